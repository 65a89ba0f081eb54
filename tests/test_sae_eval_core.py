"""Core SAE metrics (sae_eval/core.py), each against numbers computed by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from sae_refusal.sae import L1, BatchTopK, BatchTopKSAE, Contrastive, JumpReLU, MatryoshkaBatchTopK, TopK
from sae_refusal.sae.base import SparseAutoencoder
from sae_refusal.sae.jumprelu import JumpReLUSAE
from sae_refusal.sae_eval.core import (
    core_metrics,
    density_histogram,
    encode_decode,
    firing_density,
    max_decoder_cosine,
)

ACTS = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
RECON = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
CODES = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 3.0, 0.0, 0.0]])
#: Decoder rows: e0, (e0 + e1), e1 and -e0.
W_DEC = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])


def test_fvu_explained_variance_l0_dead_dense_and_shrinkage_by_hand() -> None:
    m = core_metrics(ACTS, CODES, RECON, W_DEC, dense_threshold=0.5)
    # squared errors 0 + 4; mean (1.5, 2): total variance 2 * (1.5^2 + 2^2) = 12.5
    assert m.fvu == pytest.approx(4 / 12.5)
    assert m.explained_variance == pytest.approx(1 - 4 / 12.5)
    assert m.l0 == pytest.approx(1.5)  # 1 and 2 latents fire
    assert m.dead_share == pytest.approx(0.5)  # latents 2 and 3 never fire
    assert m.dense_share == pytest.approx(0.25)  # densities 1, 0.5, 0, 0: only > 0.5 is dense (strict)
    assert m.shrinkage == pytest.approx((3 / 3 + 2 / 4) / 2)
    assert m.shrinkage_of_sums == pytest.approx(5 / 7)
    assert (m.n_rows, m.n_latents) == (2, 4)


def test_max_decoder_cosine_is_signed_and_excludes_the_latent_itself() -> None:
    root_half = 1 / math.sqrt(2)
    # e0 and -e0 are anti-parallel: -1, not 1 (codes are non-negative, so they are not redundant)
    torch.testing.assert_close(
        max_decoder_cosine(W_DEC), torch.tensor([root_half, root_half, root_half, 0.0])
    )
    torch.testing.assert_close(max_decoder_cosine(W_DEC, chunk=1), max_decoder_cosine(W_DEC))
    m = core_metrics(ACTS, CODES, RECON, W_DEC)
    assert m.max_cosine_mean == pytest.approx(3 * root_half / 4)
    assert m.max_cosine_median == pytest.approx(root_half)
    assert m.max_cosine_share_above == 0.0
    near = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.1]])  # latent 2 ~ latent 0: cos 2 / sqrt(4.01)
    assert core_metrics(ACTS, CODES[:, :3], RECON, near).max_cosine_share_above == pytest.approx(2 / 3)
    assert math.isnan(float(max_decoder_cosine(torch.ones(1, 3))[0]))


def test_density_histogram_counts_log10_densities_and_dead_latents_apart() -> None:
    density = firing_density(CODES)
    torch.testing.assert_close(density, torch.tensor([1.0, 0.5, 0.0, 0.0], dtype=torch.float64))
    hist = density_histogram(density, n_rows=2, bins=2)
    # bins over [log10(1/2), 0]: log10(0.5) in the first, log10(1) = 0 in the last (closed) bin
    assert hist["counts"] == [1, 1] and hist["dead"] == 2
    assert hist["edges"] == pytest.approx([-math.log10(2), -math.log10(2) / 2, 0.0])


def _saes() -> dict[str, SparseAutoencoder]:
    g = torch.Generator().manual_seed(0)
    return {
        "topk": TopK(k=3).build(6, 12, g),
        "relu": L1().build(6, 12, g),
        "contrastive": Contrastive(TopK(k=3)).build(6, 12, g),
        "jumprelu": JumpReLUSAE(6, 12, generator=g),
        "batchtopk": BatchTopK(k=3).build(6, 12, g),
        "matryoshka_batchtopk": MatryoshkaBatchTopK(k=3, prefix_fractions=[0.5, 1.0]).build(6, 12, g),
        "jumprelu_trained": JumpReLU().build(6, 12, g),
    }


@pytest.mark.parametrize("arch", list(_saes()))
def test_every_architecture_gives_its_own_fvu_and_l0_through_encode_decode(arch: str) -> None:
    sae = _saes()[arch]
    sae.set_input_scale(0.5)
    if isinstance(sae, BatchTopKSAE):  # a trained one has its inference threshold (unset: per-batch top-k)
        sae.threshold.fill_(0.2)
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    sae.train()  # encode_decode switches to eval mode and back
    codes, recon = encode_decode(sae, x, batch_size=7)
    assert sae.training
    sae.eval()
    with torch.no_grad():
        out = sae(x)
    m = core_metrics(x, codes, recon, sae.W_dec_FD)
    torch.testing.assert_close(recon, out.recon_BD, rtol=1e-5, atol=1e-5)
    assert m.fvu == pytest.approx(float(out.fvu), rel=1e-4)
    assert m.l0 == pytest.approx(float(out.l0))
    assert m.dead_share == pytest.approx(1 - float(out.fired_F.float().mean()))


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="rows must match"):
        core_metrics(ACTS, CODES[:1], RECON, W_DEC)
    with pytest.raises(ValueError, match="non-empty"):
        firing_density(torch.zeros(0, 3))
