"""What every SAE shares (sae/base.py): input scaling, FVU, decoded directions, the export's error paths."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sae_refusal.sae import ReLUSAE, TopKSAE, load_sae, mean_norm_scale
from sae_refusal.sae.base import fvu_of


def test_fvu_is_unexplained_over_total_variance_also_for_small_data() -> None:
    gen = torch.Generator().manual_seed(0)
    x = 0.01 * torch.randn(6, 4, generator=gen)  # total variance far below 1
    recon = x + 0.003 * torch.randn(6, 4, generator=gen)
    expected = ((recon - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    torch.testing.assert_close(fvu_of(x, recon), expected)
    assert fvu_of(x, x.mean(0).expand(6, 4)).item() == pytest.approx(1.0)  # the mean explains nothing
    same = torch.ones(3, 2)
    assert fvu_of(same, same).item() == 0.0  # no variance: finite, not NaN


def test_mean_norm_scale_accepts_small_activations() -> None:
    acts = 0.01 * torch.randn(50, 9, generator=torch.Generator().manual_seed(1))
    scale = mean_norm_scale(acts)
    assert (acts * scale).norm(dim=1).mean().item() == pytest.approx(3.0, rel=1e-5)
    with pytest.raises(ValueError, match="mean row norm"):
        mean_norm_scale(torch.full((2, 3), math.inf))


@pytest.mark.parametrize("scale", [0.0, -1.0, math.inf, math.nan])
def test_set_input_scale_rejects_non_positive_or_non_finite(scale: float) -> None:
    sae = TopKSAE(4, 8, 2)
    with pytest.raises(ValueError, match="input_scale must be finite and > 0"):
        sae.set_input_scale(scale)
    assert float(sae.input_scale) == 1.0  # unchanged (and 1 by default)


@pytest.mark.parametrize("cls", [TopKSAE, ReLUSAE])
def test_decode_direction_is_a_difference_of_reconstructions(cls: type) -> None:
    sae = cls(5, 10, 3) if cls is TopKSAE else cls(5, 10)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        sae.b_dec_D.copy_(torch.randn(5, generator=gen))
    sae.set_input_scale(2.5)
    z1, z2 = torch.rand(2, 10, generator=gen), torch.rand(2, 10, generator=gen)
    direction = sae.decode_direction(z1 - z2)
    torch.testing.assert_close(direction, sae.decode(z1) - sae.decode(z2))
    torch.testing.assert_close(direction, (z1 - z2) @ sae.W_dec_FD / 2.5)
    assert sae.decode_direction((z1 - z2).double()).dtype == torch.float32


def test_smallest_shapes_are_valid_and_zero_is_not() -> None:
    assert ReLUSAE(1, 1).W_dec_FD.shape == (1, 1)
    for d_model, n_latents in ((0, 4), (4, 0)):
        with pytest.raises(ValueError, match="d_model and n_latents must be >= 1"):
            ReLUSAE(d_model, n_latents)


def test_load_errors_name_the_problem(tmp_path: Path) -> None:
    sae = TopKSAE(4, 8, 2)
    folder = sae.save(tmp_path / "ok")
    cfg = json.loads((folder / "cfg.json").read_text())

    def broken(name: str, record: dict[str, object], weights: bool = True) -> Path:
        out = tmp_path / name
        out.mkdir()
        (out / "cfg.json").write_text(json.dumps(record))
        if weights:
            (out / "sae.safetensors").write_bytes((folder / "sae.safetensors").read_bytes())
        return out

    with pytest.raises(FileNotFoundError, match=r"lacks sae\.safetensors"):
        load_sae(broken("no-weights", cfg, weights=False))
    no_arch = {k: v for k, v in cfg.items() if k != "architecture"}
    with pytest.raises(ValueError, match="unknown architecture None"):
        load_sae(broken("no-arch", no_arch))
    with pytest.raises(ValueError, match="config does not fit a topk SAE"):
        load_sae(broken("extra", {**cfg, "width": 3}))
    bare = {k: v for k, v in cfg.items() if k not in ("input_scale", "metadata")}
    assert isinstance(load_sae(broken("bare", bare)), TopKSAE)  # scale comes from the weights
