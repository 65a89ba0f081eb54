"""The end-of-fit summary: which outputs exist, the headline numbers per seed, and the printed text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from sae_refusal.sae.summary import (
    FitOutputs,
    FitSummaryCallback,
    find_fit_outputs,
    fit_summary,
    headline_numbers,
)


def _touch(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _run_folder(root: Path) -> Path:
    """A run folder as a fit leaves it: exports for seed0 / seed2 / seed10, two analyses, a checkpoint."""
    run = root / "tensorboard" / "version_0"
    for seed in ("seed10", "seed2", "seed0"):
        _touch(run / "sae" / seed / "cfg.json", "{}")
    (run / "sae" / ".seed3.tmp-1234").mkdir()  # an interrupted write: no cfg.json, not listed
    for epoch in (9, 29):
        _touch(run / "features" / f"epoch{epoch}" / "report.json", json.dumps({"epoch": epoch}))
    _touch(run / "features" / "epoch29" / "plots" / "residual_pca.png")
    _touch(run / "features" / "epoch29" / "plots" / "seed0_sparse_full_pca.png")
    _touch(run / "features" / "epoch9" / "plots" / "residual_pca.png")
    _touch(run / "checkpoints" / "last.ckpt")
    _touch(run / "checkpoints" / "epoch=29-step=180.ckpt")
    _touch(run / "events.out.tfevents.123.host.1.0")
    return run


def test_find_fit_outputs_lists_what_exists(tmp_path: Path) -> None:
    run = _run_folder(tmp_path)
    out = find_fit_outputs(run, checkpoint_dirs=[run / "checkpoints"], tensorboard_dir=run)
    assert out.log_dir == run
    assert [p.name for p in out.sae_exports] == ["seed0", "seed2", "seed10"]  # seed order, not string order
    assert out.feature_report == run / "features" / "epoch29" / "report.json"  # the newest epoch, not 9
    assert [p.name for p in out.plots] == ["residual_pca.png", "seed0_sparse_full_pca.png"]
    assert [p.name for p in out.checkpoints] == ["epoch=29-step=180.ckpt", "last.ckpt"]
    assert out.tensorboard == run
    # a folder the feature callback names first wins; missing things are left out, never invented
    other = _touch(tmp_path / "elsewhere" / "report.json").parent
    assert find_fit_outputs(run, feature_dirs=[other]).feature_report == other / "report.json"
    empty = find_fit_outputs(
        tmp_path / "nothing", checkpoint_dirs=[tmp_path / "no"], tensorboard_dir=tmp_path
    )
    assert empty == FitOutputs(tmp_path / "nothing")


def test_headline_numbers_per_seed() -> None:
    metrics = {
        "val/seed0/fvu": torch.tensor(0.372),
        "train/seed0/fvu": torch.tensor(0.043),
        "val/seed0/l0": torch.tensor(32.0),
        "train/seed0/dead_fraction": torch.tensor(0.515),
        "val/seed0/splice/loss_recovered": 0.99,
        "val/seed1/fvu": torch.tensor(float("nan")),  # undefined: left out, not printed as nan
        "val/seed1/l0": torch.tensor(31.5),
        "not/a/number": "text",
    }
    report = {"seeds": {"seed0": {"head": {"accuracy": 0.54}}, "seed1": {"head": {}}}}
    numbers = headline_numbers(metrics, ["seed0", "seed1"], report)
    assert numbers["seed0"] == pytest.approx(
        {
            "val FVU": 0.372,
            "train FVU": 0.043,
            "val L0": 32.0,
            "dead": 0.515,
            "loss recovered": 0.99,
            "head acc": 0.54,
        }
    )
    assert numbers["seed1"] == pytest.approx({"val L0": 31.5})
    assert headline_numbers(metrics, ["seed0"])["seed0"].get("head acc") is None


def test_fit_summary_text(tmp_path: Path) -> None:
    run = _run_folder(tmp_path)
    outputs = find_fit_outputs(run, checkpoint_dirs=[run / "checkpoints"], tensorboard_dir=run)
    numbers = {
        "seed0": {"val FVU": 0.3724, "val L0": 32.0, "dead": 0.515, "head acc": 0.5431},
        "seed1": {"val FVU": 0.3731, "val L0": 32.0, "dead": 0.5},
    }
    text = fit_summary(
        wall_seconds=151.2, train_seconds=98.0, outputs=outputs, numbers=numbers, n_train_rows=181
    )
    lines = text.splitlines()
    assert lines[0] == "fit finished in 2 min 31 s (wall time; training loop 1 min 38 s)"
    assert f"  SAE exports     {run / 'sae'}/{{seed0, seed2, seed10}}" in text
    assert f"  feature report  {run / 'features' / 'epoch29' / 'report.json'}" in lines
    assert f"{run / 'features' / 'epoch29' / 'plots'}/  (2 PNG)" in text
    assert f"  checkpoints     {run / 'checkpoints' / 'epoch=29-step=180.ckpt'}" in lines
    assert f"                  {run / 'checkpoints' / 'last.ckpt'}" in lines
    assert f"  TensorBoard     {run}  (tensorboard --logdir {run.parent})" in lines
    table = lines[lines.index("headline numbers (181 training rows)") + 1 :]
    assert table[0].split() == ["seed", "val", "FVU", "val", "L0", "dead", "head", "acc"]
    assert table[1].split() == ["seed0", "0.372", "32.0", "51.5%", "0.543"]
    assert table[2].split() == ["seed1", "0.373", "32.0", "50.0%", "-"]  # no report for seed1: a dash
    quick = fit_summary(wall_seconds=9.04, outputs=FitOutputs(tmp_path), numbers={})
    assert quick.splitlines() == ["fit finished in 9.0 s (wall time)", f"  run folder      {tmp_path}"]


class _TwoSeeds(L.LightningModule):
    """Enough of an SAE module for the callback: ``named_saes``, logged FVU, an exported folder."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def named_saes(self) -> list[tuple[str, Any]]:
        return [("seed0", None), ("seed1", None)]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.log("train/seed0/fvu", 0.25)
        return (self.w - 1).pow(2).sum()

    def on_train_epoch_end(self) -> None:
        self.log("val/seed0/fvu", 0.5)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def train_dataloader(self) -> Any:
        return DataLoader(TensorDataset(torch.zeros(2, 1)), batch_size=1)

    def on_fit_end(self) -> None:  # as SAEModule does: the exports are written here
        _touch(Path(self.trainer.log_dir or ".") / "sae" / "seed0" / "cfg.json", "{}")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_callback_prints_after_the_exports_are_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    callback = FitSummaryCallback()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(_TwoSeeds())
    printed = capsys.readouterr().out
    assert callback.text is not None and callback.text in printed
    run = tmp_path / "tb" / "version_0"
    assert f"SAE exports     {run / 'sae'}/{{seed0}}" in callback.text  # written in on_fit_end, listed
    assert "checkpoints     " + str(run / "checkpoints" / "epoch=0-step=2.ckpt") in callback.text
    assert "headline numbers" in callback.text and "0.500" in callback.text and "0.250" in callback.text
    callback.text = None
    trainer.validate(_TwoSeeds(), dataloaders=DataLoader(TensorDataset(torch.zeros(1, 1))), verbose=False)
    capsys.readouterr()
    assert callback.text is None  # fit only
