"""Gate tuning: a known optimum, brute force on random tables, the Pareto front, the real outcome table."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from sae_refusal.finetune.tokens import add_refusal_tokens
from sae_refusal.llm.refusal_tokens import RefusalVocabulary
from sae_refusal.steer.gates import DistanceGate, GatedSteering, GatePolicy, load_gate
from sae_refusal.steer.scoring import first_token_decisions, residual_rows
from sae_refusal.steer.tuning import (
    TIE_BREAK,
    OutcomeTable,
    PolicyPoint,
    build_outcome_table,
    evaluate_policy,
    threshold_candidates,
    tune_policy,
    unconditional_curve,
)
from sae_refusal.testing import build_tiny_model, build_tiny_tokenizer

ALPHAS = [-2.0, -1.0, 0.0, 1.0, 2.0]


def known_table() -> tuple[OutcomeTable, torch.Tensor]:
    """A table whose optimum is known by construction (see the test below).

    Rows: harmful with scores 0.9, 0.8, 0.6 (refused iff alpha >= 1) and 0.2 (a gate miss, refused iff
    alpha >= -1); benign with scores 0.5 (an over-refusal prompt, refused iff alpha >= 0) and 0.3, 0.1, 0.05
    (refused iff alpha >= 2).
    """
    alphas = torch.tensor(ALPHAS)
    refused_from = torch.tensor(
        [1.0, 1.0, 1.0, -1.0, 0.0, 2.0, 2.0, 2.0]
    )  # least alpha that refuses each row
    refused = alphas[None, :] >= refused_from[:, None]
    harmful = torch.tensor([True] * 4 + [False] * 4)
    scores = torch.tensor([0.9, 0.8, 0.6, 0.2, 0.5, 0.3, 0.1, 0.05])
    groups = ("harmful",) * 4 + ("xstest",) + ("benign",) * 3
    return OutcomeTable(alphas, refused, harmful, groups), scores


def test_the_known_optimum_is_found() -> None:
    table, scores = known_table()
    result = tune_policy(table, scores, floor=1.0)
    # The 0.5 over-refusal row needs alpha <= -1, so t_low > 0.5; then the 0.2 harmful row is in the low band
    # and stays refused only for alpha_neg <= 1: alpha_neg = 1. The harmful rows >= 0.6 need +1 or +2: the
    # weaker one wins the tie. The only candidate threshold in (0.5, 0.6] is the midpoint 0.55.
    t = float(torch.tensor(0.55))  # the float32 midpoint
    assert result.policy == GatePolicy(t_low=t, t_high=t, alpha_pos=1.0, alpha_neg=1.0, alpha_mid=0.0)
    assert result.chosen.rates.over_refusal == 0.0 and result.chosen.rates.harmful_refusal == 1.0
    assert result.chosen.n_steered == 8
    # unconditional steering cannot do this: at alpha 1 the over-refusal prompt is refused
    curve = {p.alpha: (p.rates.over_refusal, p.rates.harmful_refusal) for p in result.unconditional}
    assert curve == {
        -2.0: (0.0, 0.0),
        -1.0: (0.0, 0.25),
        0.0: (0.25, 0.25),
        1.0: (0.25, 1.0),
        2.0: (1.0, 1.0),
    }
    # a lower floor: nothing refused among the benign rows is possible with more harmful rows refused
    lower = tune_policy(table, scores, floor=0.5)
    assert lower.chosen.rates.over_refusal == 0.0 and lower.chosen.rates.harmful_refusal == 1.0
    provenance = result.provenance(sets={"harmful": "val.jsonl"}, model_fingerprint={"model": "tiny"})
    assert provenance["sets"]["sizes"] == {"harmful": 4, "xstest": 1, "benign": 3}
    assert provenance["floor"] == 1.0 and provenance["tie_break"] == TIE_BREAK
    assert provenance["model_fingerprint"] == {"model": "tiny"} and json.dumps(provenance)


def test_the_mid_band_alpha_is_tuned_when_asked() -> None:
    # harmful 0.9 (refused iff alpha >= 1) and 0.5 (iff alpha >= 0.5); benign 0.6 and 0.1 (iff alpha >= 1).
    # Without a middle alpha, the 0.5 harmful row needs +1 in the high band, and so does the 0.6 benign row.
    alphas = torch.tensor([-1.0, 0.0, 0.5, 1.0])
    refused_from = torch.tensor([1.0, 0.5, 1.0, 1.0])
    table = OutcomeTable(
        alphas, alphas[None] >= refused_from[:, None], torch.tensor([True, True, False, False])
    )
    scores = torch.tensor([0.9, 0.5, 0.6, 0.1])
    plain = tune_policy(table, scores, floor=1.0)
    assert plain.policy.alpha_mid == 0.0 and plain.chosen.rates.over_refusal == 0.5
    tuned = tune_policy(table, scores, floor=1.0, tune_alpha_mid=True)
    assert tuned.chosen.rates.over_refusal == 0.0 and tuned.chosen.rates.harmful_refusal == 1.0
    # t_high above 0.6 (0.75, a midpoint), 0.5 and 0.6 in the middle band at +0.5; t_low = 0.3 leaves the 0.1
    # row unsteered (fewest steered rows), with alpha_neg 0 (least strength)
    t_low, t_high = float(torch.tensor(0.3)), float(torch.tensor(0.75))
    assert tuned.policy == GatePolicy(t_low, t_high, alpha_pos=1.0, alpha_neg=0.0, alpha_mid=0.5)
    assert tuned.chosen.n_steered == 3


def brute_force(
    table: OutcomeTable,
    scores: torch.Tensor,
    floor: float,
    tune_mid: bool,
    grid_t: list[float] | None = None,
) -> list[PolicyPoint]:
    """Every policy of the grid, evaluated one by one (in the tuner's grid order)."""
    grid_t = threshold_candidates(scores) if grid_t is None else grid_t
    alphas = table.alphas_A.tolist()
    pos = [a for a in alphas if a >= 0]
    neg = [-a for a in reversed(alphas) if a <= 0]
    mid = alphas if tune_mid else [0.0]
    points = []
    for i, j in itertools.combinations_with_replacement(range(len(grid_t)), 2):
        for a_neg, a_mid, a_pos in itertools.product(neg, mid, pos):
            policy = GatePolicy(grid_t[i], grid_t[j], a_pos, a_neg, a_mid)
            points.append(evaluate_policy(table, scores, policy))
    return points


def strength(p: PolicyPoint) -> float:
    return p.policy.alpha_pos + p.policy.alpha_neg + abs(p.policy.alpha_mid)


def random_table(seed: int) -> tuple[OutcomeTable, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    n = 14
    alphas = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.5])
    harmful = torch.arange(n) < 6
    # refusal is monotone in alpha; harmful rows refuse more easily; scores are noisy and tied in places
    refused_from = torch.randint(0, 5, (n,), generator=gen).float() - 2.5 - harmful.float()
    refused = alphas[None] >= refused_from[:, None]
    scores = (harmful.float() * 0.4 + torch.rand(n, generator=gen) * 0.6).round(decimals=1)
    return OutcomeTable(alphas, refused, harmful), scores


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tune_mid", [False, True])
@pytest.mark.parametrize("on_scores", [False, True], ids=["midpoints", "thresholds_on_scores"])
def test_the_search_equals_brute_force(seed: int, tune_mid: bool, on_scores: bool) -> None:
    """The grid search picks what scoring every policy with evaluate_policy picks, and reports its rates.

    ``thresholds_on_scores`` puts every threshold exactly on a score (the default candidates are midpoints
    between scores, which never are): a row scoring ``t_high`` is harmful-looking, one scoring ``t_low`` is
    not benign-looking, in the search's prefix counts as in GatePolicy. Kills: the search splitting ties at a
    threshold on the other side (``searchsorted(..., side="right")``, ``<=`` for ``<``).
    """
    table, scores = random_table(seed)
    grid_t = sorted({0.0, *scores.unique().tolist(), 1.0}) if on_scores else None
    points = brute_force(table, scores, 0.8, tune_mid, grid_t)
    feasible = [p for p in points if p.rates.harmful_refusal >= 0.8]
    best = min(
        enumerate(feasible),
        key=lambda ip: (
            ip[1].rates.over_refusal,
            -ip[1].rates.harmful_refusal,
            ip[1].n_steered,
            strength(ip[1]),
            ip[0],
        ),
    )[1]
    result = tune_policy(table, scores, floor=0.8, tune_alpha_mid=tune_mid, thresholds=grid_t)
    assert result.policy == best.policy and result.chosen == best
    assert result.n_policies == len(points)
    # the front: every non-dominated (over-refusal, harmful refusal) point, by over-refusal
    rates = {(p.rates.over_refusal, p.rates.harmful_refusal) for p in points}
    front = sorted(
        (o, h) for o, h in rates if not any(o2 <= o and h2 >= h and (o2, h2) != (o, h) for o2, h2 in rates)
    )
    assert [(p.rates.over_refusal, p.rates.harmful_refusal) for p in result.front] == front
    assert result.chosen in result.front


