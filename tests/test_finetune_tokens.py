"""Adding the refusal tokens to tokenizers and initialising their embedding rows."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from sae_refusal.categories import DEFAULT_REFUSAL_TOKENS, SAFETY
from sae_refusal.finetune.tokens import (
    add_refusal_tokens,
    embeddings_tied,
    init_refusal_embeddings,
    refusal_token_order,
)
from sae_refusal.llm import LLMConfig, RefusalVocabulary, load_tokenizer
from sae_refusal.testing import build_tiny_model, build_tiny_tokenizer


def tiny_model(tied: bool, vocab_size: int = 400) -> PreTrainedModel:
    model = build_tiny_model("llama", vocab_size=vocab_size, num_layers=2)
    if not tied:
        return model
    config = model.config
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def check_tokens(tokenizer: object, vocab: RefusalVocabulary) -> None:
    added = add_refusal_tokens(tokenizer, vocab)
    assert added == refusal_token_order(vocab)
    assert added[0] == " [respond]"
    for token in added:
        ids = tokenizer.encode(token, add_special_tokens=False)  # type: ignore[attr-defined]
        assert len(ids) == 1
        assert tokenizer.convert_tokens_to_ids(token) == ids[0]  # type: ignore[attr-defined]
        assert tokenizer.decode(ids) == token  # type: ignore[attr-defined]
    resolved = vocab.resolve(tokenizer)
    respond_id = resolved.token_ids[0]
    text = "Hello there [respond] Sure, here it is."
    ids = tokenizer.encode(text, add_special_tokens=False)  # type: ignore[attr-defined]
    assert respond_id in ids
    assert tokenizer.decode(ids) == text  # type: ignore[attr-defined]
    assert " [respond]" not in tokenizer.decode(ids, skip_special_tokens=True)  # type: ignore[attr-defined]
    size = len(tokenizer)  # type: ignore[arg-type]
    assert add_refusal_tokens(tokenizer, vocab) == []
    assert len(tokenizer) == size  # type: ignore[arg-type]
    assert vocab.resolve(tokenizer) == resolved


def test_tokens_single_id_round_trip_idempotent() -> None:
    tokenizer = build_tiny_tokenizer()
    with pytest.raises(ValueError):
        RefusalVocabulary().resolve(tokenizer)
    check_tokens(tokenizer, RefusalVocabulary())
    assert len(tokenizer) == 406


def test_token_order_ignores_mapping_order() -> None:
    first, second = build_tiny_tokenizer(), build_tiny_tokenizer()
    add_refusal_tokens(first, RefusalVocabulary())
    add_refusal_tokens(second, RefusalVocabulary(dict(reversed(DEFAULT_REFUSAL_TOKENS.items()))))
    assert first.get_added_vocab() == second.get_added_vocab()


@pytest.mark.slow
def test_tokens_on_smollm2_tokenizer() -> None:
    tokenizer = load_tokenizer(LLMConfig())
    base = len(tokenizer)
    check_tokens(tokenizer, RefusalVocabulary())
    assert len(tokenizer) == base + 6
    assert [tokenizer.convert_tokens_to_ids(t) for t in refusal_token_order(RefusalVocabulary())] == list(
        range(base, base + 6)
    )


def _word_mean(weight: torch.Tensor, tokenizer: object, words: str) -> torch.Tensor:
    ids = tokenizer.encode(words, add_special_tokens=False)  # type: ignore[attr-defined]
    return weight[ids].mean(dim=0)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("init", ["mean", "category_words"])
def test_init_rows(tied: bool, init: str) -> None:
    tokenizer, vocab = build_tiny_tokenizer(), RefusalVocabulary()
    model = tiny_model(tied)
    assert embeddings_tied(model) is tied
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    added = add_refusal_tokens(tokenizer, vocab)
    init_refusal_embeddings(model, tokenizer, vocab, added, init=init)
    new_in, new_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert new_in.shape[0] == new_out.shape[0] == len(tokenizer) == 406
    assert embeddings_tied(model) is tied
    assert torch.equal(new_in[:400], old_in)
    assert torch.equal(new_out[:400], old_out)
    resolved = vocab.resolve(tokenizer)
    safety = resolved.token_ids[resolved.class_index(SAFETY)]
    respond = resolved.token_ids[0]
    for new, old in ((new_in, old_in), (new_out, old_out)):
        if init == "mean":
            for token_id in resolved.token_ids:
                torch.testing.assert_close(new[token_id], old.mean(dim=0))
        else:
            torch.testing.assert_close(new[safety], _word_mean(old, tokenizer, " " + SAFETY))
            torch.testing.assert_close(new[respond], _word_mean(old, tokenizer, " respond"))
            assert not torch.allclose(new[safety], new[respond])


def test_init_keeps_padded_embedding() -> None:
    tokenizer, vocab = build_tiny_tokenizer(), RefusalVocabulary()
    model = tiny_model(tied=False, vocab_size=410)  # embedding padded past the tokenizer (as in Qwen2)
    old = model.get_input_embeddings().weight.detach().clone()
    added = add_refusal_tokens(tokenizer, vocab)
    init_refusal_embeddings(model, tokenizer, vocab, added, init="mean")
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == 410
    keep = torch.ones(410, dtype=torch.bool)
    keep[400:406] = False
    torch.testing.assert_close(weight[400], old[keep].mean(dim=0))
    assert torch.equal(weight[406:], old[406:])


def test_init_errors_and_noop() -> None:
    tokenizer, vocab = build_tiny_tokenizer(), RefusalVocabulary()
    model = tiny_model(tied=False)
    added = add_refusal_tokens(tokenizer, vocab)
    with pytest.raises(ValueError, match="token_init"):
        init_refusal_embeddings(model, tokenizer, vocab, added, init="random")
    with pytest.raises(ValueError, match="refusal_tokens"):
        init_refusal_embeddings(model, build_tiny_tokenizer(), vocab, added)
    init_refusal_embeddings(model, tokenizer, vocab, added)
    before = model.get_input_embeddings().weight.detach().clone()
    init_refusal_embeddings(model, tokenizer, vocab, [])
    assert torch.equal(model.get_input_embeddings().weight, before)
