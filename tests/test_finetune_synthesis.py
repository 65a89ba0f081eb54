"""The synthesis loop: fake rewriter/judge for the logic, a tiny random model for the mechanics."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import AddedToken

from sae_refusal.categories import COCONOT_CATEGORIES, DEFAULT_REFUSAL_TOKENS, HUMANIZING, SAFETY
from sae_refusal.data import Label, Prompt, PromptSet, load_builtin
from sae_refusal.finetune.synthesis import (
    DIRECTIONS,
    Attempt,
    FlipExample,
    LLMRewriter,
    RewriteRequest,
    SynthesisConfig,
    TokenJudge,
    as_prompt_set,
    clean_rewrite,
    load_flip_examples,
    read_pairs,
    synthesize,
)
from sae_refusal.llm import RefusalVocabulary
from sae_refusal.testing import build_tiny_model, build_tiny_tokenizer

# ------------------------------------------------------------------------------------------ fakes

_REWRITE_RE = re.compile(r"^try (\d+) \[(.*?)\]: (.*)$")


def _sources(n_harmful: int = 6, n_benign: int = 6) -> PromptSet:
    harmful = [
        Prompt(f"h{i}", f"harmful {i}", Label.HARMFUL, COCONOT_CATEGORIES[i % 5], source="t")
        for i in range(n_harmful)
    ]
    benign = [Prompt(f"b{i}", f"benign {i}", Label.BENIGN, source="t") for i in range(n_benign)]
    ambiguous = [Prompt("a0", "ambiguous 0", Label.AMBIGUOUS, SAFETY, source="t")]
    return PromptSet([*harmful, *benign, *ambiguous])


class FakeRewriter:
    """Writes ``try <k> [<category>]: <source>`` and records every request it got."""

    def __init__(self, output: str | None = None) -> None:
        self.calls: list[list[RewriteRequest]] = []
        self.output = output

    def __call__(self, requests: list[RewriteRequest]) -> list[str]:
        self.calls.append(list(requests))
        if self.output is not None:
            return [self.output for _ in requests]
        return [f"try {r.try_index} [{r.category}]: {r.source}" for r in requests]

    def requests_for(self, source: str) -> list[RewriteRequest]:
        return [r for call in self.calls for r in call if r.source == source]


class FakeJudge:
    """Sources get their correct class unless listed in ``wrong``; a rewrite flips from try ``flip_at[src]``.

    A flipped harmful_to_benign rewrite gets respond; a flipped benign_to_harmful one gets the category named
    in the rewrite (or ``other_category`` when set, to test target-category misses).
    """

    def __init__(
        self,
        sources: PromptSet,
        flip_at: dict[str, int] | None = None,
        default_flip: int = 1,
        wrong: set[str] | None = None,
        other_category: str | None = None,
    ) -> None:
        self.truth = {p.text: p.category if p.label == Label.HARMFUL else None for p in sources}
        self.flip_at = flip_at or {}
        self.default_flip = default_flip
        self.wrong = wrong or set()
        self.other_category = other_category
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> list[str | None]:
        self.calls.append(list(texts))
        out: list[str | None] = []
        for text in texts:
            if text in self.truth:
                correct = self.truth[text]
                out.append((SAFETY if correct is None else None) if text in self.wrong else correct)
                continue
            match = _REWRITE_RE.match(text)
            assert match is not None, text
            k, category, source = int(match.group(1)), match.group(2), match.group(3)
            was = self.truth[source]
            flipped = k >= self.flip_at.get(source, self.default_flip)
            if was is not None:  # harmful source
                out.append(None if flipped else was)
            else:
                out.append((self.other_category or category) if flipped else None)
        return out


def _cfg(tmp_path: Path, **kwargs: Any) -> SynthesisConfig:
    return SynthesisConfig(output_path=str(tmp_path / "out" / "pairs.jsonl"), **kwargs)


# ------------------------------------------------------------------------------------------ loop logic


def test_flip_accepted_on_try_k(tmp_path: Path) -> None:
    sources = _sources()
    judge = FakeJudge(sources, default_flip=3)
    report = synthesize(sources, FakeRewriter(), judge, _cfg(tmp_path, n_pairs=4, max_tries=3))
    assert report.accepted == {"harmful_to_benign": 2, "benign_to_harmful": 2}
    for record in report.records:
        assert record.accepted and record.tries == 3
        assert [a.flipped for a in record.attempts] == [False, False, True]
        assert record.rewrite == record.attempts[-1].rewrite
        assert record.rewrite.startswith("try 3 ")
    assert report.flip_rate_per_try() == [0.0, 0.0, 1.0]


def test_retry_feedback_contains_previous_failure(tmp_path: Path) -> None:
    sources = _sources()
    rewriter = FakeRewriter()
    synthesize(sources, rewriter, FakeJudge(sources, default_flip=2), _cfg(tmp_path, n_pairs=2))
    first_call = rewriter.calls[0]
    assert all(not r.previous and r.feedback() is None for r in first_call)
    h2b = next(r for r in rewriter.calls[1] if r.direction == "harmful_to_benign")
    b2h = next(r for r in rewriter.calls[1] if r.direction == "benign_to_harmful")
    for request in (h2b, b2h):
        assert request.try_index == 2
        (previous,) = request.previous
        assert not previous.flipped and previous.judged and previous.try_index == 1
        feedback = request.feedback()
        assert feedback is not None and previous.rewrite in feedback
    assert b2h.feedback() is not None and "the model still answered with [respond]" in str(b2h.feedback())
    assert f"the model still answered with [{h2b.category}]" in str(h2b.feedback())


def test_max_tries_exhausted(tmp_path: Path) -> None:
    sources = _sources(n_harmful=2, n_benign=2)
    never = {"harmful 0": 99, "benign 0": 99}
    rewriter = FakeRewriter()
    cfg = _cfg(tmp_path, n_pairs=4, max_tries=2)
    report = synthesize(sources, rewriter, FakeJudge(sources, flip_at=never), cfg)
    failed = [r for r in report.records if not r.accepted]
    assert {r.source_text for r in failed} == {"harmful 0", "benign 0"}
    for record in failed:
        assert record.tries == 2 and len(rewriter.requests_for(record.source_text)) == 2
        assert record.target_category_hit in (None, False)
    # the sources ran out: one pair per direction instead of two, still balanced
    assert report.accepted == {"harmful_to_benign": 1, "benign_to_harmful": 1}
    written = read_pairs(cfg.output_path)
    assert {r.source_text for r in written} == {"harmful 1", "benign 1"}


def test_fifty_fifty_balance_refills_from_more_sources(tmp_path: Path) -> None:
    sources = _sources(n_harmful=10, n_benign=10)
    # half of the harmful sources never flip: the loop must draw more of them to reach the quota
    flip_at = {f"harmful {i}": 99 for i in range(0, 10, 2)}
    report = synthesize(
        sources, FakeRewriter(), FakeJudge(sources, flip_at=flip_at), _cfg(tmp_path, n_pairs=8, max_tries=1)
    )
    assert report.quota == {"harmful_to_benign": 4, "benign_to_harmful": 4}
    assert report.accepted == {"harmful_to_benign": 4, "benign_to_harmful": 4}
    assert report.attempted["harmful_to_benign"] > 4
    pairs = as_prompt_set(report)
    assert Counter(p.label for p in pairs) == {Label.AMBIGUOUS: 4, Label.HARMFUL: 4}
    # the ambiguous source prompt is never used
    assert all(r.source_id != "a0" for r in report.records)


def test_balance_fraction_and_target_round_robin(tmp_path: Path) -> None:
    sources = _sources(n_harmful=10, n_benign=10)
    report = synthesize(sources, FakeRewriter(), FakeJudge(sources), _cfg(tmp_path, n_pairs=9, balance=1 / 3))
    assert report.accepted == {"harmful_to_benign": 3, "benign_to_harmful": 6}
    targets = [r.target_category for r in report.records if r.direction == "benign_to_harmful"]
    assert targets == [COCONOT_CATEGORIES[i % 5] for i in range(6)]
    # harmful sources are drawn round-robin over their categories
    h2b = [r.source_category for r in report.records if r.direction == "harmful_to_benign"]
    assert len(set(h2b)) == 3


def test_skips_sources_the_judge_gets_wrong(tmp_path: Path) -> None:
    sources = _sources(n_harmful=4, n_benign=4)
    wrong = {"harmful 0", "harmful 1", "benign 0", "benign 1", "benign 2"}
    rewriter = FakeRewriter()
    report = synthesize(sources, rewriter, FakeJudge(sources, wrong=wrong), _cfg(tmp_path, n_pairs=4))
    # every source gets drawn (too few good ones for the quota), the misjudged ones are skipped
    assert report.n_skipped == {"harmful_to_benign": 2, "benign_to_harmful": 3}
    assert {s.source_id for s in report.skipped} == {"h0", "h1", "b0", "b1", "b2"}
    rewritten = {r.source for call in rewriter.calls for r in call}
    assert rewritten == {"harmful 2", "harmful 3", "benign 3"}
    assert report.accepted == {"harmful_to_benign": 2, "benign_to_harmful": 1}
    # with skipping off, a misjudged source is rewritten and its wrong start recorded
    report = synthesize(
        sources,
        FakeRewriter(),
        FakeJudge(sources, wrong=wrong),
        _cfg(tmp_path, n_pairs=4, skip_misjudged=False),
    )
    assert not report.skipped
    assert any(r.source_text == "harmful 0" and r.token_before is None for r in report.records)


def test_empty_or_unchanged_rewrites_fail_without_judging(tmp_path: Path) -> None:
    sources = _sources(n_harmful=1, n_benign=1)
    judge = FakeJudge(sources)
    report = synthesize(sources, FakeRewriter(output="   "), judge, _cfg(tmp_path, n_pairs=2, max_tries=2))
    assert len(judge.calls) == 1  # the sources only
    for record in report.records:
        assert not record.accepted and record.token_after is None
        assert [a.failure for a in record.attempts] == ["the rewrite was empty"] * 2
        assert not any(a.judged for a in record.attempts)

    class Echo(FakeRewriter):
        def __call__(self, requests: list[RewriteRequest]) -> list[str]:
            return [r.source.upper() for r in requests]

    report = synthesize(sources, Echo(), FakeJudge(sources), _cfg(tmp_path, n_pairs=2, max_tries=1))
    assert {r.attempts[0].failure for r in report.records} == {
        "the rewrite was identical to the source prompt"
    }

    copied = load_flip_examples()[0].rewrite
    report = synthesize(sources, FakeRewriter(output=copied), judge, _cfg(tmp_path, n_pairs=2, max_tries=1))
    assert {r.attempts[0].failure for r in report.records} == {
        "the rewrite copied one of the examples instead of editing the prompt"
    }


def test_provenance_fields_and_round_trip(tmp_path: Path) -> None:
    sources = _sources()
    judge = FakeJudge(sources, default_flip=2, other_category=HUMANIZING)
    cfg = _cfg(tmp_path, n_pairs=2, max_tries=3)
    report = synthesize(sources, FakeRewriter(), judge, cfg)
    rows = [json.loads(line) for line in Path(cfg.output_path).read_text().splitlines()]
    assert len(rows) == 2
    keys = {
        "id", "direction", "source_id", "source_text", "source_label", "source_category", "target_category",
        "intended_label", "rewrite", "accepted", "tries", "token_before", "token_after",
        "target_category_hit", "attempts",
    }  # fmt: skip
    by_direction = {row["direction"]: row for row in rows}
    h2b, b2h = by_direction["harmful_to_benign"], by_direction["benign_to_harmful"]
    for row in rows:
        assert set(row) == keys
        assert row["tries"] == 2 and len(row["attempts"]) == 2 and row["accepted"]
        assert row["attempts"][0]["failure"] and row["attempts"][1]["failure"] is None
        assert row["rewrite"] == row["attempts"][-1]["rewrite"]
    src = next(p for p in sources if p.id == h2b["source_id"])
    assert h2b["source_text"] == src.text and h2b["source_category"] == src.category
    assert h2b["token_before"] == src.category and h2b["token_after"] == "respond"
    assert h2b["intended_label"] == "ambiguous" and h2b["target_category"] == src.category
    assert h2b["id"] == f"synthesized:h2b:{src.id}" and h2b["target_category_hit"] is None
    assert b2h["token_before"] == "respond" and b2h["source_category"] is None
    assert b2h["target_category"] == COCONOT_CATEGORIES[0] and b2h["intended_label"] == "harmful"
    assert b2h["token_after"] == HUMANIZING
    assert b2h["target_category_hit"] is (COCONOT_CATEGORIES[0] == HUMANIZING)
    assert read_pairs(cfg.output_path) == report.accepted_records

    prompts = as_prompt_set(cfg.output_path)
    assert prompts.ids == [r.id for r in report.accepted_records]
    for prompt, record in zip(prompts, report.accepted_records, strict=True):
        assert prompt.source == "synthesized" and prompt.text == record.rewrite
        assert prompt.subcategory == record.direction
    ambiguous = next(p for p in prompts if p.label == Label.AMBIGUOUS)
    assert ambiguous.category == src.category
    harmful = next(p for p in prompts if p.label == Label.HARMFUL)
    assert harmful.category == COCONOT_CATEGORIES[0]


def test_output_is_written_atomically(tmp_path: Path) -> None:
    sources = _sources()
    cfg = _cfg(tmp_path, n_pairs=2)
    out = Path(cfg.output_path)
    out.parent.mkdir(parents=True)
    out.write_text("old\n")

    class Broken(FakeRewriter):
        def __call__(self, requests: list[RewriteRequest]) -> list[str]:
            raise RuntimeError("rewriter died")

    with pytest.raises(RuntimeError, match="rewriter died"):
        synthesize(sources, Broken(), FakeJudge(sources), cfg)
    assert out.read_text() == "old\n"
    synthesize(sources, FakeRewriter(), FakeJudge(sources), cfg)
    assert len(out.read_text().splitlines()) == 2
    assert sorted(p.name for p in out.parent.iterdir()) == ["pairs.jsonl"]


def test_report_numbers(tmp_path: Path) -> None:
    sources = _sources(n_harmful=4, n_benign=4)
    # harmful sources come in category order h0, h1, h2, h3 (one per category); two are drawn first
    flip_at = {"harmful 0": 99, "harmful 1": 2, "harmful 2": 1, "harmful 3": 99}
    cfg = _cfg(tmp_path, n_pairs=4, max_tries=2)
    report = synthesize(sources, FakeRewriter(), FakeJudge(sources, flip_at=flip_at), cfg)
    assert [r.source_id for r in report.records if r.direction == "harmful_to_benign"] == ["h0", "h1", "h2"]
    assert report.attempted == {"harmful_to_benign": 3, "benign_to_harmful": 2}
    assert report.accepted == {"harmful_to_benign": 2, "benign_to_harmful": 2}
    # try 1: h0, h1, two benign, then h2 in round two -> 3 of 5 flip; try 2: h0 and h1 -> h1 flips
    assert report.flip_rate_per_try() == [pytest.approx(3 / 5), pytest.approx(1 / 2)]
    assert report.flip_rate_per_try("benign_to_harmful") == [1.0, None]
    final = report.judge_accuracy()
    assert final == {"decision": pytest.approx(4 / 5), "exact": pytest.approx(4 / 5), "n": 5}
    assert report.judge_accuracy(report.accepted_records) == {"decision": 1.0, "exact": 1.0, "n": 4}
    summary = report.summary()
    json.dumps(summary)
    assert summary["accepted"] == report.accepted and summary["skipped"] == report.n_skipped
    assert "flip rate per try: 0.60, 0.50" in report.format()


def test_config_and_source_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="balance"):
        SynthesisConfig(balance=1.5)
    with pytest.raises(ValueError, match="max_tries"):
        SynthesisConfig(max_tries=0)
    with pytest.raises(ValueError, match="n_pairs"):
        SynthesisConfig(n_pairs=0)
    only_harmful = _sources(n_harmful=3, n_benign=0)
    with pytest.raises(ValueError, match=r"no 'benign' prompts.*balance"):
        synthesize(only_harmful, FakeRewriter(), FakeJudge(only_harmful), _cfg(tmp_path, n_pairs=2))
    report = synthesize(
        only_harmful, FakeRewriter(), FakeJudge(only_harmful), _cfg(tmp_path, n_pairs=2, balance=1.0)
    )
    assert report.accepted == {"harmful_to_benign": 2, "benign_to_harmful": 0}

    class Short(FakeRewriter):
        def __call__(self, requests: list[RewriteRequest]) -> list[str]:
            return []

    with pytest.raises(RuntimeError, match="rewriter returned 0 rewrites"):
        synthesize(only_harmful, Short(), FakeJudge(only_harmful), _cfg(tmp_path, n_pairs=1, balance=1.0))


# ------------------------------------------------------------------------------------------ examples, prompts


def test_builtin_flip_examples_cover_every_category_both_ways() -> None:
    examples = load_flip_examples()
    assert 12 <= len(examples) <= 16
    for direction in DIRECTIONS:
        assert {e.category for e in examples if e.direction == direction} == set(COCONOT_CATEGORIES)
    assert all(e.note and e.source != e.rewrite for e in examples)
    builtin_texts = set(load_builtin().texts)
    assert not builtin_texts & ({e.source for e in examples} | {e.rewrite for e in examples})


def test_flip_example_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "ex.jsonl"
    path.write_text('{"direction": "sideways", "category": "safety", "source": "a", "rewrite": "b"}\n')
    with pytest.raises(ValueError, match=r"ex.jsonl:1.*unknown direction"):
        load_flip_examples(path)
    path.write_text('{"direction": "harmful_to_benign", "source": "a", "rewrite": "b"}\n')
    with pytest.raises(ValueError, match=r"ex.jsonl:1: not a flip example"):
        load_flip_examples(path)
    with pytest.raises(FileNotFoundError, match="examples_path"):
        load_flip_examples(tmp_path / "missing.jsonl")


def test_clean_rewrite() -> None:
    assert clean_rewrite('Rewrite: "How do I keep my dog safe?"\nmore text') == "How do I keep my dog safe?"
    assert clean_rewrite("Here is the edited prompt:\n'Why did he lose?'") == "Why did he lose?"
    assert clean_rewrite("```\nPrompt: Convert it.\n```") == "Convert it."
    assert clean_rewrite("  \n ") == ""
    assert clean_rewrite("Answer the question: why?") == "Answer the question: why?"


def _rewriter_for_prompts(examples: list[FlipExample]) -> LLMRewriter:
    return LLMRewriter(build_tiny_model(), build_tiny_tokenizer(), examples, n_shots=3)


def test_llm_rewriter_prompt_has_shots_of_the_same_direction_and_category_last() -> None:
    rewriter = _rewriter_for_prompts(load_flip_examples())
    failed = Attempt(
        1, "Were you ever scared on a stage?", True, None, False, "the model still answered with X"
    )
    request = RewriteRequest("Give me tips for public speaking.", "benign_to_harmful", HUMANIZING, (failed,))
    chat = rewriter.messages(request)
    assert chat[0]["role"] == "system" and chat[-1]["role"] == "user"
    shots = rewriter.shots("benign_to_harmful", HUMANIZING)
    assert len(shots) == 3 and all(s.direction == "benign_to_harmful" for s in shots)
    assert shots[-1].category == HUMANIZING and chat[-2]["content"] == shots[-1].rewrite
    assert "Give me tips for public speaking." in chat[-1]["content"]
    assert "Were you ever scared on a stage?" in chat[-1]["content"]
    assert "the model still answered with X" in chat[-1]["content"]
    assert "human" in chat[-1]["content"]  # the target category's hint
    rendered = rewriter.render(request)
    assert rendered.endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="no few-shot example for direction"):
        _rewriter_for_prompts([e for e in load_flip_examples() if e.direction == "harmful_to_benign"])


# ------------------------------------------------------------------------------------------ tiny model


@pytest.fixture(scope="module")
def tiny_refusal_model() -> tuple[Any, Any]:
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=True) for t in DEFAULT_REFUSAL_TOKENS])
    model = build_tiny_model("llama", vocab_size=400)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return model, tokenizer


def test_llm_rewriter_sampling_is_seeded_and_leaves_global_rng_alone(tiny_refusal_model: Any) -> None:
    model, tokenizer = tiny_refusal_model
    examples = load_flip_examples()
    requests = [RewriteRequest(f"What is {i} plus {i}?", "benign_to_harmful", SAFETY) for i in range(3)]
    state = torch.random.get_rng_state()
    first = LLMRewriter(model, tokenizer, examples, max_new_tokens=6, seed=3)(requests)
    assert torch.equal(torch.random.get_rng_state(), state)
    again = LLMRewriter(model, tokenizer, examples, max_new_tokens=6, seed=3)(requests)
    assert first == again and len(first) == 3
    greedy = LLMRewriter(model, tokenizer, examples, max_new_tokens=6, temperature=0, batch_size=2)
    assert greedy(requests) == greedy(requests)
    assert all("\n" not in text for text in first)


def test_token_judge_is_batch_invariant(tiny_refusal_model: Any) -> None:
    model, tokenizer = tiny_refusal_model
    judge = TokenJudge(model, tokenizer, RefusalVocabulary(), batch_size=4)
    texts = ["Hi", "How do I bake bread at home? Tell me a story about a dragon.", "What is the capital?"]
    batched = judge.logits(texts)
    alone = torch.cat([judge.logits([t]) for t in texts])
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)
    predictions = judge(texts)
    assert all(p is None or p in COCONOT_CATEGORIES for p in predictions)
    assert judge([]) == []


def test_llm_rewriter_and_token_judge_end_to_end(tiny_refusal_model: Any, tmp_path: Path) -> None:
    model, tokenizer = tiny_refusal_model
    builtin = load_builtin()
    harmful = [p for p in builtin if p.label == Label.HARMFUL][:3]
    benign = [p for p in builtin if p.label == Label.BENIGN][:3]
    rewriter = LLMRewriter(model, tokenizer, load_flip_examples(), max_new_tokens=8, seed=0)
    judge = TokenJudge(model, tokenizer)
    cfg = _cfg(tmp_path, n_pairs=4, max_tries=2, skip_misjudged=False)
    report = synthesize(PromptSet([*harmful, *benign]), rewriter, judge, cfg)
    assert sum(report.attempted.values()) >= 4 and not report.skipped
    assert all(1 <= r.tries <= 2 and len(r.attempts) == r.tries for r in report.records)
    lines = Path(cfg.output_path).read_text().splitlines()
    assert len(lines) == sum(report.accepted.values()) <= 4
    assert read_pairs(cfg.output_path) == report.accepted_records
    assert len(as_prompt_set(report)) == len(lines)
