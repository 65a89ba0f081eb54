"""SAEBench-style SAE metrics on the project's cached activations (``sae-refusal sae-eval``).

Pure functions on tensors and arrays, one module per job, each metric defined in its module's docstring:

* :mod:`.core`: FVU / explained variance, L0, dead and dense shares, firing-density histogram, shrinkage,
  max decoder cosine;
* :mod:`.probing`: k-sparse probes on SAE codes (latents ranked on the fit rows) against a dense probe on
  the residual, for harmful-vs-benign and each refusal category one-vs-rest;
* :mod:`.absorption`: SAEBench's feature absorption (full absorption, absorption fraction) with the refusal
  categories in place of first letters;
* :mod:`.stability`: cross-seed matching of decoder rows and of the L1 heads' top features;
* :mod:`.job`: the orchestration and the report files; :mod:`.command`: the command line.

Exports load on first use (:mod:`sae_refusal.lazy`): importing one module of the package imports
nothing else of it.
"""

from typing import TYPE_CHECKING

from sae_refusal.lazy import lazy_exports

if TYPE_CHECKING:
    from sae_refusal.sae_eval.absorption import absorption_report as absorption_report
    from sae_refusal.sae_eval.absorption import absorption_scores as absorption_scores
    from sae_refusal.sae_eval.config import SAEEvalConfig as SAEEvalConfig
    from sae_refusal.sae_eval.core import core_metrics as core_metrics
    from sae_refusal.sae_eval.job import evaluate_saes as evaluate_saes
    from sae_refusal.sae_eval.probing import dense_probes as dense_probes
    from sae_refusal.sae_eval.probing import sparse_probing as sparse_probing
    from sae_refusal.sae_eval.stability import stability_report as stability_report

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "sae_refusal.sae_eval.absorption": ("absorption_report", "absorption_scores"),
        "sae_refusal.sae_eval.config": ("SAEEvalConfig",),
        "sae_refusal.sae_eval.core": ("core_metrics",),
        "sae_refusal.sae_eval.job": ("evaluate_saes",),
        "sae_refusal.sae_eval.probing": ("dense_probes", "sparse_probing"),
        "sae_refusal.sae_eval.stability": ("stability_report",),
    },
)
