"""Prompts with labels: the unit every later stage consumes.

A :class:`Prompt` is one user turn with its label (harmful / benign / ambiguous), CoCoNot category
(``None`` for benign prompts), subcategory, source name and split. A :class:`PromptSet` is an ordered,
immutable collection with unique ids and a content hash, so caches and split manifests can prove
which prompts they were built from.

A harmful prompt's class everywhere downstream (contrastive loss, feature analysis, refusal tokens) is its
category, and class 0 means benign, so a harmful prompt without a canonical CoCoNot category would silently
train and score as benign. :func:`category_problem` says when that is the case; the loaders
(:func:`~sae_refusal.data.sources.load_source`, :meth:`PromptSet.from_jsonl`) and the activation data module
refuse such prompts, naming where they came from.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from sae_refusal.atomic import atomic_write_text
from sae_refusal.categories import COCONOT_CATEGORIES


class Label(StrEnum):
    """What a prompt should get from a well-behaved refusal-token model."""

    HARMFUL = "harmful"  #: should be refused (``[refuse_<category>]``)
    BENIGN = "benign"  #: should be answered (``[respond]``)
    AMBIGUOUS = "ambiguous"  #: looks refusable but should be answered (contrast / over-refusal sets)


@dataclass(frozen=True)
class Prompt:
    """One prompt.

    Args:
        id: Unique id within a prompt set, conventionally ``"<source>:<row id>"``.
        text: The user message (no chat template applied).
        label: Harmful, benign or ambiguous.
        category: CoCoNot category (canonical name) or ``None``.
        subcategory: Finer category from the source, or ``None``.
        source: Name of the source the prompt was loaded from.
        split: ``"train"``, ``"val"``, ``"test"`` or ``None`` before a split manifest is applied.
        response: A reference answer when the source has one (CoCoNot contrast ``chosen``, UltraChat).
        tags: ``(column, value)`` pairs of the source's tag columns (``adversarial``, ``language``, ...): the
            slices a report breaks rates down by. Not part of :meth:`PromptSet.content_hash`.
    """

    id: str
    text: str
    label: Label
    category: str | None = None
    subcategory: str | None = None
    source: str = ""
    split: str | None = None
    response: str | None = None
    tags: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (``tags`` as an object, left out when there are none)."""
        row = asdict(self)
        row["label"] = str(self.label)
        if self.tags:
            row["tags"] = dict(self.tags)
        else:
            del row["tags"]
        return row

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> Prompt:
        """Inverse of :meth:`to_json`."""
        tags = tuple((str(k), str(v)) for k, v in dict(row.get("tags") or {}).items())
        return cls(**{**row, "label": Label(row["label"]), "tags": tags})

    @property
    def tag_dict(self) -> dict[str, str]:
        """``tags`` as a dict (column -> value)."""
        return dict(self.tags)


def category_problem(prompt: Prompt) -> str | None:
    """Why ``prompt``'s category cannot be used for its label, or ``None`` when it can.

    A harmful prompt needs a canonical CoCoNot category (without one it would count as benign, class 0);
    benign and ambiguous prompts may have none. A category, when present, must be a canonical name
    (:data:`~sae_refusal.categories.COCONOT_CATEGORIES`); loaders resolve short names before this point.
    """
    if prompt.category is None:
        if prompt.label == Label.HARMFUL:
            return "harmful prompt without a category (it would count as benign)"
        return None
    if prompt.category not in COCONOT_CATEGORIES:
        return f"unknown category {prompt.category!r}; expected one of {list(COCONOT_CATEGORIES)}"
    return None


