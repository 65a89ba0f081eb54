"""Gate tuning: a known optimum, brute force on random tables, the Pareto front, the real outcome table."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from sae_refusal.finetune.tokens import add_refusal_tokens
from sae_refusal.llm.refusal_tokens import RefusalVocabulary
from sae_refusal.steer import tuning
from sae_refusal.steer.gates import DistanceGate, GatedSteering, GatePolicy, load_gate
from sae_refusal.steer.scoring import first_token_decisions, residual_rows
from sae_refusal.steer.tuning import (
    TIE_BREAK,
    OutcomeTable,
    PolicyPoint,
    Rates,
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
    # the JSON forms, whole
    rates = {
        "over_refusal": 0.0,
        "harmful_refusal": 1.0,
        "benign_refused": 0,
        "harmful_refused": 4,
        "n_benign": 4,
        "n_harmful": 4,
    }
    assert result.chosen.rates == Rates(**rates)
    assert result.chosen.to_dict() == {"policy": result.policy.to_dict(), "rates": rates, "n_steered": 8}
    assert result.unconditional[3].to_dict() == {
        "alpha": 1.0,
        "rates": {**rates, "over_refusal": 0.25, "benign_refused": 1},
    }
    assert provenance == {
        "objective": "min over_refusal s.t. harmful_refusal >= floor (validation)",
        "tie_break": TIE_BREAK,
        "floor": 1.0,
        "act_on": "all",
        "do_no_harm": {"tolerance": None, "groups": {}},
        "value": rates,
        "n_steered": 8,
        "grid": {
            "thresholds": result.thresholds,
            "alphas": ALPHAS,
            "tune_alpha_mid": False,
            "n_policies": result.n_policies,
        },
        "sets": {"sizes": {"harmful": 4, "xstest": 1, "benign": 3}, "harmful": "val.jsonl"},
        "table": {},
        "model_fingerprint": {"model": "tiny"},
    }
    assert result.provenance()["sets"] == {"sizes": {"harmful": 4, "xstest": 1, "benign": 3}}
    assert result.provenance()["model_fingerprint"] is None
    assert tune_policy(table, scores, floor=1.0, vector="global").policy.vector == "global"


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
    assert math.copysign(1.0, tuned.policy.alpha_neg) == 1.0  # 0.0, not -0.0 (written to the gate's JSON)
    assert tuned.chosen.n_steered == 3


def test_the_weaker_alpha_wins_when_everything_else_ties() -> None:
    # harmful 0.9 refused iff alpha >= 1; benign 0.1 refused iff alpha >= 0: -1 and -2 both spare it, on
    # the same rows: strength decides (1 + 1 < 1 + 2). Kills: alpha_neg's magnitude taken with its sign.
    alphas = torch.tensor([-2.0, -1.0, 0.0, 1.0])
    table = OutcomeTable(
        alphas, alphas[None] >= torch.tensor([1.0, 0.0])[:, None], torch.tensor([True, False])
    )
    result = tune_policy(table, torch.tensor([0.9, 0.1]), floor=1.0)
    assert result.policy == GatePolicy(0.5, 0.5, alpha_pos=1.0, alpha_neg=1.0)
    assert (result.chosen.rates.over_refusal, result.chosen.n_steered) == (0.0, 2)


def test_more_harmful_refusals_beat_an_unsteered_policy_even_when_every_row_is_steered() -> None:
    # equal scores: the only split steers all 3 rows (t_high 0) or none. Harm 2 (all steered) must beat
    # harm 1 (none steered) at the same over-refusal: the key's "rows not steered" digit (0..N) must not
    # carry into the harm digit. Kills: a digit span of N - 1.
    alphas = torch.tensor([0.0, 1.0])
    refused = alphas[None] >= torch.tensor([1.0, 0.0, 2.0])[:, None]
    table = OutcomeTable(alphas, refused, torch.tensor([True, True, False]))
    result = tune_policy(table, torch.full((3,), 0.5), floor=0.0)
    assert result.chosen.rates.harmful_refused == 2 and result.chosen.n_steered == 3
    assert result.policy == GatePolicy(0.0, 0.0, alpha_pos=1.0, alpha_neg=0.0)


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
    check_against_brute_force(table, scores, tune_mid, grid_t)


def test_the_search_equals_brute_force_in_many_small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The grid is searched in chunks: the best of one over-refusal count found in an earlier chunk must
    lose only to a strictly better key of a later one. Kills: ``<`` for ``<=`` when merging chunks, ``and``
    for ``or`` in the key comparison, ``>=`` for ``>`` (a later equal key would win the grid-order tie)."""
    monkeypatch.setattr(tuning, "_CHUNK", 7)
    for seed in (0, 1):
        table, scores = random_table(seed)
        check_against_brute_force(table, scores, True, sorted({0.0, *scores.unique().tolist(), 1.0}))


