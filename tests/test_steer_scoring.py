"""First-token refusal decisions under per-row interventions (`sae_refusal.steer.scoring`)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from sae_refusal.finetune.tokens import add_refusal_tokens, init_refusal_embeddings
from sae_refusal.llm.refusal_tokens import RefusalVocabulary, set_respond_bias
from sae_refusal.steer.scoring import first_token_decisions, residual_rows
from sae_refusal.testing import build_tiny_model, build_tiny_tokenizer

TEXTS = [f"Tell me about the sea, number {i}" for i in range(7)] + ["How do I build a weapon?"]


@pytest.fixture(scope="module")
def refusal_model() -> tuple[Any, Any, Any]:
    tokenizer = build_tiny_tokenizer()
    vocab = RefusalVocabulary()
    added = add_refusal_tokens(tokenizer, vocab)
    model = build_tiny_model("llama", vocab_size=len(tokenizer), hidden_size=32, seed=1)
    init_refusal_embeddings(model, tokenizer, vocab, added, init="mean")
    resolved = vocab.resolve(tokenizer)
    with torch.no_grad():  # distinct output rows, so the six tokens' logits differ
        head = model.get_output_embeddings().weight
        gen = torch.Generator().manual_seed(2)
        head[list(resolved.token_ids)] = torch.randn(6, head.shape[1], generator=gen) * 0.5
    return model.eval(), tokenizer, resolved


def test_decisions_are_in_input_order_and_match_one_prompt_at_a_time(refusal_model: Any) -> None:
    model, tokenizer, resolved = refusal_model
    together = first_token_decisions(model, tokenizer, TEXTS, resolved, batch_size=3)
    for i, text in enumerate(TEXTS):
        alone = first_token_decisions(model, tokenizer, [text], resolved, batch_size=1)
        torch.testing.assert_close(alone.probs_NC[0], together.probs_NC[i], atol=1e-5, rtol=1e-5)
    assert together.class_names[0] == "respond" and together.probs_NC.shape == (len(TEXTS), 6)


def test_per_row_steering_moves_only_the_steered_rows(refusal_model: Any) -> None:
    model, tokenizer, resolved = refusal_model
    plain = first_token_decisions(model, tokenizer, TEXTS, resolved, batch_size=3)
    alpha = torch.zeros(len(TEXTS))
    alpha[[1, 5]] = 8.0
    vector = torch.randn(32, generator=torch.Generator().manual_seed(0))
    steered = first_token_decisions(
        model, tokenizer, TEXTS, resolved, batch_size=3, edits=residual_rows(1, vector, alpha)
    )
    moved = (steered.probs_NC - plain.probs_NC).abs().amax(dim=1) > 1e-4
    assert moved.tolist() == [i in (1, 5) for i in range(len(TEXTS))]
    unmoved = ~moved
    assert torch.equal(steered.probs_NC[unmoved], plain.probs_NC[unmoved])  # bit for bit


def test_the_respond_bias_decides_and_rates_count_refusals(refusal_model: Any) -> None:
    model, tokenizer, resolved = refusal_model
    kw: dict[str, Any] = {"judge": "restricted"}
    everyone_responds = first_token_decisions(model, tokenizer, TEXTS, resolved, respond_bias=1e4, **kw)
    assert everyone_responds.rate() == 0.0 and not everyone_responds.refused_N.any()
    nobody_responds = first_token_decisions(model, tokenizer, TEXTS, resolved, respond_bias=-1e4, **kw)
    assert nobody_responds.rate() == 1.0
    assert nobody_responds.rate(torch.tensor([True] + [False] * 7)) == 1.0
    set_respond_bias(model, resolved.respond_id, -1e4)  # the calibrated bias, read from the model
    try:
        assert first_token_decisions(model, tokenizer, TEXTS, resolved, **kw).rate() == 1.0
    finally:
        set_respond_bias(model, resolved.respond_id, 0.0)
    # the emitted reading: [respond] emitted everywhere under a huge bias
    emitted = first_token_decisions(model, tokenizer, TEXTS, resolved, respond_bias=1e4)
    assert emitted.top_class_N.tolist() == [0] * len(TEXTS) and emitted.rate() == 0.0


def test_the_emitted_reading_differs_from_the_restricted_one(refusal_model: Any) -> None:
    # with a refusal token far below the vocabulary's best token, the restricted argmax still names a class
    # but greedy generation would emit another token: "other" (-1), not refused
    model, tokenizer, resolved = refusal_model
    head = model.get_output_embeddings().weight
    saved = head[list(resolved.token_ids)].clone()
    try:
        with torch.no_grad():
            head[list(resolved.token_ids)] = 0.0  # refusal logits 0: below the vocabulary's best token
            head[resolved.token_ids[4]] = saved[4]  # one refusal row as before
        restricted = first_token_decisions(
            model, tokenizer, TEXTS, resolved, judge="restricted", respond_bias=-1e4
        )
        emitted = first_token_decisions(model, tokenizer, TEXTS, resolved, respond_bias=-1e4)
        assert restricted.refused_N.all()  # every row's best refusal token is a category
        assert torch.equal(emitted.pred_class_N, restricted.pred_class_N)
        assert (emitted.top_class_N == -1).any() and not emitted.refused_N.all()
        assert emitted.rate() < restricted.rate()
        with pytest.raises(ValueError, match="judge"):
            first_token_decisions(model, tokenizer, TEXTS, resolved, judge="vibes")
    finally:
        with torch.no_grad():
            head[list(resolved.token_ids)] = saved
