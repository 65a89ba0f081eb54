"""The refusal-token vocabulary: one added token per CoCoNot category plus a ``respond`` token.

A refusal-token model (trained with the project's finetune recipe, or a published one such as
``tomg-group-umd/zephyr-llama3-8b-sft-refusal-n-contrast-multiple-tokens``) emits one of these tokens as its
first response token. Reading that single next-token prediction, restricted to the refusal tokens, is a
classifier: :meth:`ResolvedRefusalTokens.classify`.

Class order is fixed: ``respond`` is class 0, then the categories in
:data:`sae_refusal.categories.COCONOT_CATEGORIES` order (only those present in the vocabulary).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tokenizers import AddedToken
from torch import Tensor

from sae_refusal.categories import (
    CATEGORY_SHORT_NAMES,
    COCONOT_CATEGORIES,
    DEFAULT_REFUSAL_TOKENS,
    resolve_category,
)

__all__ = [
    "DEFAULT_DETECT_PATTERN",
    "RESPOND_CLASS_NAME",
    "RefusalPrediction",
    "RefusalTokenError",
    "RefusalVocabulary",
    "ResolvedRefusalTokens",
    "add_token_strings",
    "respond_bias_of",
    "set_respond_bias",
]

#: Class name of the ``respond`` (benign) class, index 0.
RESPOND_CLASS_NAME = "respond"

#: Matches bracketed added tokens such as ``[refuse_safety]``, ``[respond]`` or ``" [Humanizing requests]"``;
#: the ``name`` group is mapped to a category by :meth:`RefusalVocabulary.detect`.
DEFAULT_DETECT_PATTERN = r"^\s?\[(?P<name>[^\[\]]+)\]$"

_FINETUNE_HINT = (
    "Train one with the project's refusal-token finetune recipe (which adds the tokens and resizes the "
    "embeddings), or set refusal_tokens to the spellings this tokenizer uses"
)


class RefusalTokenError(ValueError):
    """A refusal token is missing from a tokenizer or does not encode to exactly one id."""


def _tokenizer_name(tokenizer: Any) -> str:
    name = getattr(tokenizer, "name_or_path", "") or ""
    return f"{type(tokenizer).__name__}({name!r})" if name else type(tokenizer).__name__


def _single_token_id(tokenizer: Any, token: str) -> int | None:
    """The one id ``token`` maps to, or ``None`` if it is absent or splits into several ids."""
    encoded = tokenizer.encode(token, add_special_tokens=False)
    if len(encoded) == 1:
        return int(encoded[0])
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int):
        return None
    unk_id = getattr(tokenizer, "unk_token_id", None)
    if token_id == unk_id and token != getattr(tokenizer, "unk_token", None):
        return None
    if tokenizer.convert_ids_to_tokens(token_id) != token:
        return None
    return token_id


def add_token_strings(tokenizer: Any, strings: Sequence[str]) -> list[str]:
    """Add each string that is not yet a single token of ``tokenizer``, in the given order.

    Each is added as ``AddedToken(s, normalized=False, special=True)``: it encodes to exactly one id (leading
    space included), decodes back to itself, and ``skip_special_tokens=True`` removes it from decoded text.

    Args:
        tokenizer: A Hugging Face tokenizer (modified in place).
        strings: Token strings, e.g. ``" [respond]"`` (leading space included).

    Returns:
        The strings added, in order (empty when all were present already).

    Raises:
        ValueError: If a string is empty or repeated, or still does not encode to one id after adding.
    """
    if len(set(strings)) != len(strings) or not all(strings):
        raise ValueError(f"refusal_tokens: token strings must be non-empty and distinct, got {list(strings)}")
    missing = [s for s in strings if _single_token_id(tokenizer, s) is None]
    if missing:
        tokenizer.add_tokens([AddedToken(s, normalized=False, special=True) for s in missing])
    broken = [s for s in missing if _single_token_id(tokenizer, s) is None]
    if broken:
        raise ValueError(
            f"refusal_tokens: {broken} still do not encode to a single id of {type(tokenizer).__name__} "
            "after adding them; this tokenizer does not support literal added tokens"
        )
    return missing


@dataclass
class RefusalPrediction:
    """The refusal-token reading of a batch of next-token logits.

    Args:
        pred_class_B: Predicted class per row: argmax over the refusal tokens only (0 = respond).
        probs_BC: Softmax over the refusal-token logits only (rows sum to 1), classes in class order.
        refusal_mass_B: Probability of the refusal tokens together under the full-vocabulary softmax.
        top_is_refusal_token_B: Whether the unrestricted argmax is one of the refusal tokens.
        top_class_B: Class of the unrestricted argmax when it is a refusal token, else -1.
    """

    pred_class_B: Tensor
    probs_BC: Tensor
    refusal_mass_B: Tensor
    top_is_refusal_token_B: Tensor
    top_class_B: Tensor


@dataclass(frozen=True)
class ResolvedRefusalTokens:
    """Refusal tokens bound to one tokenizer's ids, in class order.

    Args:
        tokens: Token strings in class order.
        token_ids: The single id of each token.
        categories: CoCoNot category of each class (``None`` for respond).
        class_names: Short class names (``"respond"``, then category short names).
    """

    tokens: tuple[str, ...]
    token_ids: tuple[int, ...]
    categories: tuple[str | None, ...]
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        """Number of classes (refusal tokens)."""
        return len(self.token_ids)

    @property
    def respond_id(self) -> int:
        """Token id of the respond token.

        Raises:
            ValueError: If the vocabulary has no respond token.
        """
        if None not in self.categories:
            raise ValueError(f"refusal vocabulary has no respond token (tokens {list(self.tokens)})")
        return self.token_ids[self.categories.index(None)]

    def class_index(self, category: str | None) -> int:
        """Class index of a category (canonical or short name), or of respond for ``None``/``"respond"``.

        Raises:
            KeyError: If the category has no token in this vocabulary.
        """
        if category is not None and category.strip().casefold() != RESPOND_CLASS_NAME:
            category = resolve_category(category)
        else:
            category = None
        try:
            return self.categories.index(category)
        except ValueError:
            raise KeyError(f"no refusal token for category {category!r} in {self.class_names}") from None

    def classify(self, next_token_logits_BV: Tensor) -> RefusalPrediction:
        """Read next-token logits as a classification over the refusal tokens.

        Args:
            next_token_logits_BV: Logits of the first response token, shape ``(B, vocab)``.

        Raises:
            ValueError: If the logits are not 2-D or the vocabulary is too small for the token ids.
        """
        if next_token_logits_BV.ndim != 2:
            raise ValueError(
                f"next_token_logits_BV must be (B, vocab), got {tuple(next_token_logits_BV.shape)}"
            )
        vocab = next_token_logits_BV.shape[1]
        if max(self.token_ids) >= vocab:
            raise ValueError(
                f"refusal token id {max(self.token_ids)} is outside the logits' vocabulary of {vocab}; "
                "was the model's embedding resized after adding the tokens?"
            )
        logits_BV = next_token_logits_BV.float()
        ids_C = torch.tensor(self.token_ids, device=logits_BV.device)
        restricted_BC = logits_BV.index_select(1, ids_C)
        probs_BC = restricted_BC.softmax(dim=1)
        refusal_mass_B = (restricted_BC.logsumexp(dim=1) - logits_BV.logsumexp(dim=1)).exp()
        top_B = logits_BV.argmax(dim=1)
        match_BC = top_B.unsqueeze(1) == ids_C.unsqueeze(0)
        top_is_refusal_B = match_BC.any(dim=1)
        top_class_B = torch.where(
            top_is_refusal_B, match_BC.to(torch.long).argmax(dim=1), torch.full_like(top_B, -1)
        )
        return RefusalPrediction(
            pred_class_B=restricted_BC.argmax(dim=1),
            probs_BC=probs_BC,
            refusal_mass_B=refusal_mass_B,
            top_is_refusal_token_B=top_is_refusal_B,
            top_class_B=top_class_B,
        )


def _match_category(name: str) -> tuple[bool, str | None]:
    """Map a bracketed token name to ``(is_refusal_token, category)``; category ``None`` means respond."""
    folded = re.sub(r"[\s_\-]+", " ", name.strip().casefold())
    if folded in ("respond", "response", "comply"):
        return True, None
    for prefix in ("refuse ", "refusal ", "refuse: "):
        if folded.startswith(prefix):
            folded = folded[len(prefix) :]
            break
    for canonical in COCONOT_CATEGORIES:
        canonical_folded = canonical.casefold()
        spellings = {
            canonical_folded,
            CATEGORY_SHORT_NAMES[canonical],
            canonical_folded.removesuffix(" requests"),
            canonical_folded.removeprefix("requests with "),
        }
        if folded in spellings:
            return True, canonical
    return False, None


@dataclass
class RefusalVocabulary:
    """Spellings of the refusal tokens and the category each one stands for.

    Args:
        tokens: Token string -> CoCoNot category (canonical or short name), or ``None`` for the respond
            token. Defaults to the published spellings, :data:`sae_refusal.categories.DEFAULT_REFUSAL_TOKENS`.
    """

    tokens: dict[str, str | None] = field(default_factory=lambda: dict(DEFAULT_REFUSAL_TOKENS))

    def __post_init__(self) -> None:
        if not self.tokens:
            raise ValueError("refusal_tokens: empty; expected token -> category (None for respond)")
        normalised: dict[str, str | None] = {}
        seen: dict[str | None, str] = {}
        for token, category in self.tokens.items():
            if not token:
                raise ValueError("refusal_tokens: empty token string")
            canonical = (
                None if category is None else resolve_category(category, key=f"refusal_tokens[{token!r}]")
            )
            if canonical in seen:
                raise ValueError(
                    f"refusal_tokens: tokens {seen[canonical]!r} and {token!r} both stand for "
                    f"{canonical or RESPOND_CLASS_NAME!r}; each class needs exactly one token"
                )
            seen[canonical] = token
            normalised[token] = canonical
        if len(normalised) < 2:
            raise ValueError("refusal_tokens: need at least two tokens (e.g. respond and one category)")
        self.tokens = normalised

    def resolve(self, tokenizer: Any) -> ResolvedRefusalTokens:
        """Bind the tokens to ``tokenizer``'s ids, in class order.

        Raises:
            RefusalTokenError: If any token is absent or does not encode to exactly one id.
        """
        by_category = {category: token for token, category in self.tokens.items()}
        order: list[str | None] = [c for c in (None, *COCONOT_CATEGORIES) if c in by_category]
        ids: list[int] = []
        missing: list[str] = []
        for category in order:
            token_id = _single_token_id(tokenizer, by_category[category])
            if token_id is None:
                missing.append(by_category[category])
            else:
                ids.append(token_id)
        if missing:
            raise RefusalTokenError(
                f"refusal_tokens: {len(missing)} of {len(order)} refusal tokens are not single tokens of "
                f"{_tokenizer_name(tokenizer)}: {missing}. This model was probably not trained with refusal "
                f"tokens. {_FINETUNE_HINT}."
            )
        if len(set(ids)) != len(ids):
            raise RefusalTokenError(
                f"refusal_tokens: two tokens share one id in {_tokenizer_name(tokenizer)}: {ids}"
            )
        return ResolvedRefusalTokens(
            tokens=tuple(by_category[c] for c in order),
            token_ids=tuple(ids),
            categories=tuple(order),
            class_names=tuple(RESPOND_CLASS_NAME if c is None else CATEGORY_SHORT_NAMES[c] for c in order),
        )

    @classmethod
    def detect(cls, tokenizer: Any, pattern: str = DEFAULT_DETECT_PATTERN) -> RefusalVocabulary:
        """Find refusal tokens among the tokenizer's added tokens by regex.

        Recognises ``[respond]``, ``[refuse_<short name>]`` (e.g. ``[refuse_safety]``) and the published
        ``[<Category> requests]`` spellings, with or without a leading space, any case, ``_``/``-``/space
        alike. Bracketed added tokens that name no category (``[INST]``, ``[PAD]``) are ignored.

        Args:
            tokenizer: A Hugging Face tokenizer.
            pattern: Regex with a named group ``name`` applied to each added token.

        Raises:
            RefusalTokenError: If no respond token or no category token is found, or two tokens claim one
                class (ambiguous).
        """
        regex = re.compile(pattern)
        if "name" not in regex.groupindex:
            raise ValueError(f"pattern: {pattern!r} has no named group 'name'")
        found: dict[str | None, list[str]] = {}
        for token in sorted(tokenizer.get_added_vocab()):
            match = regex.search(token)
            if match is None:
                continue
            is_refusal_token, category = _match_category(match.group("name"))
            if not is_refusal_token:
                continue
            found.setdefault(category, []).append(token)
        ambiguous = {(c or RESPOND_CLASS_NAME): t for c, t in found.items() if len(t) > 1}
        if ambiguous:
            raise RefusalTokenError(
                f"refusal_tokens: ambiguous added tokens in {_tokenizer_name(tokenizer)}: {ambiguous}; "
                "set refusal_tokens explicitly"
            )
        if None not in found or len(found) < 2:
            raise RefusalTokenError(
                f"refusal_tokens: found {sorted(t[0] for t in found.values()) or 'no'} refusal tokens "
                f"among the added tokens of {_tokenizer_name(tokenizer)}; need a respond token and at least "
                f"one category token. {_FINETUNE_HINT}."
            )
        return cls(tokens={tokens[0]: category for category, tokens in found.items()})


# ------------------------------------------------------------------------- calibrated respond bias


def _sequence_bias_entries(sequence_bias: Any) -> list[tuple[tuple[int, ...], float]]:
    """``generation_config.sequence_bias`` in either of its forms (dict or list of pairs) as pairs."""
    if not sequence_bias:
        return []
    if isinstance(sequence_bias, dict):
        return [(tuple(int(t) for t in k), float(v)) for k, v in sequence_bias.items()]
    return [(tuple(int(t) for t in ids), float(bias)) for ids, bias in sequence_bias]


def respond_bias_of(model: Any, respond_id: int) -> float:
    """The bias ``generate`` adds to the respond token, from ``model.generation_config.sequence_bias``.

    A calibrated refusal-token model carries its decision threshold there (set by :func:`set_respond_bias`
    when its artifact is applied), so generation and every first-token reading agree; 0 when unset.

    Args:
        model: A Hugging Face model (with or without a ``generation_config``).
        respond_id: Token id of the respond token.
    """
    config = getattr(model, "generation_config", None)
    for ids, bias in _sequence_bias_entries(getattr(config, "sequence_bias", None)):
        if ids == (respond_id,):
            return bias
    return 0.0


def set_respond_bias(model: Any, respond_id: int, bias: float) -> None:
    """Make ``generate`` add ``bias`` to the respond token's logit (``generation_config.sequence_bias``).

    Stored in the JSON-serialisable list form, so ``save_pretrained`` keeps it; other entries are kept, and
    ``bias = 0`` removes the respond entry. Like any ``sequence_bias`` of one token it applies at every
    generated position, which only matters at the first (the respond token appears nowhere else).

    Args:
        model: A Hugging Face causal LM with a ``generation_config``.
        respond_id: Token id of the respond token.
        bias: The bias; must be finite.

    Raises:
        ValueError: If ``bias`` is not finite or the model has no ``generation_config``.
    """
    if not math.isfinite(bias):
        raise ValueError(f"respond_bias must be finite, got {bias}")
    config = getattr(model, "generation_config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no generation_config to carry a respond bias")
    entries = [(ids, b) for ids, b in _sequence_bias_entries(config.sequence_bias) if ids != (respond_id,)]
    if bias != 0.0:
        entries.append(((respond_id,), float(bias)))
    config.sequence_bias = [[list(ids), b] for ids, b in entries] or None
