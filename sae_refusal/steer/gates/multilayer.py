"""The multi-layer probe gate: one logistic-regression probe on residuals of several layers side by side.

:class:`MultiLayerProbeGate` concatenates the last-token residuals of its layers (in ascending layer order)
into ``(N, L * D)`` features and holds a :class:`~sae_refusal.steer.gates.probe.ProbeGate` fitted on them
(standardisation, ``P(harmful)`` probe and category head or means all come from there). The residuals of
all layers come from one early-exit pass (:func:`~sae_refusal.steer.study.last_token_acts`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from sae_refusal.llm.layers import num_layers, validate_layers
from sae_refusal.sae.base import SparseAutoencoder
from sae_refusal.steer.gates.base import GateScores, _check_layer
from sae_refusal.steer.gates.probe import ProbeGate
from sae_refusal.steer.study import last_token_acts


def _check_layers(layers: Sequence[int]) -> tuple[int, ...]:
    if isinstance(layers, int | str) or not isinstance(layers, Sequence) or len(layers) == 0:
        raise ValueError(f"layers: expected a non-empty sequence of layer indices, got {layers!r}")
    for layer in layers:
        try:
            _check_layer(layer)
        except ValueError:
            raise ValueError(f"layers: expected layer indices >= 0, got {list(layers)!r}") from None
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers: a layer is listed twice in {list(layers)!r}")
    return tuple(sorted(int(layer) for layer in layers))


class MultiLayerProbeGate:
    """Logistic-regression probe on the concatenated standardised last-token residuals of several layers.

    Build it with :meth:`fit`. The features are the raw residuals of :attr:`layers` in ascending order,
    concatenated to ``(N, L * D)``; the held :attr:`probe` (a :class:`ProbeGate` of width ``L * D``)
    standardises them and scores ``P(harmful)``; its category head (``"head"``) or category means
    (``"mean"``) name the category. :attr:`layer` is the deepest layer read (so
    :meth:`~sae_refusal.steer.gates.steering.GatedSteering.check_model` refuses a model too shallow for it)
    and :attr:`d_model` the width of one layer's residuals.

    Args:
        probe: A :class:`ProbeGate` fitted on the concatenated features (width ``len(layers) * d_model``,
            no SAE).
        layers: The layers read, distinct and >= 0 (any order; kept sorted).
        d_model: Residual width of one layer.
    """

    kind: ClassVar[str] = "probe_multilayer"

    def __init__(self, probe: ProbeGate, *, layers: Sequence[int], d_model: int) -> None:
        if not isinstance(probe, ProbeGate):
            raise TypeError(f"probe: expected a ProbeGate, got {type(probe).__name__}")
        self._layers = _check_layers(layers)
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model: expected a width >= 1, got {d_model!r}")
        if probe.sae is not None:
            raise ValueError("probe: a multi-layer probe reads residuals, not SAE codes")
        if probe.d_model != len(self._layers) * d_model:
            raise ValueError(
                f"probe: its width {probe.d_model} != len(layers) * d_model = {len(self._layers)} * {d_model}"
            )
        self.probe = probe
        self._d_model = int(d_model)

    @classmethod
    def fit(
        cls,
        acts_by_layer: Mapping[int, Tensor],
        y_N: Tensor,
        class_names: Sequence[str],
        *,
        layers: Sequence[int],
        category: Literal["head", "mean"] = "head",
        C: float = 1.0,
        max_iter: int = 1000,
    ) -> MultiLayerProbeGate:
        """Fit on TRAIN-split residuals of several layers.

        Args:
            acts_by_layer: Raw last-token residuals ``{layer: (N, D)}`` (extra layers are ignored).
            y_N: Class codes (0 benign, ``1..C`` categories; negative rows are ignored).
            class_names: Names of classes ``0..C`` (those of the steering vectors).
            layers: The layers to read.
            category: ``"head"`` or ``"mean"`` (see :class:`ProbeGate`).
            C: Inverse L2 strength of both logistic regressions (scikit-learn ``C``).
            max_iter: Solver iterations (lbfgs).

        Raises:
            ValueError: Naming ``layers``, ``acts_by_layer`` (a missing layer, a shape that disagrees) or
                what :meth:`ProbeGate.fit` refuses.
        """
        keys = _check_layers(layers)
        x_NF, d_model = _concatenate(acts_by_layer, keys, None)
        probe = ProbeGate.fit(
            x_NF, y_N, class_names, layer=keys[-1], category=category, C=C, max_iter=max_iter
        )
        return cls(probe, layers=keys, d_model=d_model)

    @property
    def layers(self) -> tuple[int, ...]:
        """The layers read, ascending (the order of the concatenated features)."""
        return self._layers

    @property
    def layer(self) -> int:
        """The deepest layer read."""
        return self._layers[-1]

    @property
    def d_model(self) -> int:
        """Residual width of one layer."""
        return self._d_model

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names of class codes ``0..C`` (benign first)."""
        return self.probe.class_names

    def features(self, acts_by_layer: Mapping[int, Tensor]) -> Tensor:
        """The probe's input: the residuals of :attr:`layers` concatenated to ``(N, L * D)`` float32 (CPU).

        Raises:
            ValueError: Naming ``acts_by_layer[layer]`` for a missing layer or a wrong shape.
        """
        x_NF, _ = _concatenate(acts_by_layer, self._layers, self._d_model)
        return x_NF

    def score(self, acts_by_layer: Mapping[int, Tensor]) -> GateScores:
        """Score raw last-token residuals ``{layer: (N, D)}`` (every layer of :attr:`layers` needed)."""
        return self.probe.score(self.features(acts_by_layer))

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model that lacks one of :attr:`layers` (ValueError naming ``layers``)."""
        validate_layers(list(self._layers), num_layers(model), key="layers")

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
        """Extract the residuals of all :attr:`layers` in one early-exit pass and :meth:`score` them."""
        self.check_model(model)
        acts = last_token_acts(
            model,
            tokenizer,
            texts,
            list(self._layers),
            batch_size=batch_size,
            max_length=max_length,
            chat_template=chat_template,
            system_prompt=system_prompt,
        )
        return self.score(acts)

    def config(self) -> dict[str, Any]:
        """JSON facts: layers, deepest layer, one layer's width, class names and the probe's config."""
        return {
            "layers": list(self._layers),
            "layer": self.layer,
            "d_model": self._d_model,
            "class_names": list(self.class_names),
            "probe": self.probe.config(),
        }

    def tensors(self) -> dict[str, Tensor]:
        """The probe's tensors (standardisation, probe weights, category head or means)."""
        return self.probe.tensors()

    @classmethod
    def from_saved(
        cls, config: Mapping[str, Any], tensors: Mapping[str, Tensor], sae: SparseAutoencoder | None = None
    ) -> MultiLayerProbeGate:
        """Rebuild from :meth:`config` and :meth:`tensors` (``sae`` is not used: the gate reads residuals)."""
        probe = ProbeGate.from_saved(config["probe"], tensors)
        return cls(probe, layers=[int(layer) for layer in config["layers"]], d_model=int(config["d_model"]))


