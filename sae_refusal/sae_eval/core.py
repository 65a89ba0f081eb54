"""Core (unsupervised) SAE metrics on held-out rows, SAEBench style.

``x`` are raw residual activations ``(N, D)``, ``z = sae.encode(x)`` the codes ``(N, F)`` and
``x_hat = sae.decode(z)`` the reconstruction, in eval mode (BatchTopK then uses its inference threshold).
Every architecture's codes are non-negative; a latent *fires* on a row when its code is ``> 0``.

* **FVU** ``= sum_n ||x_n - x_hat_n||^2 / sum_n ||x_n - mean(x)||^2``, the mean taken over the same rows
  (:func:`sae_refusal.sae.base.fvu_of`, the number ``SAEModule`` logs as ``val|test/seed{n}/fvu``);
  **explained variance** ``= 1 - FVU``. Both are scale-free, so raw and normalised space agree.
* **L0** = mean over rows of the number of latents that fire.
* **dead share** = share of latents that fire on no row; **dense share** = share of latents that fire on
  more than ``dense_threshold`` of the rows.
* **density** of latent ``f`` = share of rows it fires on; the histogram is of ``log10(density)`` over the
  latents that fire at all (dead latents are counted apart: ``log10(0)`` has no bin).
* **shrinkage** = mean over rows of ``||x_hat_n|| / ||x_n||`` (rows with ``x_n = 0`` left out; 1 is no
  shrinkage, SAEBench's ``l2_ratio``); ``shrinkage_of_sums`` = ``sum ||x_hat_n|| / sum ||x_n||``.
* **max decoder cosine** of latent ``f`` = ``max_{g != f} cos(W_dec[f], W_dec[g])``, the *signed* cosine:
  codes are non-negative, so only parallel decoder rows are redundant (an anti-parallel pair writes opposite
  directions). Reported as mean, median and share above ``0.9`` over all latents.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sae_refusal.sae.base import SparseAutoencoder, fvu_of

__all__ = [
    "CoreMetrics",
    "core_metrics",
    "density_histogram",
    "encode_decode",
    "firing_density",
    "max_decoder_cosine",
]

#: Share of latents whose max decoder cosine counts as redundant.
REDUNDANT_COSINE = 0.9


@dataclass(frozen=True)
class CoreMetrics:
    """Core metrics of one SAE on one set of rows (definitions in the module docstring).

    Args:
        n_rows: Rows scored.
        n_latents: Dictionary size ``F``.
        fvu: Fraction of variance unexplained.
        explained_variance: ``1 - fvu``.
        l0: Mean latents firing per row.
        dead_share: Share of latents firing on no row.
        dense_share: Share of latents firing on more than ``dense_threshold`` of the rows.
        dense_threshold: The density above which a latent is dense.
        shrinkage: Mean over rows of ``||x_hat|| / ||x||``.
        shrinkage_of_sums: ``sum ||x_hat|| / sum ||x||``.
        max_cosine_mean: Mean over latents of the max decoder cosine with another latent.
        max_cosine_median: Its median.
        max_cosine_share_above: Share of latents whose max decoder cosine exceeds ``0.9``.
    """

    n_rows: int
    n_latents: int
    fvu: float
    explained_variance: float
    l0: float
    dead_share: float
    dense_share: float
    dense_threshold: float
    shrinkage: float
    shrinkage_of_sums: float
    max_cosine_mean: float
    max_cosine_median: float
    max_cosine_share_above: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)


@torch.no_grad()
def encode_decode(
    sae: SparseAutoencoder, acts_ND: torch.Tensor, batch_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``(N, F)`` and reconstruction ``(N, D)`` of raw rows, in eval mode, batched; on the CPU."""
    was_training = sae.training
    sae.eval()
    try:
        device = sae.W_dec_FD.device
        codes, recons = [], []
        for i in range(0, len(acts_ND), batch_size):
            z_BF = sae.encode(acts_ND[i : i + batch_size].to(device).float())
            recons.append(sae.decode(z_BF).float().cpu())
            codes.append(z_BF.float().cpu())
    finally:
        sae.train(was_training)
    if not codes:
        return acts_ND.new_zeros(0, sae.n_latents), acts_ND.new_zeros(0, sae.d_model)
    return torch.cat(codes), torch.cat(recons)


def firing_density(codes_NF: torch.Tensor) -> torch.Tensor:
    """Per latent, the share of rows whose code is ``> 0`` (float64, ``(F,)``)."""
    if codes_NF.ndim != 2 or codes_NF.shape[0] == 0:
        raise ValueError(f"codes must be a non-empty (N, F) tensor, got shape {tuple(codes_NF.shape)}")
    return (codes_NF > 0).double().mean(0)


