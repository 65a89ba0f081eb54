"""Early-exit extraction of last-token residual-stream activations.

Design notes:

* **One forward, stopped early.** Forward hooks sit on the requested decoder blocks. Each hook slices the
  last *real* token's row out of the block output ``(B, T, D)`` at once and keeps only that ``(B, D)``
  copy, so no full hidden-state tensor outlives its block. The hook on the deepest requested block raises
  :class:`~sae_refusal.llm.hooks.StopForward`: later blocks, the final norm and the LM head (a
  ``(B, T, vocab)`` matmul) never run. The hooks are the project's one mechanism
  (:func:`~sae_refusal.llm.hooks.residual_hooks`), removed whatever happens.
* **Padding either side.** The last real token is the last position whose attention mask is 1, so left
  and right padding both work. ``position_ids`` are computed from the mask (``cumsum - 1``, clamped at 0),
  so a left-padded prompt sees the same positions as when it runs alone (see DESIGN.md, "Left padding").
* **Layer convention.** Layer ``l`` is the output of decoder block ``l`` (see :mod:`sae_refusal.llm.layers`).
  :func:`full_forward_last_token` is the naive baseline (``output_hidden_states=True`` over the whole
  model); it serves benchmarks and tests as an oracle.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sae_refusal.llm.hooks import ResidualFn, StepContext, StopForward, residual_hooks
from sae_refusal.llm.layers import decoder_layers, input_device, validate_layers
from sae_refusal.llm.packing import check_pack_length, packed_last_token_residuals, plan_packs
from sae_refusal.llm.tokenize import (
    check_max_length,
    context_length,
    default_max_length,
    encode_prompts,
    pad_left,
)

__all__ = [
    "ResidualBatch",
    "full_forward_last_token",
    "iter_last_token_residuals",
    "last_token_indices",
    "last_token_residuals",
    "plan_batches",
    "position_ids_from_mask",
]

logger = logging.getLogger(__name__)


def _check_batch(input_ids_BT: Tensor, attention_mask_BT: Tensor) -> None:
    if input_ids_BT.ndim != 2:
        raise ValueError(f"input_ids_BT must be 2-D (batch, tokens), got shape {tuple(input_ids_BT.shape)}")
    if attention_mask_BT.shape != input_ids_BT.shape:
        raise ValueError(
            f"attention_mask_BT shape {tuple(attention_mask_BT.shape)} != input_ids_BT shape "
            f"{tuple(input_ids_BT.shape)}"
        )
    if input_ids_BT.shape[1] == 0:
        raise ValueError("input_ids_BT has zero tokens")
    empty = (attention_mask_BT.sum(dim=1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"attention_mask_BT rows {empty} have no real token")


def last_token_indices(attention_mask_BT: Tensor) -> Tensor:
    """Index of the last position whose mask is 1, per row (works for left and right padding)."""
    n_tokens = attention_mask_BT.shape[1]
    flipped_first = attention_mask_BT.flip(dims=(1,)).to(torch.long).argmax(dim=1)
    return n_tokens - 1 - flipped_first


def position_ids_from_mask(attention_mask_BT: Tensor) -> Tensor:
    """Positions counted over real tokens only (``cumsum - 1``, clamped at 0 on padding)."""
    return (attention_mask_BT.to(torch.long).cumsum(dim=1) - 1).clamp(min=0)


def last_token_residuals(
    model: nn.Module,
    input_ids_BT: Tensor,
    attention_mask_BT: Tensor,
    layers: Sequence[int],
) -> dict[int, Tensor]:
    """Residual stream at the last real token after each requested layer, from one early-exit forward.

    Args:
        model: A Hugging Face causal LM in eval mode.
        input_ids_BT: Token ids, left- or right-padded.
        attention_mask_BT: 1 on real tokens, 0 on padding; every row needs at least one real token.
        layers: Layer indices (negative ones count from the end); layer ``l`` is the output of block ``l``.

    Returns:
        ``{layer: acts_BD}`` with non-negative layer keys in ascending order; tensors are in the model's dtype
        on the device of the block that produced them.

    Raises:
        ValueError: On an invalid layer (naming ``layers``) or malformed inputs.
    """
    _check_batch(input_ids_BT, attention_mask_BT)
    blocks = decoder_layers(model)
    wanted = validate_layers(layers, len(blocks))
    deepest = wanted[-1]
    device = input_device(model)
    input_ids_BT = input_ids_BT.to(device)
    attention_mask_BT = attention_mask_BT.to(device)
    last_B = last_token_indices(attention_mask_BT)
    rows_B = torch.arange(input_ids_BT.shape[0], device=device)
    captured: dict[int, Tensor] = {}

    def make_hook(layer: int) -> ResidualFn:
        def read(hidden_BTD: Tensor, _ctx: StepContext) -> None:
            # Advanced indexing copies: only the (B, D) rows survive the block.
            captured[layer] = hidden_BTD[rows_B.to(hidden_BTD.device), last_B.to(hidden_BTD.device)]
            if layer == deepest:
                raise StopForward

        return read

    with residual_hooks(model, {layer: make_hook(layer) for layer in wanted}), torch.inference_mode():
        model(
            input_ids=input_ids_BT,
            attention_mask=attention_mask_BT,
            position_ids=position_ids_from_mask(attention_mask_BT),
            use_cache=False,
        )
    missing = [layer for layer in wanted if layer not in captured]
    if missing:
        raise RuntimeError(f"decoder layers {missing} never ran; the model skipped them")
    return {layer: captured[layer] for layer in wanted}


def full_forward_last_token(
    model: nn.Module,
    input_ids_BT: Tensor,
    attention_mask_BT: Tensor,
    layers: Sequence[int],
) -> dict[int, Tensor]:
    """Naive baseline: a whole forward with ``output_hidden_states=True``, then pick the last real token.

    Uses ``hidden_states[l + 1]`` for each layer; since Hugging Face normalises its last hidden state, the
    final layer is read with a forward hook instead, so the result follows the project's layer convention
    and matches :func:`last_token_residuals` (up to float noise). Same arguments and result as that function.
    """
    _check_batch(input_ids_BT, attention_mask_BT)
    blocks = decoder_layers(model)
    wanted = validate_layers(layers, len(blocks))
    device = input_device(model)
    input_ids_BT = input_ids_BT.to(device)
    attention_mask_BT = attention_mask_BT.to(device)
    last_B = last_token_indices(attention_mask_BT)
    rows_B = torch.arange(input_ids_BT.shape[0], device=device)
    final_output: list[Tensor] = []
    final = len(blocks) - 1

    def read_final(hidden_BTD: Tensor, _ctx: StepContext) -> None:
        final_output.append(hidden_BTD)

    with residual_hooks(model, {final: read_final} if final in wanted else {}), torch.inference_mode():
        outputs = model(
            input_ids=input_ids_BT,
            attention_mask=attention_mask_BT,
            position_ids=position_ids_from_mask(attention_mask_BT),
            use_cache=False,
            output_hidden_states=True,
        )
    result: dict[int, Tensor] = {}
    for layer in wanted:
        hidden_BTD = final_output[0] if layer == final else outputs.hidden_states[layer + 1]
        result[layer] = hidden_BTD[rows_B.to(hidden_BTD.device), last_B.to(hidden_BTD.device)]
    return result


@dataclass
class ResidualBatch:
    """One batch of last-token residuals from :func:`iter_last_token_residuals`, rows in input order.

    Args:
        indices: Position of each row's prompt in the input list (consecutive, ascending).
        acts: ``{layer: acts_BD}``, rows in the order of ``indices``.
        n_tokens: Token count of each prompt after the overflow policy.
        truncated: Whether each prompt was cut by ``overflow="truncate_left"``.
        n_truncated: How many prompts of this batch were cut (``sum(truncated)``).
    """

    indices: list[int]
    acts: dict[int, Tensor]
    n_tokens: list[int]
    truncated: list[bool]
    n_truncated: int


def _check_token_budget(token_budget: int | None, key: str = "token_budget") -> None:
    if token_budget is None:
        return
    if isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget < 1:
        raise ValueError(f"{key}: must be a positive integer or null, got {token_budget!r}")


def plan_batches(
    lengths: Sequence[int], *, batch_size: int, token_budget: int | None = None, sort: bool = True
) -> list[list[int]]:
    """Forward passes for prompts of these token counts: lists of their indices, every index once.

    With ``sort``, prompts run longest first (ties in input order), so each pass pads little; without it,
    in input order. A pass takes prompts until it holds ``batch_size`` of them or, with a
    ``token_budget``, until one more would make ``rows x longest`` exceed the budget (the padded tokens
    the pass computes); a prompt longer than the budget runs alone.

    Raises:
        ValueError: On a bad ``batch_size`` or ``token_budget`` (naming it).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be a positive integer, got {batch_size!r}")
    _check_token_budget(token_budget)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort else list(range(len(lengths)))
    passes: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        width = max(longest, lengths[i])
        fits = len(current) < batch_size and (
            token_budget is None or (len(current) + 1) * width <= token_budget
        )
        if current and not fits:
            passes.append(current)
            current, width = [], lengths[i]
        current.append(i)
        longest = width
    if current:
        passes.append(current)
    return passes