def check_against_brute_force(
    table: OutcomeTable, scores: torch.Tensor, tune_mid: bool, grid_t: list[float] | None
) -> None:
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
    assert result.thresholds == (threshold_candidates(scores) if grid_t is None else grid_t)
    assert result.alphas == table.alphas_A.tolist() and result.tune_alpha_mid is tune_mid
    assert result.n_policies == len(points)
    # the front: every non-dominated (over-refusal, harmful refusal) point, by over-refusal
    rates = {(p.rates.over_refusal, p.rates.harmful_refusal) for p in points}
    front = sorted(
        (o, h) for o, h in rates if not any(o2 <= o and h2 >= h and (o2, h2) != (o, h) for o2, h2 in rates)
    )
    assert [(p.rates.over_refusal, p.rates.harmful_refusal) for p in result.front] == front
    assert result.chosen in result.front


def noisy_table(seed: int) -> tuple[OutcomeTable, torch.Tensor, list[str | None]]:
    """A random table with some non-monotone cells (a strong push can move a row off its refusal token), and
    three harm groups over the harmful rows."""
    table, scores = random_table(seed)
    gen = torch.Generator().manual_seed(100 + seed)
    flips = torch.rand(table.refused_NA.shape, generator=gen) < 0.12
    flips[:, table.alpha_index(0.0)] = False
    refused = table.refused_NA ^ flips
    groups: list[str | None] = [("a", "b", "c")[i % 3] if h else None for i, h in enumerate(table.harmful_N)]
    return OutcomeTable(table.alphas_A, refused, table.harmful_N), scores, groups


def brute_force_no_harm(
    table: OutcomeTable,
    scores: torch.Tensor,
    groups: list[str | None],
    tolerance: float,
    act_on: str,
    tune_mid: bool = False,
) -> list[tuple[PolicyPoint, bool]]:
    """Every policy with its rates and whether it does no harm, computed row by row without prefix sums."""
    r0 = table.refused_NA[:, table.alpha_index(0.0)]
    alphas = table.alphas_A.tolist()
    grid_t = threshold_candidates(scores)
    out = []
    for i, j in itertools.combinations_with_replacement(range(len(grid_t)), 2):
        for a_neg, a_pos in itertools.product(
            [-a for a in reversed(alphas) if a <= 0], [a for a in alphas if a >= 0]
        ):
            policy = GatePolicy(grid_t[i], grid_t[j], a_pos, a_neg, 0.0, act_on=act_on)  # type: ignore[arg-type]
            alpha_N = policy.alphas(scores, r0)
            refused = torch.stack(
                [table.refused_NA[n, alphas.index(float(a))] for n, a in enumerate(alpha_N)]
            )
            ok = True
            for name in ("a", "b", "c"):
                rows = [n for n, g in enumerate(groups) if g == name]
                ok &= float(refused[rows].float().mean()) >= float(r0[rows].float().mean()) - tolerance - 1e-9
            harmful = table.harmful_N
            rates = Rates.of(
                int(refused[~harmful].sum()), int(refused[harmful].sum()), table.n_benign, table.n_harmful
            )
            out.append((PolicyPoint(policy, rates, int((alpha_N != 0).sum())), ok))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("tolerance", [0.0, 0.34])
