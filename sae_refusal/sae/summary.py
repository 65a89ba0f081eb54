"""What a ``fit`` produced, printed when it ends: wall time, where the outputs are, headline numbers.

:func:`fit_summary` is a pure function from the facts (seconds, paths, logged metrics, a feature report) to
the text; :func:`find_fit_outputs` lists the outputs of a run folder that exist; :class:`FitSummaryCallback`
gathers both at the end of fit (global rank zero only) and prints the text. It runs in the callback
``teardown`` hook, which Lightning calls after the module's ``on_fit_end``, so the SAE exports written there
are listed.

The feature report is found without importing :mod:`sae_refusal.features` (a higher layer): any callback
with a ``last_dir`` holding a ``report.json`` (the ``FeatureAnalysisCallback``), else the newest
``<log_dir>/features/epoch{e}/report.json``.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

__all__ = ["FitOutputs", "FitSummaryCallback", "find_fit_outputs", "fit_summary", "headline_numbers"]

#: Headline columns: (title, metric key with ``{seed}`` for the seed name, format).
HEADLINE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("val FVU", "val/{seed}/fvu", "{:.3f}"),
    ("train FVU", "train/{seed}/fvu", "{:.3f}"),
    ("val L0", "val/{seed}/l0", "{:.1f}"),
    ("dead", "train/{seed}/dead_fraction", "{:.1%}"),
    ("shrinkage", "val/{seed}/shrinkage", "{:.3f}"),
    ("loss recovered", "val/{seed}/splice/loss_recovered", "{:.3f}"),
    ("KL", "val/{seed}/splice/kl", "{:.3f}"),
    ("head acc", "features/{seed}/head/accuracy", "{:.3f}"),
)


@dataclass(frozen=True)
class FitOutputs:
    """Outputs of one fit that exist on disk.

    Args:
        log_dir: The run folder (``trainer.log_dir``).
        sae_exports: One folder per seed (``cfg.json`` + ``sae.safetensors``).
        feature_report: The newest feature analysis ``report.json``.
        plots: PNG plots of that analysis.
        checkpoints: Lightning checkpoints (``.ckpt``).
        tensorboard: The TensorBoard run folder (holds ``events.out.tfevents.*``).
    """

    log_dir: Path | None
    sae_exports: list[Path] = field(default_factory=list)
    feature_report: Path | None = None
    plots: list[Path] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    tensorboard: Path | None = None


def _epoch_of(folder: Path) -> int:
    match = re.fullmatch(r"epoch(\d+)", folder.name)
    return int(match.group(1)) if match else -1


def find_fit_outputs(
    log_dir: str | Path | None,
    *,
    checkpoint_dirs: Sequence[str | Path] = (),
    feature_dirs: Sequence[str | Path] = (),
    tensorboard_dir: str | Path | None = None,
) -> FitOutputs:
    """The outputs of a fit run that exist (nothing is created).

    Args:
        log_dir: The run folder; ``sae/seed*`` and ``features/epoch*/report.json`` are looked for in it.
        checkpoint_dirs: Folders of the checkpoint callbacks (``*.ckpt`` in them are listed).
        feature_dirs: Feature analysis folders known to the caller (newest first wins over ``log_dir``'s).
        tensorboard_dir: The TensorBoard logger's run folder.
    """
    root = Path(log_dir) if log_dir is not None else None
    exports: list[Path] = []
    reports: list[Path] = [Path(d) / "report.json" for d in feature_dirs]
    if root is not None:
        sae_root = root / "sae"
        if sae_root.is_dir():
            exports = sorted(
                (p for p in sae_root.iterdir() if (p / "cfg.json").is_file()),
                key=lambda p: (len(p.name), p.name),
            )
        reports += sorted((root / "features").glob("epoch*/report.json"), key=lambda p: -_epoch_of(p.parent))
    report = next((p for p in reports if p.is_file()), None)
    plots = sorted((report.parent / "plots").glob("*.png")) if report is not None else []
    checkpoints = sorted({p for d in checkpoint_dirs for p in Path(d).glob("*.ckpt") if p.is_file()})
    tensorboard = Path(tensorboard_dir) if tensorboard_dir is not None else None
    if tensorboard is not None and not any(tensorboard.glob("events.out.tfevents.*")):
        tensorboard = None
    return FitOutputs(root, exports, report, plots, checkpoints, tensorboard)


def headline_numbers(
    metrics: Mapping[str, Any], seeds: Sequence[str], report: Mapping[str, Any] | None = None
) -> dict[str, dict[str, float]]:
    """Per seed, the headline numbers that were logged: ``{seed: {column title: value}}``.

    Args:
        metrics: Logged scalars (``trainer.callback_metrics``; tensors or numbers).
        seeds: Seed names (``seed0``, ...).
        report: A feature analysis report (its ``seeds.<name>.head.accuracy`` fills ``head acc``).
    """
    values: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            values[key] = float(value)
        except (TypeError, ValueError):
            continue
    for name, seed_report in ((report or {}).get("seeds") or {}).items():
        accuracy = ((seed_report or {}).get("head") or {}).get("accuracy")
        if isinstance(accuracy, int | float):
            values[f"features/{name}/head/accuracy"] = float(accuracy)
    out: dict[str, dict[str, float]] = {}
    for seed in seeds:
        row = {}
        for title, key, _ in HEADLINE_COLUMNS:
            value = values.get(key.format(seed=seed))
            if value is not None and math.isfinite(value):
                row[title] = value
        out[seed] = row
    return out


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{seconds:.1f} s"


def fit_summary(
    *,
    wall_seconds: float,
    outputs: FitOutputs,
    numbers: Mapping[str, Mapping[str, float]],
    train_seconds: float | None = None,
    n_train_rows: int | None = None,
) -> str:
    """The text printed at the end of ``fit``.

    Args:
        wall_seconds: Seconds since the job's callbacks were built (data preparation and caching included).
        outputs: What exists on disk (:func:`find_fit_outputs`).
        numbers: Headline numbers per seed (:func:`headline_numbers`).
        train_seconds: Seconds of the fit loop itself (from ``on_fit_start``).
        n_train_rows: Training rows, shown beside the numbers (a small set explains a train/val FVU gap).
    """
    timing = f"fit finished in {_duration(wall_seconds)} (wall time"
    if train_seconds is not None:
        timing += f"; training loop {_duration(train_seconds)}"
    lines = [timing + ")"]
    rows: list[tuple[str, str]] = []
    if outputs.sae_exports:
        parent = outputs.sae_exports[0].parent
        names = ", ".join(p.name for p in outputs.sae_exports)
        rows.append(("SAE exports", f"{parent}/{{{names}}}  (cfg.json + sae.safetensors; sae.load_sae)"))
    if outputs.feature_report is not None:
        rows.append(("feature report", str(outputs.feature_report)))
    if outputs.plots:
        rows.append(("plots", f"{outputs.plots[0].parent}/  ({len(outputs.plots)} PNG)"))
    for i, ckpt in enumerate(outputs.checkpoints):
        rows.append(("checkpoints" if i == 0 else "", str(ckpt)))
    if outputs.tensorboard is not None:
        tb = outputs.tensorboard
        rows.append(("TensorBoard", f"{tb}  (tensorboard --logdir {tb.parent})"))
    if not rows and outputs.log_dir is not None:
        rows.append(("run folder", str(outputs.log_dir)))
    lines += [f"  {label:<14}  {text}" for label, text in rows]  # 14: "feature report"
    titles = [title for title, _, _ in HEADLINE_COLUMNS if any(title in row for row in numbers.values())]
    if titles:
        formats = {title: fmt for title, _, fmt in HEADLINE_COLUMNS}
        header = "headline numbers" + (f" ({n_train_rows} training rows)" if n_train_rows else "")
        seed_width = max(len("seed"), *(len(s) for s in numbers))
        table = [[f"{'seed':<{seed_width}}", *titles]]
        for seed, row in numbers.items():
            cells = [formats[t].format(row[t]) if t in row else "-" for t in titles]
            table.append([f"{seed:<{seed_width}}", *cells])
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        lines.append(header)
        lines += ["  " + "  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in table]
        if "train FVU" in titles:
            lines.append("  (train FVU: the last training batch; val: the whole val split)")
    return "\n".join(lines)


class FitSummaryCallback(L.Callback):
    """Print :func:`fit_summary` when ``fit`` ends (global rank zero only; nothing after other stages).

    The wall time counts from when the callback was built (right after the config was parsed, before the
    activation cache is prepared) to the end of ``fit``; the training loop from ``on_fit_start``.
    """

    def __init__(self) -> None:
        self._built = time.perf_counter()
        self._fit_start: float | None = None
        #: The last text printed (for tests and callers).
        self.text: str | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self._fit_start is None or trainer.interrupted:
            return
        log_dir = trainer.log_dir  # a collective under DDP: read on every rank
        if not trainer.is_global_zero:
            return
        now = time.perf_counter()
        feature_dirs = [
            Path(d)
            for cb in trainer.callbacks  # type: ignore[attr-defined]
            if isinstance(d := getattr(cb, "last_dir", None), str | Path)
        ]
        tensorboard = next(
            (logger.log_dir for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)), None
        )
        outputs = find_fit_outputs(
            log_dir,
            checkpoint_dirs=[d for cb in trainer.checkpoint_callbacks if (d := getattr(cb, "dirpath", None))],
            feature_dirs=feature_dirs,
            tensorboard_dir=tensorboard,
        )
        report = None
        if outputs.feature_report is not None:
            report = json.loads(outputs.feature_report.read_text())
        named_saes = getattr(pl_module, "named_saes", None)
        seeds = [name for name, _ in named_saes()] if callable(named_saes) else []
        splits = getattr(getattr(trainer, "datamodule", None), "splits", None) or {}
        train = splits.get("train") if isinstance(splits, Mapping) else None
        self.text = fit_summary(
            wall_seconds=now - self._built,
            train_seconds=now - self._fit_start,
            outputs=outputs,
            numbers=headline_numbers(trainer.callback_metrics, seeds, report),
            n_train_rows=len(train.acts_ND) if train is not None and hasattr(train, "acts_ND") else None,
        )
        print(self.text, flush=True)