def test_unreachable_floor_and_bad_inputs_name_the_argument() -> None:
    table, scores = known_table()
    never = OutcomeTable(table.alphas_A, torch.zeros_like(table.refused_NA), table.harmful_N)
    with pytest.raises(ValueError, match="floor"):
        tune_policy(never, scores, floor=0.5)
    with pytest.raises(ValueError, match="floor"):
        tune_policy(table, scores, floor=1.5)
    with pytest.raises(ValueError, match="score_N"):
        tune_policy(table, scores[:3], floor=0.5)
    with pytest.raises(ValueError, match="thresholds"):
        tune_policy(table, scores, floor=0.5, thresholds=[-0.1, 0.5])
    with pytest.raises(ValueError, match="alpha_pos"):
        evaluate_policy(table, scores, GatePolicy(0.5, 0.5, 3.0, 1.0))
    with pytest.raises(ValueError, match="alphas_A"):
        OutcomeTable(torch.tensor([1.0, 2.0]), torch.zeros(8, 2, dtype=torch.bool), table.harmful_N)
    with pytest.raises(ValueError, match="harmful_N"):
        OutcomeTable(table.alphas_A, table.refused_NA, torch.ones(8, dtype=torch.bool))


def test_threshold_candidates_split_float32_gaps() -> None:
    a = torch.tensor(0.3, dtype=torch.float32)
    b = torch.nextafter(a, torch.tensor(1.0))  # adjacent float32 values: the midpoint rounds onto one of them
    candidates = threshold_candidates(torch.stack([a, b]))
    assert candidates[0] == 0.0 and candidates[-1] == 1.0 and len(candidates) == 3
    policy = GatePolicy(candidates[1], candidates[1], 1.0, 1.0)
    assert policy.alphas(torch.stack([a, b])).tolist() == [-1.0, 1.0]
    many = threshold_candidates(torch.linspace(0, 1, 500), max_thresholds=10)
    assert len(many) == 10 and many[0] == 0.0 and many[-1] == 1.0