@pytest.mark.parametrize(
    ("act_on", "tune_mid"), [("all", False), ("disagreement", False), ("disagreement", True)]
)
def test_do_no_harm_and_disagreement_equal_brute_force(
    seed: int, tolerance: float, act_on: str, tune_mid: bool
) -> None:
    """Per-group non-inferiority and the disagreement rule, searched with prefix sums, against every policy
    scored one by one. Kills: a group held to the pooled rate, the tolerance's sign, a disagreement policy
    that steers refused rows up (or counts them as steered), infeasible policies on the front."""
    table, scores, groups = noisy_table(seed)
    floor = 0.3
    points = brute_force_no_harm(table, scores, groups, tolerance, act_on, tune_mid)
    feasible = [p for p, ok in points if ok and p.rates.harmful_refusal >= floor]
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
    result = tune_policy(
        table,
        scores,
        floor=floor,
        act_on=act_on,
        harm_groups=groups,
        tolerance=tolerance,  # type: ignore[arg-type]
    )
    assert result.policy == best.policy and result.chosen == best
    assert result.harm_groups == {"a": 2, "b": 2, "c": 2} and result.tolerance == tolerance
    rates = {(p.rates.over_refusal, p.rates.harmful_refusal) for p, ok in points if ok}
    front = sorted(
        (o, h) for o, h in rates if not any(o2 <= o and h2 >= h and (o2, h2) != (o, h) for o2, h2 in rates)
    )
    assert [(p.rates.over_refusal, p.rates.harmful_refusal) for p in result.front] == front
    # the chosen policy's own per-group rates hold the constraint
    per_group = tuning.harm_group_rates(table, tuning.policy_columns(table, scores, result.policy), groups)
    assert all(r["policy"] >= r["unsteered"] - tolerance - 1e-9 for r in per_group.values())


def test_do_no_harm_binds_where_the_pooled_floor_does_not() -> None:
    """Two harm groups: steering everything down except one group's rows wins pooled harmful refusal but
    loses the other group's refusal; do no harm forbids it. Kills: groups ignored."""
    alphas = torch.tensor([-1.0, 0.0, 1.0])
    # rows: harmful a (refused unsteered, lost at -1), harmful b x2 (answered unsteered, refused at +1),
    # benign (refused unsteered, answered at -1)
    refused = torch.tensor([[0, 1, 1], [0, 0, 1], [0, 0, 1], [0, 1, 1]]).bool()
    harmful = torch.tensor([True, True, True, False])
    table = OutcomeTable(alphas, refused, harmful)
    scores = torch.tensor([0.2, 0.9, 0.9, 0.2])  # the gate calls harmful row a benign
    free = tune_policy(table, scores, floor=0.6)
    assert free.chosen.rates.over_refusal == 0.0  # a's refusal is given up
    held = tune_policy(table, scores, floor=0.6, harm_groups=["a", "b", "b", None], tolerance=0.0)
    assert held.chosen.rates.over_refusal == 1.0 and held.chosen.rates.harmful_refusal == 1.0
    with pytest.raises(ValueError, match="harm_groups: group 'x' holds rows that are not harmful"):
        tune_policy(table, scores, floor=0.6, harm_groups=["a", "b", "b", "x"])
    with pytest.raises(ValueError, match="harm_groups: expected one group name"):
        tune_policy(table, scores, floor=0.6, harm_groups=["a"])
    with pytest.raises(ValueError, match="tolerance"):
        tune_policy(table, scores, floor=0.6, harm_groups=["a", "b", "b", None], tolerance=-0.1)
    # a refused only unsteered (a strong push moves it off its token), b refused only at +1, one score for
    # all: the floor needs +1, which loses a
    lost = OutcomeTable(alphas, torch.tensor([[0, 1, 0], [0, 0, 1], [0, 0, 1], [0, 0, 0]]).bool(), harmful)
    same = torch.full((4,), 0.5)
    assert tune_policy(lost, same, floor=0.6).chosen.rates.harmful_refusal == 2 / 3
    with pytest.raises(ValueError, match=r"floor: .*without losing more than the tolerance"):
        tune_policy(lost, same, floor=0.6, harm_groups=["a", "b", "b", None], tolerance=0.0)


