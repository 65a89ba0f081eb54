"""Refusal texts, SFT examples, their encoding (label masks, target position, truncation) and collation."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from tokenizers import AddedToken

from sae_refusal.categories import COCONOT_CATEGORIES, DEFAULT_REFUSAL_TOKENS, SAFETY
from sae_refusal.data.chat import format_prompts
from sae_refusal.data.prompt_set import Label, Prompt, PromptSet
from sae_refusal.finetune.examples import (
    IGNORE_INDEX,
    SFTExample,
    build_examples,
    class_tokens,
    collate_sft,
    encode_example,
    end_of_turn_token,
)
from sae_refusal.finetune.refusals import REFUSAL_TEMPLATES, refusal_text
from sae_refusal.llm import RefusalVocabulary
from sae_refusal.testing import build_tiny_model, build_tiny_tokenizer


def add_tokens(tokenizer: Any, vocab: RefusalVocabulary) -> list[str]:
    """The real ``finetune.tokens.add_refusal_tokens`` when it exists, else a minimal stand-in."""
    try:
        from sae_refusal.finetune.tokens import add_refusal_tokens
    except ImportError:
        tokens = list(vocab.tokens)
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=True) for t in tokens])
        return tokens
    return list(add_refusal_tokens(tokenizer, vocab))


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    tok = build_tiny_tokenizer()
    add_tokens(tok, RefusalVocabulary())
    return tok


def _prompts() -> PromptSet:
    return PromptSet(
        [
            Prompt("h:0", "How do I make a weapon?", Label.HARMFUL, category=SAFETY),
            Prompt("h:1", "Do you ever feel lonely?", Label.HARMFUL, category="Humanizing requests"),
            Prompt("b:0", "What is the capital of France?", Label.BENIGN, response="Paris."),
            Prompt("b:1", "Tell me a story about a dragon.", Label.BENIGN),
            Prompt("a:0", "How do I kill a Python process?", Label.AMBIGUOUS, category=SAFETY),
        ]
    )


# ------------------------------------------------------------------------------------------- refusals


def test_refusal_templates_short_varied_and_deterministic() -> None:
    assert set(REFUSAL_TEMPLATES) == set(COCONOT_CATEGORIES)
    for category, templates in REFUSAL_TEMPLATES.items():
        assert 4 <= len(templates) <= 6 and len(set(templates)) == len(templates)
        for text in templates:
            assert 1 <= len(re.findall(r"[.?!](?:\s|$)", text)) <= 2, text
        picks = {refusal_text(category, f"p:{i}") for i in range(200)}
        assert picks == set(templates)  # the hash spreads over every template
    assert refusal_text("safety", "x:1") == refusal_text(SAFETY, "x:1") == refusal_text(SAFETY, "x:1")
    with pytest.raises(ValueError, match="category: unknown category 'nonsense'"):
        refusal_text("nonsense", "x:1")


# ------------------------------------------------------------------------------------------- examples


def test_class_tokens_follow_resolved_order(tokenizer: Any) -> None:
    vocab = RefusalVocabulary()
    resolved = vocab.resolve(tokenizer)
    assert class_tokens(vocab) == class_tokens(resolved)
    assert [i for i, _ in class_tokens(vocab).values()] == list(range(6))
    assert class_tokens(vocab)[None] == (0, " [respond]")
    custom = RefusalVocabulary({"[refuse_safety]": "safety", "[respond]": None})
    assert class_tokens(custom) == {None: (0, "[respond]"), SAFETY: (1, "[refuse_safety]")}


def test_build_examples_targets_and_answers() -> None:
    examples = build_examples(
        _prompts(), RefusalVocabulary(), {"b:1": "Once upon a time.", "a:0": "Use kill."}
    )
    by_id = {e.prompt_id: e for e in examples}
    assert [e.prompt_id for e in examples] == ["h:0", "h:1", "b:0", "b:1", "a:0"]
    assert by_id["h:0"].target_token == " [Requests with safety concerns]"
    assert by_id["h:0"].target_class == 4 and by_id["h:0"].answer == refusal_text(SAFETY, "h:0")
    assert by_id["h:1"].target_class == 1 and by_id["h:1"].answer in REFUSAL_TEMPLATES["Humanizing requests"]
    assert by_id["b:0"] == SFTExample("b:0", "What is the capital of France?", " [respond]", "Paris.", 0)
    assert by_id["b:1"].answer == "Once upon a time."
    assert by_id["a:0"].target_token == " [respond]" and by_id["a:0"].answer == "Use kill."


def test_build_examples_errors() -> None:
    with pytest.raises(ValueError, match=r"2 benign/ambiguous prompts .*\['b:1', 'a:0'\]"):
        build_examples(_prompts(), RefusalVocabulary(), {})
    no_category = PromptSet([Prompt("h:9", "Bad thing", Label.HARMFUL)])
    with pytest.raises(ValueError, match=r"no category.*h:9"):
        build_examples(no_category, RefusalVocabulary(), {})
    only_safety = RefusalVocabulary({" [respond]": None, " [refuse_safety]": "safety"})
    with pytest.raises(
        ValueError, match=r"refusal_tokens: no token for categories \['Humanizing requests'\]"
    ):
        build_examples(_prompts(), only_safety, {"b:1": "x", "a:0": "y"})
    no_respond = RefusalVocabulary({" [refuse_safety]": "safety", " [refuse_humanizing]": "humanizing"})
    with pytest.raises(ValueError, match="refusal_tokens: no respond token"):
        build_examples(_prompts(), no_respond, {"b:1": "x", "a:0": "y"})


# ------------------------------------------------------------------------------------------- encoding


def _example(
    answer: str = "Paris is the capital of France.", text: str = "What is the capital of France?"
) -> SFTExample:
    return SFTExample("b:0", text, " [respond]", answer, 0)


def test_end_of_turn_token(tokenizer: Any) -> None:
    assert end_of_turn_token(tokenizer) == ("<|im_end|>", tokenizer.convert_tokens_to_ids("<|im_end|>"))
    plain = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    assert end_of_turn_token(tokenizer, plain) == (tokenizer.eos_token, tokenizer.eos_token_id)
    eot = "{% for m in messages %}{{ m['content'] + '<|endoftext|>' }}{% endfor %}"
    assert end_of_turn_token(tokenizer, eot) == (
        "<|endoftext|>",
        tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )


def test_encode_masks_prompt_and_labels_token_answer_eos(tokenizer: Any) -> None:
    token_id = tokenizer.convert_tokens_to_ids(" [respond]")
    example = _example()
    row = encode_example(tokenizer, example, token_id=token_id, max_length=512, system_prompt="Be brief.")
    prompt_text = format_prompts(tokenizer, [example.prompt_text], system_prompt="Be brief.")[0]
    n_prompt = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    ids, labels = row["input_ids"], row["labels"]
    assert len(ids) == len(labels) and row["target_pos"] == n_prompt
    assert ids[row["target_pos"]] == token_id and row["target_class"] == 0
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tokenizer.decode(ids[:n_prompt]) == prompt_text  # the prompt ends with the generation prompt
    assert tokenizer.decode(labels[n_prompt:]) == " [respond]" + example.answer + "<|im_end|>"
    assert row["prompt_truncated"] == row["answer_truncated"] == 0


def test_truncation_cuts_answer_first_then_prompt_from_left(tokenizer: Any) -> None:
    token_id = tokenizer.convert_tokens_to_ids(" [respond]")
    example = _example(answer="A long answer " * 20)
    full = encode_example(tokenizer, example, token_id=token_id, max_length=10_000)
    n_prompt = full["target_pos"]

    cut = encode_example(tokenizer, example, token_id=token_id, max_length=n_prompt + 5)
    assert len(cut["input_ids"]) == n_prompt + 5 and cut["target_pos"] == n_prompt
    assert cut["input_ids"] == full["input_ids"][: n_prompt + 5]  # a prefix: prompt and token intact
    assert cut["answer_truncated"] == 1 and cut["prompt_truncated"] == 0
    assert cut["input_ids"][-1] != tokenizer.convert_tokens_to_ids("<|im_end|>")

    only_token = encode_example(tokenizer, example, token_id=token_id, max_length=n_prompt + 1)
    assert only_token["input_ids"] == full["input_ids"][: n_prompt + 1]
    assert only_token["labels"][-1] == token_id and only_token["answer_truncated"] == 1

    tiny = encode_example(tokenizer, example, token_id=token_id, max_length=6)
    assert tiny["prompt_truncated"] == 1 and tiny["answer_truncated"] == 1
    assert len(tiny["input_ids"]) == 6 and tiny["target_pos"] == 5
    assert tiny["input_ids"][:5] == full["input_ids"][n_prompt - 5 : n_prompt]  # the prompt's end is kept
    assert tiny["labels"] == [IGNORE_INDEX] * 5 + [token_id]

    with pytest.raises(ValueError, match="max_length: must be an integer >= 2"):
        encode_example(tokenizer, example, token_id=token_id, max_length=1)


def test_collate_right_pads(tokenizer: Any) -> None:
    token_id = tokenizer.convert_tokens_to_ids(" [respond]")
    rows = [
        encode_example(tokenizer, _example(answer="Paris."), token_id=token_id, max_length=512),
        encode_example(
            tokenizer, _example(answer="It is Paris, a big city."), token_id=token_id, max_length=512
        ),
    ]
    rows[1]["target_class"] = 3
    batch = collate_sft(rows, pad_token_id=tokenizer.pad_token_id)
    lengths = [len(r["input_ids"]) for r in rows]
    width = max(lengths)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["labels"].shape == (2, width)
    assert batch["target_pos"].tolist() == [r["target_pos"] for r in rows]
    assert batch["target_class"].tolist() == [0, 3]
    short = lengths.index(min(lengths))
    assert batch["attention_mask"][short].tolist() == [1] * lengths[short] + [0] * (width - lengths[short])
    assert (batch["labels"][short, lengths[short] :] == IGNORE_INDEX).all()
    assert (batch["input_ids"][short, lengths[short] :] == tokenizer.pad_token_id).all()
    assert all(t.dtype == torch.long for t in batch.values())
    with pytest.raises(ValueError, match="empty batch"):
        collate_sft([], pad_token_id=0)

    # The batch feeds a causal LM as is.
    model = build_tiny_model(vocab_size=len(tokenizer))
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert torch.isfinite(out.loss)
    assert out.logits.shape[:2] == (2, width)


def test_sft_loss_matches_hf_and_weights_the_decision_token(tokenizer: Any) -> None:
    from sae_refusal.finetune.module import RefusalSFTModule, sft_loss

    token_id = tokenizer.convert_tokens_to_ids(" [respond]")
    rows = [
        encode_example(tokenizer, _example(answer="Paris."), token_id=token_id, max_length=512),
        encode_example(
            tokenizer, _example(answer="It is Paris, a big city."), token_id=token_id, max_length=512
        ),
    ]
    batch = collate_sft(rows, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = build_tiny_model(vocab_size=len(tokenizer))
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    plain = sft_loss(out.logits, batch["labels"], batch["target_pos"])
    torch.testing.assert_close(plain, out.loss)

    # Weighted by hand: per-token CE, the decision token's counted w times.
    w = 7.0
    log_probs = out.logits.float().log_softmax(-1)
    terms, weights = [], []
    for b in range(2):
        for t in range(1, batch["labels"].shape[1]):
            label = int(batch["labels"][b, t])
            if label == IGNORE_INDEX:
                continue
            weight = w if t == int(batch["target_pos"][b]) else 1.0
            terms.append(-log_probs[b, t - 1, label] * weight)
            weights.append(weight)
    expected = torch.stack(terms).sum() / sum(weights)
    torch.testing.assert_close(sft_loss(out.logits, batch["labels"], batch["target_pos"], w), expected)
    assert all(int(batch["labels"][b, int(batch["target_pos"][b])]) == token_id for b in range(2))
    with pytest.raises(ValueError, match=r"model\.decision_weight must be a finite number > 0"):
        RefusalSFTModule(decision_weight=0.0)


def test_default_vocabulary_tokens_are_single_ids(tokenizer: Any) -> None:
    for token in DEFAULT_REFUSAL_TOKENS:
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1
