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
* ``"cuda_graph"``: the fixed-shape step captured once per generator as a CUDA graph and replayed.

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

Limits: greedy decoding only; every row runs ``max_new_tokens`` steps (stop tokens cut the answers
afterwards; there is no early exit when all rows have stopped); in the static modes a batch smaller than the
generator's ``batch_size`` is padded with copies of its first row, and ``around`` hooks are refused (their
position tracking needs the growing 2-D mask of ``"eager"``). The model must take ``position_ids``, a 4-D
additive mask and a ``StaticCache`` (Llama-like Hugging Face decoders do).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
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
from sae_refusal.llm.hooks import block_hidden, with_block_hidden
from sae_refusal.llm.layers import decoder_layers, input_device, validate_layers

__all__ = ["Mode", "ResidualAdd", "StaticEdit", "StaticGenerator", "generate_static"]

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


class StaticGenerator:
    """Greedy generation for batches of up to ``batch_size`` prompts with a reusable static decode step.

    Use it as a context manager (the edits' hooks are removed on exit). The first call builds the cache and,
    in ``"cuda_graph"`` mode, captures the decode step (after one extra prefill and two warm-up steps, the
    cache is reset and the call runs normally); :attr:`setup_s` holds that one-off time. Later calls reuse
    the graph: each prompt batch costs one eager prefill and ``max_new_tokens - 1`` replays.

    Args:
        model: A Hugging Face causal LM (Llama-like), in eval mode, on one device.
        batch_size: Rows per call (static modes pad smaller batches).
        max_cache_len: Most prompt plus new tokens per row (the static cache's length).
        edits: ``{layer: StaticEdit}``, applied in the prefill and every decode step.
        mode: ``"eager"``, ``"static"`` or ``"cuda_graph"`` (module docstring).
        compile: ``torch.compile`` the static decode step (static modes; with ``"cuda_graph"`` the compiled
            step is captured). Compilation happens in the first call and counts in :attr:`setup_s`; it
            resets dynamo's caches first (``torch._dynamo.reset()``), since compiled code does not guard on
            the edits' hooks.

    Raises:
        ValueError: On a bad size, mode or layer, ``"cuda_graph"`` on a model that is not on CUDA, or
            ``compile`` in ``"eager"`` mode.
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
        self.model, self.batch_size, self.max_cache_len = model, batch_size, max_cache_len
        self.mode: Mode = mode
        self.compile = compile
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
        self.graph: torch.cuda.CUDAGraph | None = None
        self.setup_s = 0.0
        # the decode step's fixed-address inputs (shapes fixed at the first static call)
        self._tok_B1: Tensor | None = None
        self._pos_B1: Tensor | None = None
        self._cpos_1: Tensor | None = None
        self._real_BS: Tensor | None = None
        self._next_B: Tensor | None = None
        self._step_fn: Callable[[], Tensor] = self._step
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
        """Remove the edits' hooks and drop the graph and cache."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.graph = None
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
        next_B = out.logits[:, -1, :].argmax(dim=-1)
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
    ) -> Tensor:
        """Greedy-generate ``max_new_tokens`` tokens for one left-padded batch.

        Args:
            input_ids_BT: Left-padded token ids (``B <= batch_size`` rows).
            attention_mask_BT: 1 on real tokens, 0 on padding.
            max_new_tokens: Tokens generated per row (no early stop).
            around: ``"eager"`` mode only: ``around(indices)`` entered around the prefill and all steps.
            indices: Given to ``around`` (default: ``0..B-1``).

        Returns:
            ``(B, max_new_tokens)`` token ids, ``torch.long`` on the CPU.

        Raises:
            ValueError: On too many rows, a prompt plus answer longer than ``max_cache_len``, or ``around``
                in a static mode.
        """
        check_positive("max_new_tokens", max_new_tokens)
        n_rows, length = input_ids_BT.shape
        if n_rows > self.batch_size:
            raise ValueError(f"input_ids_BT: {n_rows} rows for a generator of batch_size {self.batch_size}")
        if length + max_new_tokens > self.max_cache_len:
            raise ValueError(
                f"prompt of {length} + {max_new_tokens} new tokens exceeds max_cache_len {self.max_cache_len}"
            )
        if around is not None and self.mode != "eager":
            raise ValueError("around: hooks with position tracking need mode 'eager'; use edits instead")
        ids_BT = input_ids_BT.to(self.device)
        mask_BT = attention_mask_BT.to(device=self.device, dtype=torch.long)
        with torch.inference_mode():
            if self.mode == "eager":
                context = around(indices or list(range(n_rows))) if around is not None else nullcontext()
                with context:
                    return self._generate_eager(ids_BT, mask_BT, max_new_tokens)
            if n_rows < self.batch_size:  # fixed shapes: fill with copies of the first row
                fill = self.batch_size - n_rows
                ids_BT = torch.cat([ids_BT, ids_BT[:1].expand(fill, -1)])
                mask_BT = torch.cat([mask_BT, mask_BT[:1].expand(fill, -1)])
            return self._generate_static(ids_BT, mask_BT, max_new_tokens)[:n_rows]

    def _generate_eager(self, ids_BT: Tensor, mask_BT: Tensor, max_new_tokens: int) -> Tensor:
        n_rows, length = ids_BT.shape
        self.cache = _static_cache(self.model, n_rows, length + max_new_tokens)
        real_BS = torch.ones(n_rows, length + max_new_tokens, dtype=torch.long, device=self.device)
        real_BS[:, :length] = mask_BT
        positions_B = mask_BT.sum(dim=1)
        next_B = self._prefill_logits(ids_BT, mask_BT).argmax(dim=-1)
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
            next_B = out.logits[:, -1, :].argmax(dim=-1)
            tokens.append(next_B)
        self.cache = None
        return torch.stack(tokens, dim=1).cpu()

    def _generate_static(self, ids_BT: Tensor, mask_BT: Tensor, max_new_tokens: int) -> Tensor:
        if self.cache is None:
            start = time.perf_counter()
            self._setup(ids_BT, mask_BT)
            self.setup_s = time.perf_counter() - start
        else:
            self.cache.reset()
        next_B = self._begin(ids_BT, mask_BT)
        out_BN = torch.empty(ids_BT.shape[0], max_new_tokens, dtype=torch.long, device=self.device)
        out_BN[:, 0] = next_B
        for step in range(1, max_new_tokens):
            if self.graph is not None and self._next_B is not None:
                self.graph.replay()
                out_BN[:, step] = self._next_B
            else:
                out_BN[:, step] = self._step_fn()
        return out_BN.cpu()

    def _begin(self, ids_BT: Tensor, mask_BT: Tensor) -> Tensor:
        """Prefill one batch and load the decode step's buffers in place; returns the first new tokens."""
        tok_B1, pos_B1, cpos_1, real_BS = self._buffers()
        length = ids_BT.shape[1]
        next_B = self._prefill_logits(ids_BT, mask_BT).argmax(dim=-1)
        real_BS.fill_(True)
        real_BS[:, :length] = mask_BT.bool()
        tok_B1.copy_(next_B[:, None])
        pos_B1.copy_(mask_BT.sum(dim=1, keepdim=True))
        cpos_1.fill_(length)
        return next_B

    def _setup(self, ids_BT: Tensor, mask_BT: Tensor) -> None:
        """Build the cache and the step's buffers; compile and capture the step where asked."""
        n_rows = ids_BT.shape[0]
        self.cache = _static_cache(self.model, n_rows, self.max_cache_len)
        self._tok_B1 = torch.zeros(n_rows, 1, dtype=torch.long, device=self.device)
        self._pos_B1 = torch.zeros(n_rows, 1, dtype=torch.long, device=self.device)
        self._cpos_1 = torch.zeros(1, dtype=torch.long, device=self.device)
        self._real_BS = torch.ones(n_rows, self.max_cache_len, dtype=torch.bool, device=self.device)
        if self.compile:
            # Dynamo caches compiled code per code object and does not guard on module hooks by default:
            # another generator's edits would be baked in. Start from an empty cache.
            torch._dynamo.reset()
            self._step_fn = cast(Callable[[], Tensor], torch.compile(self._step, dynamic=False))
        if self.mode != "cuda_graph" and not self.compile:
            return
        # one throw-away prefill initialises the cache (lazily shaped) and warms up the step
        self._begin(ids_BT, mask_BT)
        if self.mode != "cuda_graph":
            self._step_fn()  # compile now, outside the timed steps
            self.cache.reset()
            return
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step_fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._next_B = self._step_fn()
        self.graph = graph
        self.cache.reset()  # positions back to 0 in place; the real prefill follows


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
) -> list[Generation]:
    """Greedy generation through a :class:`StaticGenerator`: the fast counterpart of ``batched.generate``.

    Same prompts, padding and results as :func:`~sae_refusal.llm.batched.generate` with ``temperature=0``
    (greedy tokens equal up to floating-point rounding; exactly equal in float32 on the CPU in the tests).
    One generator serves all batches (one graph capture); every row runs ``max_new_tokens`` steps and is then
    cut at its first stop token.

    Args:
        model: A Hugging Face causal LM (Llama-like), on one device.
        input_ids: One non-empty list of token ids per prompt (chat-formatted and encoded).
        max_new_tokens: Tokens generated per prompt.
        pad_id: Id of the padding.
        batch_size: Prompts per batch.
        stop_ids: Tokens that end an answer (cut afterwards).
        edits: ``{layer: StaticEdit}`` applied to every batch (e.g. :class:`ResidualAdd`).
        mode: ``"eager"``, ``"static"`` or ``"cuda_graph"``.
        compile: ``torch.compile`` the decode step (static modes).
        around: ``"eager"`` mode only: the project's per-batch context (e.g. an ``Intervention``).

    Returns:
        One :class:`~sae_refusal.llm.batched.Generation` per prompt, in input order.

    Raises:
        ValueError: On a non-positive size, a bad mode, or ``around`` with a static mode.
    """
    check_positive("max_new_tokens", max_new_tokens)
    check_positive("batch_size", batch_size)
    if around is not None and mode != "eager":
        raise ValueError("around: hooks with position tracking need mode 'eager'; use edits instead")
    if not input_ids:
        return []
    longest = max(len(ids) for ids in input_ids)
    rows = min(batch_size, len(input_ids))
    stops = set(stop_ids)
    generations: list[Generation | None] = [None] * len(input_ids)
    with (
        _eval_mode(model),
        StaticGenerator(
            model,
            batch_size=rows,
            max_cache_len=longest + max_new_tokens,
            edits=edits,
            mode=mode,
            compile=compile,
        ) as generator,
    ):
        for batch in iter_padded_batches(input_ids, batch_size=rows, pad_id=pad_id):
            new_BN = generator(
                batch.input_ids_BT,
                batch.attention_mask_BT,
                max_new_tokens,
                around=around,
                indices=batch.indices,
            )
            for index, row in zip(batch.indices, new_BN.tolist(), strict=True):
                generations[index] = _cut_at_stop(row, stops)
    return [g for g in generations if g is not None]
