"""The fit's own validation logs the cheap SAE-eval number: shrinkage, the same as ``sae-eval`` computes."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest

from sae_refusal.sae import SAEModule, TopK
from sae_refusal.sae.summary import headline_numbers
from sae_refusal.sae_eval.core import core_metrics, encode_decode
from tests.test_sae_module import InMemoryData, make_split


def test_validation_shrinkage_is_the_splits_mean_ratio_of_norms(tmp_path: Path) -> None:
    module = SAEModule(d_model=8, architecture=TopK(k=2), expansion_factor=2, seeds=[0], lr=1e-2)
    data = InMemoryData(batch_size=5)
    data.splits["val"] = make_split(21, 8, 1)  # batches of 5, 5, 5, 5 and 1: a row-weighted mean
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
    )
    trainer.fit(module, datamodule=data)
    (result,) = trainer.validate(module, datamodule=data, verbose=False)
    sae = dict(module.named_saes())["seed0"]
    x = data.splits["val"].acts_ND
    codes, recon = encode_decode(sae, x)
    expected = core_metrics(x, codes, recon, sae.W_dec_FD).shrinkage
    assert result["val/seed0/shrinkage"] == pytest.approx(expected, rel=1e-5)
    assert headline_numbers(result, ["seed0"])["seed0"]["shrinkage"] == pytest.approx(expected, rel=1e-5)
