"""Add the refusal tokens to a tokenizer and give their new embedding rows a sensible start.

Design notes:

* Each refusal token is added as ``AddedToken(t, normalized=False, special=True)``. ``normalized=False`` makes
  the tokenizer match the literal string, leading space included, before any normalisation or byte-level
  pre-tokenisation, so ``" [respond]"`` encodes to one id and decodes back to itself on byte-level BPE
  (GPT-2 / SmolLM2 / Llama-3 style) tokenizers. ``special=True`` marks it a control token: ``decode(...,
  skip_special_tokens=True)`` drops it from user-visible text, like ``<|im_end|>``; read refusal decisions
  from token ids (:meth:`~sae_refusal.llm.refusal_tokens.ResolvedRefusalTokens.classify`), or decode with
  ``skip_special_tokens=False`` to see the token.
* Tokens are added in class order (respond first, then the CoCoNot categories in
  :data:`~sae_refusal.categories.COCONOT_CATEGORIES` order), whatever the order of the configured mapping, so
  the new ids depend only on the set of tokens and the base tokenizer. A string that already is a single
  token is not added again: :func:`add_refusal_tokens` is idempotent.
* The embedding matrix only grows: it is resized to ``max(len(tokenizer), rows)``. Models whose embedding is
  padded past the tokenizer (Qwen2, ...) keep their shape and the new ids land in the padding rows, which are
  initialised like any new row.
* New rows start at the mean of the existing rows (``token_init: mean``) or at the mean embedding of the
  category's own words (``token_init: category_words``: ``" [Requests with safety concerns]"`` starts at
  the mean of the rows of ``" Requests with safety concerns"``; ``" [respond]"`` at that of ``" respond"``),
  so the first training step already sees related directions. With untied embeddings the LM-head rows get
  the same treatment from the LM-head matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sae_refusal.categories import COCONOT_CATEGORIES
from sae_refusal.llm.layers import base_weight, embeddings_tied
from sae_refusal.llm.refusal_tokens import (
    RESPOND_CLASS_NAME,
    RefusalVocabulary,
    _single_token_id,
    add_token_strings,
)

__all__ = [
    "TOKEN_INITS",
    "add_refusal_tokens",
    "embeddings_tied",  # re-exported from sae_refusal.llm.layers
    "init_refusal_embeddings",
    "refusal_token_order",
]

#: Accepted values of ``token_init``.
TOKEN_INITS: tuple[str, ...] = ("category_words", "mean")


def refusal_token_order(vocab: RefusalVocabulary) -> list[str]:
    """The vocabulary's token strings in class order: respond first, then the CoCoNot categories.

    Args:
        vocab: The refusal-token vocabulary.
    """
    by_category = {category: token for token, category in vocab.tokens.items()}
    return [by_category[c] for c in (None, *COCONOT_CATEGORIES) if c in by_category]


def add_refusal_tokens(tokenizer: Any, vocab: RefusalVocabulary) -> list[str]:
    """Add the vocabulary's refusal tokens that ``tokenizer`` lacks, in class order.

    Each is added as ``AddedToken(t, normalized=False, special=True)``: it encodes to exactly one id (leading
    space included), decodes back to itself, and ``skip_special_tokens=True`` removes it from decoded text.
    Calling it again adds nothing. Afterwards ``vocab.resolve(tokenizer)`` succeeds.

    Args:
        tokenizer: A Hugging Face tokenizer (modified in place).
        vocab: The refusal-token vocabulary.

    Returns:
        The token strings added, in the order their ids were assigned.
    """
    return add_token_strings(tokenizer, refusal_token_order(vocab))


def _category_word_ids(tokenizer: Any, vocab: RefusalVocabulary, token: str) -> list[int]:
    category = vocab.tokens.get(token)
    words = " " + (category if category is not None else RESPOND_CLASS_NAME)
    return [int(i) for i in tokenizer.encode(words, add_special_tokens=False)]


@torch.no_grad()
def init_refusal_embeddings(
    model: nn.Module,
    tokenizer: Any,
    vocab: RefusalVocabulary,
    added: Sequence[str],
    init: str = "category_words",
) -> None:
    """Resize the model's embeddings to the tokenizer and initialise the rows of the added tokens.

    The embedding grows to ``max(len(tokenizer), rows)`` rows (``pad_to_multiple_of`` unset; never shrunk).
    Rows of ``added`` and any other row beyond the old size are set from the old rows (excluding those new
    rows): ``"mean"`` = the mean row; ``"category_words"`` = the mean row of the tokens of the token's
    category name (``" Requests with safety concerns"``, ``" respond"``), falling back to the mean when those
    words give no usable token. With untied embeddings the output (LM-head) rows are set the same way from the
    output matrix; tied ones share the input rows.

    Args:
        model: A Hugging Face causal LM (before any peft wrapping).
        tokenizer: Its tokenizer, after :func:`add_refusal_tokens`.
        vocab: The refusal-token vocabulary (maps each token to its category).
        added: The strings :func:`add_refusal_tokens` returned.
        init: ``"category_words"`` or ``"mean"``.

    Raises:
        ValueError: If ``init`` is unknown (config key ``token_init``) or an added string is not a single
            token.
    """
    if init not in TOKEN_INITS:
        raise ValueError(f"token_init: unknown value {init!r}; expected one of {TOKEN_INITS}")
    input_embeddings = model.get_input_embeddings()  # type: ignore[operator]
    old_rows = int(base_weight(input_embeddings).shape[0])
    added_ids: dict[int, str] = {}
    for token in added:
        token_id = _single_token_id(tokenizer, token)
        if token_id is None:
            raise ValueError(
                f"refusal_tokens: {token!r} is not a single token; call add_refusal_tokens first"
            )
        added_ids[token_id] = token
    new_rows = max(len(tokenizer), old_rows)
    if new_rows > old_rows:
        # mean_resizing=False: every new row is overwritten below, so skip transformers' covariance sampling.
        model.resize_token_embeddings(new_rows, mean_resizing=False)  # type: ignore[operator]
    targets = sorted(set(added_ids) | set(range(old_rows, new_rows)))
    if not targets:
        return
    matrices = [base_weight(model.get_input_embeddings())]  # type: ignore[operator]
    if not embeddings_tied(model):
        matrices.append(base_weight(model.get_output_embeddings()))  # type: ignore[operator]
    keep_V = torch.ones(new_rows, dtype=torch.bool)
    keep_V[targets] = False
    keep_V[old_rows:] = False
    for weight_VD in matrices:
        mean_D = weight_VD[keep_V.to(weight_VD.device)].float().mean(dim=0)
        for token_id in targets:
            row_D = mean_D
            added_token = added_ids.get(token_id)
            if init == "category_words" and added_token is not None:
                word_ids = [
                    i
                    for i in _category_word_ids(tokenizer, vocab, added_token)
                    if 0 <= i < new_rows and keep_V[i]
                ]
                if word_ids:
                    row_D = weight_VD[torch.tensor(word_ids, device=weight_VD.device)].float().mean(dim=0)
            weight_VD[token_id] = row_D.to(weight_VD.dtype)