def test_the_front_spans_every_over_refusal_count_from_no_harmful_refusal() -> None:
    # one harmful and one benign row the gate cannot tell apart, both refused only at alpha 1: the front is
    # (0 over-refusal, 0 harmful) and (all benign, all harmful). Kills: a front that starts above 1 harmful
    # row or stops before the last over-refusal count.
    alphas = torch.tensor([0.0, 1.0])
    table = OutcomeTable(alphas, alphas[None].expand(2, 2) >= 1.0, torch.tensor([True, False]))
    result = tune_policy(table, torch.tensor([0.5, 0.5]), floor=0.0)
    assert [(p.rates.over_refusal, p.rates.harmful_refusal) for p in result.front] == [(0.0, 0.0), (1.0, 1.0)]


def test_unreachable_floor_and_bad_inputs_name_the_argument() -> None:
    table, scores = known_table()
    never = OutcomeTable(table.alphas_A, torch.zeros_like(table.refused_NA), table.harmful_N)
    with pytest.raises(ValueError, match="floor"):
        tune_policy(never, scores, floor=0.5)
    half = table.refused_NA.clone()
    half[:2] = False  # two of the four harmful rows are never refused
    with pytest.raises(ValueError, match=r"^floor: no policy .* >= 0.9 of the 4 .* the best refuses 0.5000$"):
        tune_policy(OutcomeTable(table.alphas_A, half, table.harmful_N), scores, floor=0.9)
    for floor in (1.5, True):
        with pytest.raises(ValueError, match=r"^floor: expected a share in \[0, 1\]"):
            tune_policy(table, scores, floor=floor)
    with pytest.raises(ValueError, match=r"^score_N: expected 8 finite scores"):
        tune_policy(table, scores[:3], floor=0.5)
    for thresholds in ([-0.1, 0.5], [0.2, 0.5, 1.5], []):
        with pytest.raises(ValueError, match=r"^thresholds: expected values in \[0, 1\]"):
            tune_policy(table, scores, floor=0.5, thresholds=thresholds)
    assert len(tune_policy(table, scores, floor=0.5, max_thresholds=3).thresholds) == 3
    with pytest.raises(ValueError, match=r"^alpha_pos: 3.0 is not in"):
        evaluate_policy(table, scores, GatePolicy(0.5, 0.5, 3.0, 1.0))
    with pytest.raises(ValueError, match=r"^alpha_neg: -3.0 is not in"):
        evaluate_policy(table, scores, GatePolicy(0.5, 0.5, 1.0, 3.0))
    with pytest.raises(ValueError, match=r"^alpha_mid: 0.5 is not in"):
        evaluate_policy(table, scores, GatePolicy(0.4, 0.6, 1.0, 1.0, alpha_mid=0.5))
    with pytest.raises(ValueError, match="alphas_A"):
        OutcomeTable(torch.tensor([1.0, 2.0]), torch.zeros(8, 2, dtype=torch.bool), table.harmful_N)
    with pytest.raises(ValueError, match="harmful_N"):
        OutcomeTable(table.alphas_A, table.refused_NA, torch.ones(8, dtype=torch.bool))