class PromptSet(Sequence[Prompt]):
    """An ordered collection of prompts with unique ids.

    Args:
        prompts: The prompts, in order.

    Raises:
        ValueError: If two prompts share an id.
    """

    def __init__(self, prompts: Iterable[Prompt]) -> None:
        self._prompts: tuple[Prompt, ...] = tuple(prompts)
        counts = Counter(p.id for p in self._prompts)
        dupes = [i for i, n in counts.items() if n > 1]
        if dupes:
            raise ValueError(f"prompt ids must be unique; duplicated: {dupes[:5]}")

    def __len__(self) -> int:
        return len(self._prompts)

    def __getitem__(self, index: int) -> Prompt:  # type: ignore[override]
        return self._prompts[index]

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self._prompts)

    def __add__(self, other: PromptSet) -> PromptSet:
        return PromptSet((*self._prompts, *other._prompts))

    def __repr__(self) -> str:
        return f"PromptSet({len(self)} prompts, {dict(self.counts())})"

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self._prompts]

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self._prompts]

    def filter(self, predicate: Callable[[Prompt], bool]) -> PromptSet:
        """Prompts for which ``predicate`` is true, order kept."""
        return PromptSet(p for p in self._prompts if predicate(p))

    def split(self, name: str) -> PromptSet:
        """Prompts of one split (``"train"``, ``"val"``, ``"test"``)."""
        return self.filter(lambda p: p.split == name)

    def with_splits(self, split_of: dict[str, str]) -> PromptSet:
        """A copy with each prompt's ``split`` set from ``split_of[id]``.

        Raises:
            KeyError: If a prompt's id is missing from ``split_of``.
        """
        missing = [p.id for p in self._prompts if p.id not in split_of]
        if missing:
            raise KeyError(f"split manifest has no entry for {len(missing)} prompt ids, e.g. {missing[:3]}")
        return PromptSet(replace(p, split=split_of[p.id]) for p in self._prompts)

    def counts(self) -> Counter[str]:
        """Number of prompts per ``label/category`` key."""
        return Counter(f"{p.label}/{p.category}" if p.category else str(p.label) for p in self._prompts)

    def check_categories(self, origin: str = "prompt set") -> None:
        """Raise if a prompt's category cannot be used for its label (see :func:`category_problem`).

        Args:
            origin: Where the prompts came from, for the message (e.g. a file or config key).

        Raises:
            ValueError: Naming ``origin`` and the first offending prompts (id, source, row, reason).
        """
        bad = [(i, p, why) for i, p in enumerate(self._prompts) if (why := category_problem(p)) is not None]
        if bad:
            shown = "; ".join(f"row {i} id {p.id!r} (source {p.source!r}): {why}" for i, p, why in bad[:3])
            raise ValueError(f"{origin}: {len(bad)} prompts have an unusable category, e.g. {shown}")

    def content_hash(self) -> str:
        """SHA-256 over ids, texts, labels and categories in order (split and response excluded)."""
        digest = hashlib.sha256()
        for p in self._prompts:
            digest.update(json.dumps([p.id, p.text, str(p.label), p.category]).encode())
            digest.update(b"\n")
        return digest.hexdigest()

    def to_jsonl(self, path: str | os.PathLike[str]) -> None:
        """Write one JSON object per line, atomically (temp file + rename)."""
        lines = (json.dumps(p.to_json(), ensure_ascii=False) + "\n" for p in self._prompts)
        atomic_write_text(path, "".join(lines))

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike[str]) -> PromptSet:
        """Read a file written by :meth:`to_jsonl`.

        Raises:
            FileNotFoundError: If ``path`` does not exist.
            ValueError: If a line is not a valid prompt record, or its category cannot be used for its
                label (:func:`category_problem`); the line number and prompt id are named.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        prompts = []
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    prompt = Prompt.from_json(json.loads(line))
                except (ValueError, TypeError, KeyError) as err:
                    raise ValueError(f"{path}:{lineno}: not a prompt record ({err})") from err
                problem = category_problem(prompt)
                if problem is not None:
                    raise ValueError(f"{path}:{lineno}: prompt {prompt.id!r}: {problem}")
                prompts.append(prompt)
        return cls(prompts)
