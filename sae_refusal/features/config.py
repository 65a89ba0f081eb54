"""What the feature analysis computes (``FeatureAnalysisCallback.analysis``, ``features --analysis.*``).

Plain settings, importable without torch, so configs are checked before the heavy libraries load.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["PROJECTIONS", "FeatureAnalysisConfig"]

#: 2-D projections the analysis can draw.
PROJECTIONS: tuple[str, ...] = ("pca", "tsne", "umap")


@dataclass
class FeatureAnalysisConfig:
    """What the feature analysis computes (shared by the callback and ``sae-refusal features``).

    Args:
        fit_split: Rows the vectors and heads are fitted on.
        eval_split: Held-out rows the heads are scored on and the metrics and plots use.
        tau: SAS activity threshold: a feature is active in a set when its mean code reaches it (``>=``).
        sas_top_k: Keep only this many SAS features per category (largest ``|v_z|``); null = all.
        remove_shared: Drop SAS features active in both the category and the benign mean.
        head: ``sklearn`` (L1 logistic regression, saga) or ``torch`` (softmax layer with an L1 term).
        head_c: Inverse L1 strength of the scikit-learn head.
        head_l1: L1 weight of the torch head.
        head_steps: Most full-batch proximal-gradient (FISTA) steps of the torch head.
        top_k_features: Top features listed (and matched across seeds) per class.
        n_permutations: Label permutations of the cluster-metric baseline.
        metrics_max_rows: Most rows the cluster metrics use (random subset above it).
        projections: 2-D projections drawn: any of ``pca``, ``tsne``, ``umap`` (empty = no plots).
        plot_max_rows: Most rows drawn per plot.
        consensus_source: Each seed's selected features, matched across seeds and used for the
            ``sparse_topk`` cluster metrics and plots: ``head`` (top features) or ``sas``.
        consensus_min_share: Share of seeds a feature must be found in to be kept.
        consensus_min_cosine: Decoder cosine a match needs to count.
        seed: Seed of the scikit-learn head, the permutations, subsets and projections (the torch head is
            deterministic).
    """

    fit_split: str = "train"
    eval_split: str = "test"
    tau: float = 0.0
    sas_top_k: int | None = None
    remove_shared: bool = True
    head: str = "sklearn"
    head_c: float = 1.0
    head_l1: float = 1e-3
    head_steps: int = 500
    top_k_features: int = 10
    n_permutations: int = 20
    metrics_max_rows: int | None = 2000
    projections: list[str] = field(default_factory=lambda: list(PROJECTIONS))
    plot_max_rows: int | None = 2000
    consensus_source: str = "head"
    consensus_min_share: float = 0.5
    consensus_min_cosine: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        prefix = "features"
        if self.head not in ("sklearn", "torch"):
            raise ValueError(f"{prefix}.head must be 'sklearn' or 'torch', got {self.head!r}")
        if self.consensus_source not in ("head", "sas"):
            raise ValueError(
                f"{prefix}.consensus_source must be 'head' or 'sas', got {self.consensus_source!r}"
            )
        unknown = [p for p in self.projections if p not in PROJECTIONS]
        if unknown:
            raise ValueError(f"{prefix}.projections: unknown {unknown}; choose from {list(PROJECTIONS)}")
        if self.tau < 0:
            raise ValueError(f"{prefix}.tau must be >= 0, got {self.tau}")
        if self.sas_top_k is not None and self.sas_top_k < 1:
            raise ValueError(f"{prefix}.sas_top_k must be >= 1 or null, got {self.sas_top_k}")
        if self.top_k_features < 1 or self.n_permutations < 0 or self.head_steps < 1:
            raise ValueError(f"{prefix}: top_k_features and head_steps must be >= 1, n_permutations >= 0")
        if not 0 < self.consensus_min_share <= 1 or not -1 <= self.consensus_min_cosine <= 1:
            raise ValueError(
                f"{prefix}: consensus_min_share must be in (0, 1], consensus_min_cosine in [-1, 1]"
            )
        if self.head_c <= 0 or self.head_l1 < 0:
            raise ValueError(f"{prefix}: head_c must be > 0 and head_l1 >= 0")
