"""Batched next-token logits and generation over encoded prompts: left-padded batches, rows by input index.

Evaluation and the synthesis judge read the logits of the first response token; base answers, sample answers
and the synthesis rewriter generate text. They share one loop, kept here:

* :func:`iter_padded_batches` cuts encoded prompts (see :func:`~sae_refusal.llm.tokenize.encode_prompts`) into
  left-padded batches, in input order or sorted by length (longest first, less padding); each batch names the
  input positions of its rows, and :func:`rows_in_input_order` puts per-batch rows back in input order.
* :func:`iter_next_token_logits` / :func:`next_token_logits` run one forward per batch with ``position_ids``
  from the attention mask (:func:`~sae_refusal.llm.extraction.position_ids_from_mask`), so a prompt's logits
  are the same alone and in a padded batch, and read the logits at the last position.
* :func:`generate` / :func:`generate_texts` run ``model.generate`` per batch (greedy, or sampled at a
  temperature), in input order, and cut each answer at its first stop token (:func:`stop_token_ids`).

The model runs in eval mode (its previous mode is restored afterwards) under ``torch.inference_mode``;
inputs go to the device of its input embeddings. Nothing here applies a chat template: callers format and
encode the prompts.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import torch
from torch import Tensor, nn

from sae_refusal.llm.extraction import position_ids_from_mask
from sae_refusal.llm.layers import input_device
from sae_refusal.llm.tokenize import default_max_length, encode_prompts, pad_left

if TYPE_CHECKING:
    from transformers import LogitsProcessor

#: ``around(indices)`` -> a context manager entered around one batch's forward or ``generate`` call, given the
#: batch's prompt indices (per-row interventions use it: rows come length-sorted, not in input order).
BatchContext = Callable[[list[int]], AbstractContextManager[Any]]

__all__ = [
    "BatchContext",
    "Generation",
    "LogitsBatch",
    "PaddedBatch",
    "check_positive",
    "forward_parameters",
    "generate",
    "generate_texts",
    "iter_next_token_logits",
    "iter_padded_batches",
    "next_token_logits",
    "resolve_pad_id",
    "rows_in_input_order",
    "stop_token_ids",
]


def check_positive(name: str, value: int) -> None:
    """Check that ``value`` is a positive ``int`` (a ``bool`` is refused).

    Args:
        name: The argument or config key, named in the error.
        value: The value to check.

    Raises:
        ValueError: ``"<name>: must be a positive integer, got <value>"``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")


