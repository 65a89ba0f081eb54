"""``SAEModule``: a thin LightningModule training one TopK SAE on cached activations.

The SAE itself is the plain :class:`~sae_refusal.sae.topk.TopKSAE`; this class only wires the loss,
decoder-norm constraint, metrics and export. The SAE export (``cfg.json`` + ``sae.safetensors``) is written
at the end of fit to ``<log_dir>/sae`` on global rank zero.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

from sae_refusal.sae.topk import TopKSAE, TopKSAEConfig


class SAEModule(L.LightningModule):
    """Train a TopK sparse autoencoder on residual activations.

    Args:
        d_model: Input width (linked from the data module; leave unset in configs).
        expansion_factor: Latents per input dimension.
        k: Active latents per input.
        lr: Adam learning rate.
        seed: Seed of the weight initialisation (own generator; global RNG untouched).
    """

    def __init__(self, d_model: int, expansion_factor: int = 8, k: int = 32, lr: float = 1e-3, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        if expansion_factor < 1:
            raise ValueError(f"model.expansion_factor must be >= 1, got {expansion_factor}")
        generator = torch.Generator().manual_seed(seed)
        self.sae = TopKSAE(TopKSAEConfig(d_model, expansion_factor * d_model, k), generator=generator)
        self.lr = lr
        self.fired_F: torch.Tensor
        self.register_buffer(
            "fired_F", torch.zeros(self.sae.cfg.n_latents, dtype=torch.bool), persistent=False
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.sae(batch["acts"])
        if not torch.isfinite(out.mse):
            raise FloatingPointError(
                f"non-finite SAE loss at step {self.global_step} (seed {self.hparams['seed']})"
            )
        self.fired_F |= (out.latents_BF > 0).any(0)
        n = batch["acts"].shape[0]
        self.log_dict({"train/mse": out.mse, "train/fvu": out.fvu}, prog_bar=True, batch_size=n)
        self.log("train/l0", (out.latents_BF > 0).float().sum(-1).mean(), batch_size=n)
        return out.mse

    def on_train_epoch_end(self) -> None:
        self.log("train/dead_fraction", 1.0 - self.fired_F.float().mean(), sync_dist=True)
        self.fired_F.zero_()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self.sae(batch["acts"])
        n = batch["acts"].shape[0]
        self.log_dict({"val/mse": out.mse, "val/fvu": out.fvu}, prog_bar=True, batch_size=n, sync_dist=True)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self.sae(batch["acts"])
        n = batch["acts"].shape[0]
        self.log_dict({"test/mse": out.mse, "test/fvu": out.fvu}, batch_size=n, sync_dist=True)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.sae.remove_parallel_grads()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.sae.normalize_decoder()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.sae.parameters(), lr=self.lr)

    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero and self.trainer.log_dir is not None:
            self.sae.save(Path(self.trainer.log_dir) / "sae")
