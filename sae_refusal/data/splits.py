"""Held-out split manifests: which prompt id is train, val or test, saved as JSON beside the artifacts.

A split is made once per prompt set (:func:`make_split_manifest`), written to disk
(:func:`write_manifest`) and applied by every later stage (:func:`apply_manifest`), so a held-out prompt
never leaks into training when a stage is rerun elsewhere. :func:`load_or_create_manifest` does the usual
"reuse if it matches, create if absent, refuse if it is for other prompts" dance.

Splitting is stratified (by default per source, label and category) and deterministic: each stratum's
sorted ids are shuffled by a numpy Generator seeded from ``seed`` and the stratum key, so the result does
not depend on the order of the prompts, and adding a source leaves the other strata's splits unchanged.
Every stratum with at least two prompts gets at least one test prompt when ``test_fraction > 0`` (and one
val prompt when ``val_fraction > 0`` and three or more prompts), and keeps at least one training prompt.

The manifest records an order-independent prompt-set hash (:func:`prompt_set_hash`: the
:meth:`PromptSet.content_hash` of the prompts sorted by id).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sae_refusal.atomic import atomic_write_text
from sae_refusal.data.prompt_set import Prompt, PromptSet

#: Split names, in manifest order.
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")

#: Prompt fields a split may be stratified by.
STRATIFY_FIELDS: tuple[str, ...] = ("source", "label", "category", "subcategory")

MANIFEST_VERSION = 1


@dataclass
class SplitConfig:
    """How to split a prompt set into train / val / test.

    Args:
        test_fraction: Fraction of each stratum held out as test, in ``[0, 1)``.
        val_fraction: Fraction of each stratum held out as validation, in ``[0, 1)``.
        seed: Seed of the shuffle.
        stratify_by: Prompt fields whose value combination defines a stratum (any of ``source``,
            ``label``, ``category``, ``subcategory``); empty = one stratum.
    """

    test_fraction: float = 0.2
    val_fraction: float = 0.0
    seed: int = 0
    stratify_by: list[str] = field(default_factory=lambda: ["source", "label", "category"])

    def __post_init__(self) -> None:
        for key in ("test_fraction", "val_fraction"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"split: `{key}` must be in [0, 1) (got {value})")
        if self.test_fraction + self.val_fraction >= 1.0:
            raise ValueError(
                f"split: `test_fraction` + `val_fraction` must be < 1 "
                f"(got {self.test_fraction} + {self.val_fraction})"
            )
        unknown = [s for s in self.stratify_by if s not in STRATIFY_FIELDS]
        if unknown:
            raise ValueError(
                f"split: `stratify_by` has unknown fields {unknown}; expected some of {STRATIFY_FIELDS}"
            )


@dataclass
class SplitManifest:
    """Prompt ids per split, with what they were made from.

    Args:
        seed: Seed the split was made with.
        test_fraction: Test fraction it was made with.
        val_fraction: Validation fraction it was made with.
        stratify_by: Stratification fields it was made with.
        prompt_set_hash: :func:`prompt_set_hash` of the prompt set it was made for.
        splits: Split name -> sorted prompt ids.
        version: Manifest format version.
    """

    seed: int
    test_fraction: float
    val_fraction: float
    stratify_by: list[str]
    prompt_set_hash: str
    splits: dict[str, list[str]]
    version: int = MANIFEST_VERSION

    def split_of(self) -> dict[str, str]:
        """Prompt id -> split name."""
        return {pid: name for name, ids in self.splits.items() for pid in ids}

    def config(self) -> SplitConfig:
        """The :class:`SplitConfig` this manifest was made with."""
        return SplitConfig(
            test_fraction=self.test_fraction,
            val_fraction=self.val_fraction,
            seed=self.seed,
            stratify_by=list(self.stratify_by),
        )

    def matches(self, cfg: SplitConfig) -> bool:
        """Whether this manifest was made with ``cfg``."""
        return (
            self.seed == cfg.seed
            and math.isclose(self.test_fraction, cfg.test_fraction)
            and math.isclose(self.val_fraction, cfg.val_fraction)
            and list(self.stratify_by) == list(cfg.stratify_by)
        )

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict."""
        return {
            "version": self.version,
            "seed": self.seed,
            "test_fraction": self.test_fraction,
            "val_fraction": self.val_fraction,
            "stratify_by": list(self.stratify_by),
            "prompt_set_hash": self.prompt_set_hash,
            "splits": {name: list(ids) for name, ids in self.splits.items()},
        }

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> SplitManifest:
        """Inverse of :meth:`to_json`.

        Raises:
            KeyError: If a required key is missing.
        """
        return cls(
            seed=int(row["seed"]),
            test_fraction=float(row["test_fraction"]),
            val_fraction=float(row["val_fraction"]),
            stratify_by=[str(s) for s in row["stratify_by"]],
            prompt_set_hash=str(row["prompt_set_hash"]),
            splits={str(name): [str(i) for i in ids] for name, ids in row["splits"].items()},
            version=int(row.get("version", MANIFEST_VERSION)),
        )


