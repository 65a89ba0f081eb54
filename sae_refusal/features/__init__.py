"""Refusal features: steering vectors (CAA, SAS), classification heads, cluster metrics, plots, consensus.

Pure functions over activations and SAE codes (:mod:`.vectors`, :mod:`.heads`, :mod:`.clusters`,
:mod:`.plots`, :mod:`.consensus`), one orchestration (:func:`.analysis.analyze_features`) shared by the
epoch-end :class:`.callback.FeatureAnalysisCallback` and the ``sae-refusal features`` subcommand.
"""

from sae_refusal.features.analysis import (
    CLASS_NAMES,
    FeatureAnalysis,
    FeatureAnalysisConfig,
    analyze_features,
)
from sae_refusal.features.callback import FeatureAnalysisCallback
from sae_refusal.features.vectors import SASResult, SteeringVectors, caa_vectors, sas_vectors

__all__ = [
    "CLASS_NAMES",
    "FeatureAnalysis",
    "FeatureAnalysisCallback",
    "FeatureAnalysisConfig",
    "SASResult",
    "SteeringVectors",
    "analyze_features",
    "caa_vectors",
    "sas_vectors",
]
