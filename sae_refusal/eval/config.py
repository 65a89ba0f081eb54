"""An eval job's settings (``sae-refusal eval --config ...``) and its intervention: plain dataclasses.

No torch needed: the command line parses and checks an eval config before the heavy libraries are imported.
:mod:`sae_refusal.eval.interventions` turns an :class:`InterventionConfig` into edits from saved artifacts;
:mod:`sae_refusal.eval.job` runs an :class:`EvalJobConfig`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sae_refusal.llm.config import GENERATION_ENGINES, LLMConfig
from sae_refusal.steer.positions import Positions, check_positions
from sae_refusal.steer.sets import SetsConfig

__all__ = [
    "CAPABILITY_TASKS",
    "INTERVENTION_KINDS",
    "CapabilitySettings",
    "EvalJobConfig",
    "GenerationSettings",
    "InterventionConfig",
    "JudgeSettings",
    "SweepSettings",
]

#: Accepted ``kind`` values.
INTERVENTION_KINDS: tuple[str, ...] = ("none", "residual", "latent", "ablation", "gate")

_SPACES = {"residual": ("caa", "sas_decoded"), "latent": ("sas",), "ablation": ("caa", "sas_decoded")}


@dataclass
class InterventionConfig:
    """One intervention (one column of the results table).

    Args:
        kind: ``none``, ``residual``, ``latent``, ``ablation`` or ``gate`` (see the module notes).
        name: Column label; default derived from the other fields (e.g. ``residual caa global -1``).
        vectors: Folder of a steering-vector artifact (``vectors.json``: written by the feature callback or
            ``sae-refusal steer``) or of a gate (``gate.json``), or a file of another tool (an lm-eval steer
            ``.pt``, a control vector ``.gguf``; see ``vectors_format``). Not used by ``none`` / ``gate``.
        space: ``caa`` or ``sas_decoded`` (residual, ablation), ``sas`` (latent).
        category: A category class name of the artifact (``safety``, ...) or ``global``.
        alpha: Signed strength (residual / latent); the removed share for ablation (1 = all of it).
        layer: Layer to act at; ``None`` takes the artifact's recorded layer.
        positions: ``all``, ``prompt``, ``generated`` or a token index.
        unit_norm: Scale the vector to norm 1 first (alpha in residual-norm units).
        sae: SAE export folder or hub id (``latent``; also given to a gate on SAE codes).
        gate: Gate folder (``gate``).
        allow_other_model: Apply an artifact recorded for another model (transfer experiments).
        allow_zero_vector: Run a column whose vector is all zeros (by default an error: it steers nothing).
        verify_sae: Check the SAE's tensor file against the sha256 its ``cfg.json`` records.
        vectors_format: What ``vectors`` is: ``auto`` (a folder is a project artifact, a ``.gguf`` file a
            llama.cpp / repeng control vector, a ``.pt`` / ``.pth`` file an lm-eval steer file or a
            steering-vectors ``layer_activations`` file, told apart by content), ``project``, ``lm-eval``,
            ``steering-vectors`` or ``gguf-control-vector``. A file gives the vector of ``layer`` (needed when
            it holds several) as the file's own edit at ``alpha`` 1; ``space`` / ``category`` do not apply
            (:mod:`sae_refusal.steer.exchange`).
    """

    kind: str = "none"
    name: str | None = None
    vectors: str | None = None
    space: str = "caa"
    category: str = "global"
    alpha: float = 1.0
    layer: int | None = None
    positions: Positions = "all"
    unit_norm: bool = False
    sae: str | None = None
    gate: str | None = None
    allow_other_model: bool = False
    allow_zero_vector: bool = False
    verify_sae: bool = True
    vectors_format: str = "auto"

    def __post_init__(self) -> None:
        if self.kind not in INTERVENTION_KINDS:
            raise ValueError(
                f"intervention.kind: expected one of {list(INTERVENTION_KINDS)}, got {self.kind!r}"
            )
        if self.kind in _SPACES and self.space not in _SPACES[self.kind]:
            raise ValueError(
                f"intervention.space: {self.kind} takes one of {list(_SPACES[self.kind])}, got {self.space!r}"
            )
        if self.kind in ("residual", "latent", "ablation") and not self.vectors:
            raise ValueError(f"intervention.vectors: kind {self.kind!r} needs a vectors (or gate) folder")
        if self.kind == "latent" and not self.sae:
            raise ValueError(
                "intervention.sae: kind 'latent' needs the SAE export the vectors were made with"
            )
        if self.kind == "gate" and not self.gate:
            raise ValueError(
                "intervention.gate: kind 'gate' needs a gate folder (written by sae-refusal steer)"
            )
        if self.layer is not None and self.layer < 0:
            raise ValueError(f"intervention.layer: must be >= 0, got {self.layer}")
        formats = ("auto", "project", "lm-eval", "steering-vectors", "gguf-control-vector")
        if self.vectors_format not in formats:
            raise ValueError(
                f"intervention.vectors_format: expected one of {list(formats)}, got {self.vectors_format!r}"
            )
        try:
            check_positions(self.positions)
        except ValueError as err:
            raise ValueError(f"intervention.positions: {err}") from err

    @property
    def label(self) -> str:
        """The column label."""
        if self.name:
            return self.name
        if self.kind == "none":
            return "unsteered"
        if self.kind == "gate":
            return f"gate {Path(str(self.gate)).name}"
        if self.kind == "ablation":
            return f"ablation {self.space} {self.category}"
        return f"{self.kind} {self.space} {self.category} {self.alpha:+g}"

    def with_alpha(self, alpha: float, category: str | None = None) -> InterventionConfig:
        """A copy at another alpha (and category); the name is re-derived."""
        values = asdict(self) | {"alpha": float(alpha), "name": None}
        if category is not None:
            values["category"] = category
        return InterventionConfig(**values)


CAPABILITY_TASKS: tuple[str, ...] = ("mmlu", "gsm8k", "truthfulqa", "next_token_kl", "reference")


@dataclass
class GenerationSettings:
    """How refusal-set answers are generated (greedy).

    Args:
        max_new_tokens: Most tokens per answer (the phrase judge reads these).
        batch_size: Prompts per ``generate`` call.
        max_length: Most prompt tokens kept (longer prompts lose their beginning).
        engine: How every generation of the job runs (refusal sets, the alpha sweep, GSM8K; the eval jobs a
            transfer job runs too): ``hf`` (Hugging Face ``generate``), ``fast`` (static KV cache, decode step
            replayed as one CUDA graph on CUDA; every intervention kind, per-row gates included) or ``auto``
            (``fast`` on CUDA, ``hf`` elsewhere, and ``hf`` where the fast engine cannot reproduce
            ``generate``). Same greedy tokens up to floating-point rounding (:mod:`sae_refusal.llm.engine`).
            The steer job has no such setting: it generates nothing (it scores first tokens with one
            forward per batch).
    """

    max_new_tokens: int = 64
    batch_size: int = 32
    max_length: int = 1024
    engine: str = "auto"

    def __post_init__(self) -> None:
        for key in ("max_new_tokens", "batch_size", "max_length"):
            if getattr(self, key) < 1:
                raise ValueError(f"generation.{key}: must be >= 1, got {getattr(self, key)}")
        if self.engine not in GENERATION_ENGINES:
            raise ValueError(
                f"generation.engine: expected one of {', '.join(GENERATION_ENGINES)}, got {self.engine!r}"
            )


@dataclass
class JudgeSettings:
    """Which refusal judges run, and whose verdicts make the table.

    Args:
        names: Judges: ``first_token`` (refusal-token models: the first generated token), ``phrase`` (refusal
            phrases in the answer, any model), ``model`` (a local LLM judge or guard classifier,
            ``model_path``).
        primary: The judge whose rates fill the table; ``None``: ``first_token`` when the model has the
            refusal tokens and it is in ``names``, else ``phrase``, else the first name.
        model_path: Folder of the ``model`` judge.
        model_mode: ``auto``, ``classifier`` or ``chat``.
    """

    names: list[str] = field(default_factory=lambda: ["first_token", "phrase"])
    primary: str | None = None
    model_path: str | None = None
    model_mode: str = "auto"

    def __post_init__(self) -> None:
        if not self.names:
            raise ValueError("judges.names: give at least one judge")
        if self.primary is not None and self.primary not in self.names:
            raise ValueError(f"judges.primary: {self.primary!r} is not in judges.names {self.names}")


@dataclass
class CapabilitySettings:
    """Capability measures and their subsample sizes (``None`` = the whole set).

    Args:
        tasks: Some of ``mmlu``, ``gsm8k``, ``truthfulqa``, ``next_token_kl``, ``reference``.
        data_root: Folder of the local MMLU / GSM8K / TruthfulQA copies.
        mmlu_n: MMLU test questions (a seeded draw over all subjects).
        mmlu_k_shot: Dev examples per question (same subject).
        gsm8k_n: GSM8K test problems.
        gsm8k_k_shot: Worked train examples in the prompt.
        gsm8k_max_new_tokens: Most tokens per solution.
        truthfulqa_n: TruthfulQA questions.
        kl_n: Held-out benign prompts for the next-token KL.
        reference_n: Held-out prompts with reference answers for perplexity.
        batch_size: Rows per forward.
        max_length: Most tokens per scored row.
        seed: Seed of the subsample draws.
    """

    tasks: list[str] = field(default_factory=lambda: list(CAPABILITY_TASKS))
    data_root: str = "../shared/data"
    mmlu_n: int | None = 200
    mmlu_k_shot: int = 5
    gsm8k_n: int | None = 50
    gsm8k_k_shot: int = 4
    gsm8k_max_new_tokens: int = 256
    truthfulqa_n: int | None = 200
    kl_n: int | None = 100
    reference_n: int | None = 100
    batch_size: int = 16
    max_length: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in CAPABILITY_TASKS]
        if unknown:
            raise ValueError(
                f"capability.tasks: unknown {unknown}; expected some of {list(CAPABILITY_TASKS)}"
            )
        for key in ("mmlu_n", "gsm8k_n", "truthfulqa_n", "kl_n", "reference_n"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"capability.{key}: must be >= 1 or null, got {value}")
        for key in ("batch_size", "max_length", "gsm8k_max_new_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"capability.{key}: must be >= 1")
        if self.mmlu_k_shot < 0 or self.gsm8k_k_shot < 0:
            raise ValueError("capability.mmlu_k_shot / gsm8k_k_shot: must be >= 0")


@dataclass
class SweepSettings:
    """Alpha sweep of one steering intervention, per category and global.

    Args:
        alphas: Signed alphas (0, the unsteered model, is added); empty: no sweep.
        categories: Category class names of the vectors, and/or ``global``.
        intervention: The swept intervention (residual or latent); ``None``: the job's own.
        max_new_tokens: Tokens generated per prompt at each point (the first-token judge needs one; the
            phrase judge reads these).
        capability: Also measure next-token KL and reference perplexity at each point.
    """

    alphas: list[float] = field(default_factory=list)
    categories: list[str] = field(default_factory=lambda: ["global"])
    intervention: InterventionConfig | None = None
    max_new_tokens: int = 8
    capability: bool = True

    def __post_init__(self) -> None:
        if not all(math.isfinite(a) for a in self.alphas):
            raise ValueError(f"sweep.alphas: must be finite, got {self.alphas}")
        if self.alphas and not self.categories:
            raise ValueError("sweep.categories: give at least one category (or global)")
        if self.max_new_tokens < 1:
            raise ValueError("sweep.max_new_tokens: must be >= 1")


@dataclass
class EvalJobConfig:
    """An eval job (``sae-refusal eval --config lightning_configs/eval/...``).

    Args:
        llm: The model evaluated (``adapter_path`` = a refusal-token artifact, ``null`` for the base model).
        sets: Prompt sets and splits (the model's fine-tuning prompt set and split, so its held-out
            prompts stay held out, and the external sets); only ``test`` splits are reported.
        intervention: What is applied (``kind: none`` = unsteered).
        generation: Generation settings of the refusal sets.
        judges: Refusal judges.
        capability: Capability measures.
        sweep: Optional alpha sweep.
        out_dir: Output folder; must not exist yet.
        chat_template: Template overriding the tokenizer's.
        system_prompt: Optional system message.
        n_boot: Bootstrap resamples per confidence interval.
        seed: Bootstrap seed.
    """

    llm: LLMConfig
    sets: SetsConfig
    intervention: InterventionConfig = field(default_factory=InterventionConfig)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    judges: JudgeSettings = field(default_factory=JudgeSettings)
    capability: CapabilitySettings = field(default_factory=CapabilitySettings)
    sweep: SweepSettings = field(default_factory=SweepSettings)
    out_dir: str = "runs/eval/unsteered"
    chat_template: str | None = None
    system_prompt: str | None = None
    n_boot: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_boot < 1:
            raise ValueError(f"n_boot: must be >= 1, got {self.n_boot}")
