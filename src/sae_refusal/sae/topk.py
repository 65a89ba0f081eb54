"""TopK sparse autoencoder (Gao et al., 2024) as a plain ``nn.Module``.

Shapes: ``B`` batch, ``D`` d_model, ``F`` latents (``expansion_factor * D``).

    z = TopK_k(ReLU((x - b_dec) @ W_enc_DF + b_enc_F))      keep the k largest pre-activations
    x_hat = z @ W_dec_FD + b_dec_D

The encoder starts as the transpose of the unit-norm decoder, and the decoder rows are kept at unit norm
(:meth:`TopKSAE.normalize_decoder`, with :meth:`TopKSAE.remove_parallel_grads` before each step).
Parameters are float32 whatever dtype the activations come in.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sae_refusal.atomic import AtomicFolder


@dataclass(frozen=True)
class TopKSAEConfig:
    """Shape of a TopK SAE.

    Args:
        d_model: Input width.
        n_latents: Dictionary size.
        k: Active latents per input.
    """

    d_model: int
    n_latents: int
    k: int

    def __post_init__(self) -> None:
        if self.d_model < 1 or self.n_latents < 1:
            raise ValueError(f"d_model and n_latents must be >= 1, got {self.d_model}, {self.n_latents}")
        if not 1 <= self.k <= self.n_latents:
            raise ValueError(f"k must be in [1, n_latents={self.n_latents}], got {self.k}")


class SAEOutput(NamedTuple):
    """What a forward pass returns.

    Attributes:
        recon_BD: Reconstruction ``x_hat``.
        latents_BF: Sparse codes ``z`` (dense tensor, at most k non-zeros per row).
        mse: Mean over the batch of ``||x - x_hat||^2`` (summed over D).
        fvu: Fraction of variance unexplained: ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``.
    """

    recon_BD: torch.Tensor
    latents_BF: torch.Tensor
    mse: torch.Tensor
    fvu: torch.Tensor


class TopKSAE(nn.Module):
    """TopK sparse autoencoder.

    Args:
        cfg: Shape.
        generator: RNG for the initial weights (the global RNG is never touched).
    """

    def __init__(self, cfg: TopKSAEConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        W_dec_FD = torch.randn(cfg.n_latents, cfg.d_model, generator=generator)
        W_dec_FD /= W_dec_FD.norm(dim=1, keepdim=True)
        self.W_dec_FD = nn.Parameter(W_dec_FD)
        self.W_enc_DF = nn.Parameter(W_dec_FD.T.clone())
        self.b_enc_F = nn.Parameter(torch.zeros(cfg.n_latents))
        self.b_dec_D = nn.Parameter(torch.zeros(cfg.d_model))

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        pre_BF = torch.relu((x_BD.float() - self.b_dec_D) @ self.W_enc_DF + self.b_enc_F)
        values_BK, indices_BK = pre_BF.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre_BF).scatter_(-1, indices_BK, values_BK)

    def decode(self, latents_BF: torch.Tensor) -> torch.Tensor:
        return latents_BF @ self.W_dec_FD + self.b_dec_D

    def forward(self, x_BD: torch.Tensor) -> SAEOutput:
        x_BD = x_BD.float()
        latents_BF = self.encode(x_BD)
        recon_BD = self.decode(latents_BF)
        sq_err = (recon_BD - x_BD).pow(2).sum(-1)
        total_var = (x_BD - x_BD.mean(0, keepdim=True)).pow(2).sum(-1).sum().clamp_min(1e-12)
        return SAEOutput(recon_BD, latents_BF, sq_err.mean(), sq_err.sum() / total_var)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder row to unit norm."""
        self.W_dec_FD.div_(self.W_dec_FD.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Drop the gradient component along each (unit) decoder row, so steps do not change its norm."""
        if self.W_dec_FD.grad is None:
            return
        parallel_F = (self.W_dec_FD.grad * self.W_dec_FD).sum(-1, keepdim=True)
        self.W_dec_FD.grad -= parallel_F * self.W_dec_FD

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``cfg.json`` + ``sae.safetensors`` into ``folder`` atomically (temp folder + rename)."""
        with AtomicFolder(folder) as out:
            tmp = out.tmp
            (tmp / "cfg.json").write_text(json.dumps({"architecture": "topk", **asdict(self.cfg)}, indent=2))
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                str(tmp / "sae.safetensors"),
            )
            return out.commit()

    @classmethod
    def load(cls, folder: str | os.PathLike[str], device: str | torch.device = "cpu") -> TopKSAE:
        """Load an export written by :meth:`save` (no Lightning needed)."""
        folder = Path(folder)
        cfg_path = folder / "cfg.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"no SAE export at {folder} (missing cfg.json)")
        raw = json.loads(cfg_path.read_text())
        if raw.pop("architecture", "topk") != "topk":
            raise ValueError(f"{cfg_path}: not a TopK SAE export")
        sae = cls(TopKSAEConfig(**raw))
        sae.load_state_dict(load_file(str(folder / "sae.safetensors"), device=str(device)))
        return sae.to(device)
