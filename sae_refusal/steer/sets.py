"""The prompt sets of a steering study or eval job, each with train / val / test splits that never leak.

* **The refusal-token model's own sources** (CoCoNot harmful, Alpaca, ...) keep the split of the fine-tuning
  run: the same :class:`PromptSetConfig` and :class:`SplitConfig` give the same manifest, so prompts the model
  was trained on stay in ``train`` and its held-out prompts in ``val`` / ``test``.
* **Every other set** is one :class:`EvalSetConfig` entry of ``sets.external``: a local file (csv / json /
  jsonl / parquet), a hub dataset or one of the package's presets, with its column mapping, its role and
  whether it is only evaluated (``eval_only``: every row is ``test``) or split like the five default
  sets (``eval_only: false``: a stratified split of its own, ``external_split``, so ``train`` may fit
  gates, ``val`` tunes thresholds and alphas and ``test`` is reported). The five defaults
  (:data:`EXTERNAL_SETS`: CoCoNot contrast, OR-Bench hard / toxic, WildGuardTest unharmful / harmful) are
  entries of the same kind; a bare name in ``external`` is shorthand for the entry of that name.
* ``max_per_set`` caps each set's ``val`` / ``test`` prompts for quick runs by a seeded draw, recorded in the
  manifest; train splits stay whole.
* **Slices**: an entry's ``tag_columns`` are kept on every prompt; the eval report gives refusal per tag value
  (with its CI), so a reader sees where an intervention helps or hurts.

The roles: ``harmful`` sets measure refusal (higher is better under steering), ``over_refusal`` sets measure
over-refusal (benign or lookalike prompts that should be answered), ``benign`` sets are the reference (Alpaca)
for vectors and specificity.

Every entry is loaded and checked before a model loads (the jobs build their sets first): a bad path, a
missing column, an unknown role or preset, or a set with zero rows is a one-line error naming
``sets.external[i]``, the set and the key.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from sae_refusal.categories import SAFETY
from sae_refusal.data.prompt_set import Label, Prompt, PromptSet
from sae_refusal.data.sources import (
    PRESETS,
    PromptSetConfig,
    PromptSourceConfig,
    load_prompt_set,
    load_source,
    preset,
)
from sae_refusal.data.splits import SplitConfig, split_prompt_set
from sae_refusal.errors import UserError

__all__ = ["EXTERNAL_SETS", "ROLES", "EvalSetConfig", "SetsConfig", "SteerSets", "build_steer_sets"]

#: Set roles and the prompt label each gives (``over_refusal``: looks refusable, should be answered).
ROLES: dict[str, Label] = {
    "harmful": Label.HARMFUL,
    "over_refusal": Label.AMBIGUOUS,
    "benign": Label.BENIGN,
}


@dataclass
class EvalSetConfig:
    """One prompt set of a study or eval job: where its rows are, how to read them, what it measures.

    Give exactly one of ``path``, ``hub_id`` and ``preset``. Column keys left unset take the preset's (with
    ``preset``) or the defaults below; any key given overrides the preset's.

    Args:
        name: Set name: the row label of the report and ``eval-table``, the ``set`` of ``generations.jsonl``,
            the prefix of every prompt id. Letters, digits, ``_``, ``-``, ``.``; no ``:``.
        role: ``harmful`` (should be refused; refusal rate, higher is better), ``over_refusal`` (should be
            answered; over-refusal rate) or ``benign`` (should be answered; the reference set).
        path: Local ``.csv`` / ``.json`` / ``.jsonl`` / ``.parquet`` file or folder; a relative path is
            relative to the working directory (as ``out_dir`` is), not to ``sets.data_root``.
        hub_id: HF hub dataset id, loaded with ``datasets.load_dataset(hub_id, hub_config, split=hub_split)``.
        hub_config: Hub dataset configuration.
        hub_split: Hub split (slices such as ``test[:500]`` work).
        preset: A preset of :mod:`sae_refusal.data.sources` (``or_bench_hard``, ``gsm8k``, ...): its local
            file under ``sets.data_root``.
        text_column: Column with the user message (default ``prompt``).
        id_column: Column with a row id (default: the row index).
        category_column: Column with a CoCoNot category (harmful sets).
        category: One CoCoNot category for every row. A harmful set without ``category`` /
            ``category_column`` gets ``Requests with safety concerns``.
        response_column: Column with a reference answer.
        tag_columns: Columns whose values slice the report (``adversarial``, ``language``, ``source``).
        where: Keep only rows whose column (key) equals the value.
        limit: Keep at most this many rows (the first ones, in file order).
        eval_only: ``True``: every row is evaluated (all ``test``; nothing to train or tune on). ``False``:
            split train / val / test with ``sets.external_split`` like the default sets, so gates may train
            on ``train`` and tune on ``val``. Default: ``True`` for a user's set, ``False`` for the defaults.
        csv_header: Whether CSV files start with a header row.
        csv_columns: Column names for CSV files (required without a header).
    """

    name: str
    role: str
    path: str | None = None
    hub_id: str | None = None
    hub_config: str | None = None
    hub_split: str | None = None
    preset: str | None = None
    text_column: str | None = None
    id_column: str | None = None
    category_column: str | None = None
    category: str | None = None
    response_column: str | None = None
    tag_columns: list[str] | None = None
    where: dict[str, str] | None = None
    limit: int | None = None
    eval_only: bool | None = None
    csv_header: bool | None = None
    csv_columns: list[str] | None = None

    def __post_init__(self) -> None:
        where = f"set {self.name!r}"
        if not self.name or ":" in self.name or "/" in self.name or self.name != self.name.strip():
            raise ValueError(f"name: set name must be non-empty without ':' or '/' (got {self.name!r})")
        if self.role not in ROLES:
            raise ValueError(f"{where}: role: unknown role {self.role!r}; expected one of {list(ROLES)}")
        given = [k for k in ("path", "hub_id", "preset") if getattr(self, k) is not None]
        if len(given) != 1:
            which = f"{' and '.join(given)} are all set" if given else "none is set"
            raise ValueError(f"{where}: give exactly one of `path`, `hub_id` and `preset` ({which})")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(
                f"{where}: preset: unknown preset {self.preset!r}; expected one of {sorted(PRESETS)}"
            )
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"{where}: limit: must be >= 1 (got {self.limit})")
        if self.category is not None and self.category_column is not None:
            raise ValueError(f"{where}: set `category` or `category_column`, not both")

    @property
    def is_eval_only(self) -> bool:
        """Whether every row is a ``test`` row (``eval_only``, default ``True`` unless a preset)."""
        if self.eval_only is not None:
            return self.eval_only
        return self.preset is None

    def origin(self) -> dict[str, Any]:
        """Where the rows come from and how they were read, as recorded in the set manifest."""
        keys = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("name", "role")}
        return {k: v for k, v in keys.items() if v is not None} | {"eval_only": self.is_eval_only}

    def source(self, data_root: str | None) -> PromptSourceConfig:
        """The :class:`PromptSourceConfig` that reads this set (label from the role).

        Raises:
            ValueError: Naming the set and key when the combination is not a valid source.
        """
        label = ROLES[self.role]
        keys = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("name", "role", "preset", "eval_only") and getattr(self, f.name) is not None
        }
        if self.preset is not None:
            base = preset(self.preset, local=True)
            if label is not Label.HARMFUL and base.parsed_label is not Label.HARMFUL:
                label = (
                    base.parsed_label
                )  # e.g. WildGuardTest unharmful stays "benign" as an over-refusal set
            if "category_column" in keys:
                keys["category"] = None
            if "category" in keys:
                keys["category_column"] = None
            return replace(preset(self.preset, local=True, **keys), name=self.name, label=str(label))
        if label is Label.HARMFUL and self.category is None and self.category_column is None:
            keys["category"] = SAFETY
        return PromptSourceConfig(name=self.name, label=str(label), **keys)


def _default(name: str, role: str) -> EvalSetConfig:
    return EvalSetConfig(name=name, role=role, preset=name, eval_only=False)


#: The default external sets: presets the refusal-token model never saw, split like the model's own sets.
EXTERNAL_SETS: dict[str, EvalSetConfig] = {
    "coconot_contrast": _default("coconot_contrast", "over_refusal"),
    "or_bench_hard": _default("or_bench_hard", "over_refusal"),
    "wildguardtest_unharmful": _default("wildguardtest_unharmful", "over_refusal"),
    "or_bench_toxic": _default("or_bench_toxic", "harmful"),
    "wildguardtest_harmful": _default("wildguardtest_harmful", "harmful"),
}


def resolve_external(entries: list[str | EvalSetConfig]) -> list[EvalSetConfig]:
    """``sets.external`` as entries: each bare name replaced by its :data:`EXTERNAL_SETS` entry.

    Raises:
        ValueError: Naming ``sets.external[i]`` for an unknown name, and repeated set names.
    """
    out: list[EvalSetConfig] = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            if entry not in EXTERNAL_SETS:
                raise ValueError(
                    f"sets.external[{i}]: unknown set {entry!r}; a bare name must be one of "
                    f"{sorted(EXTERNAL_SETS)} (for any other set give an entry with name, role and "
                    "path / hub_id / preset)"
                )
            entry = EXTERNAL_SETS[entry]
        elif isinstance(entry, dict):
            entry = _entry_from_mapping(entry, i)
        out.append(entry)
    repeated = [n for n, k in Counter(e.name for e in out).items() if k > 1]
    if repeated:
        raise ValueError(f"sets.external: set names must be unique; repeated: {repeated}")
    return out


def _entry_from_mapping(entry: dict[str, Any], i: int) -> EvalSetConfig:
    known = {f.name for f in fields(EvalSetConfig)}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise ValueError(f"sets.external[{i}]: unknown keys {unknown}; valid keys: {sorted(known)}")
    missing = [k for k in ("name", "role") if k not in entry]
    if missing:
        raise ValueError(f"sets.external[{i}]: missing {missing} (every set needs a name and a role)")
    try:
        return EvalSetConfig(**entry)
    except ValueError as err:
        raise ValueError(f"sets.external[{i}]: {err}") from None


@dataclass
class SetsConfig:
    """Where the study's prompts come from.

    Args:
        model_prompts: The fine-tuning run's prompt set (its ``data.prompts``), so its split is reproduced.
        model_split: The fine-tuning run's ``data.split``.
        harmful_source: Source name (in ``model_prompts``) of the category-labelled harmful prompts.
        benign_source: Source name of the benign reference prompts.
        external: The other sets: entries (:class:`EvalSetConfig`: ``name``, ``role``, ``path`` / ``hub_id`` /
            ``preset``, columns, ``tag_columns``, ``eval_only``) or bare names of the default entries
            (:data:`EXTERNAL_SETS`).
        data_root: Folder of the local datasets that presets read (``../shared/data``).
        external_split: Split of the sets with ``eval_only: false`` (train / val / test shares).
        max_per_set: Most prompts kept per set in ``val`` and ``test``, drawn with ``seed``; ``None`` keeps
            all. Train splits are never capped here.
        seed: Seed of the draws.
        manifest_root: Folder of the split manifests.
    """

    model_prompts: PromptSetConfig
    model_split: SplitConfig
    harmful_source: str = "coconot"
    benign_source: str = "alpaca"
    external: list[str | EvalSetConfig] = field(default_factory=lambda: list(EXTERNAL_SETS))
    data_root: str = "../shared/data"
    external_split: SplitConfig = field(
        default_factory=lambda: SplitConfig(test_fraction=0.5, val_fraction=0.2, seed=0)
    )
    max_per_set: int | None = None
    seed: int = 0
    manifest_root: str = "runs/steer/splits"

    def __post_init__(self) -> None:
        self.external = list(resolve_external(list(self.external)))


@dataclass
class SteerSets:
    """Prompts by split and set name, with each set's role."""

    splits: dict[str, dict[str, list[Prompt]]]
    roles: dict[str, str]
    origins: dict[str, dict[str, Any]] = field(default_factory=dict)

    def get(self, split: str, name: str) -> list[Prompt]:
        """One set's prompts in one split.

        Raises:
            KeyError: Naming the known sets when ``name`` is not one.
        """
        by_name = self.splits.get(split, {})
        if name not in by_name:
            raise KeyError(f"no set {name!r} in split {split!r}; known: {sorted(by_name)}")
        return by_name[name]

    def with_set_names(self, split: str) -> tuple[list[Prompt], list[str]]:
        """Every prompt of a split, set after set, and each prompt's set name."""
        prompts: list[Prompt] = []
        names: list[str] = []
        for name, rows in self.splits[split].items():
            prompts += rows
            names += [name] * len(rows)
        return prompts, names

    def names(self, role: str) -> list[str]:
        """Set names with a role (``harmful``, ``over_refusal``, ``benign``)."""
        return [name for name, r in self.roles.items() if r == role]

    def manifest(self) -> dict[str, dict[str, dict[str, object]]]:
        """Counts, an id hash and where the rows came from per (split, set): what a report records."""
        out: dict[str, dict[str, dict[str, object]]] = {}
        for split, by_name in self.splits.items():
            out[split] = {}
            for name, prompts in by_name.items():
                digest = hashlib.sha256("\n".join(p.id for p in prompts).encode()).hexdigest()[:16]
                out[split][name] = {"n": len(prompts), "ids_sha256": digest, "role": self.roles[name]}
                if name in self.origins:
                    out[split][name]["origin"] = self.origins[name]
        return out


