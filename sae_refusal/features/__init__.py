"""Refusal features: steering vectors (CAA, SAS), classification heads, cluster metrics, plots, consensus.

Pure functions over activations and SAE codes (:mod:`.vectors`, :mod:`.heads`, :mod:`.clusters`,
:mod:`.plots`, :mod:`.consensus`), one orchestration (:func:`.analysis.analyze_features`) shared by the
epoch-end :class:`.callback.FeatureAnalysisCallback` and the ``sae-refusal features`` subcommand.

Exports load on first use (:mod:`sae_refusal.lazy`): importing one module of the package imports
nothing else of it.
"""

from typing import TYPE_CHECKING

from sae_refusal.lazy import lazy_exports

if TYPE_CHECKING:
    from sae_refusal.features.analysis import CLASS_NAMES as CLASS_NAMES
    from sae_refusal.features.analysis import FeatureAnalysis as FeatureAnalysis
    from sae_refusal.features.analysis import analyze_features as analyze_features
    from sae_refusal.features.callback import FeatureAnalysisCallback as FeatureAnalysisCallback
    from sae_refusal.features.config import FeatureAnalysisConfig as FeatureAnalysisConfig
    from sae_refusal.features.vectors import SASResult as SASResult
    from sae_refusal.features.vectors import SteeringVectors as SteeringVectors
    from sae_refusal.features.vectors import caa_vectors as caa_vectors
    from sae_refusal.features.vectors import sas_vectors as sas_vectors

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "sae_refusal.features.analysis": ("CLASS_NAMES", "FeatureAnalysis", "analyze_features"),
        "sae_refusal.features.callback": ("FeatureAnalysisCallback",),
        "sae_refusal.features.config": ("FeatureAnalysisConfig",),
        "sae_refusal.features.vectors": ("SASResult", "SteeringVectors", "caa_vectors", "sas_vectors"),
    },
)
