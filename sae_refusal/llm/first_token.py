"""First-response-token logits of chat-formatted user messages: one forward pass per batch of prompts.

The logits at the last prompt position (generation prompt included) are the distribution of the first
response token. For a refusal-token model that token is its decision (``[respond]`` or a category's refusal
token), so this is the forward pass behind the refusal-token report
(:mod:`sae_refusal.eval.refusal_tokens`), respond-bias calibration and the steering scorers.

Design notes: prompts are batched sorted by length (less padding), left-padded, with ``position_ids`` from
the attention mask, so a prompt's logits are the same alone and in a batch.
:func:`iter_first_token_logits` streams the batches (in length order, each with its prompts' indices) and
takes a per-batch ``around(indices)`` context for per-row interventions; :func:`first_token_logits` puts them
back in input order as one ``(N, vocab)`` tensor.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

from torch import Tensor, nn

from sae_refusal.data.chat import format_prompts
from sae_refusal.llm.batched import (
    BatchContext,
    check_positive,
    iter_next_token_logits,
    resolve_pad_id,
    rows_in_input_order,
)
from sae_refusal.llm.tokenize import encode_prompts

__all__ = ["FirstTokenBatch", "first_token_logits", "iter_first_token_logits"]

log = logging.getLogger(__name__)


class FirstTokenBatch(NamedTuple):
    """First-response-token logits of one batch of prompts.

    Args:
        indices: Position of each row's prompt in the input list.
        logits_BV: Logits at the last prompt position, float32 on CPU.
        truncated: Whether each prompt lost its first tokens to ``max_length``.
    """

    indices: list[int]
    logits_BV: Tensor
    truncated: list[bool]


def iter_first_token_logits(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int = 1024,
    chat_template: str | None = None,
    system_prompt: str | None = None,
    around: BatchContext | None = None,
) -> Iterator[FirstTokenBatch]:
    """Yield the first-response-token logits of user messages, one batch at a time.

    Prompts are chat-formatted (:func:`~sae_refusal.data.chat.format_prompts`, generation prompt included),
    encoded with ``overflow="truncate_left"``, sorted by length (longest first) and left-padded; each
    forward gets ``position_ids`` from the attention mask. Batches therefore come in length order, not
    input order: use each batch's ``indices``. The model runs in eval mode under ``torch.inference_mode``
    (its previous train/eval mode is restored afterwards); inputs go to the device of its input embeddings.

    Args:
        model: A Hugging Face causal LM (or a PEFT wrapper of one), on any device.
        tokenizer: Its tokenizer.
        texts: User messages (no chat template applied).
        batch_size: Prompts per forward pass.
        max_length: Most tokens a formatted prompt keeps (longer ones lose their beginning).
        chat_template: Template overriding the tokenizer's (config key ``chat_template``).
        system_prompt: Optional system message before each user message.
        around: ``around(indices)`` -> a context manager around each batch's forward (e.g. a per-row
            intervention; see :data:`sae_refusal.llm.batched.BatchContext`).

    Raises:
        ValueError: On a non-positive ``batch_size`` / ``max_length`` or an empty ``texts``.
        ChatTemplateError: If the tokenizer has no chat template and none is given.
    """
    check_positive("batch_size", batch_size)
    check_positive("max_length", max_length)
    if isinstance(texts, str):
        raise TypeError("texts: expected a sequence of strings, got a single string")
    if len(texts) == 0:
        raise ValueError("texts: no prompts to evaluate")
    formatted = format_prompts(tokenizer, texts, chat_template=chat_template, system_prompt=system_prompt)
    encoded = encode_prompts(tokenizer, formatted, max_length=max_length, overflow="truncate_left")
    if encoded.n_truncated:
        log.info(
            "%d of %d prompts were longer than max_length=%d and lost their first tokens",
            encoded.n_truncated,
            len(texts),
            max_length,
        )
    truncated = set(encoded.truncated_indices)
    for batch in iter_next_token_logits(
        model,
        encoded.input_ids,
        batch_size=batch_size,
        pad_id=resolve_pad_id(tokenizer),
        sort_by_length=True,
        around=around,
    ):
        flags = [i in truncated for i in batch.indices]
        yield FirstTokenBatch(indices=batch.indices, logits_BV=batch.logits_BV, truncated=flags)


def first_token_logits(
    model: nn.Module,
    tokenizer: Any,
    texts: list[str],
    *,
    batch_size: int = 16,
    max_length: int = 1024,
    chat_template: str | None = None,
    system_prompt: str | None = None,
) -> Tensor:
    """Logits of the first response token for each user message, in input order.

    Same arguments as :func:`iter_first_token_logits` (formatting, truncation, padding and device handling
    are described there), whose batches are put back in input order. The result is ``(N, vocab)`` float32
    on CPU; for large sets and vocabularies prefer the streaming :func:`iter_first_token_logits` (or
    :func:`~sae_refusal.eval.refusal_tokens.evaluate_refusal_tokens`, which never holds all of it).

    Returns:
        ``logits_NV``, row ``i`` for ``texts[i]``.

    Raises:
        ValueError: On a non-positive ``batch_size`` / ``max_length`` or an empty ``texts``.
        ChatTemplateError: If the tokenizer has no chat template and none is given.
    """
    batches = iter_first_token_logits(
        model,
        tokenizer,
        texts,
        batch_size=batch_size,
        max_length=max_length,
        chat_template=chat_template,
        system_prompt=system_prompt,
    )
    return rows_in_input_order(((batch.indices, batch.logits_BV) for batch in batches), len(texts))
