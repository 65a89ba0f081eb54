"""The steering study's settings (``sae-refusal steer --config ...``): plain dataclasses, no torch needed.

Kept apart from :mod:`sae_refusal.steer.job` so the command line parses and checks a study config before the
heavy libraries are imported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sae_refusal.llm.config import LLMConfig
from sae_refusal.steer.sets import SetsConfig

__all__ = ["GATE_KINDS", "JUDGES", "SteerJobConfig", "StudySettings"]

#: How a first token is read: the whole-vocabulary argmax (``emitted``) or over the refusal tokens only.
JUDGES = ("emitted", "restricted")
GATE_KINDS = ("refusal_token", "probe", "distance")


@dataclass
class StudySettings:
    """What the study measures.

    Args:
        layers: Candidate layers for the vectors (and the layer choice).
        layer: Steer at this layer; ``None`` chooses among ``layers`` (see the module notes).
        select_n: Validation benign prompts used to choose the layer.
        specificity_alphas: Alphas tried per category (units of the category's CAA vector).
        specificity_goal: Specificity every category should reach at one alpha.
        sweep_alphas: Signed alphas of the outcome tables along the global vector (0 is added).
        gates: Gates to fit and tune: ``refusal_token``, ``probe``, ``distance``.
        floor_gain: The harmful-refusal floor is the unsteered validation rate plus this.
        max_benign_train: Most benign TRAIN prompts used for vectors and gates (a seeded draw); ``None``: all.
        batch_size: Prompts per forward.
        judge: First-token reading: ``emitted`` (the whole-vocabulary argmax, what ``generate`` emits; a
            token that is no refusal token counts as "other", not refused) or ``restricted`` (argmax over
            the refusal tokens only, the fine-tuning report's reading).
    """

    layers: list[int] = field(default_factory=lambda: [9, 12, 15, 18, 21])
    layer: int | None = None
    select_n: int = 40
    specificity_alphas: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    specificity_goal: float = 0.9
    sweep_alphas: list[float] = field(default_factory=lambda: [-2.0, -1.0, -0.5, 0.5, 1.0, 2.0])
    gates: list[str] = field(default_factory=lambda: list(GATE_KINDS))
    floor_gain: float = 0.10
    max_benign_train: int | None = 600
    batch_size: int = 32
    judge: str = "emitted"

    def __post_init__(self) -> None:
        if self.judge not in JUDGES:
            raise ValueError(f"study.judge: expected one of {list(JUDGES)}, got {self.judge!r}")
        if not self.layers:
            raise ValueError("study.layers: give at least one candidate layer")
        unknown = [g for g in self.gates if g not in GATE_KINDS]
        if unknown:
            raise ValueError(f"study.gates: unknown gates {unknown}; expected some of {list(GATE_KINDS)}")
        if not self.specificity_alphas or any(a <= 0 for a in self.specificity_alphas):
            raise ValueError("study.specificity_alphas: give positive alphas")
        if not all(math.isfinite(a) for a in self.sweep_alphas) or not any(a > 0 for a in self.sweep_alphas):
            raise ValueError("study.sweep_alphas: give finite alphas, at least one positive")
        if not 0.0 <= self.floor_gain <= 1.0:
            raise ValueError(f"study.floor_gain: must lie in [0, 1], got {self.floor_gain}")
        if self.select_n < 1 or self.batch_size < 1:
            raise ValueError("study.select_n and study.batch_size must be >= 1")


@dataclass
class SteerJobConfig:
    """The steering study's settings (``sae-refusal steer --config lightning_configs/steer/...``).

    Args:
        llm: The refusal-token model (``adapter_path`` = its artifact).
        sets: Prompt sets and splits (the fine-tuning run's prompt set and split, external sets).
        study: What is measured.
        out_dir: Output folder; must not exist yet.
        chat_template: Template overriding the tokenizer's.
        system_prompt: Optional system message.
    """

    llm: LLMConfig
    sets: SetsConfig
    study: StudySettings = field(default_factory=StudySettings)
    out_dir: str = "runs/steer/refuse_smollm2"
    chat_template: str | None = None
    system_prompt: str | None = None
