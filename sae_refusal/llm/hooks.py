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
* **Static decode steps.** A static generator (:class:`~sae_refusal.llm.fast_generate.StaticGenerator`)
  registers a :class:`StaticStep` for the model while it runs a batch (:func:`static_step`). The prefill's
  context still comes from its 2-D mask; a decode step's comes from the generator's fixed buffers (no mask
  to read, no host synchronisation), and every context carries the step as ``ctx.static``. Batch rows past
  ``static.rows`` (copies of the first row that fill a small batch up to the generator's fixed size) never
  reach a hook function: it sees the real rows only. A function that may be captured in a CUDA graph says
  so with a ``static_key`` attribute (see :class:`StaticStep` for its rules); one without it still gets the
  right context in a static step, and the generator runs that batch's decode steps without a graph.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from sae_refusal.llm.layers import decoder_layers, validate_layers

__all__ = [
    "ResidualFn",
    "StaticStep",
    "StepContext",
    "StopForward",
    "block_hidden",
    "decoder_stack",
    "residual_hooks",
    "static_step",
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
        past_length: Number of positions already in the KV cache before this call (in a decode step
            replayed from a CUDA graph: the value of the step that was captured).
        prompt_length: Padded prompt length (columns) fixed by the first forward of the ``with`` block.
        static: The :class:`StaticStep` of a static generator's forward call, else ``None``: the function
            then runs in a fixed-shape step that may be captured (see :class:`StaticStep`).
    """

    real_BT: Tensor
    token_index_BT: Tensor
    generated_BT: Tensor
    past_length: int
    prompt_length: int
    static: StaticStep | None = None

    @property
    def prompt_BT(self) -> Tensor:
        """True on real prompt tokens."""
        return self.real_BT & ~self.generated_BT

    def first_rows(self, n_rows: int) -> StepContext:
        """The context of the first ``n_rows`` rows."""
        return replace(
            self,
            real_BT=self.real_BT[:n_rows],
            token_index_BT=self.token_index_BT[:n_rows],
            generated_BT=self.generated_BT[:n_rows],
        )


class StaticStep:
    """A static generator's forward calls as the project's hooks see them (``ctx.static``).

    The generator runs each batch as one eager prefill, then fixed-shape decode steps that it may capture
    once as a CUDA graph and replay for later batches. A hook function that may be captured declares a
    ``static_key`` attribute: a hashable value naming every Python-level choice that shapes what it computes
    (e.g. ``("residual", positions)``); ``None`` means "not capturable". When ``ctx.static`` is set, such a
    function must:

    * do no host synchronisation and no data-dependent shapes or branches on tensor values, and return a
      tensor (``None`` only when that follows from its ``static_key``);
    * take every tensor that may change between batches (vectors, alphas, latent indices, on the hidden
      states' device) through :meth:`hold`, called in the same order in every call of the batch: the
      prefill copies the value into a fixed-address slot and the decode steps read the slot, so a graph
      captured for an earlier batch reads this batch's values. Tensors used as they are (an SAE's weights)
      must keep their address: put the object itself in ``static_key``.

    Two batches whose prefills give the same :attr:`signature` (the hooked layers, each function's type and
    ``static_key``, the held shapes, the number of real rows) share one captured decode step.

    Attributes:
        rows: Real rows of the current batch (later rows are fill rows no hook function sees).
        prefill: True during the batch's prefill, False in its decode steps.
        capturable: False when a function without a ``static_key`` ran in this batch's prefill.
    """

    def __init__(self) -> None:
        self.rows = 0
        self.prefill = True
        self.capturable = True
        self._decode_context: StepContext | None = None
        self._signature: list[Hashable] = []
        self._order: list[tuple[Any, ...]] = []
        self._slots: dict[tuple[Any, ...], Tensor] = {}
        self._cursor = 0

    def start_batch(self, rows: int) -> None:
        """Before a batch's prefill: ``rows`` real rows."""
        self.rows, self.prefill, self.capturable = rows, True, True
        self._signature, self._order, self._cursor = [("rows", rows)], [], 0

    def start_decode(self, context: StepContext) -> None:
        """Before a decode step (eager or captured): the context every hook of the step gets."""
        self.prefill, self._cursor = False, 0
        self._decode_context = replace(context, static=self)

    @property
    def decode_context(self) -> StepContext:
        """The current decode step's context (set by :meth:`start_decode`)."""
        if self._decode_context is None:
            raise RuntimeError("StaticStep: no decode step has started")
        return self._decode_context

    @property
    def signature(self) -> tuple[Hashable, ...]:
        """What the last prefill ran: equal signatures can replay one captured decode step."""
        return tuple(self._signature)

    @property
    def held(self) -> tuple[Tensor, ...]:
        """The slots the current batch's prefill filled, in hold order."""
        return tuple(self._slots[key] for key in self._order)

    def enter(self, layer: int, fn: Any) -> None:
        """Record that ``fn`` runs at ``layer`` (prefill only; called by :func:`residual_hooks`)."""
        if not self.prefill:
            return
        key = getattr(fn, "static_key", None)
        if key is None:
            self.capturable = False
        self._signature.append((layer, type(fn).__qualname__, key))

    def hold(self, make: Callable[[], Tensor]) -> Tensor:
        """A batch tensor at a fixed address: ``make()`` copied into a slot in the prefill, the slot after.

        Args:
            make: Builds the tensor (called in the prefill only).

        Returns:
            The slot (same values as ``make()``); the same slot for every batch with the same shapes.

        Raises:
            RuntimeError: If a decode step holds more tensors than the prefill did.
        """
        if self.prefill:
            value = make()
            key = (len(self._order), tuple(value.shape), value.dtype, value.device)
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = torch.empty(key[1], dtype=value.dtype, device=value.device)
            slot.copy_(value)
            self._order.append(key)
            self._signature.append(("hold", *key[1:]))
            return slot
        if self._cursor >= len(self._order):
            raise RuntimeError("StaticStep.hold: a decode step held more tensors than its prefill")
        slot = self._slots[self._order[self._cursor]]
        self._cursor += 1
        return slot


_STATIC_STEPS: dict[int, StaticStep] = {}


@contextmanager
def static_step(model: nn.Module, step: StaticStep) -> Iterator[StaticStep]:
    """Within the block, the project's hooks on ``model`` take their contexts from ``step``.

    Args:
        model: The model a static generator runs.
        step: The generator's :class:`StaticStep`.

    Raises:
        RuntimeError: If another static step is active on the same model.
    """
    key = id(decoder_stack(model))
    if key in _STATIC_STEPS:
        raise RuntimeError("static_step: another static generator is running this model")
    _STATIC_STEPS[key] = step
    try:
        yield step
    finally:
        del _STATIC_STEPS[key]


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

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        static = _STATIC_STEPS.get(id(module))
        if static is not None and not static.prefill:  # a fixed-shape decode step: the generator's buffers
            self.context = static.decode_context
            if self.prompt_length is None:
                self.prompt_length = self.context.prompt_length
            return
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
        self.context = StepContext(real_BT, token_index_BT, generated_BT, past, self.prompt_length, static)

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
            return replace(
                ctx,
                real_BT=ctx.real_BT.to(device),
                token_index_BT=ctx.token_index_BT.to(device),
                generated_BT=ctx.generated_BT.to(device),
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

    def make_hook(layer: int, fn: ResidualFn) -> Callable[[nn.Module, Any, Any], Any]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            hidden_BTD = block_hidden(output)
            ctx = tracker.context_for(hidden_BTD)
            static = ctx.static
            if static is not None:
                static.enter(layer, fn)
            if static is None or static.rows >= hidden_BTD.shape[0]:
                seen_BTD, new = hidden_BTD, fn(hidden_BTD, ctx)
            else:  # a static generator's fill rows: the function sees the real rows only
                seen_BTD = hidden_BTD[: static.rows]
                new = fn(seen_BTD, ctx.first_rows(static.rows))
            if new is None or new is seen_BTD:
                return None
            if new.shape != seen_BTD.shape:
                raise ValueError(
                    f"a residual hook returned shape {tuple(new.shape)} for hidden states "
                    f"{tuple(seen_BTD.shape)}"
                )
            new = new.to(hidden_BTD.dtype)
            if seen_BTD is not hidden_BTD:
                new = torch.cat([new, hidden_BTD[seen_BTD.shape[0] :]])
            return with_block_hidden(output, new)

        return hook

    handles = [decoder_stack(model).register_forward_pre_hook(tracker.pre_hook, with_kwargs=True)]
    try:
        handles += [
            blocks[layer].register_forward_hook(make_hook(layer, fn)) for layer, fn in by_layer.items()
        ]
        yield
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
