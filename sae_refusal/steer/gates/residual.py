"""The shared part of the gates that read last-token residuals at one layer (optionally through an SAE).

:func:`prompt_residuals` extracts those residuals from chat-formatted user messages (one early-exit pass per
batch, the activation cache's formatting); :class:`_ResidualGate` holds the layer, width, class names and the
SAE reference that :class:`~sae_refusal.steer.gates.probe.ProbeGate`,
:class:`~sae_refusal.steer.gates.head.HeadGate` and :class:`~sae_refusal.steer.gates.distance.DistanceGate`
build on, and reloads a saved gate's SAE. Residual gates are fitted on TRAIN-split activations
(:func:`_check_labelled` checks them) and also offer ``score(acts_ND)`` on activations already extracted.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sae_refusal.llm.layers import num_layers, validate_layers
from sae_refusal.sae.base import SparseAutoencoder
from sae_refusal.sae.loading import load_sae
from sae_refusal.steer.gates.base import GateScores, _check_class_names, _check_layer
from sae_refusal.steer.study import last_token_acts


def _check_labelled(acts_ND: Tensor, y_N: Tensor, n_classes: int) -> tuple[Tensor, Tensor]:
    """Rows with a label >= 0 as float32 / int64 CPU tensors, checked."""
    if acts_ND.ndim != 2:
        raise ValueError(f"acts_ND: expected (N, D), got shape {tuple(acts_ND.shape)}")
    y_N = torch.as_tensor(y_N)
    if y_N.ndim != 1 or y_N.shape[0] != acts_ND.shape[0]:
        raise ValueError(
            f"y_N: expected one label per row of acts_ND ({acts_ND.shape[0]}), got {tuple(y_N.shape)}"
        )
    keep = y_N >= 0
    x, y = acts_ND[keep].detach().float().cpu(), y_N[keep].long().cpu()
    if y.numel() and int(y.max()) >= n_classes:
        raise ValueError(f"y_N: label {int(y.max())} is out of range for {n_classes} class_names")
    if not bool((y == 0).any()) or not bool((y > 0).any()):
        raise ValueError("y_N: the gate needs benign (0) and harmful (1..C) training rows")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("acts_ND: non-finite values")
    return x, y


def _encode(sae: SparseAutoencoder, acts_ND: Tensor, chunk: int = 4096) -> Tensor:
    """SAE codes ``(N, F)`` float32 on CPU, ``chunk`` rows at a time on the SAE's device."""
    device = sae.W_dec_FD.device
    parts = []
    with torch.no_grad():
        for start in range(0, acts_ND.shape[0], chunk):
            parts.append(sae.encode(acts_ND[start : start + chunk].to(device)).float().cpu())
    return torch.cat(parts) if parts else torch.empty(0, sae.n_latents)


def prompt_residuals(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    layer: int,
    *,
    batch_size: int = 32,
    max_length: int | None = None,
    chat_template: str | None = None,
    system_prompt: str | None = None,
) -> Tensor:
    """Last-token residuals ``(N, D)`` (float32, CPU) of chat-formatted user messages after block ``layer``.

    The same formatting as the activation cache and :func:`~sae_refusal.steer.scoring.first_token_decisions`
    (generation prompt included), from one early-exit pass per batch.
    """
    (key,) = validate_layers(layer, num_layers(model), key="layer")
    acts = last_token_acts(
        model,
        tokenizer,
        texts,
        [key],
        batch_size=batch_size,
        max_length=max_length,
        chat_template=chat_template,
        system_prompt=system_prompt,
    )
    return acts[key]


@dataclass(frozen=True)
class _SAERef:
    """Which SAE a latent-space gate reads and where it came from."""

    sae: SparseAutoencoder
    path: str | None

    def config(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "architecture": self.sae.architecture,
            "d_model": self.sae.d_model,
            "n_latents": self.sae.n_latents,
        }


class _ResidualGate:
    """Shared part of the gates that read last-token residuals at one layer (optionally through an SAE)."""

    kind: ClassVar[str] = ""

    def __init__(
        self,
        *,
        layer: int,
        d_model: int,
        class_names: Sequence[str],
        sae: SparseAutoencoder | None = None,
        sae_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self._layer = _check_layer(layer)
        if d_model < 1:
            raise ValueError(f"d_model: must be >= 1, got {d_model}")
        if sae is not None and sae.d_model != d_model:
            raise ValueError(f"sae: the SAE's width {sae.d_model} != the gate's d_model {d_model}")
        self._d_model = int(d_model)
        self._class_names = _check_class_names(class_names)
        self.sae = None if sae is None else _SAERef(sae, None if sae_path is None else str(sae_path))

    @property
    def layer(self) -> int:
        """Residual layer the gate reads."""
        return self._layer

    @property
    def d_model(self) -> int:
        """Residual width the gate expects."""
        return self._d_model

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names of class codes ``0..C`` (benign first)."""
        return self._class_names

    @property
    def n_categories(self) -> int:
        """``C``, the number of harmful categories."""
        return len(self._class_names) - 1

    def features(self, acts_ND: Tensor) -> Tensor:
        """What the gate sees of raw residuals: float32 residuals, or their SAE codes."""
        if acts_ND.ndim != 2 or acts_ND.shape[1] != self._d_model:
            raise ValueError(f"acts_ND: expected (N, {self._d_model}), got shape {tuple(acts_ND.shape)}")
        x = acts_ND.detach().float().cpu()
        return x if self.sae is None else _encode(self.sae.sae, x)

    def score(self, acts_ND: Tensor) -> GateScores:
        """Score raw last-token residuals ``(N, D)`` taken at :attr:`layer`."""
        return self._score_features(self.features(acts_ND))

    def _score_features(self, x_NF: Tensor) -> GateScores:
        raise NotImplementedError

    def score_prompts(
        self,
        model: nn.Module,
        tokenizer: Any,
        texts: Sequence[str],
        *,
        batch_size: int = 32,
        max_length: int | None = None,
        chat_template: str | None = None,
        system_prompt: str | None = None,
    ) -> GateScores:
        """Extract the residuals at :attr:`layer` (:func:`prompt_residuals`) and :meth:`score` them."""
        acts_ND = prompt_residuals(
            model,
            tokenizer,
            texts,
            self._layer,
            batch_size=batch_size,
            max_length=max_length,
            chat_template=chat_template,
            system_prompt=system_prompt,
        )
        return self.score(acts_ND)

    def config(self) -> dict[str, Any]:
        """JSON facts: layer, width, class names, the SAE reference."""
        return {
            "layer": self._layer,
            "d_model": self._d_model,
            "class_names": list(self._class_names),
            "sae": None if self.sae is None else self.sae.config(),
        }

    @staticmethod
    def _sae_from_saved(config: Mapping[str, Any], sae: SparseAutoencoder | None) -> SparseAutoencoder | None:
        """The SAE a saved gate needs: ``sae``, else the one at the recorded path; shapes checked."""
        recorded = config.get("sae")
        if recorded is None:
            return None
        if sae is None:
            path = recorded.get("path")
            if not path or not Path(path).is_dir():
                raise ValueError(
                    f"sae: this gate reads SAE codes; pass sae= (recorded path {path!r} is not a folder here)"
                )
            sae = load_sae(path)
        for key in ("d_model", "n_latents"):
            if int(getattr(sae, key)) != int(recorded[key]):
                raise ValueError(
                    f"sae.{key}: the gate was fitted on an SAE with {key}={recorded[key]}, "
                    f"the given SAE has {getattr(sae, key)}"
                )
        return sae
