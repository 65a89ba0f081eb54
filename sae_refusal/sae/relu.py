"""ReLU sparse autoencoder trained with a decoder-norm-aware L1 penalty, as a plain module.

    x' = input_scale * x
    z  = ReLU((x' - b_dec) @ W_enc_DF + b_enc)
    x_hat = (z @ W_dec_FD + b_dec) / input_scale
    L  = ||x' - x_hat'||^2 + l1_coef * sum_f z_f * ||W_dec_f||

Weighting each latent's L1 by its decoder row norm makes the penalty invariant to trading a smaller ``z_f``
for a larger ``W_dec_f`` (without it the optimiser shrinks codes and grows the decoder, and the penalty goes
to zero without any sparsity). The decoder rows are therefore left free (no unit-norm constraint). The decoder
starts with rows of norm ``init_decoder_norm`` and the encoder as its transpose.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sae_refusal.sae.base import SAE_REGISTRY, SAEOutput, SparseAutoencoder, fvu_of

__all__ = ["ReLUSAE"]


class ReLUSAE(SparseAutoencoder):
    """ReLU SAE with the decoder-norm-aware L1 penalty.

    Args:
        d_model: Input width.
        n_latents: Dictionary size.
        l1_coef: Weight ``lambda`` of the L1 term.
        init_decoder_norm: Norm of each decoder row at initialisation.
        generator: RNG of the initial weights (the global RNG is never touched).
    """

    architecture = "relu_l1"
    unit_norm_decoder = False

    def __init__(
        self,
        d_model: int,
        n_latents: int,
        l1_coef: float = 0.5,
        init_decoder_norm: float = 0.1,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(d_model, n_latents)
        if l1_coef < 0 or init_decoder_norm <= 0:
            raise ValueError(
                f"l1_coef must be >= 0 and init_decoder_norm > 0, got {l1_coef}, {init_decoder_norm}"
            )
        self.l1_coef, self.init_decoder_norm = l1_coef, init_decoder_norm
        W_dec_FD = torch.randn(n_latents, d_model, generator=generator)
        W_dec_FD *= init_decoder_norm / W_dec_FD.norm(dim=1, keepdim=True)
        self.W_dec_FD = nn.Parameter(W_dec_FD)
        self.W_enc_DF = nn.Parameter(W_dec_FD.T.clone())
        self.b_enc_F = nn.Parameter(torch.zeros(n_latents))
        self.b_dec_D = nn.Parameter(torch.zeros(d_model))

    def config(self) -> dict[str, Any]:
        return {
            "d_model": self.d_model,
            "n_latents": self.n_latents,
            "l1_coef": self.l1_coef,
            "init_decoder_norm": self.init_decoder_norm,
        }

    def _encode_scaled(self, x_BD: torch.Tensor) -> torch.Tensor:
        return torch.relu((x_BD - self.b_dec_D) @ self.W_enc_DF + self.b_enc_F)

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Dense codes ``(B, F)`` (normalised space)."""
        return self._encode_scaled(x_BD.float() * self.input_scale)

    def decode(self, latents_BF: torch.Tensor) -> torch.Tensor:
        """Raw-space reconstruction of dense codes."""
        return (latents_BF @ self.W_dec_FD + self.b_dec_D) / self.input_scale

    def forward(self, x_BD: torch.Tensor, return_latents: bool = False) -> SAEOutput:
        x_BD = x_BD.float() * self.input_scale
        latents_BF = self._encode_scaled(x_BD)
        recon_BD = latents_BF @ self.W_dec_FD + self.b_dec_D
        mse = (recon_BD - x_BD).pow(2).sum(-1).mean()
        l1 = (latents_BF * self.W_dec_FD.norm(dim=1)).sum(-1).mean()
        active_BF = latents_BF > 0
        return SAEOutput(
            recon_BD=recon_BD / self.input_scale,
            latents_BF=latents_BF if return_latents else None,
            loss=mse + self.l1_coef * l1,
            mse=mse,
            fvu=fvu_of(x_BD, recon_BD),
            l0=active_BF.sum(-1).float().mean(),
            fired_F=active_BF.any(0),
            parts={"l1": l1},
        )


SAE_REGISTRY[ReLUSAE.architecture] = ReLUSAE