def iter_last_token_residuals(
    model: nn.Module,
    tokenizer: Any,
    formatted_texts: Sequence[str],
    layers: Sequence[int],
    *,
    batch_size: int,
    max_length: int | None = None,
    overflow: str = "truncate_left",
    sort_window: int = 16,
    token_budget: int | None = None,
    out_device: str | torch.device = "cpu",
    progress: Callable[[int], object] | None = None,
    pack_length: int | None = None,
) -> Iterator[ResidualBatch]:
    """Yield last-token residuals for many chat-formatted prompts, in input order, ``batch_size`` at a time.

    To reduce padding, each window of ``sort_window * batch_size`` prompts runs sorted by length (longest
    first), in forward passes planned by :func:`plan_batches` (at most ``batch_size`` rows, and with a
    ``token_budget`` at most that many padded tokens); its results are put back in input order before they
    are yielded, so the concatenation of all batches lines up with ``formatted_texts``. Overflow is handled by
    :func:`~sae_refusal.llm.tokenize.encode_prompts`.

    Args:
        model: A Hugging Face causal LM in eval mode.
        tokenizer: Its tokenizer (its pad id fills padding; any id works since padding is masked).
        formatted_texts: Prompts already rendered by the chat template.
        layers: Layer indices (config key ``layers``).
        batch_size: Prompts per forward pass (config key ``batch_size``).
        max_length: Token limit per prompt (config key ``max_length``), at most the model's context;
            ``None`` uses :func:`~sae_refusal.llm.tokenize.default_max_length`.
        overflow: ``"truncate_left"`` or ``"error"`` (config key ``overflow``).
        sort_window: Batches per length-sorting window; 1 runs prompts in input order.
        token_budget: Most padded tokens (rows x longest prompt of the pass) per forward pass (config key
            ``token_budget``), so short prompts run many to a pass and long ones few; ``None``: ``batch_size``
            rows per pass. A prompt longer than the budget runs alone.
        out_device: Where yielded tensors go (they keep the model's dtype).
        progress: Called with the number of prompts after each forward pass (e.g. a progress bar's
            ``update``); batches are yielded a sorting window at a time, so this is the finer signal.
        pack_length: Pack each window's prompts into rows of this many tokens, each prompt attending only
            to itself (:mod:`sae_refusal.llm.packing`: no padding but the rows' tails), in passes of at most
            ``token_budget`` tokens (``batch_size x pack_length`` without a budget); ``None``: padded passes.

    Raises:
        ValueError: On a bad ``batch_size``/``sort_window``, layer, a ``max_length`` beyond the model's
            context, or overflow (see ``encode_prompts``).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be a positive integer, got {batch_size!r}")
    if isinstance(sort_window, bool) or not isinstance(sort_window, int) or sort_window < 1:
        raise ValueError(f"sort_window: must be a positive integer, got {sort_window!r}")
    _check_token_budget(token_budget)
    check_pack_length(pack_length, model)
    wanted = validate_layers(layers, len(decoder_layers(model)))
    if max_length is None:
        max_length = default_max_length(model, tokenizer)
    else:
        check_max_length(max_length, context_length(model, tokenizer))
    encoded = encode_prompts(tokenizer, formatted_texts, max_length=max_length, overflow=overflow)
    if encoded.n_truncated:  # debug: the caller decides how loudly to report it (the cache warns)
        logger.debug(
            "%d of %d prompts were longer than max_length=%d and lost their first tokens",
            encoded.n_truncated,
            len(encoded.input_ids),
            max_length,
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        pad_id = 0  # masked out; any valid id works
    truncated = set(encoded.truncated_indices)
    ids = encoded.input_ids
    window = batch_size * sort_window
    for start in range(0, len(ids), window):
        stop = min(start + window, len(ids))
        parts: dict[int, list[Tensor]] = {layer: [] for layer in wanted}
        if pack_length is not None:
            packs = plan_packs(
                [len(ids[i]) for i in range(start, stop)],
                pack_length=pack_length,
                token_budget=token_budget or batch_size * pack_length,
            )
            order = [start + i for pack in packs for row in pack for i in row]
            for pack in packs:
                rows = [[ids[start + i] for i in row] for row in pack]
                acts = packed_last_token_residuals(model, rows, wanted, pad_id)
                for layer, acts_ND in acts.items():
                    parts[layer].append(acts_ND.to(out_device))
                if progress is not None:
                    progress(sum(len(row) for row in pack))
        else:
            passes = plan_batches(
                [len(ids[i]) for i in range(start, stop)],
                batch_size=batch_size,
                token_budget=token_budget,
                sort=sort_window > 1,
            )
            order = [start + i for chunk in passes for i in chunk]
            for local_chunk in passes:
                chunk = [start + i for i in local_chunk]
                input_ids_BT, attention_mask_BT = pad_left([ids[i] for i in chunk], pad_id)
                acts = last_token_residuals(model, input_ids_BT, attention_mask_BT, wanted)
                for layer, acts_BD in acts.items():
                    parts[layer].append(acts_BD.to(out_device))
                if progress is not None:
                    progress(len(chunk))
        # Row r of the sorted window holds prompt order[r]; invert to input order.
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order) - start] = torch.arange(len(order))
        window_acts = {
            layer: torch.cat(chunks)[inverse.to(chunks[0].device)] for layer, chunks in parts.items()
        }
        for b in range(0, stop - start, batch_size):
            indices = list(range(start + b, min(start + b + batch_size, stop)))
            flags = [i in truncated for i in indices]
            yield ResidualBatch(
                indices=indices,
                acts={layer: acts_WD[b : b + len(indices)] for layer, acts_WD in window_acts.items()},
                n_tokens=[len(ids[i]) for i in indices],
                truncated=flags,
                n_truncated=sum(flags),
            )
