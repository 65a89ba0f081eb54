"""The one residual-stream hook mechanism: read or rewrite the output of decoder blocks, position-aware.

Extraction (:mod:`sae_refusal.llm.extraction`), SAE splicing (:mod:`sae_refusal.sae.splice`) and every
intervention of :mod:`sae_refusal.steer` go through :func:`residual_hooks`, so they see the same tensors in
every code path: a plain forward (log-likelihood scoring, patching), a batched ``generate`` prefill and every
decode step with or without the KV cache.

Design notes:

* **One dispatch.** A decoder block returns a tensor, a tuple led by the hidden states, or a ``ModelOutput``;
  :func:`block_hidden` and :func:`with_block_hidden` are the only places that know this.
* **Where each token sits.** A forward pre-hook on the module that owns the decoder blocks (``LlamaModel``
  and kin) reads the call's ``attention_mask`` (2-D, the whole sequence so far in ``generate``; Hugging Face
  drops it when it is all ones), ``cache_position`` / the cache's length and the number of new tokens,
  and builds a :class:`StepContext` for the block hooks of that call: which positions are real (padding
  is never edited), each token's index among its row's real tokens (left padding does not shift it), and
  whether it belongs to the prompt or was generated. The prompt length is fixed by the first forward
  inside the ``with`` block, so the same positions count as "generated" whether ``generate`` runs with the
  KV cache (one new token per call) or without it (the whole sequence again each call). Use one ``with``
  block per batch of prompts.
* **Identity when idle.** A hook function returns ``None`` to leave the block output untouched (the very
  same tensor object), so rows or calls with nothing to do are bit-identical to the unhooked model.
* **Cleanup.** Hooks are removed when the ``with`` block exits, also after an exception (including the
  :class:`StopForward` a reading hook raises to end the forward early).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sae_refusal.llm.layers import decoder_layers, validate_layers

__all__ = [
    "ResidualFn",
    "StepContext",
    "StopForward",
    "block_hidden",
    "decoder_stack",
    "residual_hooks",
    "with_block_hidden",
]


class StopForward(Exception):
    """Raise from a hook function to end the forward pass early; :func:`residual_hooks` swallows it."""


@dataclass(frozen=True)
class StepContext:
    """Where the tokens of the current forward call sit (all tensors ``(B, T)`` on the hidden states' device).

    Attributes:
        real_BT: True on real tokens, False on padding.
        token_index_BT: Index of each token among its row's real tokens (0 = the row's first real prompt
            token, whatever the padding); meaningless on padding.
        generated_BT: True on tokens after the prompt (decode steps of ``generate``).
        past_length: Number of positions already in the KV cache before this call.
        prompt_length: Padded prompt length (columns) fixed by the first forward of the ``with`` block.
    """

    real_BT: Tensor
    token_index_BT: Tensor
    generated_BT: Tensor
    past_length: int
    prompt_length: int

    @property
    def prompt_BT(self) -> Tensor:
        """True on real prompt tokens."""
        return self.real_BT & ~self.generated_BT


#: ``fn(hidden_BTD, ctx)`` -> the new hidden states (same shape and dtype), or ``None`` to leave them alone.
ResidualFn = Callable[[Tensor, StepContext], Tensor | None]


def block_hidden(output: Any) -> Tensor:
    """The hidden states in a decoder block's output (a tensor, or a tuple/ModelOutput led by it)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    hidden = getattr(output, "hidden_states", None)
    if isinstance(hidden, Tensor):
        return hidden
    raise TypeError(f"unexpected decoder block output type {type(output).__name__}")


def with_block_hidden(output: Any, hidden_BTD: Tensor) -> Any:
    """``output`` with its hidden states replaced by ``hidden_BTD`` (same container type)."""
    if isinstance(output, Tensor):
        return hidden_BTD
    if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
        return (hidden_BTD, *output[1:])
    if isinstance(output, list) and output and isinstance(output[0], Tensor):
        return [hidden_BTD, *output[1:]]
    if isinstance(getattr(output, "hidden_states", None), Tensor):
        output.hidden_states = hidden_BTD
        return output
    raise TypeError(f"unexpected decoder block output type {type(output).__name__}")


def decoder_stack(model: nn.Module) -> nn.Module:
    """The module whose forward runs the decoder blocks (it holds their ``ModuleList`` as a direct child)."""
    blocks = decoder_layers(model)
    for module in model.modules():
        if any(child is blocks for child in module.children()):
            return module
    raise TypeError(f"cannot find the module that owns the decoder blocks of {type(model).__name__}")


def _new_tokens(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[int, int, torch.device] | None:
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args[:1]):
        if isinstance(value, Tensor) and value.ndim >= 2:
            return value.shape[0], value.shape[1], value.device
    return None


