"""ReLU (L1) SAE: every output field against the module docstring's formulas, written out here."""

from __future__ import annotations

import pytest
import torch

from sae_refusal.sae import ReLUSAE
from sae_refusal.sae.base import fvu_of


def perturbed_sae(seed: int = 0) -> ReLUSAE:
    """B, D and F all different, non-zero biases and an input scale != 1, so no term hides another."""
    gen = torch.Generator().manual_seed(seed)
    sae = ReLUSAE(6, 10, l1_coef=0.3, init_decoder_norm=0.7, generator=gen)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    sae.set_input_scale(1.9)
    return sae


def reference(sae: ReLUSAE, x_BD: torch.Tensor) -> dict[str, torch.Tensor]:
    s = sae.input_scale
    xs = x_BD * s
    z = torch.relu((xs - sae.b_dec_D) @ sae.W_enc_DF + sae.b_enc_F)
    recon_scaled = z @ sae.W_dec_FD + sae.b_dec_D
    mse = ((recon_scaled - xs) ** 2).sum(dim=1).mean()
    l1 = (z * sae.W_dec_FD.norm(dim=1)).sum(dim=1).mean()
    return {
        "z": z,
        "recon": recon_scaled / s,
        "mse": mse,
        "l1": l1,
        "loss": mse + sae.l1_coef * l1,
        "fvu": ((recon_scaled - xs) ** 2).sum() / ((xs - xs.mean(0)) ** 2).sum(),
        "l0": (z > 0).float().sum(dim=1).mean(),
        "fired": (z > 0).any(dim=0),
    }


def test_forward_matches_the_formulas_field_by_field() -> None:
    sae = perturbed_sae()
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(1)) * 3.0
    ref = reference(sae, x)
    assert (ref["z"] == 0).any() and (ref["z"] > 0).any()  # the ReLU cuts some codes, keeps others
    out = sae(x, return_latents=True)
    assert out.latents_BF is not None
    torch.testing.assert_close(out.latents_BF, ref["z"])
    torch.testing.assert_close(out.recon_BD, ref["recon"])
    for field in ("mse", "loss", "fvu", "l0"):
        torch.testing.assert_close(getattr(out, field), ref[field], msg=field)
    torch.testing.assert_close(out.parts["l1"], ref["l1"])
    assert out.fired_F.shape == (10,) and torch.equal(out.fired_F, ref["fired"])
    torch.testing.assert_close(out.fvu, fvu_of(x * sae.input_scale, ref["recon"] * sae.input_scale))
    assert sae(x).latents_BF is None  # no (B, F) codes unless asked
    # encode / decode are the two halves of forward, in raw space
    torch.testing.assert_close(sae.encode(x), ref["z"])
    torch.testing.assert_close(sae.decode(ref["z"]), ref["recon"])
    # and the gradient of the loss is that of the formula
    grads = torch.autograd.grad(out.loss, list(sae.parameters()))
    ref_grads = torch.autograd.grad(reference(sae, x)["loss"], list(sae.parameters()))
    for (name, _), mine, theirs in zip(sae.named_parameters(), grads, ref_grads, strict=True):
        torch.testing.assert_close(mine, theirs, msg=name)


def test_inactive_latents_and_bf16_inputs() -> None:
    sae = perturbed_sae(2)
    with torch.no_grad():
        sae.b_enc_F[:5] = -1e4  # five latents can never fire
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(3))
    out = sae(x.bfloat16(), return_latents=True)
    assert out.latents_BF is not None and out.latents_BF.dtype == torch.float32
    assert not out.fired_F[:5].any() and not out.latents_BF[:, :5].any()
    assert (out.latents_BF >= 0).all()


def test_init_rows_have_the_configured_norm_and_the_encoder_is_the_transpose() -> None:
    a = ReLUSAE(5, 12, init_decoder_norm=0.25, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a.W_dec_FD.norm(dim=1), torch.full((12,), 0.25))
    torch.testing.assert_close(a.W_enc_DF, a.W_dec_FD.T)
    assert not a.b_enc_F.any() and not a.b_dec_D.any() and float(a.input_scale) == 1.0
    same = ReLUSAE(5, 12, init_decoder_norm=0.25, generator=torch.Generator().manual_seed(7))
    other = ReLUSAE(5, 12, init_decoder_norm=0.25, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.W_dec_FD, same.W_dec_FD) and not torch.equal(a.W_dec_FD, other.W_dec_FD)
    default = ReLUSAE(5, 12)
    assert (default.l1_coef, default.init_decoder_norm) == (0.5, 0.1)
    torch.testing.assert_close(default.W_dec_FD.norm(dim=1), torch.full((12,), 0.1))
    assert default.config() == {"d_model": 5, "n_latents": 12, "l1_coef": 0.5, "init_decoder_norm": 0.1}


def test_settings_are_checked() -> None:
    ReLUSAE(4, 8, l1_coef=0.0)  # no penalty is a valid (dense) baseline
    for l1_coef, norm in ((-0.1, 0.1), (0.5, 0.0), (0.5, -1.0)):
        with pytest.raises(ValueError, match="l1_coef must be >= 0 and init_decoder_norm > 0"):
            ReLUSAE(4, 8, l1_coef=l1_coef, init_decoder_norm=norm)
