"""Tokenize chat-formatted prompts with an explicit overflow policy, and left-pad batches.

Prompts reach this module already formatted by the chat template, which writes the special tokens itself,
so encoding always uses ``add_special_tokens=False``. Overlong prompts are never truncated silently: the
``truncate_left`` policy keeps the *last* ``max_length`` tokens (the end of the prompt, where the generation
prompt and the last-token activation live) and reports how many prompts were cut; ``error`` refuses them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sae_refusal.llm.config import DEFAULT_MAX_LENGTH_CAP, OVERFLOW_POLICIES, check_max_length

__all__ = [
    "OVERFLOW_POLICIES",
    "EncodedPrompts",
    "check_max_length",
    "context_length",
    "default_max_length",
    "encode_prompts",
    "pad_left",
    "tokenizer_fingerprint",
]


@dataclass
class EncodedPrompts:
    """Token ids of a list of prompts after the overflow policy was applied.

    Args:
        input_ids: One list of token ids per prompt, in input order, none longer than ``max_length``.
        n_truncated: How many prompts were cut to ``max_length`` (always 0 under ``overflow="error"``).
        truncated_indices: Indices (into the input list) of the prompts that were cut.
    """

    input_ids: list[list[int]]
    n_truncated: int = 0
    truncated_indices: list[int] = field(default_factory=list)


def encode_prompts(
    tokenizer: Any,
    formatted_texts: Sequence[str],
    *,
    max_length: int,
    overflow: str = "truncate_left",
) -> EncodedPrompts:
    """Encode chat-formatted prompts without adding special tokens, applying an overflow policy.

    Args:
        tokenizer: A Hugging Face tokenizer.
        formatted_texts: Prompts already rendered by the chat template.
        max_length: Most tokens a prompt may keep (config key ``max_length``).
        overflow: ``"truncate_left"`` keeps the last ``max_length`` tokens of an overlong prompt and counts
            it; ``"error"`` raises on the first overlong prompt (config key ``overflow``).

    Raises:
        ValueError: On an unknown ``overflow`` policy, a non-positive ``max_length``, an empty prompt, or an
            overlong prompt under ``overflow="error"``.
    """
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow: unknown policy {overflow!r}; expected one of {OVERFLOW_POLICIES}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length: must be a positive integer, got {max_length!r}")
    if isinstance(formatted_texts, str):
        raise TypeError("formatted_texts: expected a sequence of strings, got a single string")
    texts = list(formatted_texts)
    if not texts:
        return EncodedPrompts(input_ids=[])
    # verbose=False: the "longer than model_max_length" warning is wrong here, the policy below handles it.
    encoded = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    input_ids: list[list[int]] = []
    truncated: list[int] = []
    for index, ids in enumerate(encoded):
        ids = list(ids)
        if not ids:
            raise ValueError(f"prompt {index} encodes to zero tokens; every prompt needs at least one token")
        if len(ids) > max_length:
            if overflow == "error":
                raise ValueError(
                    f"max_length: prompt {index} has {len(ids)} tokens, more than max_length={max_length}; "
                    "raise max_length or set overflow='truncate_left'"
                )
            ids = ids[-max_length:]
            truncated.append(index)
        input_ids.append(ids)
    return EncodedPrompts(input_ids=input_ids, n_truncated=len(truncated), truncated_indices=truncated)


def pad_left(batch_ids: Sequence[Sequence[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad a batch of token-id lists.

    Args:
        batch_ids: One non-empty list of token ids per prompt.
        pad_token_id: Id written into the padding positions (they are masked out anyway).

    Returns:
        ``(input_ids_BT, attention_mask_BT)``, both ``torch.long``; the mask is 1 on real tokens.

    Raises:
        ValueError: If the batch or one of its sequences is empty.
    """
    if len(batch_ids) == 0:
        raise ValueError("pad_left: empty batch")
    lengths = [len(ids) for ids in batch_ids]
    if min(lengths) == 0:
        raise ValueError(f"pad_left: sequence {lengths.index(0)} is empty")
    width = max(lengths)
    input_ids_BT = torch.full((len(batch_ids), width), int(pad_token_id), dtype=torch.long)
    attention_mask_BT = torch.zeros((len(batch_ids), width), dtype=torch.long)
    for row, ids in enumerate(batch_ids):
        input_ids_BT[row, width - len(ids) :] = torch.as_tensor(list(ids), dtype=torch.long)
        attention_mask_BT[row, width - len(ids) :] = 1
    return input_ids_BT, attention_mask_BT


def context_length(config: Any, tokenizer: Any = None) -> int | None:
    """The model's context in tokens: ``max_position_embeddings`` of its (text) config.

    Falls back to the tokenizer's ``model_max_length`` (when it is a real number, not the "unlimited"
    sentinel) if the config has no position limit; ``None`` when neither says.

    Args:
        config: A ``PretrainedConfig`` (or a model, whose ``config`` is used).
        tokenizer: Optional tokenizer used as a fallback source.
    """
    config = getattr(config, "config", config)
    if callable(getattr(config, "get_text_config", None)):
        config = config.get_text_config()
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and not isinstance(positions, bool) and positions > 0:
        return positions
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < 1_000_000:
        return model_max
    return None


def default_max_length(model: nn.Module, tokenizer: Any = None, cap: int = DEFAULT_MAX_LENGTH_CAP) -> int:
    """A safe prompt-length limit: the model's context (:func:`context_length`), capped at ``cap``.

    Args:
        model: A Hugging Face model with a ``config`` (or the config itself).
        tokenizer: Optional tokenizer used as a fallback source.
        cap: Upper bound of the result.
    """
    context = context_length(model, tokenizer)
    return cap if context is None else min(cap, context)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of everything in ``tokenizer`` that decides token ids, for activation-cache identities.

    A fast tokenizer is identified by its full serialisation (vocabulary, merges, normaliser,
    pre-tokeniser, added tokens; not the call-time padding and truncation settings); a slow one by its
    class, vocabulary and added tokens.

    Args:
        tokenizer: A Hugging Face tokenizer.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and callable(getattr(backend, "to_str", None)):
        state = json.loads(backend.to_str())
        # Call-time settings that transformers leaves behind after a padded/truncated call; we pad ourselves.
        state.pop("truncation", None)
        state.pop("padding", None)
        payload = json.dumps(state, sort_keys=True)
    else:
        vocab = sorted(tokenizer.get_vocab().items())
        added = sorted(str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values())
        payload = json.dumps({"class": type(tokenizer).__name__, "vocab": vocab, "added": added})
    return hashlib.sha256(payload.encode()).hexdigest()
