"""A small TopK SAE trained inside the steering study on its own TRAIN residuals, for the latent-space gates.

The study's latent gates (a probe on SAE codes, the L1 multinomial head) need an SAE at the steering layer
trained on the same prompts the residual gates see. :func:`train_gate_sae` fits one with the project's
:class:`~sae_refusal.sae.topk.TopKSAE` (inputs scaled to mean norm ``sqrt(D)``, decoder bias at the data mean,
unit-norm decoder rows, AuxK on) in a plain loop: no Lightning, no cache, a few seconds on a GPU. It is seeded
by its own generator (the global RNG is not touched) and reports its FVU on the rows it was given.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sae_refusal.sae.base import mean_norm_scale
from sae_refusal.sae.topk import TopKSAE

__all__ = ["train_gate_sae"]


def train_gate_sae(
    acts_ND: Tensor,
    *,
    n_latents: int = 2048,
    k: int = 32,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[TopKSAE, dict[str, Any]]:
    """Fit a TopK SAE on ``acts_ND`` (TRAIN-split residuals at the steering layer).

    Args:
        acts_ND: Residuals, one row per prompt (any float dtype; CPU or device).
        n_latents: Dictionary size.
        k: Active latents per row.
        steps: Adam steps of ``batch_size`` rows drawn with replacement.
        batch_size: Rows per step.
        lr: Adam learning rate.
        seed: Seed of the initial weights and the row draws.
        device: Where to train.

    Returns:
        The SAE (on CPU, eval mode) and a report: its settings and FVU / L0 on ``acts_ND``.

    Raises:
        ValueError: On fewer than two rows, non-finite rows, or settings out of range (naming the argument).
    """
    if acts_ND.ndim != 2 or acts_ND.shape[0] < 2:
        raise ValueError(f"acts_ND: expected (N >= 2, D) residuals, got shape {tuple(acts_ND.shape)}")
    for key, value in (("n_latents", n_latents), ("k", k), ("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}: expected an integer >= 1, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr: must be > 0, got {lr}")
    x_ND = acts_ND.detach().float().to(device)
    if not bool(torch.isfinite(x_ND).all()):
        raise ValueError("acts_ND: non-finite values")
    generator = torch.Generator().manual_seed(seed)
    sae = TopKSAE(
        x_ND.shape[1], n_latents, k, aux_k=min(256, n_latents // 2), dead_after_steps=200, generator=generator
    )
    scale = mean_norm_scale(x_ND.cpu())
    with torch.no_grad():
        sae.set_input_scale(scale)
        sae.b_dec_D.copy_(x_ND.mean(0).cpu() * scale)
    sae.to(device).train()
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    for _ in range(steps):
        rows = torch.randint(0, x_ND.shape[0], (batch_size,), generator=generator).to(x_ND.device)
        out = sae(x_ND[rows])
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.update_firing(out.fired_F)
        sae.remove_parallel_grads()
        optimizer.step()
        sae.normalize_decoder()
    sae.eval()
    with torch.no_grad():
        out = sae(x_ND)
    report = {
        "n_latents": n_latents,
        "k": k,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "n_rows": int(x_ND.shape[0]),
        "fvu": float(out.fvu),
        "l0": float(out.l0),
        "dead_share": float(sae.dead_F.float().mean()),
    }
    return sae.cpu(), report