def test_the_outcome_table_takes_lists_and_names_each_bad_field() -> None:
    table = OutcomeTable([0.0, 1.0], [[False, True], [False, False], [True, True]], [True, False, True])
    assert table.alphas_A.dtype == torch.float64 and table.refused_NA.dtype == torch.bool
    assert table.harmful_N.tolist() == [True, False, True] and (table.n_harmful, table.n_benign) == (2, 1)
    assert table.groups == ("harmful", "benign", "harmful")
    assert table.group_sizes() == {"harmful": 2, "benign": 1}
    assert OutcomeTable([0.0], [[False], [True]], [True, False]).alphas_A.tolist() == [0.0]  # one alpha
    ok_refused, harmful = torch.zeros(2, 3, dtype=torch.bool), torch.tensor([True, False])
    for alphas, message in (
        (torch.zeros(1, 3), r"^alphas_A: expected finite \(A,\) alphas, got shape \(1, 3\)"),
        (torch.tensor([]), r"^alphas_A: expected finite \(A,\) alphas, got shape \(0,\)"),
        (torch.tensor([0.0, 1.0, math.inf]), r"^alphas_A: expected finite"),
        (torch.tensor([0.0, 0.0, 1.0]), r"^alphas_A: must be strictly increasing$"),
        (torch.tensor([0.0, 2.0, 1.0]), r"^alphas_A: must be strictly increasing$"),
        (torch.tensor([0.0, 0.0]), r"^alphas_A: must be strictly increasing$"),
        (torch.tensor([1.0, 2.0, 3.0]), r"^alphas_A: must include 0 \(unsteered rows\)$"),
    ):
        with pytest.raises(ValueError, match=message):
            OutcomeTable(alphas, ok_refused, harmful)
    alphas = torch.tensor([-1.0, 0.0, 1.0])
    for refused in (torch.zeros(3, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"^refused_NA: expected \(N, 3\), got shape"):
            OutcomeTable(alphas, refused, harmful)
    with pytest.raises(ValueError, match=r"^harmful_N: expected \(2,\), got \(3,\)"):
        OutcomeTable(alphas, ok_refused, torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match=r"^harmful_N: the table needs harmful and benign"):
        OutcomeTable(alphas, ok_refused, torch.tensor([True, True]))
    with pytest.raises(ValueError, match=r"^groups: expected 2 set names, got 1"):
        OutcomeTable(alphas, ok_refused, harmful, groups=("harmful",))
    table = OutcomeTable(alphas, ok_refused, harmful)
    assert table.alpha_index(1.0 + 1e-12) == 2
    for far in (3.0, 1.0 + 1e-7, 1e-10):  # a grid value only up to rounding (1e-9 relative, 1e-12 absolute)
        with pytest.raises(ValueError, match=r"^alpha: .* is not in the table's alpha grid"):
            table.alpha_index(far)


def test_a_grid_too_large_for_the_search_key_is_refused_by_name() -> None:
    # 55 alphas with the middle band searched: 28 x 55 x 28 triples, 3 threshold pairs; 50k rows, half of
    # them harmful. (harmful + 1) x (rows + 1) x triples x policies = 7.0e18, between 2^62 and 2^63: the
    # integer key would overflow, so the search refuses the grid up front (an int64 holds up to 2^63 - 1).
    alphas = torch.arange(-27.0, 28.0)
    n = 50_000
    harmful = torch.arange(n) % 2 == 0
    table = OutcomeTable(alphas, torch.zeros(n, 55, dtype=torch.bool), harmful)
    with pytest.raises(ValueError, match=r"^thresholds: 2 thresholds x 43120 alpha triples on 50000 rows"):
        tune_policy(table, torch.rand(n), floor=0.0, thresholds=[0.0, 1.0], tune_alpha_mid=True)


def test_threshold_candidates_split_float32_gaps() -> None:
    a = torch.tensor(0.3, dtype=torch.float32)
    b = torch.nextafter(a, torch.tensor(1.0))  # adjacent float32 values: the midpoint rounds onto one of them
    candidates = threshold_candidates(torch.stack([a, b]))
    assert candidates[0] == 0.0 and candidates[-1] == 1.0 and len(candidates) == 3
    policy = GatePolicy(candidates[1], candidates[1], 1.0, 1.0)
    assert policy.alphas(torch.stack([a, b])).tolist() == [-1.0, 1.0]
    many = threshold_candidates(torch.linspace(0, 1, 500), max_thresholds=10)
    assert len(many) == 10 and many[0] == 0.0 and many[-1] == 1.0
    assert len(threshold_candidates(torch.linspace(0, 1, 500))) == 64  # the default cap
    assert threshold_candidates(torch.linspace(0, 1, 500), max_thresholds=2) == [0.0, 1.0]
    with pytest.raises(ValueError, match=r"^max_thresholds: must be >= 2, got 1"):
        threshold_candidates(torch.tensor([0.5]), max_thresholds=1)
    # scores outside [0, 1] (a distance gate's) split inside it: clamped first
    assert threshold_candidates(torch.tensor([-0.5, 0.5, 1.5])) == [0.0, 0.25, 0.75, 1.0]


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
    # the tiny model's restricted first-token reading, unbiased, changes under +-8 (the emitted token is
    # never a refusal token on random weights): the table shows whether each column was really steered
    reading = {"judge": "restricted", "respond_bias": 0.0}
    passes: list[tuple[int, int]] = []
    table = build_outcome_table(
        model,
        tokenizer,
        TEXTS,
        resolved,
        layer=0,
        vectors_ND=vectors_ND,
        alphas=[8.0, -8.0],
        harmful_N=harmful,
        groups=["harmful", "benign", "xstest", "benign"],
        progress=lambda done, total: passes.append((done, total)),
        **reading,  # type: ignore[arg-type]
    )
    assert table.alphas_A.tolist() == [-8.0, 0.0, 8.0]  # sorted, 0 added
    assert passes == [(1, 3), (2, 3), (3, 3)]
    assert table.groups == ("harmful", "benign", "xstest", "benign")
    assert table.meta == {
        "layer": 0,
        "positions": "all",
        "max_length": 1024,
        "system_prompt": None,
        "judge": "restricted",
    }
    plain = first_token_decisions(model, tokenizer, TEXTS, resolved, **reading)  # type: ignore[arg-type]
    assert torch.equal(table.refused_NA[:, 1], plain.refused_N)
    for column, alpha in ((0, -8.0), (2, 8.0)):
        steered = first_token_decisions(
            model,
            tokenizer,
            TEXTS,
            resolved,
            edits=residual_rows(0, vectors_ND, alpha),
            batch_size=2,
            **reading,  # type: ignore[arg-type]
        )
        assert torch.equal(table.refused_NA[:, column], steered.refused_N)
        assert not torch.equal(steered.refused_N, plain.refused_N)  # the steering changed decisions
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


def test_the_outcome_table_passes_every_reading_setting_to_each_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each alpha's pass reads the prompts as the policy will be applied: template, system prompt, bias,
    batching, judge, and the steering's positions (alpha 0 unsteered)."""
    calls: list[dict[str, Any]] = []
    edits: list[tuple[Any, ...]] = []

    def fake_decisions(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        alpha = None if kwargs["edits"] is None else kwargs["edits"][2]
        return SimpleNamespace(refused_N=torch.tensor([alpha == 1.0, False]))

    def fake_rows(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
        edits.append((*args, kwargs))
        return args

    monkeypatch.setattr(tuning, "first_token_decisions", fake_decisions)
    monkeypatch.setattr(tuning, "residual_rows", fake_rows)
    vectors = torch.ones(2, 4)
    settings = {
        "batch_size": 3,
        "max_length": 77,
        "chat_template": "{{ messages }}",
        "system_prompt": "Be brief.",
        "respond_bias": 1.5,
        "judge": "restricted",
    }
    table = build_outcome_table(
        "model",  # type: ignore[arg-type]
        "tokenizer",
        ["a", "b"],
        "resolved",  # type: ignore[arg-type]
        layer=2,
        vectors_ND=vectors,
        alphas=[1.0, -1.0],
        harmful_N=[True, False],
        positions="generated",
        **settings,  # type: ignore[arg-type]
    )
    assert table.refused_NA.tolist() == [[False, False, True], [False, False, False]]
    assert [call["edits"] is None for call in calls] == [False, True, False]
    assert all({k: call[k] for k in settings} == settings for call in calls)
    assert [e[:3] for e in edits] == [(2, vectors, -1.0), (2, vectors, 1.0)]
    assert all(e[3] == {"positions": "generated"} for e in edits)
    assert table.meta["positions"] == "generated" and table.meta["system_prompt"] == "Be brief."
    assert table.meta["max_length"] == 77
    with pytest.raises(ValueError, match=r"^alphas: must be finite, got \[1.0, nan\]"):
        build_outcome_table(
            "model",  # type: ignore[arg-type]
            "tokenizer",
            ["a", "b"],
            "resolved",  # type: ignore[arg-type]
            layer=2,
            vectors_ND=vectors,
            alphas=[1.0, math.nan],
            harmful_N=[True, False],
        )
