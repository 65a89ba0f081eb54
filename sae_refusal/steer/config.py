"""The steering study's settings (``sae-refusal steer --config ...``): plain dataclasses, no torch needed.

Kept apart from :mod:`sae_refusal.steer.job` so the command line parses and checks a study config before the
heavy libraries are imported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sae_refusal.llm.config import LLMConfig
from sae_refusal.steer.sets import SetsConfig

__all__ = ["CALIBRATIONS", "ENSEMBLE_RULES", "GATE_KINDS", "JUDGES", "SteerJobConfig", "StudySettings"]

#: How a first token is read: the whole-vocabulary argmax (``emitted``) or over the refusal tokens only.
JUDGES = ("emitted", "restricted")
GATE_KINDS = (
    "refusal_token",
    "probe",
    "probe_model_only",
    "distance",
    "probe_multilayer",
    "probe_sae",
    "head",
    "ensemble",
)
CALIBRATIONS = ("platt", "isotonic")
ENSEMBLE_RULES = ("mean", "all", "any")


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
        gates: Gates to fit and tune: ``refusal_token`` (graded: ``1 - P(respond)``), ``probe`` (steering
            layer), ``probe_model_only`` (the probe fitted on the model's own sources only, without the
            external train splits), ``distance``, ``probe_multilayer`` (``gate_layers`` concatenated),
            ``probe_sae`` and ``head`` (on the codes of an SAE the study trains on its train residuals),
            ``ensemble`` (``ensemble_members`` combined by ``ensemble_rule``).
        floor_gain: The harmful-refusal floor is the unsteered validation rate plus this.
        do_no_harm: Tune under per-set non-inferiority: no harm group (each category of the harmful source,
            each other harmful set, the jailbreak-framed harmful prompts) may lose more than ``tolerance``
            of its unsteered validation refusal rate.
        tolerance: The do-no-harm tolerance (a share).
        act_on: ``disagreement``: steer only where the gate's call and the model's own first token disagree;
            ``all``: every row gets its band's alpha.
        category_vectors: Also tune and report category-conditional steering (``category_pos``: prompts
            called harmful along their predicted category's vector), one pass per category and positive
            alpha.
        gate_layers: Layers of the multi-layer probe (``None``: ``layers``; the steering layer is added).
        calibration: ``platt`` or ``isotonic`` on validation scores (thresholds become probabilities), or
            ``None``.
        probe_C: Inverse L2 strengths tried for the probes, chosen by validation AUC.
        ensemble_members: Gate kinds the ensemble combines.
        ensemble_rule: ``mean`` (of calibrated scores), ``all`` (harmful only if every member says so) or
            ``any``.
        gate_sae_latents: Latents of the study's SAE (``probe_sae``, ``head``).
        gate_sae_k: Its active latents per row.
        gate_sae_steps: Its training steps.
        misrouted_examples: Misrouted harmful prompts listed per set for the best gate.
        n_boot: Bootstrap resamples of the per-set CIs.
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
    do_no_harm: bool = True
    tolerance: float = 0.02
    act_on: str = "disagreement"
    category_vectors: bool = True
    gate_layers: list[int] | None = None
    calibration: str | None = "platt"
    probe_C: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    ensemble_members: list[str] = field(
        default_factory=lambda: ["probe_multilayer", "refusal_token", "distance"]
    )
    ensemble_rule: str = "mean"
    gate_sae_latents: int = 2048
    gate_sae_k: int = 32
    gate_sae_steps: int = 2000
    misrouted_examples: int = 8
    n_boot: int = 2000
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
        members = [g for g in self.ensemble_members if g not in GATE_KINDS or g == "ensemble"]
        if members or not self.ensemble_members:
            raise ValueError(
                f"study.ensemble_members: expected gate kinds (not ensemble), got {self.ensemble_members}"
            )
        if self.ensemble_rule not in ENSEMBLE_RULES:
            raise ValueError(
                f"study.ensemble_rule: expected one of {list(ENSEMBLE_RULES)}, got {self.ensemble_rule!r}"
            )
        if self.calibration is not None and self.calibration not in CALIBRATIONS:
            raise ValueError(
                f"study.calibration: expected one of {list(CALIBRATIONS)} or null, got {self.calibration!r}"
            )
        if self.act_on not in ("all", "disagreement"):
            raise ValueError(f"study.act_on: expected 'all' or 'disagreement', got {self.act_on!r}")
        if not 0.0 <= self.tolerance <= 1.0:
            raise ValueError(f"study.tolerance: must lie in [0, 1], got {self.tolerance}")
        if not self.probe_C or any(not (c > 0 and math.isfinite(c)) for c in self.probe_C):
            raise ValueError(f"study.probe_C: give positive finite values, got {self.probe_C}")
        if min(self.gate_sae_latents, self.gate_sae_k, self.gate_sae_steps, self.n_boot) < 1:
            raise ValueError("study.gate_sae_latents, gate_sae_k, gate_sae_steps and n_boot must be >= 1")
        if self.gate_sae_k > self.gate_sae_latents:
            raise ValueError(
                f"study.gate_sae_k: {self.gate_sae_k} > gate_sae_latents {self.gate_sae_latents}"
            )
        if self.misrouted_examples < 0:
            raise ValueError(f"study.misrouted_examples: must be >= 0, got {self.misrouted_examples}")
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
