"""Refusal-token vocabulary: resolution to single ids, detection, and reading logits as a classifier."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from sae_refusal.categories import COCONOT_CATEGORIES, DEFAULT_REFUSAL_TOKENS, SAFETY, UNSUPPORTED
from sae_refusal.llm import RefusalTokenError, RefusalVocabulary
from sae_refusal.testing import build_tiny_tokenizer


def _tokenizer_with(tokens: list[str], special: bool = True) -> Any:
    tokenizer = build_tiny_tokenizer()
    if special:
        tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    else:
        tokenizer.add_tokens(tokens)
    return tokenizer


def test_missing_tokens_raise_naming_them() -> None:
    tokenizer = build_tiny_tokenizer()
    with pytest.raises(RefusalTokenError) as info:
        RefusalVocabulary().resolve(tokenizer)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert message.startswith("refusal_tokens:")
    for token in DEFAULT_REFUSAL_TOKENS:
        assert repr(token) in message
    assert "TokenizersBackend" in message or "Tokenizer" in message
    assert "finetune" in message


def test_partially_missing_names_only_the_missing() -> None:
    tokenizer = _tokenizer_with([" [respond]", " [Humanizing requests]"])
    with pytest.raises(RefusalTokenError) as info:
        RefusalVocabulary().resolve(tokenizer)
    assert "4 of 6" in str(info.value)
    assert "' [respond]'" not in str(info.value)
    assert "' [Unsupported requests]'" in str(info.value)


@pytest.mark.parametrize("special", [True, False])
def test_default_spellings_resolve_to_single_ids_in_class_order(special: bool) -> None:
    tokenizer = _tokenizer_with(list(DEFAULT_REFUSAL_TOKENS), special=special)
    resolved = RefusalVocabulary().resolve(tokenizer)
    assert resolved.categories == (None, *COCONOT_CATEGORIES)
    assert resolved.class_names == (
        "respond",
        "humanizing",
        "incomplete",
        "indeterminate",
        "safety",
        "unsupported",
    )
    assert resolved.tokens[0] == " [respond]"
    assert resolved.num_classes == 6
    for token, token_id in zip(resolved.tokens, resolved.token_ids, strict=True):
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id]
    assert resolved.class_index(None) == 0
    assert resolved.class_index("safety") == 4
    assert resolved.class_index(UNSUPPORTED) == 5


def test_custom_vocabulary_with_short_names_and_subset() -> None:
    vocab = RefusalVocabulary(tokens={"[refuse_safety]": "safety", "[respond]": None})
    assert vocab.tokens == {"[refuse_safety]": SAFETY, "[respond]": None}
    resolved = vocab.resolve(_tokenizer_with(["[respond]", "[refuse_safety]"]))
    assert resolved.class_names == ("respond", "safety")
    with pytest.raises(KeyError):
        resolved.class_index("humanizing")


def test_vocabulary_validation() -> None:
    with pytest.raises(ValueError, match=r"refusal_tokens\['\[x\]'\]: unknown category 'nonsense'"):
        RefusalVocabulary(tokens={"[x]": "nonsense", "[respond]": None})
    with pytest.raises(ValueError, match="both stand for"):
        RefusalVocabulary(tokens={"[a]": "safety", "[b]": SAFETY})
    with pytest.raises(ValueError, match="at least two"):
        RefusalVocabulary(tokens={"[respond]": None})


def test_classify_crafted_logits() -> None:
    tokenizer = _tokenizer_with(list(DEFAULT_REFUSAL_TOKENS))
    resolved = RefusalVocabulary().resolve(tokenizer)
    vocab_size = len(tokenizer)
    logits = torch.zeros(3, vocab_size)
    ids = resolved.token_ids
    # Row 0: safety token is the global argmax.
    logits[0, ids[4]] = 10.0
    # Row 1: a normal token wins overall; among refusal tokens, respond wins.
    logits[1, 7] = 20.0
    logits[1, ids[0]] = 5.0
    logits[1, ids[2]] = 4.0
    # Row 2: all refusal tokens equal -> uniform restricted probabilities.
    logits[2, list(ids)] = 3.0
    logits[2, 9] = 3.5
    pred = resolved.classify(logits)
    assert pred.pred_class_B.tolist()[:2] == [4, 0]
    assert pred.top_is_refusal_token_B.tolist() == [True, False, False]
    assert pred.top_class_B.tolist() == [4, -1, -1]
    torch.testing.assert_close(pred.probs_BC.sum(dim=1), torch.ones(3))
    torch.testing.assert_close(pred.probs_BC[2], torch.full((6,), 1 / 6))
    expected = torch.softmax(logits[1], 0)[list(ids)].sum()
    torch.testing.assert_close(pred.refusal_mass_B[1], expected)
    assert pred.refusal_mass_B[0] > 0.9
    # bf16 logits work too (computed in float32).
    assert resolved.classify(logits.bfloat16()).pred_class_B.tolist()[:2] == [4, 0]
    with pytest.raises(ValueError, match="outside the logits' vocabulary"):
        resolved.classify(logits[:, :300])
    with pytest.raises(ValueError, match=r"\(B, vocab\)"):
        resolved.classify(logits[0])


def test_detect_published_and_refuse_spellings() -> None:
    published = RefusalVocabulary.detect(_tokenizer_with(list(DEFAULT_REFUSAL_TOKENS)))
    assert published.tokens == DEFAULT_REFUSAL_TOKENS
    tokens = ["[respond]", "[refuse_humanizing]", "[REFUSE-SAFETY]", "[refuse_unsupported]", "[INST]"]
    detected = RefusalVocabulary.detect(_tokenizer_with(tokens))
    assert detected.tokens == {
        "[respond]": None,
        "[refuse_humanizing]": COCONOT_CATEGORIES[0],
        "[REFUSE-SAFETY]": SAFETY,
        "[refuse_unsupported]": UNSUPPORTED,
    }
    resolved = detected.resolve(_tokenizer_with(tokens))
    assert resolved.class_names == ("respond", "humanizing", "safety", "unsupported")


def test_detect_custom_pattern() -> None:
    tokenizer = _tokenizer_with(["<respond>", "<refuse_safety>"])
    vocab = RefusalVocabulary.detect(tokenizer, pattern=r"^<(?P<name>[^<>]+)>$")
    assert vocab.tokens == {"<respond>": None, "<refuse_safety>": SAFETY}
    with pytest.raises(ValueError, match="named group 'name'"):
        RefusalVocabulary.detect(tokenizer, pattern=r"^<.*>$")


def test_detect_errors() -> None:
    with pytest.raises(RefusalTokenError, match="found no refusal tokens"):
        RefusalVocabulary.detect(build_tiny_tokenizer())
    with pytest.raises(RefusalTokenError, match="need a respond token"):
        RefusalVocabulary.detect(_tokenizer_with(["[refuse_safety]"]))
    with pytest.raises(RefusalTokenError, match="ambiguous"):
        RefusalVocabulary.detect(
            _tokenizer_with(["[respond]", "[refuse_safety]", " [Requests with safety concerns]"])
        )


def test_set_respond_bias_keeps_other_entries_and_serialises() -> None:
    from transformers import GenerationConfig

    from sae_refusal.llm.refusal_tokens import respond_bias_of, set_respond_bias

    class Holder:
        generation_config = GenerationConfig(sequence_bias=[[[7, 8], -1.0]])

    model = Holder()
    assert respond_bias_of(model, 5) == 0.0
    set_respond_bias(model, 5, 1.5)
    assert respond_bias_of(model, 5) == 1.5
    set_respond_bias(model, 5, -0.5)  # replaced, not appended
    assert model.generation_config.sequence_bias == [[[7, 8], -1.0], [[5], -0.5]]
    assert GenerationConfig.from_dict(model.generation_config.to_dict()).sequence_bias is not None
    set_respond_bias(model, 5, 0.0)
    assert model.generation_config.sequence_bias == [[[7, 8], -1.0]]
    model.generation_config.sequence_bias = {(5,): 3.0}  # the dict form transformers also accepts
    assert respond_bias_of(model, 5) == 3.0
    with pytest.raises(ValueError, match="finite"):
        set_respond_bias(model, 5, float("inf"))
    with pytest.raises(ValueError, match="generation_config"):
        set_respond_bias(object(), 5, 1.0)
    assert respond_bias_of(object(), 5) == 0.0
