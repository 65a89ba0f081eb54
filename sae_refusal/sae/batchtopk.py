"""BatchTopK (Bussmann et al., 2024) and Matryoshka-BatchTopK (Bussmann et al., 2025) sparse autoencoders.

BatchTopK relaxes TopK's "k latents per row" to "k latents per row on average over the batch"::

    x'    = input_scale * x
    pre   = (x' - b_dec) @ W_enc_FD.T + b_enc                      (B, F)
    z     = ReLU(pre) * M,   M = the k * B largest entries of ReLU(pre) over the whole (flattened) batch
    x_hat = (z @ W_dec_FD + b_dec) / input_scale
    loss  = mean_b ||x'_b - x'_hat_b||^2 + aux_coef * AuxK

so a row gets as many latents as it needs (variable per row, mean ``k``). Training-mode codes depend on the
batch; inference must not, so a threshold ``theta`` (the buffer ``threshold``, saved with the state dict and
the export) is estimated during training and eval-mode codes are ``z = ReLU(pre) * (pre > theta)``.

Threshold estimate (the choice of dictionary_learning's ``BatchTopKSAE``; SAELens' ``BatchTopKTrainingSAE``
does the same with ``lr = 1 - momentum``): after each training forward pass, with ``m`` the smallest *kept
positive* activation of the batch (the ``k*B``-th largest value, when positive),

    theta <- m                                         on the first update (theta starts at -1, "unset")
    theta <- momentum * theta + (1 - momentum) * m     afterwards.

Thresholding at the batch's own ``m`` keeps exactly its ``k*B`` entries, so on rows like the training ones
eval-mode L0 is about ``k``. An SAE whose threshold was never set (``theta < 0``, e.g. Lightning's sanity
validation before the first step) uses the batch top-k in eval mode too. Under DDP each rank selects within
its own batch, and ``m`` is the mean of the ranks' smallest kept activations (``rank_mean``), so
every rank keeps the same ``theta`` and rank zero's export and checkpoints hold the estimate of the whole
global batch.

AuxK is TopK's (:mod:`sae_refusal.sae.topk`): latents that have not fired for ``dead_after_steps`` training
steps are dead; the ``aux_k`` largest (ReLU'd) pre-activations among them per row reconstruct the residual
``x' - x'_hat`` (no decoder bias), and ``aux_coef * sum ||aux_recon - residual||^2 / sum ||residual||^2`` is
added to the loss. Unlike :class:`~sae_refusal.sae.topk.TopKSAE` the forward pass here is dense (a
``(B, F)`` code matrix): the batch-level selection has no fixed ``k`` per row for the sparse kernels.

Matryoshka-BatchTopK: nested prefixes ``m_1 < m_2 < ... < m_P = F``; each prefix must reconstruct the input
alone (with the decoder bias), so the first ``m_1`` latents form a usable smaller SAE::

    x'_hat^(p) = z[:, :m_p] @ W_dec_FD[:m_p] + b_dec
    loss       = sum_p mean_b ||x'_b - x'_hat^(p)_b||^2 + aux_coef * AuxK

``mse``, ``fvu`` and ``recon_BD`` are those of the full SAE (the last prefix); ``parts`` holds each prefix's
``mse_prefix{m}`` (the loss terms) and ``fvu_prefix{m}`` (diagnostics, not in the loss), so
:class:`~sae_refusal.sae.module.SAEModule` logs them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from sae_refusal.sae.architectures import SAEArchitecture
from sae_refusal.sae.base import SAE_REGISTRY, SAEOutput, SparseAutoencoder, fvu_of
from sae_refusal.sae.settings import check_batchtopk_settings, check_prefix_fractions
from sae_refusal.sae.topk import DeadLatentCounter

__all__ = [
    "BatchTopK",
    "BatchTopKSAE",
    "MatryoshkaBatchTopK",
    "MatryoshkaBatchTopKSAE",
    "check_batchtopk_settings",
    "prefix_sizes",
]


def prefix_sizes(prefix_fractions: Sequence[float], n_latents: int) -> list[int]:
    """Prefix sizes ``m_p = round(f_p * n_latents)`` of a Matryoshka SAE.

    Raises:
        ValueError: Naming ``model.architecture.prefix_fractions`` unless the fractions are in ``(0, 1]``,
            strictly increasing, end with ``1.0`` and give strictly increasing sizes >= 1
            (:func:`~sae_refusal.sae.settings.check_prefix_fractions`).
    """
    sizes = check_prefix_fractions(prefix_fractions, n_latents)
    assert sizes is not None  # the width is given
    return sizes


class BatchTopKSAE(DeadLatentCounter, SparseAutoencoder):
    """BatchTopK sparse autoencoder with AuxK and an inference threshold (see the module docstring).

    Args:
        d_model: Input width.
        n_latents: Dictionary size.
        k: Mean active latents per input (``k * B`` kept over a training batch of ``B`` rows).
        aux_k: Dead latents used by the AuxK loss (0 disables it).
        aux_coef: Weight of the AuxK loss.
        dead_after_steps: Training steps without firing after which a latent counts as dead.
        threshold_momentum: EMA decay of the inference threshold, in ``[0, 1)``.
        generator: RNG of the initial weights (the global RNG is never touched).

    Attributes:
        rank_mean: As :class:`~sae_refusal.sae.topk.TopKSAE`'s (DDP: the mean over ranks, set by
            :class:`~sae_refusal.sae.module.SAEModule` for the fit); used for the AuxK normaliser and for the
            threshold's statistic (the ranks' mean smallest kept activation, so the ``threshold`` buffer stays
            the same on every rank); a plain attribute, not in :meth:`config`.

    Raises:
        ValueError: On a setting out of range (naming its ``model.architecture.*`` key).
    """

    architecture = "batchtopk"
    unit_norm_decoder = True
    steps_since_fired_F: torch.Tensor
    threshold: torch.Tensor

    def __init__(
        self,
        d_model: int,
        n_latents: int,
        k: int,
        aux_k: int = 256,
        aux_coef: float = 1.0 / 32.0,
        dead_after_steps: int = 1000,
        threshold_momentum: float = 0.99,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(d_model, n_latents)
        check_batchtopk_settings(k, aux_k, aux_coef, dead_after_steps, threshold_momentum, n_latents)
        self.k, self.aux_k, self.aux_coef, self.dead_after_steps = k, aux_k, aux_coef, dead_after_steps
        self.threshold_momentum = float(threshold_momentum)
        self.rank_mean: Callable[[torch.Tensor], torch.Tensor] | None = None
        W_dec_FD = torch.randn(n_latents, d_model, generator=generator)
        W_dec_FD /= W_dec_FD.norm(dim=1, keepdim=True)
        self.W_dec_FD = nn.Parameter(W_dec_FD)
        self.W_enc_FD = nn.Parameter(W_dec_FD.clone())
        self.b_enc_F = nn.Parameter(torch.zeros(n_latents))
        self.b_dec_D = nn.Parameter(torch.zeros(d_model))
        self.register_buffer("steps_since_fired_F", torch.zeros(n_latents, dtype=torch.long))
        self.register_buffer("threshold", torch.tensor(-1.0))  # < 0: not estimated yet

    def config(self) -> dict[str, Any]:
        return {
            "d_model": self.d_model,
            "n_latents": self.n_latents,
            "k": self.k,
            "aux_k": self.aux_k,
            "aux_coef": self.aux_coef,
            "dead_after_steps": self.dead_after_steps,
            "threshold_momentum": self.threshold_momentum,
        }

    def _pre(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Pre-activations of normalised inputs."""
        return torch.addmm(self.b_enc_F, x_BD - self.b_dec_D, self.W_enc_FD.T)

    def _batch_topk(self, relu_BF: torch.Tensor) -> torch.Tensor:
        """``relu_BF`` with only its ``k * B`` largest entries over the whole batch kept."""
        flat = relu_BF.reshape(-1)
        keep = flat.topk(min(self.k * relu_BF.shape[0], flat.numel()), sorted=False).indices
        return torch.zeros_like(flat).scatter(0, keep, flat[keep]).reshape(relu_BF.shape)

    @torch.no_grad()
    def _update_threshold(self, z_BF: torch.Tensor) -> None:
        """EMA of the smallest kept positive activation (see the module docstring).

        Under DDP (``rank_mean`` set) the statistic is the mean over the ranks that kept a positive
        activation, so every rank applies the same update and keeps the same threshold; a batch without one
        leaves the threshold as it is.
        """
        positive = z_BF[z_BF > 0]
        found = z_BF.new_tensor(float(positive.numel() > 0))
        # (smallest * found, found): the reduction below is a collective, so every rank calls it
        stat = torch.stack([positive.min() if positive.numel() else z_BF.new_zeros(()), found])
        if self.rank_mean is not None:
            stat = self.rank_mean(stat)
        if float(stat[1]) <= 0:
            return
        smallest = (stat[0] / stat[1]).to(self.threshold.dtype)
        if float(self.threshold) < 0:
            self.threshold.copy_(smallest)
        else:
            self.threshold.mul_(self.threshold_momentum).add_((1.0 - self.threshold_momentum) * smallest)

    def _codes(self, pre_BF: torch.Tensor) -> torch.Tensor:
        """Training: batch top-k (and a threshold update); eval: ``ReLU(pre) * (pre > theta)``."""
        relu_BF = pre_BF.relu()
        if self.training or float(self.threshold) < 0:
            z_BF = self._batch_topk(relu_BF)
            if self.training:
                self._update_threshold(z_BF)
            return z_BF
        return relu_BF * (pre_BF > self.threshold)

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Dense codes ``(B, F)`` of raw-space inputs (eval mode: thresholded, independent of the batch)."""
        return self._codes(self._pre(x_BD.float() * self.input_scale))

    def decode(self, latents_BF: torch.Tensor) -> torch.Tensor:
        """Raw-space reconstruction of dense codes."""
        return (latents_BF @ self.W_dec_FD + self.b_dec_D) / self.input_scale

    def _aux_loss(
        self, pre_BF: torch.Tensor, x_BD: torch.Tensor, recon_BD: torch.Tensor
    ) -> torch.Tensor | None:
        """TopK's AuxK loss on the dead latents, or ``None`` when it is off or no latent is dead."""
        if not self.training or self.aux_k == 0:
            return None
        dead_F = self.dead_F
        n_dead = int(dead_F.sum())
        if n_dead == 0:
            return None
        masked_BF = pre_BF.masked_fill(~dead_F, float("-inf"))
        values_BA, indices_BA = masked_BF.topk(min(self.aux_k, n_dead), dim=-1, sorted=False)
        aux_z_BF = torch.zeros_like(pre_BF).scatter(1, indices_BA, values_BA.relu())
        residual_BD = (x_BD - recon_BD).detach()
        energy = residual_BD.pow(2).sum()
        if self.rank_mean is not None:
            energy = self.rank_mean(energy)
        return (aux_z_BF @ self.W_dec_FD - residual_BD).pow(2).sum() / energy.clamp_min(1e-12)

    def _reconstruction(
        self, z_BF: torch.Tensor, x_BD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``(recon_BD, mse, reconstruction loss, parts)``, normalised space (Matryoshka overrides it)."""
        recon_BD = z_BF @ self.W_dec_FD + self.b_dec_D
        mse = (recon_BD - x_BD).pow(2).sum(-1).mean()
        return recon_BD, mse, mse, {}

    def forward(self, x_BD: torch.Tensor, return_latents: bool = False) -> SAEOutput:
        x_BD = x_BD.float() * self.input_scale
        pre_BF = self._pre(x_BD)
        z_BF = self._codes(pre_BF)
        recon_BD, mse, loss, parts = self._reconstruction(z_BF, x_BD)
        aux = self._aux_loss(pre_BF, x_BD, recon_BD)
        if aux is not None:
            parts["aux"] = aux
            loss = loss + self.aux_coef * aux
        active_BF = z_BF > 0
        return SAEOutput(
            recon_BD=recon_BD / self.input_scale,
            latents_BF=z_BF if return_latents else None,
            loss=loss,
            mse=mse,
            fvu=fvu_of(x_BD, recon_BD),
            l0=active_BF.sum(-1).float().mean(),
            fired_F=active_BF.any(0),
            parts=parts,
        )


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """Matryoshka-BatchTopK SAE: every prefix of the latents reconstructs (see the module docstring).

    Args:
        d_model: Input width.
        n_latents: Dictionary size.
        k: Mean active latents per input over the whole dictionary.
        prefixes: Nested prefix sizes, strictly increasing, the last equal to ``n_latents``.
        aux_k, aux_coef, dead_after_steps, threshold_momentum, generator: As :class:`BatchTopKSAE`.

    Raises:
        ValueError: On a setting out of range, or ``prefixes`` not increasing up to ``n_latents`` (naming
            ``model.architecture.prefixes``).
    """

    architecture = "matryoshka_batchtopk"

    def __init__(
        self,
        d_model: int,
        n_latents: int,
        k: int,
        prefixes: Sequence[int],
        aux_k: int = 256,
        aux_coef: float = 1.0 / 32.0,
        dead_after_steps: int = 1000,
        threshold_momentum: float = 0.99,
        generator: torch.Generator | None = None,
    ) -> None:
        sizes = list(prefixes)
        if (
            not sizes
            or any(not isinstance(m, int) or isinstance(m, bool) for m in sizes)
            or sizes[0] < 1
            or any(b <= a for a, b in itertools.pairwise(sizes))
            or sizes[-1] != n_latents
        ):
            raise ValueError(
                f"model.architecture.prefixes must be strictly increasing sizes >= 1 ending at n_latents="
                f"{n_latents}, got {sizes}"
            )
        super().__init__(
            d_model, n_latents, k, aux_k, aux_coef, dead_after_steps, threshold_momentum, generator
        )
        self.prefixes = sizes

    def config(self) -> dict[str, Any]:
        return {**super().config(), "prefixes": list(self.prefixes)}

    def _reconstruction(
        self, z_BF: torch.Tensor, x_BD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Cumulative prefix reconstructions; the loss is the sum of the prefix MSEs."""
        recon_BD = self.b_dec_D.expand_as(x_BD)
        loss = x_BD.new_zeros(())
        parts: dict[str, torch.Tensor] = {}
        mse = loss
        start = 0
        for m in self.prefixes:
            recon_BD = recon_BD + z_BF[:, start:m] @ self.W_dec_FD[start:m]
            mse = (recon_BD - x_BD).pow(2).sum(-1).mean()
            loss = loss + mse
            parts[f"mse_prefix{m}"] = mse
            parts[f"fvu_prefix{m}"] = fvu_of(x_BD, recon_BD).detach()
            start = m
        return recon_BD, mse, loss, parts


SAE_REGISTRY[BatchTopKSAE.architecture] = BatchTopKSAE
SAE_REGISTRY[MatryoshkaBatchTopKSAE.architecture] = MatryoshkaBatchTopKSAE


class BatchTopK(SAEArchitecture):
    """BatchTopK SAE with AuxK and an inference threshold (see :class:`BatchTopKSAE`).

    Args:
        k: Mean active latents per input (``k * B`` kept over a training batch).
        aux_k: Dead latents used by the AuxK loss (0 disables it).
        aux_coef: Weight of the AuxK loss.
        dead_after_steps: Training steps without firing after which a latent counts as dead.
        threshold_momentum: EMA decay ``beta`` of the inference threshold,
            ``theta <- beta * theta + (1 - beta) * min kept activation``.
    """

    def __init__(
        self,
        k: int = 32,
        aux_k: int = 256,
        aux_coef: float = 1.0 / 32.0,
        dead_after_steps: int = 1000,
        threshold_momentum: float = 0.99,
    ):
        check_batchtopk_settings(k, aux_k, aux_coef, dead_after_steps, threshold_momentum)
        self.k, self.aux_k, self.aux_coef, self.dead_after_steps = k, aux_k, aux_coef, dead_after_steps
        self.threshold_momentum = threshold_momentum

    def _check(self, n_latents: int) -> None:
        check_batchtopk_settings(
            self.k, self.aux_k, self.aux_coef, self.dead_after_steps, self.threshold_momentum, n_latents
        )

    def build(self, d_model: int, n_latents: int, generator: torch.Generator) -> SparseAutoencoder:
        self._check(n_latents)
        return BatchTopKSAE(
            d_model,
            n_latents,
            self.k,
            self.aux_k,
            self.aux_coef,
            self.dead_after_steps,
            self.threshold_momentum,
            generator,
        )


class MatryoshkaBatchTopK(BatchTopK):
    """Matryoshka-BatchTopK SAE (see :class:`MatryoshkaBatchTopKSAE`).

    The prefixes are fractions of the width, because the width (``expansion_factor * d_model``) is only known
    when the SAE is built: ``m_p = round(f_p * n_latents)``, strictly increasing, the last fraction ``1.0``.

    Args:
        k: Mean active latents per input over the whole dictionary.
        prefix_fractions: Nested prefix sizes as fractions of ``n_latents`` (e.g. ``[0.0625, 0.25, 1.0]``).
        aux_k, aux_coef, dead_after_steps, threshold_momentum: As :class:`BatchTopK`.
    """

    def __init__(
        self,
        k: int = 32,
        prefix_fractions: Sequence[float] = (0.0625, 0.25, 1.0),
        aux_k: int = 256,
        aux_coef: float = 1.0 / 32.0,
        dead_after_steps: int = 1000,
        threshold_momentum: float = 0.99,
    ):
        super().__init__(k, aux_k, aux_coef, dead_after_steps, threshold_momentum)
        fractions = [
            float(f) if isinstance(f, int | float) and not isinstance(f, bool) else f
            for f in prefix_fractions
        ]
        check_prefix_fractions(fractions)  # the sizes are checked at build, when the width is known
        self.prefix_fractions = fractions

    def build(self, d_model: int, n_latents: int, generator: torch.Generator) -> SparseAutoencoder:
        self._check(n_latents)
        return MatryoshkaBatchTopKSAE(
            d_model,
            n_latents,
            self.k,
            prefix_sizes(self.prefix_fractions, n_latents),
            self.aux_k,
            self.aux_coef,
            self.dead_after_steps,
            self.threshold_momentum,
            generator,
        )
