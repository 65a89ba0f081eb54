"""Model A's SAE read on model B's residual stream through fitted linear maps (B -> A in, A -> B out).

When two models have different widths (or a map is asked for between models of the same width), A's SAE
cannot read B's activations directly. :class:`MappedSAE` wraps it: codes are A's SAE codes of B's
activations carried into A's space, ``z = enc_A(M_BA(x_B))``, and reconstructions are carried back,
``x_hat_B = M_AB(dec_A(z))``. Decoder *directions* (SAS vectors, latent edits) go back through the linear
part of ``M_AB`` only: a difference of codes maps to a difference of reconstructions without the bias.

It is a :class:`~sae_refusal.sae.base.SparseAutoencoder` of width ``E`` (B's), so everything that takes an SAE
(feature analysis, splice metrics, latent steering) runs on B unchanged. It is never trained and never saved:
the transfer job saves the inner SAE's export path and the maps' artifacts instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sae_refusal.sae.base import SAEOutput, SparseAutoencoder, fvu_of
from sae_refusal.transfer.linear_map import LinearMap

__all__ = ["MappedSAE"]


class MappedSAE(SparseAutoencoder):
    """``enc_A(M_BA(x))`` / ``M_AB(dec_A(z))``: A's SAE on B's residual stream.

    Args:
        inner: Model A's SAE (width ``D``).
        into_a: The map from B's residual (width ``E``) to A's (``D``).
        out_of_a: The map from A's residual back to B's.

    Raises:
        ValueError: If the maps' widths do not chain with the SAE's (naming each width).
    """

    architecture = "mapped"
    unit_norm_decoder = False  # the wrapped SAE owns its decoder; nothing here is trained
    W_in_ED: torch.Tensor
    b_in_D: torch.Tensor
    W_out_DE: torch.Tensor
    b_out_E: torch.Tensor

    def __init__(self, inner: SparseAutoencoder, into_a: LinearMap, out_of_a: LinearMap) -> None:
        if into_a.d_out != inner.d_model or out_of_a.d_in != inner.d_model or into_a.d_in != out_of_a.d_out:
            raise ValueError(
                f"maps do not chain with the SAE: B->A is {into_a.d_in}->{into_a.d_out}, A->B is "
                f"{out_of_a.d_in}->{out_of_a.d_out}, the SAE reads width {inner.d_model}"
            )
        super().__init__(into_a.d_in, inner.n_latents)
        self.inner = inner
        device = inner.W_dec_FD.device
        self.register_buffer("W_in_ED", into_a.W_DE.float().to(device))
        self.register_buffer("b_in_D", into_a.b_E.float().to(device))
        self.register_buffer("W_out_DE", out_of_a.W_DE.float().to(device))
        self.register_buffer("b_out_E", out_of_a.b_E.float().to(device))

    # the wrapped SAE's decoder, read where callers look for the SAE's device and dtype
    @property
    def W_dec_FD(self) -> nn.Parameter:  # type: ignore[override]
        return self.inner.W_dec_FD

    @property
    def d_model(self) -> int:
        """Input width: model B's."""
        return int(self.W_in_ED.shape[0])

    @property
    def n_latents(self) -> int:
        """The wrapped SAE's dictionary size."""
        return self.inner.n_latents

    def into_a(self, x_BE: torch.Tensor) -> torch.Tensor:
        """B's residual rows carried into A's space (float32)."""
        return x_BE.float() @ self.W_in_ED + self.b_in_D

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        """A's SAE codes of B's rows."""
        return self.inner.encode(self.into_a(x_BD))

    def decode(self, latents_BF: torch.Tensor) -> torch.Tensor:
        """B-space reconstruction of codes."""
        return self.inner.decode(latents_BF).float() @ self.W_out_DE + self.b_out_E

    def decode_direction(self, v_KF: torch.Tensor) -> torch.Tensor:
        """Latent directions in B's space: A's decoded direction through the map's linear part."""
        return self.inner.decode_direction(v_KF).float() @ self.W_out_DE

    def forward(self, x_BD: torch.Tensor, return_latents: bool = False) -> SAEOutput:
        """The wrapped SAE's output with the reconstruction and FVU in B's space.

        ``loss`` and ``mse`` stay those of the wrapped SAE on the mapped rows (A's normalised space).
        """
        out = self.inner(self.into_a(x_BD), return_latents=return_latents)
        recon_BE = out.recon_BD.float() @ self.W_out_DE + self.b_out_E
        return out._replace(recon_BD=recon_BE, fvu=fvu_of(x_BD.float(), recon_BE))

    def config(self) -> dict[str, Any]:
        return {"inner": {"architecture": self.inner.architecture, **self.inner.config()}}

    def save(self, folder: Any, metadata: dict[str, Any] | None = None) -> Any:
        raise TypeError(
            "a MappedSAE is not saved: keep the wrapped SAE's export and the linear maps' artifacts"
        )