def density_histogram(density_F: torch.Tensor, n_rows: int, bins: int = 20) -> dict[str, Any]:
    """Histogram of ``log10(density)`` over the latents that fire, and the dead latents apart.

    The bins span ``[log10(1 / n_rows), 0]`` (the rarest and the densest a latent can be on ``n_rows``
    rows) in ``bins`` equal steps; the last bin includes 0.

    Returns:
        ``{"edges": [bins + 1 floats], "counts": [bins ints], "dead": int}``.
    """
    if n_rows < 1 or bins < 1:
        raise ValueError(f"n_rows and bins must be >= 1, got {n_rows}, {bins}")
    alive = density_F[density_F > 0].double().numpy()
    low = -math.log10(n_rows) if n_rows > 1 else -1.0
    counts, edges = np.histogram(np.log10(alive), bins=bins, range=(low, 0.0))
    return {
        "edges": [float(e) for e in edges],
        "counts": [int(c) for c in counts],
        "dead": int((density_F == 0).sum()),
    }


def max_decoder_cosine(W_dec_FD: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Per latent ``f``, ``max_{g != f} cos(W_dec[f], W_dec[g])`` (signed; float32 ``(F,)`` on the CPU).

    A zero decoder row has cosine 0 with every row. One latent alone has no other: NaN.
    """
    if W_dec_FD.ndim != 2:
        raise ValueError(f"W_dec must be 2-D (F, D), got shape {tuple(W_dec_FD.shape)}")
    n = W_dec_FD.shape[0]
    if n < 2:
        return torch.full((n,), math.nan)
    with torch.no_grad():
        unit_FD = F.normalize(W_dec_FD.detach().float(), dim=1)
        out = torch.empty(n, dtype=torch.float32)
        for start in range(0, n, chunk):
            cos_cF = unit_FD[start : start + chunk] @ unit_FD.T
            rows = torch.arange(cos_cF.shape[0], device=cos_cF.device)
            cos_cF[rows, rows + start] = -math.inf  # not itself
            out[start : start + chunk] = cos_cF.max(1).values.cpu()
    return out


def core_metrics(
    acts_ND: torch.Tensor,
    codes_NF: torch.Tensor,
    recon_ND: torch.Tensor,
    W_dec_FD: torch.Tensor,
    *,
    dense_threshold: float = 0.1,
) -> CoreMetrics:
    """The core metrics of one SAE (module docstring) from rows, their codes and reconstruction.

    Args:
        acts_ND: Raw activations.
        codes_NF: Their codes (``sae.encode``).
        recon_ND: Their reconstruction (``sae.decode(codes)``).
        W_dec_FD: The SAE's decoder rows.
        dense_threshold: Density above which a latent is dense.

    Raises:
        ValueError: On mismatched or empty shapes.
    """
    if acts_ND.shape != recon_ND.shape or acts_ND.shape[0] != codes_NF.shape[0] or acts_ND.shape[0] == 0:
        raise ValueError(
            f"rows must match and be non-empty: acts {tuple(acts_ND.shape)}, codes {tuple(codes_NF.shape)}, "
            f"recon {tuple(recon_ND.shape)}"
        )
    x, x_hat = acts_ND.double(), recon_ND.double()
    fvu = float(fvu_of(x, x_hat))
    density_F = firing_density(codes_NF)
    norm_N, recon_norm_N = x.norm(dim=1), x_hat.norm(dim=1)
    nonzero = norm_N > 0
    shrinkage = float((recon_norm_N[nonzero] / norm_N[nonzero]).mean()) if bool(nonzero.any()) else math.nan
    total = float(norm_N.sum())
    max_cos_F = max_decoder_cosine(W_dec_FD).double()
    finite = max_cos_F[torch.isfinite(max_cos_F)]
    return CoreMetrics(
        n_rows=int(acts_ND.shape[0]),
        n_latents=int(codes_NF.shape[1]),
        fvu=fvu,
        explained_variance=1.0 - fvu,
        l0=float((codes_NF > 0).double().sum(1).mean()),
        dead_share=float((density_F == 0).double().mean()),
        dense_share=float((density_F > dense_threshold).double().mean()),
        dense_threshold=dense_threshold,
        shrinkage=shrinkage,
        shrinkage_of_sums=float(recon_norm_N.sum()) / total if total > 0 else math.nan,
        max_cosine_mean=float(finite.mean()) if finite.numel() else math.nan,
        max_cosine_median=float(np.median(finite.numpy())) if finite.numel() else math.nan,
        max_cosine_share_above=float((finite > REDUNDANT_COSINE).double().mean())
        if finite.numel()
        else math.nan,
    )
