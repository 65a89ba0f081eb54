"""Configuration of ``sae-refusal transfer`` (:mod:`sae_refusal.transfer.job`): the two models, their
artifacts, the shared prompts, the linear map, splice and eval settings. Each ``__post_init__`` names the
offending key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sae_refusal.activations.config import CacheConfig
from sae_refusal.data.sources import PromptSetConfig
from sae_refusal.data.splits import SplitConfig
from sae_refusal.eval.config import CapabilitySettings, GenerationSettings, JudgeSettings
from sae_refusal.features.config import FeatureAnalysisConfig
from sae_refusal.llm.config import LLMConfig
from sae_refusal.steer.positions import Positions
from sae_refusal.steer.sets import SetsConfig

__all__ = [
    "COLUMN_KINDS",
    "MAP_KINDS",
    "OWNERS",
    "ColumnSpec",
    "MapSettings",
    "ModelSide",
    "SpliceSettings",
    "TransferData",
    "TransferEvalSettings",
    "TransferJobConfig",
]

MAP_KINDS = ("none", "least_squares")
OWNERS = ("source", "target")
COLUMN_KINDS = ("residual", "latent", "ablation", "gate")


@dataclass
class ModelSide:
    """One model of the pair and the artifacts it brings.

    Args:
        llm: The model.
        label: Its short name in the report (e.g. ``refusal-token``, ``base``).
        sae: SAE export folder (one export with ``cfg.json``, or a folder of ``seed*/`` exports). Required for
            the source (A's SAE, applied to both models); for the target, B's own SAE (quality only).
        vectors: A steering-vector artifact (``vectors.json``) or gate folder made on this model; ``None``:
            the vectors the job computes from this model's train rows (CAA, and SAS in A's SAE).
        gates: Gate folders tuned on this model (``sae-refusal steer``), used by ``gate`` columns by name.
        layer: Layer read on this model; ``None``: ``data.layer``.
        allow_other_model: Use ``sae`` although its exports record another layer than this side reads or
            another model than ``llm`` (by default refused, naming both).
        verify_sae: Check the SAE tensor files against the sha256 their ``cfg.json`` records.
    """

    llm: LLMConfig
    label: str = ""
    sae: str | None = None
    vectors: str | None = None
    gates: list[str] = field(default_factory=list)
    layer: int | None = None
    allow_other_model: bool = False
    verify_sae: bool = True


@dataclass
class TransferData:
    """The prompts both models read (same set, same split manifest).

    Args:
        prompts: Prompt sources; ``None``: the labelled set shipped with the package.
        split: Held-out split settings (the manifest is shared: it depends on the prompts, not the model).
        cache: Activation cache settings (``layers`` is replaced by each model's layer).
        layer: Layer read on both models unless a side sets its own.
    """

    prompts: PromptSetConfig | None = None
    split: SplitConfig = field(default_factory=SplitConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    layer: int = 0


@dataclass
class MapSettings:
    """The linear map between the two residual spaces.

    Args:
        kind: ``none`` (widths must match; A's artifacts are used as they are) or ``least_squares``.
        ridge: Relative ridge of the least-squares fit (scale-free; see ``fit_linear_map``).
        fit_split: Paired rows the maps are fitted on (scored on the test split).
    """

    kind: str = "none"
    ridge: float = 1e-4
    fit_split: str = "train"

    def __post_init__(self) -> None:
        if self.kind not in MAP_KINDS:
            raise ValueError(f"map.kind: expected one of {list(MAP_KINDS)}, got {self.kind!r}")
        if self.ridge < 0:
            raise ValueError(f"map.ridge: must be >= 0, got {self.ridge}")
        if self.fit_split not in ("train", "val"):
            raise ValueError(
                f"map.fit_split: 'train' or 'val' (test rows score the map), got {self.fit_split!r}"
            )


@dataclass
class SpliceSettings:
    """Spliced next-token metrics on held-out prompts.

    Args:
        n_prompts: Test prompts scored (the first of the split, in prompt-set order); 0 skips the stage.
        batch_size: Prompts per forward.
        max_length: Most tokens a prompt keeps.
    """

    n_prompts: int = 64
    batch_size: int = 16
    max_length: int = 512

    def __post_init__(self) -> None:
        if self.n_prompts < 0 or self.batch_size < 1 or self.max_length < 1:
            raise ValueError("splice: n_prompts must be >= 0, batch_size and max_length >= 1")


@dataclass
class ColumnSpec:
    """One intervention on B, with A's (``source``) or B's own (``target``) artifacts.

    Args:
        owner: ``source`` (A's artifact on B) or ``target`` (B's own).
        kind: ``residual``, ``latent`` (SAS on A's SAE codes), ``ablation`` or ``gate``.
        name: Column label; default ``"{owner label} {kind} {space} {category} {alpha}"``.
        space: ``caa`` / ``sas_decoded`` (residual, ablation) or ``sas`` (latent).
        category: A category class name or ``global``.
        alpha: Signed strength (the removed share for ablation).
        positions: ``all``, ``prompt``, ``generated`` or a token index.
        unit_norm: Scale the vector to norm 1 first.
        gate: The gate's folder name among the owner's ``gates`` (``gate`` columns).
    """

    owner: str = "source"
    kind: str = "residual"
    name: str | None = None
    space: str = "caa"
    category: str = "global"
    alpha: float = 1.0
    positions: Positions = "all"
    unit_norm: bool = False
    gate: str | None = None

    def __post_init__(self) -> None:
        if self.owner not in OWNERS:
            raise ValueError(f"eval.columns: owner must be one of {list(OWNERS)}, got {self.owner!r}")
        if self.kind not in COLUMN_KINDS:
            raise ValueError(f"eval.columns: kind must be one of {list(COLUMN_KINDS)}, got {self.kind!r}")
        if self.kind == "gate" and not self.gate:
            raise ValueError("eval.columns: a gate column needs `gate` (a gate folder name of its owner)")


@dataclass
class TransferEvalSettings:
    """Eval jobs on B: unsteered plus one per column.

    Args:
        sets: Prompt sets and splits (only test splits are reported).
        columns: The interventions, each with A's or B's own artifacts.
        generation: Generation settings.
        judges: Refusal judges (``first_token`` only where B has the refusal tokens).
        capability: Capability measures.
        sae_seed: Which of A's SAE exports the columns use (default the first).
    """

    sets: SetsConfig
    columns: list[ColumnSpec] = field(default_factory=list)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    judges: JudgeSettings = field(default_factory=JudgeSettings)
    capability: CapabilitySettings = field(default_factory=CapabilitySettings)
    sae_seed: str | None = None


@dataclass
class TransferJobConfig:
    """A transfer job (``sae-refusal transfer --config lightning_configs/transfer/...``).

    Args:
        source: Model A and its artifacts (``sae`` required).
        target: Model B (and optionally its own artifacts).
        data: The prompts both models read.
        map: Linear map between the residual spaces (needed when the widths differ).
        features: Feature analysis settings, for both models.
        splice: Spliced next-token metrics.
        eval: Eval jobs on B (``None``: no generation).
        out_dir: Output folder; must not exist yet.
        n_boot: Bootstrap resamples per confidence interval.
        seed: Bootstrap seed.
    """

    source: ModelSide
    target: ModelSide
    data: TransferData = field(default_factory=TransferData)
    map: MapSettings = field(default_factory=MapSettings)
    features: FeatureAnalysisConfig = field(
        default_factory=lambda: FeatureAnalysisConfig(projections=["pca"])
    )
    splice: SpliceSettings = field(default_factory=SpliceSettings)
    eval: TransferEvalSettings | None = None
    out_dir: str = "runs/transfer"
    n_boot: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.source.sae:
            raise ValueError(
                "source.sae: give model A's SAE export (a cfg.json folder or a folder of seed*/)"
            )
        if self.n_boot < 1:
            raise ValueError(f"n_boot: must be >= 1, got {self.n_boot}")
        self.source.label = self.source.label or "A"
        self.target.label = self.target.label or "B"
        if self.source.label == self.target.label:
            raise ValueError(f"source.label and target.label must differ, both are {self.source.label!r}")
