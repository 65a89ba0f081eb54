"""``FeatureAnalysisCallback``: the feature analysis at the end of training epochs, logged and written.

Runs :func:`~sae_refusal.features.analysis.analyze_features` on the data module's splits and the module's
SAEs (``named_saes()``) every ``every_n_epochs`` training epochs and at the last one, never during the
sanity check, on global rank zero only. Output goes to ``<log_dir>/features/epoch{e}/`` (report, vector
artifacts, PNG plots); the numbers go to the logger as ``features/...`` scalars, the plots as
TensorBoard images and each head's held-out confusion matrix as a text table when the logger is a
TensorBoard one.

The report's ``metadata`` and every ``seed{n}/vectors.json`` record ``epoch`` (0-based, the epoch just
trained) and ``global_step`` (optimiser steps so far) of the in-memory weights the analysis used. The
``sae_paths`` (and each artifact's ``sae.path``) name where ``fit`` exports the SAEs at its end: those files
hold these weights only for the analysis of the last epoch.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L

from sae_refusal.features.analysis import FeatureAnalysis, FeatureAnalysisConfig, analyze_features

__all__ = ["FeatureAnalysisCallback", "confusion_markdown"]

log = logging.getLogger(__name__)


def confusion_markdown(confusion: list[list[int]], class_names: list[str]) -> str:
    """A confusion matrix (rows true, columns predicted) as a Markdown table for TensorBoard's text tab."""
    header = "| true \\ predicted | " + " | ".join(class_names) + " |"
    lines = [header, "|---" * (len(class_names) + 1) + "|"]
    for name, row in zip(class_names, confusion, strict=True):
        lines.append(f"| {name} | " + " | ".join(str(n) for n in row) + " |")
    return "\n".join(lines)


class FeatureAnalysisCallback(L.Callback):
    """CAA / SAS vectors, classification heads, cluster metrics, plots and cross-seed consensus per epoch.

    Args:
        analysis: What to compute (shared with ``sae-refusal features``, which reads it from this callback's
            entry in the fit config, so both give the same numbers).
        every_n_epochs: Run after every this many training epochs (the last epoch always runs).
        output_subdir: Folder under the run's ``log_dir`` that receives ``epoch{e}/``.
    """

    def __init__(
        self,
        analysis: FeatureAnalysisConfig | None = None,
        every_n_epochs: int = 10,
        output_subdir: str = "features",
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"FeatureAnalysisCallback: every_n_epochs must be >= 1, got {every_n_epochs}")
        self.analysis = analysis or FeatureAnalysisConfig()
        self.every_n_epochs = every_n_epochs
        self.output_subdir = output_subdir
        self.last: FeatureAnalysis | None = None
        self.last_dir: Path | None = None
        #: Seconds per analysis run (logging included), for reports.
        self.seconds: list[float] = []

    def _due(self, trainer: L.Trainer) -> bool:
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        return last or epoch % self.every_n_epochs == 0

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self._due(trainer):
            return
        log_dir = trainer.log_dir  # a collective under DDP: read on every rank
        if not trainer.is_global_zero:
            return
        datamodule = getattr(trainer, "datamodule", None)
        splits = getattr(datamodule, "splits", None)
        named_saes = getattr(pl_module, "named_saes", None)
        if not splits or named_saes is None:
            raise TypeError("FeatureAnalysisCallback needs an ActivationDataModule and an SAEModule")
        start = time.perf_counter()
        root = Path(log_dir or trainer.default_root_dir)
        out_dir = root / self.output_subdir / f"epoch{trainer.current_epoch}"
        saes = dict(named_saes())
        provenance = getattr(datamodule, "provenance", None)
        metadata: dict[str, Any] = {
            "epoch": trainer.current_epoch,  # the epoch just trained: the SAE weights analysed are its end
            "global_step": trainer.global_step,  # optimiser steps taken up to those weights
            # model, model_fingerprint (weights + adapter), layer, d_model: what the vectors' consumers check
            **(
                provenance()
                if callable(provenance)
                else {
                    "model": getattr(getattr(datamodule, "llm", None), "name_or_path", None),
                    "layer": getattr(datamodule, "layer", None),
                }
            ),
            "sae_paths": {name: str(root / "sae" / name) for name in saes},
        }
        result = analyze_features(splits, saes, self.analysis, out_dir=out_dir, metadata=metadata)
        self.last, self.last_dir = result, out_dir
        if trainer.logger is not None:
            scalars = {f"features/{k}": v for k, v in result.scalars().items()}
            trainer.logger.log_metrics(scalars, step=trainer.global_step)
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_image"):
            for tag, plot in result.plots.items():
                experiment.add_image(
                    f"features/{tag}", plot.image_HWC, trainer.global_step, dataformats="HWC"
                )
        if experiment is not None and hasattr(experiment, "add_text"):
            for name, seed_report in result.report.get("seeds", {}).items():
                table = confusion_markdown(seed_report["head"]["confusion"], result.report["class_names"])
                experiment.add_text(f"features/{name}/head_confusion", table, trainer.global_step)
        self.seconds.append(time.perf_counter() - start)
        log.info(
            "feature analysis of epoch %d: %.1f s, written to %s",
            trainer.current_epoch,
            self.seconds[-1],
            out_dir,
        )