def prompt_set_hash(prompt_set: PromptSet) -> str:
    """Order-independent hash of a prompt set: the content hash of its prompts sorted by id."""
    return PromptSet(sorted(prompt_set, key=lambda p: p.id)).content_hash()


def _stratum_key(prompt: Prompt, stratify_by: list[str]) -> tuple[str | None, ...]:
    values = (getattr(prompt, name) for name in stratify_by)
    return tuple(None if v is None else str(v) for v in values)


def _stratum_rng(seed: int, key: tuple[str | None, ...]) -> np.random.Generator:
    digest = hashlib.sha256(json.dumps(key).encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def _held_out_count(n: int, available: int, fraction: float) -> int:
    """Round ``n * fraction``, at least 1 when possible, leaving at least one of ``available``."""
    if fraction <= 0.0 or available <= 1:
        return 0
    count = max(1, math.floor(n * fraction + 0.5))
    return min(count, available - 1)


def make_split_manifest(prompt_set: PromptSet, cfg: SplitConfig) -> SplitManifest:
    """Split ``prompt_set`` deterministically and stratified.

    Args:
        prompt_set: The prompts to split.
        cfg: Fractions, seed and stratification.

    Returns:
        The manifest; the same for the same prompts in any order.
    """
    strata: dict[tuple[str | None, ...], list[str]] = defaultdict(list)
    for prompt in prompt_set:
        strata[_stratum_key(prompt, cfg.stratify_by)].append(prompt.id)
    splits: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    for key, ids in strata.items():
        order = sorted(ids)
        permutation = _stratum_rng(cfg.seed, key).permutation(len(order))
        shuffled = [order[i] for i in permutation]
        n = len(shuffled)
        n_test = _held_out_count(n, n, cfg.test_fraction)
        n_val = _held_out_count(n, n - n_test, cfg.val_fraction)
        splits["test"].extend(shuffled[:n_test])
        splits["val"].extend(shuffled[n_test : n_test + n_val])
        splits["train"].extend(shuffled[n_test + n_val :])
    return SplitManifest(
        seed=cfg.seed,
        test_fraction=cfg.test_fraction,
        val_fraction=cfg.val_fraction,
        stratify_by=list(cfg.stratify_by),
        prompt_set_hash=prompt_set_hash(prompt_set),
        splits={name: sorted(ids) for name, ids in splits.items()},
    )


def write_manifest(manifest: SplitManifest, path: str | os.PathLike[str]) -> None:
    """Write ``manifest`` as JSON, atomically (temp file + rename)."""
    atomic_write_text(path, json.dumps(manifest.to_json(), indent=1, ensure_ascii=False) + "\n")


def read_manifest(path: str | os.PathLike[str]) -> SplitManifest:
    """Read a manifest written by :func:`write_manifest`.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not valid JSON or not a split manifest (the file is named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split manifest not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"split manifest {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"split manifest {path}: expected a JSON object, got {type(data).__name__}")
    try:
        manifest = SplitManifest.from_json(data)
    except KeyError as err:
        raise ValueError(f"split manifest {path}: missing key {err}") from err
    except (TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"split manifest {path}: malformed ({err})") from err
    if manifest.version > MANIFEST_VERSION:
        raise ValueError(
            f"split manifest {path} has version {manifest.version}; this code reads up to {MANIFEST_VERSION}"
        )
    return manifest


def _describe_mismatch(prompt_set: PromptSet, manifest: SplitManifest) -> str:
    have = set(prompt_set.ids)
    listed = set(manifest.split_of())
    parts = []
    missing = sorted(have - listed)
    extra = sorted(listed - have)
    if missing:
        parts.append(f"{len(missing)} prompt ids are not in the manifest, e.g. {missing[:3]}")
    if extra:
        parts.append(f"{len(extra)} manifest ids are not in the prompt set, e.g. {extra[:3]}")
    if not parts:
        parts.append("same ids, but some texts, labels or categories changed")
    return "; ".join(parts)


def apply_manifest(
    prompt_set: PromptSet, manifest: SplitManifest, *, allow_subset: bool = False
) -> PromptSet:
    """A copy of ``prompt_set`` with each prompt's ``split`` set from ``manifest``.

    Args:
        prompt_set: The prompts (any order).
        manifest: The split manifest.
        allow_subset: Accept a prompt set that is a subset of the manifest's (e.g. one source of it):
            the hash is not checked, but every prompt id must be in the manifest.

    Raises:
        ValueError: If the prompt-set hash differs from the manifest's (or, with ``allow_subset``, an id
            is missing); the message says which ids are missing or extra.
    """
    split_of = manifest.split_of()
    if allow_subset:
        missing = [pid for pid in prompt_set.ids if pid not in split_of]
        if missing:
            raise ValueError(f"split manifest has no entry for {len(missing)} prompt ids, e.g. {missing[:3]}")
    else:
        actual = prompt_set_hash(prompt_set)
        if actual != manifest.prompt_set_hash:
            raise ValueError(
                f"split manifest was made for other prompts (hash {manifest.prompt_set_hash[:12]}, "
                f"this prompt set {actual[:12]}): {_describe_mismatch(prompt_set, manifest)}"
            )
    return prompt_set.with_splits(split_of)


def load_or_create_manifest(
    prompt_set: PromptSet, cfg: SplitConfig, path: str | os.PathLike[str]
) -> SplitManifest:
    """Reuse the manifest at ``path`` when it matches ``prompt_set`` and ``cfg``; create it when absent.

    Args:
        prompt_set: The prompts to split.
        cfg: The split config.
        path: Manifest file.

    Raises:
        ValueError: If ``path`` holds a manifest for other prompts or another config; it is never
            overwritten silently (delete it or choose another path).
    """
    path = Path(path)
    if not path.exists():
        manifest = make_split_manifest(prompt_set, cfg)
        write_manifest(manifest, path)
        return manifest
    manifest = read_manifest(path)
    actual = prompt_set_hash(prompt_set)
    if manifest.prompt_set_hash != actual:
        raise ValueError(
            f"split manifest {path} exists but was made for other prompts "
            f"({_describe_mismatch(prompt_set, manifest)}); delete it or choose another manifest path"
        )
    if not manifest.matches(cfg):
        raise ValueError(
            f"split manifest {path} exists but was made with {manifest.config()}, not {cfg}; "
            f"delete it or choose another manifest path"
        )
    return manifest


__all__ = [
    "SPLIT_NAMES",
    "SplitConfig",
    "SplitManifest",
    "apply_manifest",
    "load_or_create_manifest",
    "make_split_manifest",
    "prompt_set_hash",
    "read_manifest",
    "write_manifest",
]


def default_manifest_path(root: str | os.PathLike[str], prompt_set: PromptSet, cfg: SplitConfig) -> Path:
    """``<root>/splits-<prompt-set hash>-<config hash>.json``: one manifest per prompt set and config."""
    split_key = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:8]
    return Path(root) / f"splits-{prompt_set_hash(prompt_set)[:12]}-{split_key}.json"


def split_prompt_set(
    prompt_set: PromptSet,
    cfg: SplitConfig,
    manifest_path: str | os.PathLike[str] | None,
    root: str | os.PathLike[str],
) -> PromptSet:
    """``prompt_set`` with each prompt's split set from its manifest (created if absent).

    Args:
        prompt_set: All prompts.
        cfg: Split settings.
        manifest_path: Explicit manifest file, or ``None`` for :func:`default_manifest_path` under ``root``.
        root: Folder of the default manifest.
    """
    path = Path(manifest_path) if manifest_path is not None else default_manifest_path(root, prompt_set, cfg)
    return apply_manifest(prompt_set, load_or_create_manifest(prompt_set, cfg, path))
