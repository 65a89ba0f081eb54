"""Hookpoint names of other SAE libraries mapped to the project's layer convention.

The project's layer ``l`` is the residual stream *after* decoder block ``l`` (0-based; Hugging Face
``hidden_states[l + 1]``). Other libraries name the same tensors differently:

======================================  ====================================  ===========================
name                                    library                               project layer
======================================  ====================================  ===========================
``layers.{l}``                          sparsify (module path of the block)   ``l``
``model.layers.{l}``                    HF module path                        ``l``
``blocks.{l}.hook_resid_post``          SAELens / TransformerLens             ``l``
``blocks.{l}.hook_resid_pre``           SAELens / TransformerLens             ``l - 1`` (``l >= 1``)
``blocks.{l}.hook_resid_mid``,          SAELens / TransformerLens             not a block output: refused
``blocks.{l}.hook_mlp_out`` ...
======================================  ====================================  ===========================

``blocks.0.hook_resid_pre`` is the embedding output, which the project never reads (refused with the reason).
"""

from __future__ import annotations

import re

__all__ = ["NotABlockOutputError", "hookpoint_for_layer", "layer_of_hookpoint"]


class NotABlockOutputError(ValueError):
    """A hookpoint name the library defines that reads no decoder block's output (``hook_resid_mid``,
    ``hook_mlp_out``, the embedding output ...): no project layer holds its activations."""


_BLOCK_OUTPUT = re.compile(r"^(?:model\.)?layers\.(\d+)$")
_TL = re.compile(r"^blocks\.(\d+)\.(hook_\w+)$")


def layer_of_hookpoint(name: str) -> int:
    """The project layer a hookpoint name reads (see the module table).

    Raises:
        NotABlockOutputError: For a known hookpoint that is not the output of a decoder block (naming it and
            what it is).
        ValueError: For a name of no known naming.
    """
    match = _BLOCK_OUTPUT.match(name)
    if match:
        return int(match.group(1))
    match = _TL.match(name)
    if match:
        block, hook = int(match.group(1)), match.group(2)
        if hook == "hook_resid_post":
            return block
        if hook == "hook_resid_pre":
            if block == 0:
                raise NotABlockOutputError(
                    f"hookpoint {name!r} is the embedding output; the project reads block outputs (layer l = "
                    "output of block l), so no layer matches it"
                )
            return block - 1
        raise NotABlockOutputError(
            f"hookpoint {name!r} ({hook}) is not a residual-stream block output; the project's layer l is "
            "blocks.{l}.hook_resid_post = layers.{l}"
        )
    raise ValueError(
        f"hookpoint {name!r}: unknown naming; expected layers.{{l}} (sparsify), model.layers.{{l}} or "
        "blocks.{l}.hook_resid_post / hook_resid_pre (SAELens)"
    )


def hookpoint_for_layer(layer: int, fmt: str) -> str:
    """The hookpoint name of project layer ``layer`` in a library's convention (``sparsify`` or ``saelens``).

    Raises:
        ValueError: On a negative layer or an unknown format.
    """
    if layer < 0:
        raise ValueError(f"layer: must be >= 0 (a resolved index), got {layer}")
    if fmt == "sparsify":
        return f"layers.{layer}"
    if fmt == "saelens":
        return f"blocks.{layer}.hook_resid_post"
    raise ValueError(f"format: expected 'sparsify' or 'saelens', got {fmt!r}")
