"""Find the decoder blocks and embedding weights of any Hugging Face causal LM and validate layer indices.

Layer convention (used everywhere in this project):
    **layer ``l`` is the residual stream right after decoder block ``l``** (0-based), i.e. the output of
    ``decoder_layers(model)[l]``. For every layer but the last this equals Hugging Face's
    ``outputs.hidden_states[l + 1]`` (``hidden_states[0]`` is the embedding output). Hugging Face applies the
    final norm to its last hidden state; this project never does, so for the last layer
    ``hidden_states[-1]`` is *not* our layer ``n_layers - 1`` (read it with a forward hook instead).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = [
    "base_layer",
    "base_weight",
    "d_model",
    "decoder_layers",
    "embeddings_tied",
    "num_layers",
    "validate_layers",
]

# Attribute paths (from the causal LM object) where decoder blocks live, tried in order.
_LAYER_PATHS: tuple[tuple[str, ...], ...] = (
    ("model", "layers"),
    ("transformer", "h"),
    ("gpt_neox", "layers"),
    ("model", "decoder", "layers"),
    ("transformer", "layers"),
)


def _follow(obj: object, path: tuple[str, ...]) -> object | None:
    for name in path:
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """Return the list of decoder blocks of a Hugging Face causal LM.

    Tries ``model.get_decoder().layers``, then ``model.model.layers``, ``model.transformer.h``,
    ``model.gpt_neox.layers`` and a few other common spellings.

    Args:
        model: A causal LM (e.g. ``LlamaForCausalLM``) or its base model.

    Raises:
        TypeError: If no list of decoder blocks can be found.
    """
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except (AttributeError, NotImplementedError):
            decoder = None
        layers = getattr(decoder, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    for path in (("layers",), *_LAYER_PATHS):
        candidate = _follow(model, path)
        if isinstance(candidate, nn.ModuleList) and len(candidate) > 0:
            return candidate
    raise TypeError(
        f"cannot find the decoder layers of {type(model).__name__}: tried get_decoder().layers, layers, "
        + ", ".join(".".join(p) for p in _LAYER_PATHS)
        + "; this architecture is not supported yet"
    )


def num_layers(model: nn.Module) -> int:
    """Number of decoder blocks of ``model`` (the valid layer indices are ``0 .. num_layers - 1``)."""
    return len(decoder_layers(model))


def d_model(model: nn.Module) -> int:
    """Width of the residual stream (``hidden_size``) of a Hugging Face causal LM.

    Raises:
        TypeError: If the model has no config with a hidden size.
    """
    config = getattr(model, "config", None)
    if config is not None:
        get_text_config = getattr(config, "get_text_config", None)
        if callable(get_text_config):
            config = get_text_config()
        for name in ("hidden_size", "n_embd", "d_model"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
    embeddings = getattr(model, "get_input_embeddings", None)
    if callable(embeddings):
        module = embeddings()
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.ndim == 2:
            return int(weight.shape[1])
    raise TypeError(f"cannot determine the hidden size of {type(model).__name__}")


def validate_layers(layers: int | Iterable[int], n_layers: int, key: str = "layers") -> list[int]:
    """Check layer indices against a model depth and return them sorted and unique.

    Negative indices count from the end (``-1`` is the last block).

    Args:
        layers: One layer index or several.
        n_layers: Number of decoder blocks of the model (see :func:`num_layers`).
        key: The config key the layers came from, used in error messages.

    Raises:
        ValueError: If ``layers`` is empty, holds a non-integer, or an index is out of range.
    """
    items = [layers] if isinstance(layers, int) else list(layers)
    if not items:
        raise ValueError(f"{key}: no layers given; expected at least one index in [0, {n_layers - 1}]")
    resolved: set[int] = set()
    for layer in items:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"{key}: layer {layer!r} is not an integer")
        index = layer + n_layers if layer < 0 else layer
        if not 0 <= index < n_layers:
            raise ValueError(
                f"{key}: layer {layer} is out of range for a model with {n_layers} decoder layers; "
                f"valid indices are 0..{n_layers - 1} (or -{n_layers}..-1 from the end)"
            )
        resolved.add(index)
    return sorted(resolved)


def input_device(model: nn.Module) -> torch.device:
    """Device of the model's input embeddings (where token ids must go), else of its first parameter."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    weight = getattr(get_embeddings(), "weight", None) if callable(get_embeddings) else None
    if isinstance(weight, Tensor):
        return weight.device
    return next(model.parameters()).device


def base_layer(module: nn.Module) -> nn.Module:
    """``module`` itself, or the layer a peft wrapper (LoRA layer, trainable-tokens wrapper) wraps.

    Args:
        module: An embedding or linear layer, possibly wrapped by peft.
    """
    while True:
        if callable(getattr(type(module), "get_base_layer", None)):
            inner = module.get_base_layer()  # type: ignore[operator]
        else:
            inner = getattr(module, "original_module", None)  # peft's AuxiliaryTrainingWrapper
        if not isinstance(inner, nn.Module) or inner is module:
            return module
        module = inner


def base_weight(module: nn.Module) -> Tensor:
    """The base-layer weight of ``module`` (not peft's merged view of trainable rows).

    Args:
        module: An embedding or linear layer, possibly wrapped by peft.

    Raises:
        TypeError: If the base layer has no weight tensor.
    """
    weight = base_layer(module).weight
    if not isinstance(weight, Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return weight


def embeddings_tied(model: nn.Module) -> bool:
    """Whether the model's output projection shares its weight with the input embedding.

    Reads the actual parameters (``get_output_embeddings().weight is get_input_embeddings().weight``), not
    only ``config.tie_word_embeddings``; a model without output embeddings counts as tied (nothing to update).

    Args:
        model: A Hugging Face causal LM (not a peft wrapper).
    """
    output = model.get_output_embeddings()  # type: ignore[operator]
    if output is None:
        return True
    return base_weight(output) is base_weight(model.get_input_embeddings())  # type: ignore[operator]
