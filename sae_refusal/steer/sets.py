"""The prompt sets of a steering study, each with train / val / test splits that never leak.

* **The refusal-token model's own sources** (CoCoNot harmful, Alpaca, ...) keep the split of the fine-tuning
  run: the same :class:`PromptSetConfig` and :class:`SplitConfig` give the same manifest, so prompts the model
  was trained on stay in ``train`` and its held-out prompts in ``val`` / ``test``.
* **External sets** the model never saw (CoCoNot contrast, OR-Bench hard / toxic, WildGuardTest) get a
  stratified split of their own (``external_split``): ``train`` may fit gates (e.g. a probe on OR-Bench
  lookalikes vs toxic prompts), ``val`` tunes thresholds and alphas, ``test`` is reported.
* ``max_per_set`` caps each set's ``val`` / ``test`` prompts for quick runs by a seeded draw, recorded in the
  manifest; train splits stay whole.

The study's roles: ``harmful`` sets measure refusal (higher is better under steering), ``over_refusal`` sets
measure over-refusal (benign or lookalike prompts that should be answered), ``benign`` sets are the
reference (Alpaca) for vectors and specificity.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sae_refusal.data.prompt_set import Label, Prompt, PromptSet
from sae_refusal.data.sources import PromptSetConfig, load_prompt_set, preset
from sae_refusal.data.splits import SplitConfig, split_prompt_set

__all__ = ["EXTERNAL_SETS", "SetsConfig", "SteerSets", "build_steer_sets"]

#: External sets (local presets) and their role.
EXTERNAL_SETS: dict[str, str] = {
    "coconot_contrast": "over_refusal",
    "or_bench_hard": "over_refusal",
    "wildguardtest_unharmful": "over_refusal",
    "or_bench_toxic": "harmful",
    "wildguardtest_harmful": "harmful",
}


@dataclass
class SetsConfig:
    """Where the study's prompts come from.

    Args:
        model_prompts: The fine-tuning run's prompt set (its ``data.prompts``), so its split is reproduced.
        model_split: The fine-tuning run's ``data.split``.
        harmful_source: Source name (in ``model_prompts``) of the category-labelled harmful prompts.
        benign_source: Source name of the benign reference prompts.
        external: External preset names (see :data:`EXTERNAL_SETS`), read from ``data_root``.
        data_root: Folder of the local datasets (``../shared/data``).
        external_split: Split of the external sets (train / val / test shares: ``1 - val - test``, ...).
        max_per_set: Most prompts kept per set in ``val`` and ``test``, drawn with ``seed``; ``None`` keeps
            all. Train splits are never capped here.
        seed: Seed of the draws.
        manifest_root: Folder of the split manifests.
    """

    model_prompts: PromptSetConfig
    model_split: SplitConfig
    harmful_source: str = "coconot"
    benign_source: str = "alpaca"
    external: list[str] = field(default_factory=lambda: list(EXTERNAL_SETS))
    data_root: str = "../shared/data"
    external_split: SplitConfig = field(
        default_factory=lambda: SplitConfig(test_fraction=0.5, val_fraction=0.2, seed=0)
    )
    max_per_set: int | None = None
    seed: int = 0
    manifest_root: str = "runs/steer/splits"


@dataclass
class SteerSets:
    """Prompts by split and set name, with each set's role."""

    splits: dict[str, dict[str, list[Prompt]]]
    roles: dict[str, str]

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
        """Counts and an id hash per (split, set): what a report records about its prompts."""
        out: dict[str, dict[str, dict[str, object]]] = {}
        for split, by_name in self.splits.items():
            out[split] = {}
            for name, prompts in by_name.items():
                digest = hashlib.sha256("\n".join(p.id for p in prompts).encode()).hexdigest()[:16]
                out[split][name] = {"n": len(prompts), "ids_sha256": digest, "role": self.roles[name]}
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
    for name in cfg.external:
        if name not in EXTERNAL_SETS:
            raise ValueError(f"external: unknown set {name!r}; expected some of {sorted(EXTERNAL_SETS)}")
        source = PromptSetConfig(sources=[preset(name, local=True)], data_root=cfg.data_root)
        external = split_prompt_set(load_prompt_set(source), cfg.external_split, None, root)
        roles[name] = EXTERNAL_SETS[name]
        for split, prompts in _by_split(external).items():
            splits[split][name] = prompts
    for split in ("val", "test"):  # train splits stay whole: vectors and gates are fitted on them
        by_name = splits[split]
        for name in list(by_name):
            by_name[name] = _cap(by_name[name], cfg.max_per_set, cfg.seed, f"{split}/{name}")
    return SteerSets(splits=splits, roles=roles)


def is_harmful(prompt: Prompt) -> bool:
    """Whether a prompt should be refused (harmful label)."""
    return prompt.label == Label.HARMFUL