def resolve_pad_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad id, else its EOS id, else 0 (padding is masked out anyway).

    Args:
        tokenizer: A Hugging Face tokenizer.
    """
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def stop_token_ids(model: nn.Module, tokenizer: Any, extra: Iterable[int] = ()) -> list[int]:
    """Token ids that end a generation: ``extra``, the tokenizer's EOS id and the generation config's EOS ids.

    Args:
        model: A Hugging Face causal LM (its ``generation_config.eos_token_id`` is read when present).
        tokenizer: Its tokenizer.
        extra: More stop ids, e.g. the chat template's end-of-turn token.

    Returns:
        The ids, sorted and without repeats.
    """
    ids = {int(i) for i in extra}
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list | tuple):
        ids.update(int(i) for i in configured)
    return sorted(ids)


class PaddedBatch(NamedTuple):
    """One left-padded batch of :func:`iter_padded_batches`.

    Args:
        indices: Position of each row's prompt in the input list.
        input_ids_BT: Token ids, left-padded, ``torch.long``.
        attention_mask_BT: 1 on real tokens, 0 on padding, ``torch.long``.
    """

    indices: list[int]
    input_ids_BT: Tensor
    attention_mask_BT: Tensor


def iter_padded_batches(
    input_ids: Sequence[Sequence[int]],
    *,
    batch_size: int,
    pad_id: int,
    sort_by_length: bool = False,
) -> Iterator[PaddedBatch]:
    """Cut encoded prompts into left-padded batches of at most ``batch_size`` rows.

    Args:
        input_ids: One non-empty list of token ids per prompt.
        batch_size: Most prompts per batch.
        pad_id: Id written into the padding positions (see :func:`resolve_pad_id`).
        sort_by_length: If true, batches come longest prompt first (less padding), not in input order: use
            each batch's ``indices``. Ties keep input order.

    Returns:
        An iterator of :class:`PaddedBatch`; nothing for an empty ``input_ids``.

    Raises:
        ValueError: On a non-positive ``batch_size`` (at once), or an empty prompt (when its batch is built).
    """
    check_positive("batch_size", batch_size)
    order = list(range(len(input_ids)))
    if sort_by_length:
        order.sort(key=lambda i: -len(input_ids[i]))
    return _padded_batches(input_ids, order, batch_size, pad_id)


def _padded_batches(
    input_ids: Sequence[Sequence[int]], order: list[int], batch_size: int, pad_id: int
) -> Iterator[PaddedBatch]:
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        input_ids_BT, attention_mask_BT = pad_left([input_ids[i] for i in chunk], pad_id)
        yield PaddedBatch(chunk, input_ids_BT, attention_mask_BT)


def rows_in_input_order(batches: Iterable[tuple[Sequence[int], Tensor]], n_rows: int) -> Tensor:
    """Stack per-batch rows so that row ``i`` of the result is the input at position ``i``.

    Args:
        batches: ``(indices, rows)`` pairs such as :class:`LogitsBatch`; ``rows[k]`` belongs to input
            ``indices[k]``. All rows share one shape and dtype.
        n_rows: Number of inputs; the batches must cover each of them once.

    Returns:
        ``(n_rows, ...)`` in the rows' dtype and device; ``(0, 0)`` float32 when there are no batches and
        ``n_rows`` is 0.

    Raises:
        ValueError: If the batches hold a different number of rows than ``n_rows``.
    """
    out_N: Tensor | None = None
    seen = 0
    for indices, rows_B in batches:
        if out_N is None:
            out_N = rows_B.new_empty((n_rows, *rows_B.shape[1:]))
        out_N[torch.tensor(list(indices), dtype=torch.long, device=out_N.device)] = rows_B
        seen += len(indices)
    if seen != n_rows:
        raise ValueError(f"batches: {seen} rows for n_rows={n_rows} inputs")
    return out_N if out_N is not None else torch.empty(0, 0)


def forward_parameters(model: nn.Module) -> set[str]:
    """Keyword names ``model.forward`` (and, under a PEFT wrapper, the base model's) takes explicitly."""
    names: set[str] = set()
    candidates: list[Any] = [model]
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        candidates.append(get_base())
    for candidate in candidates:
        try:
            names.update(inspect.signature(candidate.forward).parameters)
        except (TypeError, ValueError):
            continue
    return names


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the model (or the base model under a PEFT wrapper) names ``logits_to_keep`` in ``forward``."""
    return "logits_to_keep" in forward_parameters(model)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode (no dropout) for the block and restore its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class LogitsBatch(NamedTuple):
    """Next-token logits of one batch of :func:`iter_next_token_logits`.

    Args:
        indices: Position of each row's prompt in the input list.
        logits_BV: Logits at the last prompt position, float32 on CPU.
    """

    indices: list[int]
    logits_BV: Tensor


def iter_next_token_logits(
    model: nn.Module,
    input_ids: Sequence[Sequence[int]],
    *,
    batch_size: int,
    pad_id: int,
    sort_by_length: bool = False,
    around: BatchContext | None = None,
) -> Iterator[LogitsBatch]:
    """Yield the logits of the token that follows each prompt, one left-padded batch at a time.

    Each forward gets ``position_ids`` from the attention mask and ``use_cache=False`` (and
    ``logits_to_keep=1`` where the model accepts it), so a prompt's logits do not depend on its batch. The
    model is in eval mode under ``torch.inference_mode`` while the iterator runs; its mode is restored when
    the iterator is exhausted or closed.

    Args:
        model: A Hugging Face causal LM (or a PEFT wrapper of one), on any device.
        input_ids: One non-empty list of token ids per prompt (already chat-formatted and encoded).
        batch_size: Prompts per forward pass.
        pad_id: Id written into the padding positions (see :func:`resolve_pad_id`).
        sort_by_length: Run the prompts longest first (less padding); batches then come in that order.
        around: ``around(indices)`` -> a context manager entered around each batch's forward, given the
            batch's prompt indices (e.g. a per-row :class:`~sae_refusal.steer.interventions.Intervention`).

    Raises:
        ValueError: On a non-positive ``batch_size`` (at once).
    """
    batches = iter_padded_batches(
        input_ids, batch_size=batch_size, pad_id=pad_id, sort_by_length=sort_by_length
    )
    return _next_token_logits(model, batches, around)


def _next_token_logits(
    model: nn.Module, batches: Iterator[PaddedBatch], around: BatchContext | None = None
) -> Iterator[LogitsBatch]:
    device = input_device(model)
    extra: dict[str, Any] = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    with _eval_mode(model), torch.inference_mode():
        for batch in batches:
            attention_mask_BT = batch.attention_mask_BT.to(device)
            with around(batch.indices) if around is not None else nullcontext():
                out = model(
                    input_ids=batch.input_ids_BT.to(device),
                    attention_mask=attention_mask_BT,
                    position_ids=position_ids_from_mask(attention_mask_BT),
                    use_cache=False,
                    **extra,
                )
            # Left padding: the last position is the last real token of every row.
            yield LogitsBatch(batch.indices, out.logits[:, -1, :].float().cpu())


def next_token_logits(
    model: nn.Module,
    input_ids: Sequence[Sequence[int]],
    *,
    batch_size: int,
    pad_id: int,
    sort_by_length: bool = False,
) -> Tensor:
    """The logits of the token that follows each prompt, in input order.

    Same arguments as :func:`iter_next_token_logits`, whose batches are stacked here.

    Returns:
        ``logits_NV`` float32 on CPU, row ``i`` for ``input_ids[i]``; ``(0, 0)`` for no prompts.

    Raises:
        ValueError: On a non-positive ``batch_size``.
    """
    batches = iter_next_token_logits(
        model, input_ids, batch_size=batch_size, pad_id=pad_id, sort_by_length=sort_by_length
    )
    return rows_in_input_order(batches, len(input_ids))


class Generation(NamedTuple):
    """One prompt's generated tokens from :func:`generate`.

    Args:
        token_ids: The new tokens before the first stop token (the stop token excluded).
        stop_id: The stop token that ended the generation, ``None`` if it ran to ``max_new_tokens``.
    """

    token_ids: list[int]
    stop_id: int | None

    @property
    def stopped(self) -> bool:
        """Whether a stop token ended the generation before ``max_new_tokens``."""
        return self.stop_id is not None

    @property
    def first_id(self) -> int | None:
        """The first generated token (the stop token if it came first); ``None`` if nothing was generated."""
        return self.token_ids[0] if self.token_ids else self.stop_id


def _cut_at_stop(row: list[int], stops: set[int]) -> Generation:
    cut = next((k for k, token in enumerate(row) if token in stops), None)
    return Generation(row, None) if cut is None else Generation(row[:cut], row[cut])


def generate(
    model: nn.Module,
    input_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    pad_id: int,
    stop_ids: Sequence[int],
    batch_size: int,
    temperature: float = 0.0,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    around: BatchContext | None = None,
    sort_by_length: bool = False,
) -> list[Generation]:
    """Generate a continuation of each prompt with ``model.generate``, left-padded batches in input order.

    Args:
        model: A Hugging Face causal LM, on any device.
        input_ids: One non-empty list of token ids per prompt (already chat-formatted and encoded).
        max_new_tokens: Most tokens generated per prompt.
        pad_id: Id of the padding (see :func:`resolve_pad_id`); also ``generate``'s ``pad_token_id``.
        stop_ids: Tokens that end a generation (see :func:`stop_token_ids`); empty leaves ``generate`` its
            own EOS setting.
        batch_size: Prompts per ``generate`` call.
        temperature: 0 for greedy decoding; above 0 samples at that temperature (``do_sample=True``, from
            the global RNG).
        logits_processors: Extra logits processors for ``generate`` (e.g. a seeded sampler over greedy
            decoding).
        around: ``around(indices)`` -> a context manager entered around each batch's ``generate`` call (an
            intervention acts on the prefill and every decode step).
        sort_by_length: Batch the prompts longest first (far less padding when lengths vary; each prompt's
            answer is the same up to floating-point rounding); results still come back in input order.

    Returns:
        One :class:`Generation` per prompt, in input order.

    Raises:
        ValueError: On a non-positive ``max_new_tokens`` / ``batch_size`` or a negative ``temperature``.
    """
    check_positive("max_new_tokens", max_new_tokens)
    if temperature < 0:
        raise ValueError(f"temperature: must be >= 0 (0 = greedy), got {temperature}")
    batches = iter_padded_batches(
        input_ids, batch_size=batch_size, pad_id=pad_id, sort_by_length=sort_by_length
    )
    options: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        options = {"do_sample": True, "temperature": temperature}
    if logits_processors:
        from transformers import LogitsProcessorList

        options["logits_processor"] = LogitsProcessorList(logits_processors)
    stops = set(stop_ids)
    device = input_device(model)
    generations: list[Generation | None] = [None] * len(input_ids)
    with _eval_mode(model), torch.inference_mode():
        for batch in batches:
            with around(batch.indices) if around is not None else nullcontext():
                out_BT = cast(Any, model).generate(
                    input_ids=batch.input_ids_BT.to(device),
                    attention_mask=batch.attention_mask_BT.to(device),
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad_id,
                    eos_token_id=list(stop_ids) or None,
                    **options,
                )
            new_BT = out_BT[:, batch.input_ids_BT.shape[1] :]
            for index, row in zip(batch.indices, new_BT.tolist(), strict=True):
                generations[index] = _cut_at_stop(row, stops)
    return [g for g in generations if g is not None]


def generate_texts(
    model: nn.Module,
    tokenizer: Any,
    formatted_texts: Sequence[str],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    batch_size: int,
    temperature: float = 0.0,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    max_length: int | None = None,
    skip_special_tokens: bool = True,
    around: BatchContext | None = None,
) -> list[str]:
    """Encode chat-formatted prompts, :func:`generate` from them and decode each answer up to its stop token.

    Args:
        model: A Hugging Face causal LM, on any device.
        tokenizer: Its tokenizer (its pad id, or EOS id, pads the batches).
        formatted_texts: Prompts already rendered by the chat template (generation prompt included).
        max_new_tokens: Most tokens generated per prompt.
        stop_ids: Tokens that end a generation (see :func:`stop_token_ids`).
        batch_size: Prompts per ``generate`` call.
        temperature: 0 for greedy decoding; above 0 samples at that temperature.
        logits_processors: Extra logits processors for ``generate``.
        max_length: Most prompt tokens kept (longer prompts lose their beginning); ``None`` leaves room for
            the answer within the model's limit: ``default_max_length - max_new_tokens`` (at least 1).
        skip_special_tokens: Passed to ``tokenizer.decode``.
        around: See :func:`generate`.

    Returns:
        One decoded answer per prompt, in input order, not stripped.

    Raises:
        ValueError: On a non-positive size, a negative ``temperature`` or an empty prompt.
    """
    check_positive("max_new_tokens", max_new_tokens)
    if max_length is None:
        max_length = max(default_max_length(model, tokenizer) - max_new_tokens, 1)
    encoded = encode_prompts(tokenizer, formatted_texts, max_length=max_length, overflow="truncate_left")
    generations = generate(
        model,
        encoded.input_ids,
        max_new_tokens=max_new_tokens,
        pad_id=resolve_pad_id(tokenizer),
        stop_ids=stop_ids,
        batch_size=batch_size,
        temperature=temperature,
        logits_processors=logits_processors,
        around=around,
    )
    return [tokenizer.decode(g.token_ids, skip_special_tokens=skip_special_tokens) for g in generations]