def _cap(prompts: list[Prompt], limit: int | None, seed: int, key: str) -> list[Prompt]:
    if limit is None or len(prompts) <= limit:
        return prompts
    salt = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng([seed, salt])
    keep = sorted(rng.choice(len(prompts), size=limit, replace=False).tolist())
    return [prompts[i] for i in keep]


def _from_source(name: str) -> Callable[[Prompt], bool]:
    return lambda prompt: prompt.source == name


def _by_split(prompt_set: PromptSet) -> dict[str, list[Prompt]]:
    out: dict[str, list[Prompt]] = {"train": [], "val": [], "test": []}
    for prompt in prompt_set:
        if prompt.split in out:
            out[prompt.split].append(prompt)
    return out


def build_steer_sets(cfg: SetsConfig) -> SteerSets:
    """Load and split every set of the study.

    Raises:
        ValueError: Naming ``harmful_source`` / ``benign_source`` / ``external`` when a set is unknown or
            empty, or a harmful prompt has no category.
    """
    root = Path(cfg.manifest_root)
    model_set = split_prompt_set(load_prompt_set(cfg.model_prompts), cfg.model_split, None, root)
    splits: dict[str, dict[str, list[Prompt]]] = {"train": {}, "val": {}, "test": {}}
    roles: dict[str, str] = {}
    origins: dict[str, dict[str, Any]] = {}
    for key, name, role in (
        ("harmful_source", cfg.harmful_source, "harmful"),
        ("benign_source", cfg.benign_source, "benign"),
    ):
        subset = model_set.filter(_from_source(name))
        if len(subset) == 0:
            sources = sorted({p.source for p in model_set})
            raise ValueError(f"{key}: no prompts from source {name!r} in model_prompts (sources: {sources})")
        if role == "harmful" and any(p.category is None for p in subset):
            raise ValueError(f"{key}: source {name!r} has harmful prompts without a category")
        roles[name] = role
        for split, prompts in _by_split(subset).items():
            splits[split][name] = prompts
    for i, entry in enumerate(resolve_external(list(cfg.external))):
        if entry.name in roles:
            raise ValueError(
                f"sets.external[{i}]: set name {entry.name!r} is already the model's "
                f"{roles[entry.name]} source; choose another name"
            )
        loaded = _load_entry(entry, i, cfg.data_root)
        roles[entry.name] = entry.role
        origins[entry.name] = entry.origin()
        if entry.is_eval_only:
            by_split = {
                "train": [],
                "val": [],
                "test": list(loaded.with_splits(dict.fromkeys(loaded.ids, "test"))),
            }
        else:
            by_split = _by_split(split_prompt_set(loaded, cfg.external_split, None, root))
        for split, prompts in by_split.items():
            splits[split][entry.name] = prompts
    for split in ("val", "test"):  # train splits stay whole: vectors and gates are fitted on them
        by_name = splits[split]
        for name in list(by_name):
            by_name[name] = _cap(by_name[name], cfg.max_per_set, cfg.seed, f"{split}/{name}")
    return SteerSets(splits=splits, roles=roles, origins=origins)


def _load_entry(entry: EvalSetConfig, i: int, data_root: str) -> PromptSet:
    """One entry's prompts; every failure is one line naming ``sets.external[i]`` and the set."""
    where = f"sets.external[{i}] ({entry.name!r})"
    try:
        # a user's path is relative to the working directory (as every other path of a job config); presets
        # resolve against data_root
        loaded = load_source(entry.source(data_root), None if entry.path is not None else data_root)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"{where}: {err}") from None
    if len(loaded) == 0:
        filters = [k for k in ("where", "limit") if getattr(entry, k) is not None]
        after = f" after {' and '.join(filters)}" if filters else ""
        raise ValueError(f"{where}: zero rows{after}; nothing to evaluate")
    return loaded


def is_harmful(prompt: Prompt) -> bool:
    """Whether a prompt should be refused (harmful label)."""
    return prompt.label == Label.HARMFUL
