"""What every sparse autoencoder of the package shares: its output, its input scaling, its export format.

Shapes: ``B`` batch, ``D`` d_model, ``F`` latents, ``K`` active latents per row (TopK).

Input normalisation lives *inside* the SAE: ``input_scale`` (a buffer, saved in ``cfg.json`` and the weights)
multiplies every input before encoding and divides every reconstruction, so a user passes raw residual
activations and gets raw-space reconstructions, exactly as during training. Losses and ``mse`` are measured in
the normalised space (scale chosen so that the mean input norm is ``sqrt(D)``), so they compare across models.

Export layout (one folder per SAE; :func:`sae_refusal.sae.loading.load_sae` reads it without Lightning)::

    cfg.json            {"architecture": "topk" | "relu_l1", <shape and loss settings>, "input_scale": s,
                         "metadata": {...}, "sha256": {"sae.safetensors": <hex>}}
    sae.safetensors     the parameters and buffers, float32 (all finite: a non-finite one is refused)

The sha256 is verified on load (:mod:`sae_refusal.sae.files`); exports written before it was recorded load
unverified.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from sae_refusal.atomic import AtomicFolder
from sae_refusal.provenance import relative_paths
from sae_refusal.sae.files import SHA256_KEY, write_tensors

__all__ = [
    "CONFIG_FILE",
    "INIT_SAMPLE_ROWS",
    "SAE_REGISTRY",
    "WEIGHTS_FILE",
    "SAEOutput",
    "SparseAutoencoder",
    "mean_norm_scale",
    "start_from_data",
]

#: Config file of a project export.
CONFIG_FILE = "cfg.json"
#: Tensor file of a project export.
WEIGHTS_FILE = "sae.safetensors"
#: Most training rows an architecture's data-driven start (:meth:`SparseAutoencoder.init_from_data`) reads.
INIT_SAMPLE_ROWS = 4096


class SAEOutput(NamedTuple):
    """What a forward pass returns.

    Attributes:
        recon_BD: Reconstruction ``x_hat`` in the input's (raw) space.
        latents_BF: Dense codes ``z`` (normalised space), or ``None`` unless asked for (a TopK SAE then never
            builds the ``(B, F)`` matrix).
        loss: The training loss of this SAE: reconstruction + its sparsity / auxiliary terms.
        mse: Batch mean of ``||x - x_hat||^2`` summed over ``D``, in the normalised space.
        fvu: Fraction of variance unexplained, ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` (scale-free).
        l0: Mean number of active latents per row.
        fired_F: Which latents were active for at least one row (bool, ``(F,)``).
        parts: Named loss terms besides ``mse`` that ``loss`` includes (e.g. ``aux``, ``l1``), unweighted.
    """

    recon_BD: torch.Tensor
    latents_BF: torch.Tensor | None
    loss: torch.Tensor
    mse: torch.Tensor
    fvu: torch.Tensor
    l0: torch.Tensor
    fired_F: torch.Tensor
    parts: dict[str, torch.Tensor]


def mean_norm_scale(acts_ND: torch.Tensor) -> float:
    """The ``input_scale`` that gives the rows of ``acts_ND`` a mean norm of ``sqrt(D)`` (unit mean square).

    Raises:
        ValueError: If ``acts_ND`` is not 2-D, empty, or all zero / non-finite.
    """
    if acts_ND.ndim != 2 or acts_ND.shape[0] == 0:
        raise ValueError(f"acts_ND: expected a non-empty (N, D) tensor, got shape {tuple(acts_ND.shape)}")
    mean_norm = float(acts_ND.float().norm(dim=1).mean())
    if not math.isfinite(mean_norm) or mean_norm <= 0.0:
        raise ValueError(f"acts_ND: mean row norm is {mean_norm}; cannot normalise")
    return math.sqrt(acts_ND.shape[1]) / mean_norm


@torch.no_grad()
def start_from_data(
    saes: SparseAutoencoder | Sequence[SparseAutoencoder],
    acts_ND: torch.Tensor,
    *,
    normalize_inputs: bool = True,
) -> torch.Tensor:
    """Start one SAE, or every seed of a fit, from the training rows, as a fit does before the first step.

    Sets each SAE's input scale (:func:`mean_norm_scale`, or 1), its decoder bias to the scaled data mean,
    then calls :meth:`SparseAutoencoder.init_from_data` on at most :data:`INIT_SAMPLE_ROWS` evenly spaced rows
    (no RNG). The statistics and the sample are computed once for all the SAEs given.

    Returns:
        The scaled data mean ``(D,)`` (on the first SAE's device).
    """
    saes = [saes] if isinstance(saes, SparseAutoencoder) else list(saes)
    if not saes:
        raise ValueError("start_from_data: no SAE given")
    scale = mean_norm_scale(acts_ND) if normalize_inputs else 1.0
    mean_D = acts_ND.float().mean(0) * scale
    n = acts_ND.shape[0]
    sample_ND = acts_ND[torch.linspace(0, n - 1, min(n, INIT_SAMPLE_ROWS)).round().long()].float()
    for sae in saes:
        device = sae.b_dec_D.device
        sae.set_input_scale(scale)
        sae.b_dec_D.copy_(mean_D.to(device))
        sae.init_from_data(sample_ND.to(device))
    return mean_D.to(saes[0].b_dec_D.device)


def fvu_of(x_BD: torch.Tensor, recon_BD: torch.Tensor) -> torch.Tensor:
    """``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over the batch."""
    total = (x_BD - x_BD.mean(0, keepdim=True)).pow(2).sum().clamp_min(1e-12)
    return (recon_BD - x_BD).pow(2).sum() / total


class SparseAutoencoder(nn.Module):
    """Base class: input scaling, decoder-row helpers and the ``cfg.json`` + ``sae.safetensors`` export.

    Subclasses set :attr:`architecture`, implement :meth:`encode`, :meth:`decode`, :meth:`forward` and
    :meth:`config`, and take their :meth:`config` as keyword arguments (plus ``generator``).
    """

    architecture: ClassVar[str] = ""
    #: Whether the decoder rows are kept at unit norm (TopK) or free (L1 with a norm-aware penalty).
    unit_norm_decoder: ClassVar[bool] = True
    W_dec_FD: nn.Parameter
    b_dec_D: nn.Parameter
    input_scale: torch.Tensor

    def __init__(self, d_model: int, n_latents: int) -> None:
        super().__init__()
        if d_model < 1 or n_latents < 1:
            raise ValueError(f"d_model and n_latents must be >= 1, got {d_model}, {n_latents}")
        self.register_buffer("input_scale", torch.tensor(1.0))

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Dense sparse codes ``(B, F)`` of raw-space inputs (each architecture defines it)."""
        raise NotImplementedError

    def decode(self, latents_BF: torch.Tensor) -> torch.Tensor:
        """Raw-space reconstruction ``(B, D)`` of dense codes (each architecture defines it)."""
        raise NotImplementedError

    def decode_direction(self, v_KF: torch.Tensor) -> torch.Tensor:
        """Latent-space directions ``(..., F)`` mapped to raw residual space: ``v @ W_dec / input_scale``.

        No decoder bias: a *difference* of codes maps to a difference of reconstructions.
        """
        return (v_KF.to(self.W_dec_FD.dtype) @ self.W_dec_FD) / self.input_scale

    def config(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this SAE (shape and loss settings)."""
        raise NotImplementedError

    @property
    def n_latents(self) -> int:
        """Dictionary size ``F``."""
        return int(self.W_dec_FD.shape[0])

    @property
    def d_model(self) -> int:
        """Input width ``D``."""
        return int(self.W_dec_FD.shape[1])

    def set_input_scale(self, scale: float) -> None:
        """Set the factor applied to every input (see the module docstring).

        Raises:
            ValueError: If ``scale`` is not finite and positive.
        """
        if not math.isfinite(scale) or scale <= 0.0:
            raise ValueError(f"input_scale must be finite and > 0, got {scale}")
        self.input_scale.fill_(scale)

    def update_firing(self, fired_F: torch.Tensor) -> None:
        """Count one training step's active latents (a no-op unless the SAE tracks dead latents)."""

    def init_from_data(self, x_ND: torch.Tensor) -> None:
        """Start architecture-specific parameters from training rows (raw space); a no-op by default.

        Called once before training, after :meth:`set_input_scale` and with ``b_dec_D`` at the data mean
        (:func:`start_from_data`); a trainable JumpReLU SAE starts its encoder bias here.
        """

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder row to unit norm (no-op for SAEs with free decoder norms)."""
        if self.unit_norm_decoder:
            self.W_dec_FD.div_(self.W_dec_FD.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Drop each decoder row's gradient component along the row, so a step keeps its (unit) norm."""
        if not self.unit_norm_decoder or self.W_dec_FD.grad is None:
            return
        parallel_F1 = (self.W_dec_FD.grad * self.W_dec_FD).sum(-1, keepdim=True)
        self.W_dec_FD.grad.addcmul_(parallel_F1, self.W_dec_FD, value=-1.0)  # one pass, no (F, D) temporary

    def save(self, folder: str | os.PathLike[str], metadata: dict[str, Any] | None = None) -> Path:
        """Write ``cfg.json`` + ``sae.safetensors`` into ``folder`` atomically (temp folder + rename).

        ``cfg.json`` records the sha256 of ``sae.safetensors`` (verified on load).

        Args:
            folder: Export folder (replaced if it exists).
            metadata: JSON-serialisable facts to keep beside the config (model, layer, seed, training). Its
                local paths (model folder, adapter...) are written relative to ``folder``
                (:func:`~sae_refusal.provenance.relative_paths`; read back by
                :func:`~sae_refusal.sae.formats.sae_metadata`), so the export names no path of this machine.

        Raises:
            ArtifactError: If a parameter or buffer holds inf / nan (nothing is written).
            TypeError: If ``metadata`` is not JSON-serialisable (nothing is written).
        """
        record: dict[str, Any] = {
            "architecture": self.architecture,
            **self.config(),
            "input_scale": float(self.input_scale),
            "metadata": relative_paths(metadata or {}, folder),
        }
        json.dumps(record)  # fails before anything is written if metadata is not JSON
        with AtomicFolder(folder) as out:
            digest = write_tensors(
                self.state_dict(), out.tmp / WEIGHTS_FILE, label=Path(folder) / WEIGHTS_FILE
            )
            record[SHA256_KEY] = {WEIGHTS_FILE: digest}
            (out.tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2))
            return out.commit()


#: ``cfg.json`` ``architecture`` -> SAE class; filled by the modules that define them.
SAE_REGISTRY: dict[str, type[SparseAutoencoder]] = {}
