"""Capability scoring: batching-invariant log-likelihoods, task formats and metrics, and steering in the path.

The key tests steer a tiny random model through ``around`` (a random residual vector at alpha 50) and check
that every score moves, that alpha 0 changes nothing, and that a per-item plan steers only its item.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel

import sae_refusal.eval.capability as cap
from sae_refusal.data.capability import GSM8KItem, MCItem, TruthfulQAItem
from sae_refusal.eval.capability import (
    ItemScore,
    accuracy,
    continuation_logprobs,
    gsm8k,
    gsm8k_prompt,
    mc1,
    mc2,
    mean_of,
    mmlu,
    mmlu_prompt,
    next_token_kl,
    perplexity,
    reference_answers,
    truthfulqa_mc,
)
from sae_refusal.llm.batched import Generation
from sae_refusal.steer.interventions import Intervention, ResidualSteering
from sae_refusal.testing import build_tiny_model, build_tiny_tokenizer

LAYER = 2
ALPHA = 50.0

Around = Callable[[list[int]], AbstractContextManager[Any]]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer: Any) -> PreTrainedModel:
    return build_tiny_model("llama", vocab_size=len(tokenizer), num_layers=4, hidden_size=32)


@pytest.fixture(scope="module")
def vector() -> torch.Tensor:
    return torch.randn(32, generator=torch.Generator().manual_seed(0))


def steer(model: PreTrainedModel, vector: torch.Tensor, alpha: float = ALPHA, **kwargs: Any) -> Around:
    """The same residual steering on every row of every batch."""
    return lambda idx: Intervention(model, {LAYER: ResidualSteering(vector, alpha, **kwargs)})


def steer_item0(model: PreTrainedModel, vector: torch.Tensor) -> Around:
    """Per-row steering: only the rows of item 0 get alpha; the rest get 0 (the identity)."""

    def around(idx: list[int]) -> AbstractContextManager[Any]:
        alphas = torch.tensor([ALPHA if i == 0 else 0.0 for i in idx])
        return Intervention(model, {LAYER: ResidualSteering(vector, alphas)})

    return around


MMLU_ITEMS = [
    MCItem("m0", "What is the capital of France?", ["Paris", "Rome", "Oslo", "Bern"], 0, "geography"),
    MCItem("m1", "Bake bread?", ["yes", "no", "maybe", "never"], 1, "cooking"),
    MCItem("m2", "Is the sea blue?", ["a", "b", "c", "d"], 3, "geography"),
]
MMLU_DEV = [
    MCItem("d0", "Gravity pulls?", ["down", "up", "left", "right"], 0, "geography"),
    MCItem("d1", "Water is?", ["dry", "wet", "hot", "cold"], 1, "geography"),
    MCItem("d2", "Flour is for?", ["bread", "cars", "sea", "stars"], 0, "cooking"),
]
GSM_ITEMS = [
    GSM8KItem("g0", "Tom has 2 apples and buys 3. How many?", "2 + 3 = 5\n#### 5", "5"),
    GSM8KItem("g1", "A dragon has 4 eggs and loses 1. How many?", "4 - 1 = 3\n#### 3", "3"),
]
GSM_SHOTS = [GSM8KItem("s0", "What is 1 + 1?", "1 + 1 = 2\n#### 2", "2")]
TQA_ITEMS = [
    TruthfulQAItem("t0", "What is the capital of France?", "Paris", ["Lyon", "Paris"], ["Rome", "Oslo"]),
    TruthfulQAItem("t1", "Do dragons exist?", "No", ["No"], ["Yes", "In the sea"]),
]
PROMPTS = ["Tell me a story about a dragon.", "What is the water cycle?", "hi"]
RESPONSES = ["Once upon a time, a dragon.", "Water goes up and comes down.", "Hello! How can I help?"]


# ------------------------------------------------------------------------------ log-likelihood core


def _reference_logprob(model: PreTrainedModel, tokenizer: Any, context: str, continuation: str) -> float:
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0].float().log_softmax(-1)
    return float(sum(logprobs[len(ctx) + k - 1, t] for k, t in enumerate(cont)))


def test_continuation_logprobs_match_unbatched(model: PreTrainedModel, tokenizer: Any) -> None:
    contexts = ["hi", "Please explain photosynthesis and the water cycle.", "Answer:", "What is the capital?"]
    continuations = [" there", " B", " Paris, of course. It is big.", " the sea"]
    scored = continuation_logprobs(model, tokenizer, contexts, continuations, batch_size=3, max_length=256)
    for (logprob, n), ctx, cont in zip(scored, contexts, continuations, strict=True):
        assert n == len(tokenizer(cont, add_special_tokens=False)["input_ids"])
        assert logprob == pytest.approx(_reference_logprob(model, tokenizer, ctx, cont), abs=1e-4)
    alone = [
        continuation_logprobs(model, tokenizer, [c], [k], batch_size=1)[0]
        for c, k in zip(contexts, continuations, strict=True)
    ]
    assert [lp for lp, _ in scored] == pytest.approx([lp for lp, _ in alone], abs=1e-4)


def test_continuation_logprobs_truncates_context_from_the_left(
    model: PreTrainedModel, tokenizer: Any
) -> None:
    context, continuation = "Please explain photosynthesis and the water cycle.", " Paris"
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    max_length = len(cont) + 4
    ((logprob, n),) = continuation_logprobs(
        model, tokenizer, [context], [continuation], batch_size=1, max_length=max_length
    )
    kept = tokenizer.decode(ctx[-4:])
    assert n == len(cont)
    assert logprob == pytest.approx(_reference_logprob(model, tokenizer, kept, continuation), abs=1e-4)
    with pytest.raises(ValueError, match="max_length"):
        continuation_logprobs(model, tokenizer, [context], [continuation], batch_size=1, max_length=len(cont))
    with pytest.raises(ValueError, match="continuations"):
        continuation_logprobs(model, tokenizer, [context], [], batch_size=1)


def test_around_gets_item_indices_per_row(model: PreTrainedModel, tokenizer: Any) -> None:
    calls: list[list[int]] = []

    def around(idx: list[int]) -> AbstractContextManager[Any]:
        calls.append(list(idx))
        return nullcontext()

    row_items = [0, 0, 1, 1, 1, 2]
    contexts = ["a", "bb", "ccc", "dddd", "eeeee", "f"]
    continuations = [" x", " y", " z", " x", " y", " z"]
    continuation_logprobs(
        model, tokenizer, contexts, continuations, row_items=row_items, batch_size=4, around=around
    )
    assert all(len(c) <= 4 for c in calls)
    assert sorted(i for c in calls for i in c) == row_items


# -------------------------------------------------------------------------------------- metrics


def test_mc1_mc2_and_aggregates_on_hand_made_numbers() -> None:
    assert mc1(-1.0, [-2.0, -3.0]) == 1.0
    assert mc1(-2.0, [-1.0, -3.0]) == 0.0
    assert mc1(-2.0, [-2.0]) == 0.0  # a tie is not a win
    assert mc2(
        [torch.log(torch.tensor(0.2)).item(), torch.log(torch.tensor(0.3)).item()], [-0.6931471805599453]
    ) == pytest.approx(0.5)
    assert mc2([-1000.0], [-1001.0]) == pytest.approx(1 / (1 + torch.e**-1))  # no underflow
    with pytest.raises(ValueError, match="incorrect_logprobs"):
        mc1(0.0, [])
    scores = [
        ItemScore("a", 1.0, {"n_tokens": 1, "mc2": 0.2}),
        ItemScore("b", 3.0, {"n_tokens": 3, "mc2": 0.4}),
    ]
    assert accuracy(scores) == 2.0
    assert mean_of(scores, "mc2") == pytest.approx(0.3)
    assert perplexity(scores) == pytest.approx(torch.e ** ((1.0 + 9.0) / 4))  # token-weighted
    assert torch.isnan(torch.tensor(perplexity([])))


# ------------------------------------------------------------------------------------------ MMLU


def test_mmlu_prompt_format() -> None:
    item = MCItem("x", " What is 2+2? ", ["3", "4", "5", "6"], 1, "elementary_mathematics")
    shot = MCItem("y", "What is 1+1?", ["2", "3", "4", "5"], 0, "elementary_mathematics")
    assert mmlu_prompt(item, [shot]) == (
        "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
        "What is 1+1?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer: A\n\n"
        "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"
    )


def test_mmlu_scores_letters_with_subject_shots(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    fake = [-3.0, -1.0, -2.0, -4.0, -2.0, -0.2, -3.0, -4.0]  # both pick B: wrong for item 0, right for 1

    def fake_logprobs(
        model: Any, tokenizer: Any, contexts: list[str], continuations: list[str], **kw: Any
    ) -> Any:
        seen.update(contexts=contexts, continuations=continuations, **kw)
        return [(lp, 1) for lp in fake]

    monkeypatch.setattr(cap, "continuation_logprobs", fake_logprobs)
    scores = mmlu(None, None, MMLU_ITEMS[:2], MMLU_DEV, k_shot=1, batch_size=2, around=None)  # type: ignore[arg-type]
    assert seen["continuations"] == [" A", " B", " C", " D"] * 2
    assert seen["row_items"] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert seen["contexts"][0] == mmlu_prompt(MMLU_ITEMS[0], MMLU_DEV[:1])
    assert seen["contexts"][4] == mmlu_prompt(MMLU_ITEMS[1], MMLU_DEV[2:3])  # shots of its own subject
    assert [s.extra["pred"] for s in scores] == [1, 1]
    assert [s.value for s in scores] == [0.0, 1.0]
    assert scores[1].extra["logprobs"] == fake[4:8]
    with pytest.raises(ValueError, match="k_shot"):
        mmlu(None, None, MMLU_ITEMS[:2], MMLU_DEV, k_shot=2, batch_size=2)  # cooking has 1  # type: ignore[arg-type]


def test_mmlu_logprobs_are_the_letter_continuations(model: PreTrainedModel, tokenizer: Any) -> None:
    scores = mmlu(model, tokenizer, MMLU_ITEMS, MMLU_DEV, k_shot=1, batch_size=5, progress=True)
    prompt = mmlu_prompt(MMLU_ITEMS[2], MMLU_DEV[:1])
    direct = continuation_logprobs(model, tokenizer, [prompt] * 4, [" A", " B", " C", " D"], batch_size=4)
    assert scores[2].extra["logprobs"] == pytest.approx([lp for lp, _ in direct], abs=1e-4)
    assert scores[2].value == float(scores[2].extra["pred"] == 3)


# ----------------------------------------------------------------------------------------- GSM8K


def test_gsm8k_prompt_cut_and_exact_match(monkeypatch: pytest.MonkeyPatch, tokenizer: Any) -> None:
    assert gsm8k_prompt(GSM_ITEMS[0], GSM_SHOTS) == (
        "Question: What is 1 + 1?\nAnswer: 1 + 1 = 2\n#### 2\n\n"
        "Question: Tom has 2 apples and buys 3. How many?\nAnswer:"
    )
    texts = [" 2 + 3 = 5.\n#### 5\n\nQuestion: What is 9? #### 9", " I think 7.\nQuestion: 3"]

    def fake_generate(model: Any, input_ids: list[list[int]], **kw: Any) -> list[Generation]:
        return [Generation(tokenizer.encode(t), None) for t in texts[: len(input_ids)]]

    monkeypatch.setattr(cap, "generate", fake_generate)
    monkeypatch.setattr(cap, "stop_token_ids", lambda *a: [])
    model = build_tiny_model("llama", vocab_size=len(tokenizer), num_layers=1, hidden_size=32)
    scores = gsm8k(model, tokenizer, GSM_ITEMS, GSM_SHOTS, k_shot=1, max_new_tokens=4, batch_size=2)
    assert [s.extra["output"] for s in scores] == [" 2 + 3 = 5.\n#### 5", " I think 7.\n"]
    assert [s.extra["pred"] for s in scores] == ["5", "7"]
    assert [s.value for s in scores] == [1.0, 0.0]
    with pytest.raises(ValueError, match="k_shot"):
        gsm8k(model, tokenizer, GSM_ITEMS, GSM_SHOTS, k_shot=2, batch_size=2)


# ------------------------------------------------------------------------------------- TruthfulQA


def test_truthfulqa_mc_sets_and_best_index(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    # t0: correct Lyon, Paris(best); incorrect Rome, Oslo. t1: correct No(best); incorrect Yes, In the sea.
    fake = [-1.0, -3.0, -2.0, -4.0, -1.0, -2.0, -0.5]

    def fake_logprobs(
        model: Any, tokenizer: Any, contexts: list[str], continuations: list[str], **kw: Any
    ) -> Any:
        seen.update(contexts=contexts, continuations=continuations, **kw)
        return [(lp, 1) for lp in fake]

    monkeypatch.setattr(cap, "continuation_logprobs", fake_logprobs)
    s0, s1 = truthfulqa_mc(None, None, TQA_ITEMS, batch_size=4)  # type: ignore[arg-type]
    assert seen["contexts"][0] == "Q: What is the capital of France?\nA:"
    assert seen["continuations"][:4] == [" Lyon", " Paris", " Rome", " Oslo"]
    assert seen["row_items"] == [0, 0, 0, 0, 1, 1, 1]
    assert s0.value == 0.0 and s0.extra["best_logprob"] == -3.0  # Paris (-3) loses to Rome (-2)
    assert s1.value == 0.0  # No (-1) loses to In the sea (-0.5)
    e = torch.tensor
    expected = float(e([-1.0, -3.0]).logsumexp(0).exp() / e([-1.0, -3.0, -2.0, -4.0]).logsumexp(0).exp())
    assert s0.extra["mc2"] == pytest.approx(expected)


def test_truthfulqa_mc2_in_unit_interval(model: PreTrainedModel, tokenizer: Any) -> None:
    scores = truthfulqa_mc(model, tokenizer, TQA_ITEMS, batch_size=3)
    assert all(0.0 <= s.extra["mc2"] <= 1.0 and s.value in (0.0, 1.0) for s in scores)
    assert all(s.extra["mc1"] == s.value for s in scores)


# --------------------------------------------------------------------------------- KL and reference


def test_kl_zero_without_steering_or_at_alpha_zero(
    model: PreTrainedModel, tokenizer: Any, vector: torch.Tensor
) -> None:
    for around in (None, steer(model, vector, alpha=0.0)):
        assert [s.value for s in next_token_kl(model, tokenizer, PROMPTS, batch_size=2, around=around)] == [
            0.0
        ] * 3
        ref = reference_answers(model, tokenizer, PROMPTS, RESPONSES, batch_size=2, around=around)
        assert [s.extra["kl"] for s in ref] == [0.0] * 3
    steered = next_token_kl(model, tokenizer, PROMPTS, batch_size=2, around=steer(model, vector))
    assert all(s.value > 1e-3 for s in steered)
    ref = reference_answers(model, tokenizer, PROMPTS, RESPONSES, batch_size=2, around=steer(model, vector))
    assert all(s.extra["kl"] > 1e-3 for s in ref)


def test_reference_nll_matches_chat_formatted_continuation(model: PreTrainedModel, tokenizer: Any) -> None:
    from sae_refusal.data.chat import format_prompts

    scores = reference_answers(model, tokenizer, PROMPTS, RESPONSES, batch_size=2, ids=["p0", "p1", "p2"])
    direct = continuation_logprobs(
        model, tokenizer, format_prompts(tokenizer, PROMPTS), RESPONSES, batch_size=1
    )
    for s, (lp, n) in zip(scores, direct, strict=True):
        assert s.extra["n_tokens"] == n
        assert s.value == pytest.approx(-lp / n, abs=1e-5)
    assert [s.id for s in scores] == ["p0", "p1", "p2"]
    assert perplexity(scores) == pytest.approx(
        float(torch.exp(torch.tensor(-sum(lp for lp, _ in direct) / sum(n for _, n in direct)))), rel=1e-5
    )


# ------------------------------------------------------------------- steering is in the path (key)


def _all_scores(model: PreTrainedModel, tokenizer: Any, around: Around | None) -> dict[str, list[Any]]:
    """One per-item number (or text) per task, with ``around`` in the path."""
    mm = mmlu(model, tokenizer, MMLU_ITEMS, MMLU_DEV, k_shot=1, batch_size=5, around=around)
    gs = gsm8k(
        model, tokenizer, GSM_ITEMS, GSM_SHOTS, k_shot=1, max_new_tokens=8, batch_size=1, around=around
    )
    tq = truthfulqa_mc(model, tokenizer, TQA_ITEMS, batch_size=3, around=around)
    ref = reference_answers(model, tokenizer, PROMPTS, RESPONSES, batch_size=2, around=around)
    kl = next_token_kl(model, tokenizer, PROMPTS, batch_size=2, around=around)
    return {
        "mmlu": [tuple(s.extra["logprobs"]) for s in mm],
        "gsm8k": [s.extra["output"] for s in gs],
        "truthfulqa": [s.extra["mc2"] for s in tq],
        "reference": [s.value for s in ref],
        "next_token_kl": [s.value for s in kl],
    }


@pytest.fixture(scope="module")
def unsteered(model: PreTrainedModel, tokenizer: Any) -> dict[str, list[Any]]:
    return _all_scores(model, tokenizer, None)


def test_every_score_moves_under_steering(
    model: PreTrainedModel, tokenizer: Any, vector: torch.Tensor, unsteered: dict[str, list[Any]]
) -> None:
    steered = _all_scores(model, tokenizer, steer(model, vector))
    for task, base in unsteered.items():
        for i, (a, b) in enumerate(zip(base, steered[task], strict=True)):
            assert a != b, f"{task} item {i} did not move under steering: {a!r}"
    assert _all_scores(model, tokenizer, steer(model, vector, alpha=0.0)) == unsteered  # alpha 0: identity


def test_generation_decode_steps_are_steered(
    model: PreTrainedModel, tokenizer: Any, vector: torch.Tensor, unsteered: dict[str, list[Any]]
) -> None:
    # Steering only generated positions leaves the prefill alone: any change comes from the decode steps.
    around = steer(model, vector, positions="generated")
    outputs = [
        s.extra["output"]
        for s in gsm8k(
            model, tokenizer, GSM_ITEMS, GSM_SHOTS, k_shot=1, max_new_tokens=8, batch_size=2, around=around
        )
    ]
    assert all(a != b for a, b in zip(outputs, unsteered["gsm8k"], strict=True))


def test_per_item_steering_moves_only_that_item(
    model: PreTrainedModel, tokenizer: Any, vector: torch.Tensor, unsteered: dict[str, list[Any]]
) -> None:
    steered = _all_scores(model, tokenizer, steer_item0(model, vector))
    for task, base in unsteered.items():
        assert steered[task][0] != base[0], f"{task}: item 0 did not move"
        assert steered[task][1:] == base[1:], f"{task}: items other than 0 moved"
