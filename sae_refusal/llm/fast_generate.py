"""Fast greedy generation: a static KV cache and a fixed-shape decode step, optionally one CUDA graph.

:func:`sae_refusal.llm.batched.generate` runs Hugging Face ``generate`` with its dynamic cache: every decode
step launches each kernel of the model from Python, which dominates the step time of a large model at small
batch sizes. :class:`StaticGenerator` keeps every tensor of the decode step at a fixed address and shape (a
``StaticCache`` of ``max_cache_len`` positions, the current token, its position, a 4-D additive attention
mask built from the prompt padding and the cache position), so the step can be replayed as one CUDA graph
(``mode="cuda_graph"``) and, optionally, compiled first (``compile=True``). :func:`generate_static` is the
drop-in counterpart of :func:`~sae_refusal.llm.batched.generate` (greedy only).

Modes:

* ``"eager"``: one ``model(...)`` call per token with the 2-D attention mask of the positions so far (like
  ``generate``); the project's hooks (``around``, e.g. an :class:`~sae_refusal.steer.interventions.
  Intervention`) work unchanged, with their :class:`~sae_refusal.llm.hooks.StepContext`.
* ``"static"``: the fixed-shape decode step run eagerly (the step a CUDA graph captures; any device).
* ``"cuda_graph"``: the fixed-shape step captured as a CUDA graph and replayed: once per generator, and once
  more for each new :attr:`~sae_refusal.llm.hooks.StaticStep.signature` of the ``around`` hooks.

``around`` hooks in the static modes: ``around(indices)`` (e.g. an :class:`~sae_refusal.steer.interventions.
Intervention`, a gate's per-row steering) is entered around each batch's prefill and decode steps, as in
``generate``. The generator registers a :class:`~sae_refusal.llm.hooks.StaticStep` for the batch
(:func:`~sae_refusal.llm.hooks.static_step`): the prefill's hooks get their context from its 2-D mask, as
in ``generate``; a decode step's context comes from the generator's fixed buffers (every row real and
generated, ``token_index_BT`` the position buffer; ``past_length`` a host value, frozen at capture in a
replayed graph). Fill rows are hidden from the hook functions. A hook function with a ``static_key`` (all of
:mod:`sae_refusal.steer.interventions`) keeps its per-batch tensors in the step's fixed-address slots
(:meth:`~sae_refusal.llm.hooks.StaticStep.hold`, written by each prefill), so a graph captured for one
batch replays correctly for the next batch with the same signature (same hooked layers, kinds, positions,
tensor shapes and number of real rows): a gate's per-row vectors and alphas change every batch and still
share one graph; a batch with no active hook (all its alphas 0) and a smaller last batch get one graph each.
A batch whose hooks include a function without a ``static_key`` runs its decode steps eagerly (``"static"``
step, still with the right contexts) and is counted in :attr:`StaticGenerator.eager_batches`.

Edits: ``edits={layer: fn}`` with ``fn(hidden_BTD, prefill) -> hidden_BTD`` (a :data:`StaticEdit`) rewrite
the output of decoder block ``layer`` (project convention: the residual stream after block ``layer``) in the
prefill and every decode step, in every mode. A static edit must be capturable: no host synchronisation, no
data-dependent shapes or Python branches on tensor values, and it must keep its tensors at fixed addresses
(update them in place, as :meth:`ResidualAdd.set_alpha` does; the generator runs in ``torch.inference_mode``,
so a buffer an edit creates during a call must be made under ``torch.inference_mode(False)`` if it is to be
written outside inference mode later); ``prefill`` is a Python bool (the decode step
always sees ``False``). It acts on every position, padding included (padding is masked out of attention, so
real tokens see the same values as with an edit that skips padding). :class:`ResidualAdd` is the residual
steering edit ``a <- a + alpha_b * v``, per row; anything that reads the prompt once (a gate deciding per
prompt) can do so in its ``prefill`` call and write its decision into a buffer the decode step reads.

Attention: the decode step of a Llama model attends with :func:`grouped_decode_attention` (Hugging Face's
eager formula, the query heads of each key / value head grouped instead of the cache repeated per head);
Hugging Face's own kernels, given a mask, copy the whole static cache per head and layer at every step,
which dominated the step (``grouped_attention=False`` keeps them). The prefill uses the model's attention.

Logits: greedy argmax of the logits (in float32 plus ``logit_bias`` when one is given: the single-token
``sequence_bias`` of a generation config, e.g. a calibrated respond bias, as ``generate`` adds it).

Limits: greedy decoding only; rows run on after their stop token until every row of the batch has stopped
(checked every :data:`STOP_CHECK_EVERY` steps when ``stop_ids`` are given; answers are cut at their first
stop token); in the static modes a batch smaller than the generator's ``batch_size`` is padded with copies
of its first row; ``compile`` takes no ``around`` hooks (dynamo would bake one batch's hooks in). The model
must take ``position_ids``, a 4-D additive mask and a ``StaticCache`` (Llama-like Hugging Face decoders do),
on one device. :func:`generate_static` with ``sort_by_length`` sizes the static cache per batch (rounded up
to :func:`cache_length` buckets), so short batches do not attend over the longest prompt's cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from sae_refusal.llm.batched import (
    BatchContext,
    Generation,
    _cut_at_stop,
    _eval_mode,
    check_positive,
    forward_parameters,
    iter_padded_batches,
)
from sae_refusal.llm.extraction import position_ids_from_mask
from sae_refusal.llm.hooks import StaticStep, StepContext, block_hidden, static_step, with_block_hidden
from sae_refusal.llm.layers import decoder_layers, input_device, validate_layers

__all__ = [
    "GROUPED_DECODE_ATTENTION",
    "STOP_CHECK_EVERY",
    "Mode",
    "ResidualAdd",
    "StaticEdit",
    "StaticGenerator",
    "cache_length",
    "generate_static",
    "grouped_decode_attention",
]

log = logging.getLogger(__name__)

#: Decode steps between two checks (one host synchronisation) of whether every row has stopped.
STOP_CHECK_EVERY = 8

#: ``fn(hidden_BTD, prefill)`` -> the new hidden states (same shape); see the module docstring for the rules.
StaticEdit = Callable[[Tensor, bool], Tensor]

#: How the decode step runs (see the module docstring).
Mode = Literal["eager", "static", "cuda_graph"]

_MODES = ("eager", "static", "cuda_graph")


class ResidualAdd:
    """Residual steering as a :data:`StaticEdit`: ``a <- a + alpha_b * v`` at every position of row ``b``.

    The same arithmetic as :class:`~sae_refusal.steer.interventions.ResidualSteering` (``alpha * v`` in
    float32, cast to the hidden dtype, added), so greedy tokens match it; a row whose alpha is 0 gets
    ``a + 0``, the same values.

    Args:
        vector: ``(D,)`` steering vector.
        alpha: A float, or one value per row ``(B,)``; change it in place with :meth:`set_alpha`.

    Raises:
        ValueError: On a vector that is not 1-D or an alpha that is not a number or 1-D.
    """

    def __init__(self, vector: Tensor, alpha: float | Sequence[float] | Tensor = 1.0) -> None:
        if vector.ndim != 1:
            raise ValueError(f"vector: expected shape (D,), got {tuple(vector.shape)}")
        alpha_t = torch.as_tensor(alpha, dtype=torch.float32)
        if alpha_t.ndim > 1:
            raise ValueError(f"alpha: expected a number or (B,), got shape {tuple(alpha_t.shape)}")
        # Normal tensors even when built inside inference mode (e.g. beside a gate's scores): set_alpha must
        # be able to write them outside it.
        with torch.inference_mode(False):
            self.vector_D = vector.detach().float().clone()
            self.alpha = alpha_t.clone()
        self._placed: torch.device | None = None

    def set_alpha(self, alpha: float | Sequence[float] | Tensor) -> None:
        """Overwrite alpha in place (same shape), so a captured CUDA graph sees the new values.

        Works inside and outside ``torch.inference_mode`` (the buffers are normal tensors: :meth:`_place`).
        """
        self.alpha.copy_(torch.as_tensor(alpha, dtype=torch.float32))

    def _place(self, device: torch.device) -> None:
        """Fresh copies of the buffers on ``device``, made in the first call (eager prefill, before capture).

        The generator calls its edits inside ``torch.inference_mode``, where a new tensor would be an
        inference tensor that :meth:`set_alpha` could not update outside it ("Inplace update to inference
        tensor outside InferenceMode"): the copies are made with inference mode off. They are made on every
        device, the CPU included, so the CPU runs the same code as CUDA.
        """
        with torch.inference_mode(False):
            self.vector_D = self.vector_D.to(device, copy=True)
            self.alpha = self.alpha.to(device, copy=True)
        self._placed = device

    def __call__(self, hidden_BTD: Tensor, prefill: bool) -> Tensor:
        if self._placed != hidden_BTD.device:  # once, in the (eager) first prefill
            self._place(hidden_BTD.device)
        alpha_B = self.alpha.expand(hidden_BTD.shape[0]) if self.alpha.ndim == 0 else self.alpha
        delta_BD = alpha_B[:, None] * self.vector_D[None, :]
        return hidden_BTD + delta_BD[:, None, :].to(hidden_BTD.dtype)


#: The static cache's length is a multiple of this (cuBLAS's aligned kernels for the decode attention's
#: products need row strides of whole 16-byte vectors: on an H100 the unaligned ``align1`` kernels took
#: 0.85 of a 10.0 ms Llama-3-8B decode step at a 181-position cache, ``benchmarks/profile_decode_step.py``).
CACHE_ALIGN = 8


def _static_cache(model: nn.Module, batch_size: int, max_cache_len: int) -> Any:
    """A Hugging Face ``StaticCache`` (the recent signature, else the older one with batch size and dtype)."""
    from transformers import StaticCache

    config = cast(Any, model).config
    try:
        return StaticCache(config=config, max_cache_len=max_cache_len)
    except TypeError:
        parameter = next(iter(model.parameters()))
        return cast(Any, StaticCache)(
            config=config,
            max_batch_size=batch_size,
            max_cache_len=max_cache_len,
            device=parameter.device,
            dtype=parameter.dtype,
        )


#: Name under which :func:`grouped_decode_attention` is registered with ``transformers.AttentionInterface``.
GROUPED_DECODE_ATTENTION = "sae_refusal_grouped_decode"


def grouped_decode_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **_kwargs: Any,
) -> tuple[Tensor, None]:
    """Eager attention (Hugging Face's formula) without repeating the key / value heads of grouped queries.

    Hugging Face's ``eager`` and ``sdpa`` attention (the latter whenever a mask is given) copy every key and
    value head ``H / KV`` times before attending: in a decode step over a static cache that copy, twice per
    layer over the whole cache, and a fused kernel built for long queries dominated the step. Here the
    ``H / KV`` query heads of each key head attend as one matrix: ``softmax(q k^T * scaling + mask) v``,
    the softmax in float32, the same arithmetic as ``eager`` up to floating-point rounding.

    Args:
        module: The attention module (unused).
        query: ``(B, H, T, Dh)``.
        key: ``(B, KV, S, Dh)``; ``H`` a multiple of ``KV``.
        value: ``(B, KV, S, Dh)``.
        attention_mask: Additive ``(B, 1, T, S')`` with ``S' >= S``, or ``None``.
        scaling: Score scale (default ``Dh ** -0.5``).
        dropout: Must be 0 (inference).

    Returns:
        ``(B, T, H, Dh)`` and no attention weights.
    """
    if dropout:
        raise ValueError("grouped_decode_attention: inference only (dropout 0)")
    batch, heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    scale = head_dim**-0.5 if scaling is None else scaling
    q_BKGD = query.reshape(batch, kv_heads, groups * q_len, head_dim)
    scores = torch.matmul(q_BKGD, key.transpose(2, 3)) * scale
    if attention_mask is not None:
        scores = scores.view(batch, kv_heads, groups, q_len, kv_len) + attention_mask[:, :, None, :, :kv_len]
        scores = scores.view(batch, kv_heads, groups * q_len, kv_len)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value).view(batch, heads, q_len, head_dim)
    return out.transpose(1, 2).contiguous(), None


def _decode_attention_name(model: nn.Module) -> str | None:
    """:data:`GROUPED_DECODE_ATTENTION`, registered, for a Llama model; else ``None`` (its own attention)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "llama" or not hasattr(config, "_attn_implementation"):
        return None
    try:
        from transformers import AttentionInterface
    except ImportError:  # pragma: no cover - older transformers
        return None
    AttentionInterface.register(GROUPED_DECODE_ATTENTION, grouped_decode_attention)
    return GROUPED_DECODE_ATTENTION


class StaticGenerator:
    """Greedy generation for batches of up to ``batch_size`` prompts with a reusable static decode step.

    Use it as a context manager (the edits' hooks are removed on exit). The first call builds the cache. In
    ``"cuda_graph"`` mode the decode step is captured after the prefill of the first batch with each new
    hook signature (two warm-up steps and the capture; their writes to the decode buffers and the cache
    counters are undone, and the positions they wrote are masked until the real steps overwrite them), then
    replayed for every later batch with that signature. :attr:`setup_s` adds up these one-off costs (cache,
    captures, compilation): each prompt batch otherwise costs one eager prefill and ``max_new_tokens - 1``
    replays.

    Args:
        model: A Hugging Face causal LM (Llama-like), in eval mode, on one device.
        batch_size: Rows per call (static modes pad smaller batches).
        max_cache_len: Most prompt plus new tokens per row. The static cache holds it rounded up to a
            multiple of :data:`CACHE_ALIGN` (:attr:`cache_len`; the extra columns stay masked): an unaligned
            length sends the decode attention's products to slow unaligned GEMM kernels.
        edits: ``{layer: StaticEdit}``, applied in the prefill and every decode step.
        mode: ``"eager"``, ``"static"`` or ``"cuda_graph"`` (module docstring).
        compile: ``torch.compile`` the static decode step (static modes; with ``"cuda_graph"`` the compiled
            step is captured). Compilation happens in the first call and counts in :attr:`setup_s`; it
            resets dynamo's caches first (``torch._dynamo.reset()``), since compiled code does not guard on
            the edits' hooks. Takes no ``around`` hooks.
        logit_bias: ``(V,)`` added to the float32 logits before each argmax (``None``: plain argmax).
        grouped_attention: Run the static decode step's attention as :func:`grouped_decode_attention` (Llama
            models; the prefill keeps the model's own attention). Off: the model's own attention.

    Attributes:
        cache_len: The static cache's length (``max_cache_len`` rounded up to :data:`CACHE_ALIGN`).
        setup_s: Seconds spent on the cache, captures and compilation so far.
        captures: CUDA graphs captured so far (one per hook signature).
        eager_batches: Batches of ``"cuda_graph"`` mode whose decode steps ran without a graph (a hook
            function without a ``static_key``, or one whose capture failed: logged once per signature).

    Raises:
        ValueError: On a bad size, mode, layer or ``logit_bias``, ``"cuda_graph"`` on a model that is not
            on CUDA, or ``compile`` in ``"eager"`` mode.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        batch_size: int,
        max_cache_len: int,
        edits: Mapping[int, StaticEdit] | None = None,
        mode: Mode = "static",
        compile: bool = False,
        logit_bias: Tensor | None = None,
        grouped_attention: bool = True,
    ) -> None:
        check_positive("batch_size", batch_size)
        check_positive("max_cache_len", max_cache_len)
        if mode not in _MODES:
            raise ValueError(f"mode: expected one of {_MODES}, got {mode!r}")
        self.device = input_device(model)
        if mode == "cuda_graph" and self.device.type != "cuda":
            raise ValueError(f"mode 'cuda_graph' needs a model on CUDA, not {self.device}")
        if compile and mode == "eager":
            raise ValueError("compile: only the static modes ('static', 'cuda_graph') have a step to compile")
        if logit_bias is not None and logit_bias.ndim != 1:
            raise ValueError(f"logit_bias: expected shape (V,), got {tuple(logit_bias.shape)}")
        self.model, self.batch_size, self.max_cache_len = model, batch_size, max_cache_len
        self.cache_len = -(-max_cache_len // CACHE_ALIGN) * CACHE_ALIGN
        self.mode: Mode = mode
        self.compile = compile
        self.logit_bias_V = (
            None if logit_bias is None else logit_bias.detach().to(self.device, torch.float32, copy=True)
        )
        blocks = decoder_layers(model)
        self.edits: dict[int, StaticEdit] = {}
        for key, fn in (edits or {}).items():
            (layer,) = validate_layers(key, len(blocks))
            if layer in self.edits:
                raise ValueError(f"edits: layer {key} names block {layer} twice")
            self.edits[layer] = fn
        self._blocks = blocks
        self._handles: list[Any] = []
        self._prefill = False
        names = forward_parameters(model)
        self._new_cache_api = "cache" in names and "past_key_values" not in names
        self._logits_to_keep = "logits_to_keep" in names
        self.dtype = next(iter(model.parameters())).dtype
        self.cache: Any = None
        self.static = StaticStep()
        self.setup_s = 0.0
        self.captures = 0
        self.eager_batches = 0
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, Tensor] | None] = {}
        self._compiled_warm = False
        # the decode step's fixed-address inputs (shapes fixed at the first static call)
        self._tok_B1: Tensor | None = None
        self._pos_B1: Tensor | None = None
        self._cpos_1: Tensor | None = None
        self._real_BS: Tensor | None = None
        self._ones_B1: Tensor | None = None
        self._step_fn: Callable[[], Tensor] = self._step
        self._decode_attention = _decode_attention_name(model) if grouped_attention else None
        self._register()

    # -- hooks ---------------------------------------------------------------------------------------------

    def _register(self) -> None:
        def make_hook(fn: StaticEdit) -> Callable[[nn.Module, Any, Any], Any]:
            def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
                return with_block_hidden(output, fn(block_hidden(output), self._prefill))

            return hook

        self._handles = [
            self._blocks[layer].register_forward_hook(make_hook(fn)) for layer, fn in self.edits.items()
        ]

    def close(self) -> None:
        """Remove the edits' hooks and drop the graphs and cache."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._graphs = {}
        self.cache = None

    def __enter__(self) -> StaticGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- model calls ---------------------------------------------------------------------------------------

    def _cache_kwargs(self, cache_position: Tensor) -> dict[str, Any]:
        if self._new_cache_api:  # the cache tracks its own write position
            return {"cache": self.cache}
        return {"past_key_values": self.cache, "cache_position": cache_position}

    def _pick(self, logits_BV: Tensor) -> Tensor:
        """Greedy tokens: the argmax of the logits (in float32 plus the bias, when there is one)."""
        if self.logit_bias_V is None:
            return logits_BV.argmax(dim=-1)
        return (logits_BV.float() + self.logit_bias_V).argmax(dim=-1)

    def _prefill_logits(self, input_ids_BT: Tensor, mask_BT: Tensor) -> Tensor:
        extra: dict[str, Any] = {"logits_to_keep": 1} if self._logits_to_keep else {}
        positions_T = torch.arange(input_ids_BT.shape[1], device=self.device)
        self._prefill = True
        try:
            out = cast(Any, self.model)(
                input_ids=input_ids_BT,
                attention_mask=mask_BT,
                position_ids=position_ids_from_mask(mask_BT),
                use_cache=True,
                **self._cache_kwargs(positions_T),
                **extra,
            )
        finally:
            self._prefill = False
        return cast(Tensor, out.logits[:, -1, :])

    def _buffers(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The decode step's fixed-address inputs: token, position, cache position, real-column mask."""
        tok_B1, pos_B1, cpos_1, real_BS = self._tok_B1, self._pos_B1, self._cpos_1, self._real_BS
        if tok_B1 is None or pos_B1 is None or cpos_1 is None or real_BS is None:
            raise RuntimeError("StaticGenerator: the decode buffers are built by the first static call")
        return tok_B1, pos_B1, cpos_1, real_BS

    def _run_step(self) -> Tensor:
        """One decode step (eager, or traced by a capture) with the decode attention switched in."""
        if self._decode_attention is None:
            return self._step_fn()
        config = cast(Any, self.model).config
        before = config._attn_implementation
        config._attn_implementation = self._decode_attention
        try:
            return self._step_fn()
        finally:
            config._attn_implementation = before

    def _step(self) -> Tensor:
        """One fixed-shape decode step: reads and advances the token, position and cache-position buffers."""
        tok_B1, pos_B1, cpos_1, real_BS = self._buffers()
        columns_S = torch.arange(real_BS.shape[1], device=self.device)
        allowed_BS = real_BS & (columns_S[None, :] <= cpos_1)
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        low = torch.full((), torch.finfo(self.dtype).min, dtype=self.dtype, device=self.device)
        mask_B11S = torch.where(allowed_BS[:, None, None, :], zero, low)
        out = cast(Any, self.model)(
            input_ids=tok_B1,
            attention_mask=mask_B11S,
            position_ids=pos_B1,
            use_cache=True,
            **self._cache_kwargs(cpos_1),
        )
        next_B = self._pick(out.logits[:, -1, :])
        tok_B1.copy_(next_B[:, None])
        pos_B1.add_(1)
        cpos_1.add_(1)
        return cast(Tensor, next_B)

    # -- generation ----------------------------------------------------------------------------------------

    def __call__(
        self,
        input_ids_BT: Tensor,
        attention_mask_BT: Tensor,
        max_new_tokens: int,
        around: BatchContext | None = None,
        indices: list[int] | None = None,
        stop_ids: Sequence[int] = (),
    ) -> Tensor:
        """Greedy-generate up to ``max_new_tokens`` tokens for one left-padded batch.

        Args:
            input_ids_BT: Left-padded token ids (``B <= batch_size`` rows).
            attention_mask_BT: 1 on real tokens, 0 on padding.
            max_new_tokens: Tokens generated per row.
            around: ``around(indices)`` entered around the prefill and all decode steps (module docstring
                for the static modes).
            indices: Given to ``around`` (default: ``0..B-1``).
            stop_ids: When given, generation ends early once every row holds one of them (checked every
                :data:`STOP_CHECK_EVERY` steps); rows are not cut here.

        Returns:
            ``(B, N)`` token ids, ``torch.long`` on the CPU: ``N = max_new_tokens``, or fewer after an early
            end (every row then holds a stop token).

        Raises:
            ValueError: On too many rows, a prompt plus answer longer than ``max_cache_len``, or ``around``
                with ``compile``.
        """
        check_positive("max_new_tokens", max_new_tokens)
        n_rows, length = input_ids_BT.shape
        if n_rows > self.batch_size:
            raise ValueError(f"input_ids_BT: {n_rows} rows for a generator of batch_size {self.batch_size}")
        if length + max_new_tokens > self.max_cache_len:
            raise ValueError(
                f"prompt of {length} + {max_new_tokens} new tokens exceeds max_cache_len {self.max_cache_len}"
            )
        if around is not None and self.compile:
            raise ValueError("around: a compiled step takes no hooks (dynamo would bake one batch's in)")
        ids_BT = input_ids_BT.to(self.device)
        mask_BT = attention_mask_BT.to(device=self.device, dtype=torch.long)
        stops_S = None
        if stop_ids:
            stops_S = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=self.device)
        with torch.inference_mode():
            if self.mode == "eager":
                context = around(indices or list(range(n_rows))) if around is not None else nullcontext()
                with context:
                    return self._generate_eager(ids_BT, mask_BT, max_new_tokens)
            if n_rows < self.batch_size:  # fixed shapes: fill with copies of the first row
                fill = self.batch_size - n_rows
                ids_BT = torch.cat([ids_BT, ids_BT[:1].expand(fill, -1)])
                mask_BT = torch.cat([mask_BT, mask_BT[:1].expand(fill, -1)])
            self.static.start_batch(n_rows)
            context = around(indices or list(range(n_rows))) if around is not None else nullcontext()
            with static_step(self.model, self.static), context:
                out_BN = self._generate_static(ids_BT, mask_BT, max_new_tokens, n_rows, stops_S)
            return out_BN[:n_rows].cpu()

    def _generate_eager(self, ids_BT: Tensor, mask_BT: Tensor, max_new_tokens: int) -> Tensor:
        n_rows, length = ids_BT.shape
        self.cache = _static_cache(self.model, n_rows, length + max_new_tokens)
        real_BS = torch.ones(n_rows, length + max_new_tokens, dtype=torch.long, device=self.device)
        real_BS[:, :length] = mask_BT
        positions_B = mask_BT.sum(dim=1)
        next_B = self._pick(self._prefill_logits(ids_BT, mask_BT))
        tokens = [next_B]
        for step in range(1, max_new_tokens):
            column = length + step - 1
            out = cast(Any, self.model)(
                input_ids=next_B[:, None],
                attention_mask=real_BS[:, : column + 1],
                position_ids=(positions_B + step - 1)[:, None],
                use_cache=True,
                **self._cache_kwargs(torch.tensor([column], device=self.device)),
            )
            next_B = self._pick(out.logits[:, -1, :])
            tokens.append(next_B)
        self.cache = None
        return torch.stack(tokens, dim=1).cpu()

    def _generate_static(
        self, ids_BT: Tensor, mask_BT: Tensor, max_new_tokens: int, n_rows: int, stops_S: Tensor | None
    ) -> Tensor:
        """Prefill and decode one (filled) batch within its hooks and static step; ``(B, N)`` on device."""
        if self.cache is None:
            start = time.perf_counter()
            self._setup(ids_BT.shape[0])
            self.setup_s += time.perf_counter() - start
        else:
            self.cache.reset()
        length = ids_BT.shape[1]
        next_B = self._begin(ids_BT, mask_BT)
        decode = self._decoder(length)
        out_BN = torch.empty(ids_BT.shape[0], max_new_tokens, dtype=torch.long, device=self.device)
        out_BN[:, 0] = next_B
        for step in range(1, max_new_tokens):
            out_BN[:, step] = decode(step)
            check = stops_S is not None and step % STOP_CHECK_EVERY == 0 and step + 1 < max_new_tokens
            if check and bool(torch.isin(out_BN[:n_rows, : step + 1], cast(Tensor, stops_S)).any(1).all()):
                return out_BN[:, : step + 1]
        return out_BN

    def _begin(self, ids_BT: Tensor, mask_BT: Tensor) -> Tensor:
        """Prefill one batch and load the decode step's buffers in place; returns the first new tokens."""
        tok_B1, pos_B1, cpos_1, real_BS = self._buffers()
        length = ids_BT.shape[1]
        next_B = self._pick(self._prefill_logits(ids_BT, mask_BT))
        real_BS.fill_(True)
        real_BS[:, :length] = mask_BT.bool()
        tok_B1.copy_(next_B[:, None])
        pos_B1.copy_(mask_BT.sum(dim=1, keepdim=True))
        cpos_1.fill_(length)
        return next_B

    def _decode_context(self, length: int, step: int) -> StepContext:
        """What the hooks see in decode step ``step``: every row real and generated, its token's index."""
        ones_B1, pos_B1 = self._ones_B1, self._pos_B1
        if ones_B1 is None or pos_B1 is None:
            raise RuntimeError("StaticGenerator: the decode buffers are built by the first static call")
        return StepContext(ones_B1, pos_B1, ones_B1, length + step - 1, length)

    def _decoder(self, length: int) -> Callable[[int], Tensor]:
        """``decode(step)`` -> the step's tokens: a replayed graph, or the step run eagerly."""

        def prepare(step: int) -> None:
            self.static.start_decode(self._decode_context(length, step))

        def eager(step: int) -> Tensor:
            prepare(step)
            return self._run_step()

        if self.mode != "cuda_graph" or not self.static.capturable:
            if self.mode == "cuda_graph":
                if not self.eager_batches:
                    log.warning(
                        "StaticGenerator: a hook function without a static_key (not capturable): its "
                        "batches run their decode steps without a CUDA graph"
                    )
                self.eager_batches += 1
            elif self.compile and not self._compiled_warm:  # compile now, outside the timed steps
                start = time.perf_counter()
                saved = self._snapshot()
                eager(1)
                self._restore(saved)
                self._compiled_warm = True
                self.setup_s += time.perf_counter() - start
            return eager
        key = self.static.signature
        if key not in self._graphs:
            start = time.perf_counter()
            try:
                self._graphs[key] = self._capture(lambda: prepare(1))
            except RuntimeError as error:  # e.g. a hook that synchronises although it has a static_key
                log.warning(
                    "StaticGenerator: no CUDA graph for these hooks, their batches run eagerly (%s)", error
                )
                self._graphs[key] = None
            self.setup_s += time.perf_counter() - start
        entry = self._graphs[key]
        if entry is None:
            self.eager_batches += 1
            return eager
        graph, next_B = entry

        def replay(_step: int) -> Tensor:
            graph.replay()
            return next_B

        return replay

    def _counters(self) -> list[Tensor]:
        """Tensors the decode step advances in place: its buffers and the cache layers' write positions."""
        tok_B1, pos_B1, cpos_1, _ = self._buffers()
        counters = [tok_B1, pos_B1, cpos_1]
        for layer in getattr(self.cache, "layers", None) or ():
            length = getattr(layer, "cumulative_length", None)
            if isinstance(length, Tensor):
                counters.append(length)
        return counters

    def _snapshot(self) -> list[tuple[Tensor, Tensor]]:
        return [(tensor, tensor.clone()) for tensor in self._counters()]

    @staticmethod
    def _restore(saved: list[tuple[Tensor, Tensor]]) -> None:
        for tensor, value in saved:
            tensor.copy_(value)

    def _capture(self, prepare: Callable[[], None]) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        """Capture the decode step after a prefill; the state the warm-up steps advance is put back."""
        saved = self._snapshot()
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    prepare()
                    self._run_step()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            prepare()
            with torch.cuda.graph(graph):
                next_B = self._run_step()
        finally:
            self._restore(saved)
        self.captures += 1
        return graph, next_B

    def _setup(self, n_rows: int) -> None:
        """Build the cache and the step's buffers; compile the step where asked."""
        self.cache = _static_cache(self.model, n_rows, self.cache_len)
        self._tok_B1 = torch.zeros(n_rows, 1, dtype=torch.long, device=self.device)
        self._pos_B1 = torch.zeros(n_rows, 1, dtype=torch.long, device=self.device)
        self._cpos_1 = torch.zeros(1, dtype=torch.long, device=self.device)
        self._real_BS = torch.ones(n_rows, self.cache_len, dtype=torch.bool, device=self.device)
        self._ones_B1 = torch.ones(n_rows, 1, dtype=torch.bool, device=self.device)
        if self.compile:
            # Dynamo caches compiled code per code object and does not guard on module hooks by default:
            # another generator's edits would be baked in. Start from an empty cache.
            torch._dynamo.reset()
            self._step_fn = cast(Callable[[], Tensor], torch.compile(self._step, dynamic=False))


def cache_length(needed: int, most: int | None = None) -> int:
    """The static cache length for ``needed`` positions: rounded up to two sizes per octave (at least 64).

    ``64, 96, 128, 192, 256, 384, 512, ...``: a batch attends over at most about 1.5 times its own length,
    and batches of similar lengths share a cache and its graphs.

    Args:
        needed: Prompt plus new tokens of the batch.
        most: Upper bound (the longest batch's need); ``None``: none.
    """
    size = 64
    while size < needed:
        half = size // 2
        size = size + half if size + half >= needed else size * 2
    return size if most is None else max(min(size, most), needed)


def generate_static(
    model: nn.Module,
    input_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    pad_id: int,
    batch_size: int,
    stop_ids: Sequence[int] = (),
    edits: Mapping[int, StaticEdit] | None = None,
    mode: Mode = "static",
    compile: bool = False,
    around: BatchContext | None = None,
    sort_by_length: bool = False,
    logit_bias: Tensor | None = None,
) -> list[Generation]:
    """Greedy generation through a :class:`StaticGenerator`: the fast counterpart of ``batched.generate``.

    Same prompts, batches, padding and results as :func:`~sae_refusal.llm.batched.generate` with
    ``temperature=0`` (greedy tokens equal up to floating-point rounding; exactly equal in float32 on the CPU
    in the tests). Rows are cut at their first stop token; a batch ends early once all its rows have stopped.
    In input order, one generator (one cache, one graph per hook signature) serves all batches; with
    ``sort_by_length`` (longest first) the cache is sized per batch by :func:`cache_length`, a new generator
    replacing the previous one when the size drops.

    Args:
        model: A Hugging Face causal LM (Llama-like), on one device.
        input_ids: One non-empty list of token ids per prompt (chat-formatted and encoded).
        max_new_tokens: Tokens generated per prompt.
        pad_id: Id of the padding.
        batch_size: Prompts per batch.
        stop_ids: Tokens that end an answer.
        edits: ``{layer: StaticEdit}`` applied to every batch (e.g. :class:`ResidualAdd`).
        mode: ``"eager"``, ``"static"`` or ``"cuda_graph"``.
        compile: ``torch.compile`` the decode step (static modes; no ``around``).
        around: The project's per-batch context (e.g. an ``Intervention``), in every mode.
        sort_by_length: Batch the prompts longest first (results still in input order).
        logit_bias: ``(V,)`` added to the float32 logits before the argmax (a generation config's
            single-token ``sequence_bias``).

    Returns:
        One :class:`~sae_refusal.llm.batched.Generation` per prompt, in input order.

    Raises:
        ValueError: On a non-positive size, a bad mode, or ``around`` with ``compile``.
    """
    check_positive("max_new_tokens", max_new_tokens)
    check_positive("batch_size", batch_size)
    if around is not None and compile:
        raise ValueError("around: a compiled step takes no hooks (dynamo would bake one batch's in)")
    if not input_ids:
        return []
    most = max(len(ids) for ids in input_ids) + max_new_tokens
    rows = min(batch_size, len(input_ids))
    stops = set(stop_ids)
    generations: list[Generation | None] = [None] * len(input_ids)
    generator: StaticGenerator | None = None
    batches = iter_padded_batches(input_ids, batch_size=rows, pad_id=pad_id, sort_by_length=sort_by_length)
    try:
        with _eval_mode(model):
            for batch in batches:
                needed = batch.input_ids_BT.shape[1] + max_new_tokens
                size = cache_length(needed, most) if sort_by_length else most
                if generator is None or generator.max_cache_len != size:
                    if generator is not None:
                        generator.close()
                    generator = StaticGenerator(
                        model,
                        batch_size=rows,
                        max_cache_len=size,
                        edits=edits,
                        mode=mode,
                        compile=compile,
                        logit_bias=logit_bias,
                    )
                new_BN = generator(
                    batch.input_ids_BT,
                    batch.attention_mask_BT,
                    max_new_tokens,
                    around=around,
                    indices=batch.indices,
                    stop_ids=list(stops),
                )
                for index, row in zip(batch.indices, new_BN.tolist(), strict=True):
                    generations[index] = _cut_at_stop(row, stops)
    finally:
        if generator is not None:
            generator.close()
    return [g for g in generations if g is not None]
