"""What every sparse autoencoder of the package shares: its output, its input scaling, its export format.

Shapes: ``B`` batch, ``D`` d_model, ``F`` latents, ``K`` active latents per row (TopK).

Input normalisation lives *inside* the SAE: ``input_scale`` (a buffer, saved in ``cfg.json`` and the weights)
multiplies every input before encoding and divides every reconstruction, so a user passes raw residual
activations and gets raw-space reconstructions, exactly as during training. Losses and ``mse`` are measured in
the normalised space (scale chosen so that the mean input norm is ``sqrt(D)``), so they compare across models.

Export layout (one folder per SAE; :func:`load_sae` reads it without Lightning)::

    cfg.json            {"architecture": "topk" | "relu_l1", <shape and loss settings>, "input_scale": s,
                         "metadata": {...}}
    sae.safetensors     the parameters and buffers, float32
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sae_refusal.atomic import AtomicFolder

__all__ = [
    "SAE_REGISTRY",
    "SAEOutput",
    "SparseAutoencoder",
    "find_sae_exports",
    "load_sae",
    "mean_norm_scale",
]


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

        Args:
            folder: Export folder (replaced if it exists).
            metadata: JSON-serialisable facts to keep beside the config (model, layer, seed, training).
        """
        record = {
            "architecture": self.architecture,
            **self.config(),
            "input_scale": float(self.input_scale),
            "metadata": metadata or {},
        }
        text = json.dumps(record, indent=2)
        with AtomicFolder(folder) as out:
            (out.tmp / "cfg.json").write_text(text)
            tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(tensors, str(out.tmp / "sae.safetensors"))
            return out.commit()


#: ``cfg.json`` ``architecture`` -> SAE class; filled by the modules that define them.
SAE_REGISTRY: dict[str, type[SparseAutoencoder]] = {}


def load_sae(folder: str | os.PathLike[str], device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load an SAE (no Lightning needed): a project export (``cfg.json`` says which architecture), a sparsify
    or SAELens folder (:mod:`sae_refusal.sae.formats`), or a hub id ``owner/repo[/hookpoint]`` of one.

    Raises:
        FileNotFoundError: If ``cfg.json`` or ``sae.safetensors`` is missing.
        ValueError: If the architecture is unknown or the config does not fit the class.
    """
    import sae_refusal.sae  # noqa: F401  (registers the architectures)
    from sae_refusal.sae.formats import load_any_sae, resolve_sae_path
    from sae_refusal.sae.formats.saelens import is_saelens_folder
    from sae_refusal.sae.formats.sparsify import is_sparsify_folder

    folder = resolve_sae_path(folder)
    if is_sparsify_folder(folder) or is_saelens_folder(folder):
        return load_any_sae(folder, device=device)
    cfg_path = folder / "cfg.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no SAE export at {folder} (missing cfg.json)")
    weights = folder / "sae.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"SAE export {folder} lacks sae.safetensors")
    raw = json.loads(cfg_path.read_text())
    architecture = raw.pop("architecture", None)
    if architecture not in SAE_REGISTRY:
        raise ValueError(f"{cfg_path}: unknown architecture {architecture!r} (known: {sorted(SAE_REGISTRY)})")
    raw.pop("input_scale", None)
    raw.pop("metadata", None)
    try:
        sae = SAE_REGISTRY[architecture](**raw)
    except TypeError as err:
        raise ValueError(f"{cfg_path}: config does not fit a {architecture} SAE: {err}") from err
    sae.load_state_dict(load_file(str(weights), device=str(device)))
    return sae.to(device)


def find_sae_exports(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """The exports under ``folder``: itself when it holds ``cfg.json``, else its ``seed*/`` exports, by name.

    ``folder`` may be a hub id (``owner/repo[/hookpoint]``, see
    :func:`sae_refusal.sae.formats.resolve_sae_path`); any format :func:`load_sae` reads counts (each has a
    ``cfg.json``).

    Raises:
        FileNotFoundError: If there is no ``cfg.json`` there nor in any ``seed*/`` subfolder.
    """
    from sae_refusal.sae.formats import resolve_sae_path

    folder = resolve_sae_path(folder)
    if (folder / "cfg.json").is_file():
        return {folder.name: folder}
    found = {p.name: p for p in sorted(folder.glob("seed*")) if (p / "cfg.json").is_file()}
    if not found:
        raise FileNotFoundError(f"{folder}: no SAE export (no cfg.json there nor in any seed*/ subfolder)")
    return found
