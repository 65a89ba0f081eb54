"""Respond-bias calibration: bias 0 is the greedy report, a bias moves the boundary, limits are honoured."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tokenizers import AddedToken

from sae_refusal.categories import DEFAULT_REFUSAL_TOKENS, INCOMPLETE, SAFETY
from sae_refusal.data.prompt_set import Label, Prompt, PromptSet
from sae_refusal.eval.calibration import biased_report, choose_respond_bias, refusal_logits
from sae_refusal.eval.refusal_tokens import refusal_report
from sae_refusal.llm import RefusalVocabulary
from sae_refusal.testing import build_tiny_tokenizer


@pytest.fixture(scope="module")
def resolved() -> Any:
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=True) for t in DEFAULT_REFUSAL_TOKENS])
    return RefusalVocabulary().resolve(tokenizer)


def _prompts() -> PromptSet:
    rows = [
        Prompt(id=f"h{i}", text=f"h{i}", label=Label.HARMFUL, category=SAFETY, source="c") for i in range(4)
    ]
    rows += [
        Prompt(id=f"i{i}", text=f"i{i}", label=Label.HARMFUL, category=INCOMPLETE, source="c")
        for i in range(2)
    ]
    rows += [Prompt(id=f"b{i}", text=f"b{i}", label=Label.BENIGN, source="a") for i in range(6)]
    rows += [
        Prompt(id=f"a{i}", text=f"a{i}", label=Label.AMBIGUOUS, category=SAFETY, source="x") for i in range(4)
    ]
    return PromptSet(rows)


def _logits(resolved: Any, n: int, vocab: int = 420) -> torch.Tensor:
    """Random logits whose top token is a refusal token in every row but one (a normal token there)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(n, vocab, generator=gen)
    ids = torch.tensor(resolved.token_ids)
    logits[:, ids] += 6.0 + 2.0 * torch.randn(n, len(ids), generator=gen)
    logits[3, 5] = 50.0  # "other" for one harmful prompt
    return logits


def test_bias_zero_equals_greedy_report(resolved: Any) -> None:
    prompts = _prompts()
    logits = _logits(resolved, len(prompts))
    compact = refusal_logits(logits, resolved)
    assert compact.shape == (len(prompts), len(resolved.token_ids) + 2)
    ours = biased_report(prompts, compact, resolved, 0.0)
    greedy = refusal_report(prompts, resolved.classify(logits), resolved, mode="greedy")
    assert ours.confusion == greedy.confusion
    assert ours.macro_f1_all6 == pytest.approx(greedy.macro_f1_all6)
    assert ours.false_refusal_rate == greedy.false_refusal_rate
    assert ours.over_refusal_rate == greedy.over_refusal_rate
    for mine, theirs in zip(ours.predictions, greedy.predictions, strict=True):
        assert mine["predicted"] == theirs["predicted"]
        assert mine["p_expected"] == pytest.approx(theirs["p_expected"], rel=1e-4, abs=1e-7)
        assert mine["refusal_mass"] == pytest.approx(theirs["refusal_mass"], rel=1e-4)


def test_bias_moves_the_boundary(resolved: Any) -> None:
    prompts = _prompts()
    compact = refusal_logits(_logits(resolved, len(prompts)), resolved)
    up = biased_report(prompts, compact, resolved, 100.0)
    assert up.false_refusal_rate == 0.0 and up.over_refusal_rate == 0.0 and up.harmful_refusal_rate == 0.0
    assert up.predictions[3]["predicted"] == "respond"  # the bias passed the normal token's logit (50)
    assert biased_report(prompts, compact, resolved, 2.0).predictions[3]["predicted"] == "other"
    down = biased_report(prompts, compact, resolved, -100.0)
    assert down.false_refusal_rate == 1.0 and down.over_refusal_rate == 1.0
    rates = [
        biased_report(prompts, compact, resolved, b).false_refusal_rate or 0.0 for b in (-4, -2, 0, 2, 4)
    ]
    assert rates == sorted(rates, reverse=True)  # monotone in the bias


def test_choose_respond_bias_honours_limits(resolved: Any) -> None:
    prompts = _prompts()
    compact = refusal_logits(_logits(resolved, len(prompts)), resolved)
    biases = [-100.0, -2.0, 0.0, 2.0, 100.0]
    free = choose_respond_bias(prompts, compact, resolved, biases)
    assert free.feasible and free.bias == max(free.table, key=lambda r: r["macro_f1"] or 0)["bias"]
    strict = choose_respond_bias(
        prompts, compact, resolved, biases, max_false_refusal=0.0, max_over_refusal=0.0
    )
    row = next(r for r in strict.table if r["bias"] == strict.bias)
    assert strict.feasible and row["false_refusal_rate"] == 0.0 and row["over_refusal_rate"] == 0.0
    stuck = choose_respond_bias(prompts, compact, resolved, [-100.0, -50.0], max_false_refusal=0.0)
    assert not stuck.feasible and stuck.bias == -50.0  # ties on rates -> closest to 0
    with pytest.raises(ValueError, match="biases: give at least one candidate"):
        choose_respond_bias(prompts, compact, resolved, [])
    with pytest.raises(ValueError, match=r"compact_NK: expected shape \(16, 8\)"):
        biased_report(prompts, compact[:3], resolved)
    with pytest.raises(ValueError, match="logits_NV: expected"):
        refusal_logits(torch.zeros(3), resolved)


def test_biased_report_records_its_bias(resolved: Any) -> None:
    prompts = _prompts()
    compact = refusal_logits(_logits(resolved, len(prompts)), resolved)
    report = biased_report(prompts, compact, resolved, 1.5)
    assert report.respond_bias == 1.5
    assert report.subset(["a"]).respond_bias == 1.5
    assert "+1.5" in report.to_markdown()
    assert type(report).from_json(report.to_json()).respond_bias == 1.5


def test_split_for_calibration_is_disjoint_stratified_and_stable() -> None:
    from sae_refusal.eval.calibration import split_for_calibration

    rows = [
        Prompt(id=f"x{i}", text=f"x{i}", label=Label.AMBIGUOUS, category=cat, source="contrast")
        for i, cat in enumerate([SAFETY] * 10 + [INCOMPLETE] * 6)
    ]
    prompts = _prompts() + PromptSet(rows)
    drawn, rest = split_for_calibration(prompts, "contrast", 0.5, seed=3)
    assert {p.source for p in drawn} == {"contrast"}
    assert set(drawn.ids).isdisjoint(rest.ids) and len(drawn) + len(rest) == len(prompts)
    categories = [p.category for p in drawn]
    assert categories.count(SAFETY) == 5 and categories.count(INCOMPLETE) == 3
    assert rest.ids == [p.id for p in prompts if p.id not in set(drawn.ids)]  # order kept
    again, _ = split_for_calibration(PromptSet(list(prompts)[::-1]), "contrast", 0.5, seed=3)
    assert sorted(again.ids) == sorted(drawn.ids)  # independent of prompt order
    with pytest.raises(ValueError, match="share"):
        split_for_calibration(prompts, "contrast", 1.0)
    with pytest.raises(ValueError, match=r"'nope'.*sources"):
        split_for_calibration(prompts, "nope", 0.5)