def _past_length(kwargs: Mapping[str, Any], mask: Tensor | None, n_new: int) -> int:
    """Positions already in the KV cache: from the 2-D mask, ``cache_position``, the cache or position ids."""
    if mask is not None:
        return int(mask.shape[1]) - n_new
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, Tensor) and cache_position.numel() > 0:
        return int(cache_position.reshape(-1)[0])
    for key in ("past_key_values", "cache"):  # the cache's keyword differs across transformers versions
        get_len = getattr(kwargs.get(key), "get_seq_length", None)
        if callable(get_len):
            return int(get_len())
    position_ids = kwargs.get("position_ids")  # no mask means no padding: positions start at the past length
    if isinstance(position_ids, Tensor) and position_ids.numel() > 0:
        return int(position_ids.reshape(-1)[0])
    return 0


class _Tracker:
    """Builds the :class:`StepContext` of each forward call from the decoder stack's inputs."""

    def __init__(self) -> None:
        self.prompt_length: int | None = None
        self.context: StepContext | None = None

    def pre_hook(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        found = _new_tokens(args, kwargs)
        if found is None:  # nothing to learn from this call; block hooks fall back to "all real"
            self.context = None
            return
        n_rows, n_new, device = found
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, Tensor) and mask.ndim == 2 else None
        past = _past_length(kwargs, mask, n_new)
        if self.prompt_length is None:
            self.prompt_length = past + n_new
        if mask is not None:
            full_BS = mask.to(device=device, dtype=torch.bool)
            index_BS = full_BS.long().cumsum(dim=1) - 1
            real_BT = full_BS[:, -n_new:]
            token_index_BT = index_BS[:, -n_new:].clamp(min=0)
        else:  # Hugging Face drops an all-ones mask: every token is real and positions count from the past
            real_BT = torch.ones(n_rows, n_new, dtype=torch.bool, device=device)
            token_index_BT = (past + torch.arange(n_new, device=device)).expand(n_rows, n_new)
        columns_T = past + torch.arange(n_new, device=device)
        generated_BT = (columns_T >= self.prompt_length).expand(n_rows, n_new)
        self.context = StepContext(real_BT, token_index_BT, generated_BT, past, self.prompt_length)

    def context_for(self, hidden_BTD: Tensor) -> StepContext:
        ctx = self.context
        n_rows, n_new = hidden_BTD.shape[0], hidden_BTD.shape[1]
        if ctx is None or tuple(ctx.real_BT.shape) != (n_rows, n_new):
            # a block called outside the stack's forward (or with another shape): every position real, prompt
            past = 0 if ctx is None else ctx.past_length
            device = hidden_BTD.device
            ones = torch.ones(n_rows, n_new, dtype=torch.bool, device=device)
            index = (past + torch.arange(n_new, device=device)).expand(n_rows, n_new)
            return StepContext(ones, index, torch.zeros_like(ones), past, past + n_new)
        if ctx.real_BT.device != hidden_BTD.device:  # a model split over devices
            device = hidden_BTD.device
            return StepContext(
                ctx.real_BT.to(device),
                ctx.token_index_BT.to(device),
                ctx.generated_BT.to(device),
                ctx.past_length,
                ctx.prompt_length,
            )
        return ctx


@contextmanager
def residual_hooks(model: nn.Module, fns: Mapping[int, ResidualFn]) -> Iterator[None]:
    """Within the block, ``fns[l](hidden_BTD, ctx)`` sees (and may replace) the output of decoder block ``l``.

    Layer ``l`` follows the project convention (:mod:`sae_refusal.llm.layers`): the residual stream right
    after block ``l``; negative layers count from the end. A function returning ``None`` leaves the output
    untouched; one raising :class:`StopForward` ends the forward (the exception does not escape the block).

    Args:
        model: Any Hugging Face causal LM (a PEFT-wrapped one too).
        fns: ``{layer: fn}``.

    Raises:
        ValueError: On an invalid layer (naming ``layers``).
    """
    blocks = decoder_layers(model)
    by_layer: dict[int, ResidualFn] = {}
    for key, fn in fns.items():
        (layer,) = validate_layers(key, len(blocks))
        if layer in by_layer:
            raise ValueError(f"layers: layer {key} names block {layer} twice; pass one function per block")
        by_layer[layer] = fn
    tracker = _Tracker()

    def make_hook(fn: ResidualFn) -> Callable[[nn.Module, Any, Any], Any]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            hidden_BTD = block_hidden(output)
            new = fn(hidden_BTD, tracker.context_for(hidden_BTD))
            if new is None or new is hidden_BTD:
                return None
            if new.shape != hidden_BTD.shape:
                raise ValueError(
                    f"a residual hook returned shape {tuple(new.shape)} for hidden states "
                    f"{tuple(hidden_BTD.shape)}"
                )
            return with_block_hidden(output, new.to(hidden_BTD.dtype))

        return hook

    handles = [decoder_stack(model).register_forward_pre_hook(tracker.pre_hook, with_kwargs=True)]
    try:
        handles += [blocks[layer].register_forward_hook(make_hook(fn)) for layer, fn in by_layer.items()]
        yield
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
