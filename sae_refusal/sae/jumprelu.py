"""JumpReLU sparse autoencoder (Rajamanoharan et al., 2024; Gemma Scope) as a plain, inference-only module.

    x' = input_scale * x
    pre = (x' - b_dec) @ W_enc_DF + b_enc
    z  = ReLU(pre) * (pre > threshold_F)       a latent fires once its pre-activation clears its threshold
    x_hat = (z @ W_dec_FD + b_dec) / input_scale

Design notes:

* **Inference only.** The project does not train JumpReLU SAEs (that needs a straight-through estimator for
  the threshold and an L0 penalty); this class exists so that JumpReLU SAEs from other libraries (SAELens,
  :mod:`sae_refusal.sae.formats.saelens`) can be applied, analysed and re-exported like the project's own.
  :meth:`JumpReLUSAE.forward` therefore reports ``loss = mse`` (no sparsity term) and no gradient reaches the
  threshold (the step ``pre > threshold`` is piecewise constant).
* **The activation is SAELens'**: ``ReLU(pre)`` masked by ``pre > threshold``. For the usual positive
  thresholds that is ``pre * (pre > threshold)``; a negative threshold behaves as 0 (no negative codes), so
  codes match SAELens' ``JumpReLUSAE.encode`` for any stored threshold.
* The threshold lives in the normalised space, like the codes: the input scale multiplies the input before the
  encoder, so folding the scale into ``W_enc`` and ``b_dec`` on export leaves ``b_enc`` and the threshold as
  they are.
* Decoder rows are free (``unit_norm_decoder = False``): imported dictionaries keep whatever norms they have.
* :meth:`JumpReLUSAE.config` (``d_model``, ``n_latents``) rebuilds it, so the project's
  :meth:`~sae_refusal.sae.base.SparseAutoencoder.save` / :func:`~sae_refusal.sae.base.load_sae` round-trip it
  (architecture ``"jumprelu"``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sae_refusal.sae.base import SAE_REGISTRY, SAEOutput, SparseAutoencoder, fvu_of

__all__ = ["JumpReLUSAE"]


class JumpReLUSAE(SparseAutoencoder):
    """JumpReLU SAE for inference (see the module notes: not trained here).

    Args:
        d_model: Input width ``D``.
        n_latents: Dictionary size ``F``.
        generator: RNG of the placeholder initial weights (unit-norm random decoder rows, the encoder their
            transpose, zero biases and thresholds); real weights come from a checkpoint. The global RNG is
            never touched.
    """

    architecture = "jumprelu"
    unit_norm_decoder = False

    def __init__(self, d_model: int, n_latents: int, generator: torch.Generator | None = None) -> None:
        super().__init__(d_model, n_latents)
        W_dec_FD = torch.randn(n_latents, d_model, generator=generator)
        W_dec_FD /= W_dec_FD.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec_FD = nn.Parameter(W_dec_FD)
        self.W_enc_DF = nn.Parameter(W_dec_FD.T.clone())
        self.b_enc_F = nn.Parameter(torch.zeros(n_latents))
        self.b_dec_D = nn.Parameter(torch.zeros(d_model))
        self.threshold_F = nn.Parameter(torch.zeros(n_latents))

    def config(self) -> dict[str, Any]:
        return {"d_model": self.d_model, "n_latents": self.n_latents}

    def _encode_scaled(self, x_BD: torch.Tensor) -> torch.Tensor:
        pre_BF = (x_BD - self.b_dec_D) @ self.W_enc_DF + self.b_enc_F
        return torch.relu(pre_BF) * (pre_BF > self.threshold_F)

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Dense codes ``(B, F)`` (normalised space) of raw-space inputs."""
        return self._encode_scaled(x_BD.float() * self.input_scale)

    def decode(self, latents_BF: torch.Tensor) -> torch.Tensor:
        """Raw-space reconstruction of dense codes."""
        return (latents_BF @ self.W_dec_FD + self.b_dec_D) / self.input_scale

    def forward(self, x_BD: torch.Tensor, return_latents: bool = False) -> SAEOutput:
        """Encode and decode ``x_BD`` (raw space); ``loss`` is the MSE alone (inference-only SAE)."""
        x_BD = x_BD.float() * self.input_scale
        latents_BF = self._encode_scaled(x_BD)
        recon_BD = latents_BF @ self.W_dec_FD + self.b_dec_D
        mse = (recon_BD - x_BD).pow(2).sum(-1).mean()
        active_BF = latents_BF > 0
        return SAEOutput(
            recon_BD=recon_BD / self.input_scale,
            latents_BF=latents_BF if return_latents else None,
            loss=mse,
            mse=mse,
            fvu=fvu_of(x_BD, recon_BD),
            l0=active_BF.sum(-1).float().mean(),
            fired_F=active_BF.any(0),
            parts={},
        )


SAE_REGISTRY[JumpReLUSAE.architecture] = JumpReLUSAE