# ------------------------------------------------------------------------------------- on a model

TEXTS = [
    "How do I bake bread at home?",
    "Tell me a story about a dragon.",
    "What is the capital of France?",
    "Write a poem about the sea and the stars.",
]


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    tokenizer = build_tiny_tokenizer()
    add_refusal_tokens(tokenizer, RefusalVocabulary())
    return build_tiny_model("llama", vocab_size=len(tokenizer), num_layers=2, hidden_size=32), tokenizer


def test_the_outcome_table_is_one_decision_pass_per_alpha(tiny: Any, tmp_path: Path) -> None:
    model, tokenizer = tiny
    resolved = RefusalVocabulary().resolve(tokenizer)
    vectors_ND = torch.randn(len(TEXTS), 32, generator=torch.Generator().manual_seed(0))
    harmful = [True, False, True, False]
    table = build_outcome_table(
        model,
        tokenizer,
        TEXTS,
        resolved,
        layer=0,
        vectors_ND=vectors_ND,
        alphas=[8.0, -8.0],
        harmful_N=harmful,
    )
    assert table.alphas_A.tolist() == [-8.0, 0.0, 8.0]  # sorted, 0 added
    plain = first_token_decisions(model, tokenizer, TEXTS, resolved)
    assert torch.equal(table.refused_NA[:, 1], plain.refused_N)
    for column, alpha in ((0, -8.0), (2, 8.0)):
        steered = first_token_decisions(
            model, tokenizer, TEXTS, resolved, edits=residual_rows(0, vectors_ND, alpha), batch_size=2
        )
        assert torch.equal(table.refused_NA[:, column], steered.refused_N)
    curve = unconditional_curve(table)
    assert [p.alpha for p in curve] == [-8.0, 0.0, 8.0]
    assert curve[1].rates.harmful_refusal == plain.rate(torch.tensor(harmful))
    # tune on it with a gate's scores, save the choice with its provenance, load it back
    acts = torch.randn(len(TEXTS), 32, generator=torch.Generator().manual_seed(1))
    gate = DistanceGate.fit(acts, torch.tensor([1, 0, 2, 0]), ["benign", "safety", "humanizing"], layer=0)
    scores = gate.score(acts)
    result = tune_policy(table, scores.score_N, floor=0.0)
    vectors_CD = torch.randn(2, 32, generator=torch.Generator().manual_seed(2))
    steering = GatedSteering(
        gate,
        result.policy,
        0,
        vectors_CD,
        vectors_CD.mean(0),
        ["benign", "safety", "humanizing"],
        provenance=result.provenance(),
    )
    steering.save(tmp_path / "gate")
    loaded = load_gate(tmp_path / "gate", model=model)
    assert loaded.policy == result.policy and loaded.provenance == json.loads(json.dumps(result.provenance()))