def _concatenate(
    acts_by_layer: Mapping[int, Tensor], layers: tuple[int, ...], d_model: int | None
) -> tuple[Tensor, int]:
    """``(N, L * D)`` float32 CPU features of ``layers`` (in that order) and ``D``; shapes checked."""
    if not isinstance(acts_by_layer, Mapping):
        raise TypeError(
            f"acts_by_layer: expected a mapping layer -> (N, D), got {type(acts_by_layer).__name__}"
        )
    parts: list[Tensor] = []
    for layer in layers:
        if layer not in acts_by_layer:
            raise ValueError(
                f"acts_by_layer: no activations for layer {layer} (the gate reads layers {list(layers)}; "
                f"given {sorted(acts_by_layer)})"
            )
        acts_ND = acts_by_layer[layer]
        width = d_model if d_model is not None else (parts[0].shape[1] if parts else None)
        rows = parts[0].shape[0] if parts else None
        if (
            acts_ND.ndim != 2
            or (width is not None and acts_ND.shape[1] != width)
            or (rows is not None and acts_ND.shape[0] != rows)
        ):
            expected = f"({'N' if rows is None else rows}, {'D' if width is None else width})"
            raise ValueError(f"acts_by_layer[{layer}]: expected shape {expected}, got {tuple(acts_ND.shape)}")
        parts.append(acts_ND.detach().float().cpu())
    return torch.cat(parts, dim=1), int(parts[0].shape[1])
