"""The minimal TopK SAE: sparsity, decoder constraint, export round trip, it learns."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sae_refusal.sae.topk import TopKSAE, TopKSAEConfig


def test_forward_shapes_and_exact_sparsity() -> None:
    sae = TopKSAE(TopKSAEConfig(d_model=16, n_latents=64, k=4), generator=torch.Generator().manual_seed(0))
    x = torch.randn(32, 16)
    out = sae(x)
    assert out.recon_BD.shape == (32, 16) and out.latents_BF.shape == (32, 64)
    assert ((out.latents_BF > 0).sum(-1) <= 4).all()
    assert (out.latents_BF >= 0).all()
    manual_fvu = (out.recon_BD - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    torch.testing.assert_close(out.fvu, manual_fvu)


def test_parameters_stay_fp32_for_bf16_inputs() -> None:
    sae = TopKSAE(TopKSAEConfig(8, 16, 2))
    out = sae(torch.randn(4, 8, dtype=torch.bfloat16))
    assert out.recon_BD.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in sae.parameters())


def test_init_ties_encoder_to_decoder_and_unit_norm() -> None:
    sae = TopKSAE(TopKSAEConfig(8, 32, 4), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sae.W_enc_DF, sae.W_dec_FD.T)
    torch.testing.assert_close(sae.W_dec_FD.norm(dim=1), torch.ones(32))


def test_parallel_grad_removal_is_orthogonal_to_decoder_rows() -> None:
    sae = TopKSAE(TopKSAEConfig(8, 32, 4))
    sae(torch.randn(16, 8)).mse.backward()
    sae.remove_parallel_grads()
    assert sae.W_dec_FD.grad is not None
    dots = (sae.W_dec_FD.grad * sae.W_dec_FD).sum(-1)
    assert dots.abs().max() < 1e-5


@pytest.mark.parametrize(("d", "f", "k"), [(0, 4, 1), (4, 4, 0), (4, 4, 5)])
def test_invalid_shapes_are_rejected(d: int, f: int, k: int) -> None:
    with pytest.raises(ValueError):
        TopKSAEConfig(d, f, k)


def test_export_round_trip(tmp_path: Path) -> None:
    sae = TopKSAE(TopKSAEConfig(8, 16, 3), generator=torch.Generator().manual_seed(2))
    sae.save(tmp_path / "sae")
    sae.save(tmp_path / "sae")  # overwriting an export is fine
    loaded = TopKSAE.load(tmp_path / "sae")
    x = torch.randn(5, 8)
    torch.testing.assert_close(loaded(x).recon_BD, sae(x).recon_BD)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]
    with pytest.raises(FileNotFoundError, match=r"cfg\.json"):
        TopKSAE.load(tmp_path / "nothing")


def test_training_reduces_fvu_on_sparse_data() -> None:
    gen = torch.Generator().manual_seed(0)
    dictionary = torch.randn(32, 16, generator=gen)
    codes = torch.rand(512, 32, generator=gen) * (torch.rand(512, 32, generator=gen) < 0.1)
    x = codes @ dictionary
    sae = TopKSAE(TopKSAEConfig(16, 64, 4), generator=gen)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    first = sae(x).fvu.item()
    for _ in range(200):
        opt.zero_grad()
        sae(x).mse.backward()
        sae.remove_parallel_grads()
        opt.step()
        sae.normalize_decoder()
    assert sae(x).fvu.item() < 0.5 * first
