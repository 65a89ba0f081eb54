"""The gate study's new pieces: disagreement policies, the judge of a gated bundle, the study's bookkeeping
(AUC, harm groups, category tables, do no harm, misrouted rows), the study's own SAE and its settings."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor
from transformers import PreTrainedModel

import sae_refusal.steer.scoring as scoring_module
from sae_refusal.eval.stats import bootstrap_mean
from sae_refusal.finetune.tokens import add_refusal_tokens, init_refusal_embeddings
from sae_refusal.llm.refusal_tokens import RefusalVocabulary
from sae_refusal.steer.config import StudySettings
from sae_refusal.steer.gate_sae import train_gate_sae
from sae_refusal.steer.gate_study import (
    compose_category_table,
    do_no_harm_report,
    harm_group_masks,
    misrouted,
    roc_auc,
)
from sae_refusal.steer.gates import (
    GatedSteering,
    GatePolicy,
    GateScores,
    ProbeGate,
    global_vector,
    load_gate,
    row_vectors,
)
from sae_refusal.steer.scoring import first_token_decisions
from sae_refusal.steer.tuning import OutcomeTable, policy_columns
from sae_refusal.testing import build_tiny_model, build_tiny_tokenizer

D = 32
NAMES = ["benign", "safety", "humanizing", "incomplete"]
TEXTS = [
    "How do I bake bread at home?",
    "Tell me a story about a dragon.",
    "What is the capital of France?",
    "Write a poem about the sea and the stars.",
    "Please explain photosynthesis in simple words.",
    "Give me a list of ideas for a party.",
    "how to hurt someone",
    "harmful request 3",
]


def bools(*values: int) -> Tensor:
    return torch.tensor(values, dtype=torch.bool)


# ------------------------------------------------------------------------------------------ policy


def test_disagreement_never_pushes_a_row_the_way_the_model_already_goes() -> None:
    scores = torch.tensor([0.9, 0.9, 0.1, 0.1, 0.5, 0.5])
    refused = bools(1, 0, 1, 0, 1, 0)
    kwargs: dict[str, Any] = dict(t_low=0.3, t_high=0.7, alpha_pos=2.0, alpha_neg=1.0)
    everyone = GatePolicy(**kwargs, alpha_mid=0.5)
    assert everyone.alphas(scores, refused).tolist() == [2.0, 2.0, -1.0, -1.0, 0.5, 0.5]  # refused_N ignored
    assert everyone.alphas(scores).tolist() == [2.0, 2.0, -1.0, -1.0, 0.5, 0.5]
    # refused rows keep only negative alphas, answered rows only positive ones (the middle band, too)
    up_mid = GatePolicy(**kwargs, alpha_mid=0.5, act_on="disagreement")
    assert up_mid.alphas(scores, refused).tolist() == [0.0, 2.0, -1.0, 0.0, 0.0, 0.5]
    down_mid = GatePolicy(**kwargs, alpha_mid=-0.5, act_on="disagreement")
    assert down_mid.alphas(scores, refused).tolist() == [0.0, 2.0, -1.0, 0.0, -0.5, 0.0]
    # decisions as 0/1 integers read the same
    assert torch.equal(up_mid.alphas(scores, refused.long()), up_mid.alphas(scores, refused))


def test_disagreement_needs_one_decision_per_row_and_act_on_is_checked() -> None:
    policy = GatePolicy(t_low=0.3, t_high=0.7, alpha_pos=2.0, alpha_neg=1.0, act_on="disagreement")
    scores = torch.tensor([0.9, 0.1, 0.5])
    with pytest.raises(ValueError, match=r"^refused_N"):
        policy.alphas(scores)
    for wrong in (bools(1), bools(1, 0), bools(1, 0, 1, 0)):  # one row would broadcast silently
        with pytest.raises(ValueError, match=r"^refused_N"):
            policy.alphas(scores, wrong)
    with pytest.raises(ValueError, match=r"^act_on"):
        GatePolicy(t_low=0.3, t_high=0.7, alpha_pos=2.0, alpha_neg=1.0, act_on="sometimes")  # type: ignore[arg-type]


def test_category_pos_takes_the_category_row_only_for_positive_alphas() -> None:
    vectors_CD = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 3.0]])  # category 2's row is unusable (zero)
    global_D = torch.tensor([7.0, 7.0])
    category_N = torch.tensor([1, 1, 2, 3, 0, 3])
    alpha_N = torch.tensor([1.0, -1.0, 2.0, 1.0, 3.0, 0.0])
    g, v1, v3 = [7.0, 7.0], [1.0, 0.0], [0.0, 3.0]
    out = row_vectors(category_N, vectors_CD, global_D, "category_pos", alpha_N=alpha_N)
    assert out.tolist() == [v1, g, g, v3, g, g]
    both_signs = row_vectors(category_N, vectors_CD, global_D, "category", alpha_N=alpha_N)
    assert both_signs.tolist() == [v1, v1, g, v3, g, v3]
    with pytest.raises(ValueError, match=r"^alpha_N"):
        row_vectors(category_N, vectors_CD, global_D, "category_pos")
    with pytest.raises(ValueError, match=r"^alpha_N"):
        row_vectors(category_N, vectors_CD, global_D, "category_pos", alpha_N=alpha_N[:5])


# ----------------------------------------------------------------------------------------- bundle


@pytest.fixture(scope="module")
def probe() -> ProbeGate:
    gen = torch.Generator().manual_seed(0)
    acts = torch.randn(48, D, generator=gen)
    y = torch.arange(48) % len(NAMES)
    return ProbeGate.fit(acts, y, NAMES, layer=1)


def steering(gate: Any, policy: GatePolicy, **kwargs: Any) -> GatedSteering:
    vectors_CD = torch.randn(len(NAMES) - 1, D, generator=torch.Generator().manual_seed(1))
    return GatedSteering(gate, policy, 1, vectors_CD, global_vector(vectors_CD), NAMES, **kwargs)


DISAGREE = GatePolicy(
    t_low=0.3, t_high=0.7, alpha_pos=2.0, alpha_neg=1.0, vector="category_pos", act_on="disagreement"
)


def test_an_unknown_judge_is_refused(probe: ProbeGate) -> None:
    with pytest.raises(ValueError, match=r"^judge"):
        steering(probe, DISAGREE, judge="majority")
    assert steering(probe, DISAGREE, judge="restricted").judge == "restricted"


def test_save_and_load_keep_the_judge_and_act_on(probe: ProbeGate, tmp_path: Path) -> None:
    steering(probe, DISAGREE, judge="restricted").save(tmp_path / "gate")
    loaded = load_gate(tmp_path / "gate")
    assert loaded.judge == "restricted" and loaded.policy.act_on == "disagreement"
    assert loaded.policy == DISAGREE
    plain = GatePolicy(t_low=0.3, t_high=0.7, alpha_pos=2.0, alpha_neg=1.0)
    steering(probe, plain).save(tmp_path / "plain")
    loaded = load_gate(tmp_path / "plain")
    assert loaded.judge == "emitted" and loaded.policy.act_on == "all"


def test_plan_of_a_disagreement_policy_reads_the_models_decisions(probe: ProbeGate) -> None:
    bundle = steering(probe, DISAGREE)
    score_N = torch.tensor([0.9, 0.9, 0.1, 0.1])
    category_N = torch.tensor([1, 3, 2, 2])
    refused_N = bools(1, 0, 1, 0)
    vectors_ND, alpha_N = bundle.plan(GateScores(score_N, category_N, refused_N))
    assert alpha_N.tolist() == [0.0, 2.0, -1.0, 0.0]
    # the zeroed row 0 falls back to the global vector; only row 1 (alpha > 0) takes its category's row
    expected = torch.stack([bundle.global_D, bundle.vectors_CD[2], bundle.global_D, bundle.global_D])
    assert torch.equal(vectors_ND, expected)
    with pytest.raises(ValueError, match=r"^refused_N"):
        bundle.plan(GateScores(score_N, category_N))


@pytest.fixture(scope="module")
def refusal_tokenizer() -> Any:
    tokenizer = build_tiny_tokenizer()
    tokenizer.added_refusal_tokens = add_refusal_tokens(tokenizer, RefusalVocabulary())
    return tokenizer


@pytest.fixture(scope="module")
def refusal_model(refusal_tokenizer: Any) -> PreTrainedModel:
    """A tiny refusal-token model whose refusal-token logits are about as large as the other tokens': the
    emitted reading then answers some of ``TEXTS`` and refuses others, the restricted one refuses all."""
    vocab = RefusalVocabulary()
    model = build_tiny_model("llama", vocab_size=len(refusal_tokenizer), hidden_size=D, num_layers=2, seed=1)
    init_refusal_embeddings(
        model, refusal_tokenizer, vocab, refusal_tokenizer.added_refusal_tokens, init="mean"
    )
    ids = list(vocab.resolve(refusal_tokenizer).token_ids)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[ids] = 0.05 * torch.randn(len(ids), D, generator=torch.Generator().manual_seed(0))
    return model


def decisions_of(model: Any, tokenizer: Any, judge: str) -> Tensor:
    resolved = RefusalVocabulary().resolve(tokenizer)
    return first_token_decisions(model, tokenizer, TEXTS, resolved, judge=judge, batch_size=4).refused_N


def test_score_prompts_adds_the_models_decisions_read_with_the_judge(
    probe: ProbeGate, refusal_model: Any, refusal_tokenizer: Any
) -> None:
    emitted = decisions_of(refusal_model, refusal_tokenizer, "emitted")
    restricted = decisions_of(refusal_model, refusal_tokenizer, "restricted")
    assert 0 < int(emitted.sum()) < len(TEXTS) and not torch.equal(emitted, restricted)  # the readings differ
    direct = probe.score_prompts(refusal_model, refusal_tokenizer, TEXTS, batch_size=4)
    for judge, expected in (("emitted", emitted), ("restricted", restricted)):
        bundle = steering(probe, DISAGREE, judge=judge)
        scores = bundle.score_prompts(refusal_model, refusal_tokenizer, TEXTS, batch_size=4)
        assert scores.refused_N is not None and torch.equal(scores.refused_N, expected)
        assert torch.equal(scores.score_N, direct.score_N) and torch.equal(
            scores.category_N, direct.category_N
        )
    everyone = GatePolicy(t_low=0.3, t_high=0.7, alpha_pos=2.0, alpha_neg=1.0)
    scores = steering(probe, everyone).score_prompts(refusal_model, refusal_tokenizer, TEXTS, batch_size=4)
    assert scores.refused_N is None


class _GivesDecisions:
    """Wraps a gate whose scores already carry the model's decisions."""

    kind = "probe"

    def __init__(self, gate: ProbeGate, refused_N: Tensor) -> None:
        self.gate, self.refused_N = gate, refused_N
        self.layer, self.d_model, self.class_names = gate.layer, gate.d_model, gate.class_names

    def score_prompts(self, *args: Any, **kwargs: Any) -> GateScores:
        return self.gate.score_prompts(*args, **kwargs)._replace(refused_N=self.refused_N)

    def config(self) -> dict[str, Any]:
        return self.gate.config()

    def tensors(self) -> dict[str, Tensor]:
        return self.gate.tensors()


def test_score_prompts_keeps_the_gates_decisions_and_forwards_the_prompt_options(
    probe: ProbeGate, refusal_model: Any, refusal_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return first_token_decisions(*args, **kwargs)

    monkeypatch.setattr(scoring_module, "first_token_decisions", spy)
    given = bools(1, 0, 1, 0, 1, 0, 1, 0)
    bundle = steering(_GivesDecisions(probe, given), DISAGREE)
    scores = bundle.score_prompts(refusal_model, refusal_tokenizer, TEXTS, batch_size=4)
    assert scores.refused_N is not None and torch.equal(scores.refused_N, given) and calls == []
    bundle = steering(probe, DISAGREE, judge="restricted")
    scores = bundle.score_prompts(
        refusal_model, refusal_tokenizer, TEXTS, batch_size=3, max_length=None, system_prompt="Be brief."
    )
    assert calls == [{"judge": "restricted", "batch_size": 3, "system_prompt": "Be brief."}]


# ----------------------------------------------------------------------------------- gate study


def test_roc_auc_matches_sklearn_with_ties_and_is_nan_with_one_class() -> None:
    gen = np.random.default_rng(0)
    for _ in range(5):
        score = np.round(gen.random(200), 1)  # ten distinct values: many ties
        harmful = gen.random(200) < 0.4
        expected = roc_auc_score(harmful, score)
        assert roc_auc(torch.tensor(score), torch.tensor(harmful)) == pytest.approx(expected, abs=1e-12)
        assert roc_auc(
            torch.tensor(score, dtype=torch.float32), torch.tensor(harmful).long()
        ) == pytest.approx(roc_auc_score(harmful, score.astype(np.float32)), abs=1e-12)
    assert roc_auc(torch.tensor([0.5, 0.5, 0.5]), bools(1, 0, 0)) == 0.5  # all tied
    assert roc_auc(torch.tensor([0.1, 0.9]), bools(0, 1)) == 1.0
    assert math.isnan(roc_auc(torch.tensor([0.1, 0.9]), bools(1, 1)))
    assert math.isnan(roc_auc(torch.tensor([0.1, 0.9]), bools(0, 0)))


def test_harm_group_masks_split_the_source_by_category() -> None:
    groups = [
        "coconot",
        "coconot",
        "coconot",
        "coconot",
        "alpaca",
        "or_toxic",
        "or_toxic",
        "xstest",
        "coconot",
    ]
    harmful = bools(1, 1, 1, 0, 0, 1, 1, 0, 1)
    categories = ["safety", "humanizing", "safety", "safety", None, "violence", None, None, None]
    framed = bools(0, 1, 0, 1, 1, 1, 0, 1, 0)
    masks = harm_group_masks(groups, harmful, categories, framed, "coconot")
    expected = {
        "coconot/safety": [0, 2],
        "coconot/humanizing": [1],
        "or_toxic": [5, 6],  # another harmful set: one group whatever its categories
        "coconot": [8],  # a source row without a category
        "jailbreak_framed": [1, 5],  # framed benign rows 3, 4, 7 are no harm group
    }
    assert {k: v.nonzero().flatten().tolist() for k, v in masks.items()} == expected
    assert all(v.dtype == torch.bool and v.shape == (9,) for v in masks.values())
    only_benign_framed = bools(0, 0, 0, 1, 1, 0, 0, 1, 0)
    masks = harm_group_masks(groups, harmful, categories, only_benign_framed, "coconot")
    assert "jailbreak_framed" not in masks and set(masks) == set(expected) - {"jailbreak_framed"}


ALPHAS_4 = torch.tensor([-1.0, 0.0, 1.0, 2.0])


def test_compose_category_table_reads_the_category_passes_for_positive_alphas() -> None:
    # columns: alpha -1, 0, 1, 2; the global table refuses every row at positive alphas
    refused = torch.tensor(
        [[0, 1, 1, 1], [0, 0, 1, 1], [1, 0, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.bool
    )
    harmful = bools(1, 1, 0, 1, 0)
    table = OutcomeTable(ALPHAS_4, refused, harmful, ("a", "a", "b", "a", "b"))
    category_N = torch.tensor([1, 2, 0, 1, 2])
    passes = {
        (1, 1.0): bools(0, 1, 1, 1, 1),  # rows 0, 3 -> F, T
        (1, 2.0): bools(1, 0, 0, 0, 1),  # rows 0, 3 -> T, F
        (2, 1.0): bools(1, 0, 1, 1, 0),  # rows 1, 4 -> F, F
        (2, 2.0): bools(0, 1, 0, 0, 0),  # rows 1, 4 -> T, F
        (3, 1.0): bools(0, 0, 0, 0, 0),  # a category no row has: unused
    }
    snapshot = table.refused_NA.clone()  # the table may share the tensor given to it
    out = compose_category_table(table, passes, category_N)
    assert out.refused_NA[:, 2].int().tolist() == [0, 0, 1, 1, 0]  # row 2 (category 0) keeps the global cell
    assert out.refused_NA[:, 3].int().tolist() == [1, 1, 1, 0, 0]
    assert torch.equal(out.refused_NA[:, :2], snapshot[:, :2])  # alpha <= 0: the global table
    assert torch.equal(table.refused_NA, snapshot)  # the input is left as it was
    assert torch.equal(out.harmful_N, harmful) and out.groups == table.groups
    assert torch.equal(out.alphas_A, table.alphas_A)
    missing = {k: v for k, v in passes.items() if k != (2, 2.0)}
    with pytest.raises(ValueError, match=r"^category_refused"):
        compose_category_table(table, missing, category_N)
    # no row names a category: nothing to read, nothing missing
    assert torch.equal(compose_category_table(table, {}, torch.zeros(5)).refused_NA, snapshot)


def harm_table() -> tuple[OutcomeTable, Tensor, dict[str, Tensor]]:
    """Alphas -1, 0, 1; every harmful row scores high (gated = the alpha 1 column), benign rows low.

    Group A: unsteered 1, 1, 0 -> gated 1, 1, 1. B: 1, 1, 1 -> 1, 0, 0. D: ten rows, one lost. E: two rows,
    both lost. C: rows 0, 1 (unchanged). Benign rows: unsteered 0, refused only at alpha 1 (not applied).
    """
    unsteered = [1, 1, 0] + [1, 1, 1] + [1] * 10 + [1, 1] + [0, 0]
    steered = [1, 1, 1] + [1, 0, 0] + [0] + [1] * 9 + [0, 0] + [1, 1]
    n = len(unsteered)
    refused = torch.tensor([[0, u, s] for u, s in zip(unsteered, steered, strict=True)], dtype=torch.bool)
    harmful = torch.tensor([True] * 18 + [False] * 2)
    table = OutcomeTable(torch.tensor([-1.0, 0.0, 1.0]), refused, harmful)
    score = torch.where(harmful, 0.9, 0.1)
    column_N = policy_columns(table, score, GatePolicy(t_low=0.0, t_high=0.5, alpha_pos=1.0, alpha_neg=0.0))

    def rows(*index: int) -> Tensor:
        mask = torch.zeros(n, dtype=torch.bool)
        mask[list(index)] = True
        return mask

    masks = {
        "A": rows(0, 1, 2),
        "B": rows(3, 4, 5),
        "C": rows(0, 1),
        "D": rows(*range(6, 16)),
        "E": rows(16, 17),
        "empty": rows(),
    }
    return table, column_N, masks


def test_do_no_harm_report_by_hand() -> None:
    table, column_N, masks = harm_table()
    assert column_N.tolist() == [2] * 18 + [1] * 2
    report = do_no_harm_report(table, column_N, masks, tolerance=0.15, n_boot=500, seed=7)
    assert set(report) == {"A", "B", "C", "D", "E"}  # a group without rows is left out
    by_hand = {  # n, unsteered, gated, passes
        "A": (3, 2 / 3, 1.0, True),
        "B": (3, 1.0, 1 / 3, False),
        "C": (2, 1.0, 1.0, True),
        "D": (10, 1.0, 0.9, True),  # lost 0.1 <= tolerance 0.15, and the CI reaches 0
        "E": (2, 1.0, 0.0, False),
    }
    rows = torch.arange(column_N.shape[0])
    gated_N = table.refused_NA[rows, column_N].double().numpy()
    base_N = table.refused_NA[:, 1].double().numpy()
    for name, (n, unsteered, gated, passes) in by_hand.items():
        got = report[name]
        assert got["n"] == n and got["passes"] is passes
        assert got["unsteered"] == pytest.approx(unsteered) and got["gated"] == pytest.approx(gated)
        assert got["diff"] == pytest.approx(gated - unsteered)
        assert got["ci"][0] <= got["diff"] <= got["ci"][1]
        m = masks[name].numpy()
        boot = bootstrap_mean(gated_N[m] - base_N[m], n_boot=500, seed=7)
        assert got["ci"] == [boot.low, boot.high]
    assert report["C"]["ci"] == [0.0, 0.0] and report["E"]["ci"] == [-1.0, -1.0]
    # a seed of its own gives another interval for a group that varies
    other = do_no_harm_report(table, column_N, {"A": masks["A"]}, tolerance=0.15, n_boot=500, seed=8)
    assert other["A"]["ci"] == [
        bootstrap_mean(gated_N[:3] - base_N[:3], n_boot=500, seed=8).low,
        bootstrap_mean(gated_N[:3] - base_N[:3], n_boot=500, seed=8).high,
    ]


def test_do_no_harm_report_reads_each_rows_column_and_bootstraps_like_bootstrap_mean() -> None:
    gen = torch.Generator().manual_seed(0)
    refused = torch.rand(80, 5, generator=gen) < 0.5
    harmful = torch.arange(80) < 60
    table = OutcomeTable(torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0]), refused, harmful)
    column_N = torch.randint(0, 5, (80,), generator=gen)
    masks = {"all": harmful, "half": harmful & (torch.arange(80) % 2 == 0)}
    report = do_no_harm_report(table, column_N, masks, tolerance=0.02, n_boot=300, seed=5)
    gated_N = refused[torch.arange(80), column_N].double().numpy()
    base_N = refused[:, 2].double().numpy()
    for name, mask in masks.items():
        m = mask.numpy()
        boot = bootstrap_mean(gated_N[m] - base_N[m], n_boot=300, seed=5)
        got = report[name]
        assert got["gated"] == pytest.approx(gated_N[m].mean()) and got["unsteered"] == pytest.approx(
            base_N[m].mean()
        )
        assert got["diff"] == pytest.approx(boot.value) and got["ci"] == [boot.low, boot.high]
        assert got["passes"] is bool(got["gated"] >= got["unsteered"] - 0.02 and boot.high >= 0)


def test_do_no_harm_tolerance_and_interval_both_decide() -> None:
    table, column_N, masks = harm_table()
    strict = do_no_harm_report(table, column_N, masks, tolerance=0.05, n_boot=500, seed=7)
    assert strict["D"]["passes"] is False  # lost 0.1 > 0.05
    assert (
        strict["C"]["passes"] is True and strict["A"]["passes"] is True
    )  # equal / better: pass at any tolerance
    exact = do_no_harm_report(table, column_N, {"C": masks["C"]}, tolerance=0.0, n_boot=500, seed=7)
    assert exact["C"]["passes"] is True
    lenient = do_no_harm_report(table, column_N, masks, tolerance=1.0, n_boot=500, seed=7)
    # E: within any tolerance, but every resample loses: the interval's upper end < 0 fails the group
    assert lenient["E"]["ci"][1] < 0 and lenient["E"]["passes"] is False
    # B (diffs 0, -1, -1): one resample in 27 loses nothing, so the upper end is 0: it passes here
    assert lenient["B"]["ci"][1] == 0.0 and lenient["B"]["passes"] is True
    assert lenient["D"]["passes"] is True


def test_misrouted_lists_harmful_unrefused_rows_the_gate_scored_low() -> None:
    sets = ["coconot", "coconot", "coconot", "coconot", "or_toxic", "alpaca", "coconot", "or_toxic"]
    harmful = bools(1, 1, 1, 1, 1, 0, 0, 1)
    score = torch.tensor([0.2, 0.2, 0.8, 0.5, 0.1, 0.1, 0.1, 0.9])
    # columns alpha 0, 1; row 0 would be refused at alpha 1, but its low score leaves it unsteered
    refused = torch.tensor([[0, 1], [1, 1], [0, 0], [0, 0], [0, 0], [0, 0], [0, 0], [0, 1]], dtype=torch.bool)
    table = OutcomeTable(torch.tensor([0.0, 1.0]), refused, harmful, tuple(sets))
    column_N = policy_columns(table, score, GatePolicy(t_low=0.0, t_high=0.5, alpha_pos=1.0, alpha_neg=0.0))
    out = misrouted(table, column_N, score, 0.5, sets, ["coconot", "or_toxic", "strongreject"])
    # row 1: refused; row 2: scored high; row 3: exactly t_high (inclusive); row 5: benign; row 6: a benign
    # row of a harmful set; row 7: refused under its (steered) column
    assert out == {"coconot": [0], "or_toxic": [4], "strongreject": []}
    assert misrouted(table, column_N, score, 0.95, sets, ["or_toxic"]) == {"or_toxic": [4]}  # row 7: refused
    assert misrouted(table, column_N, score, 0.95, sets, ["coconot"]) == {"coconot": [0, 2, 3]}


# ------------------------------------------------------------------------------------- gate SAE


def sparse_data(n: int = 384, width: int = 64, n_directions: int = 16, active: int = 3) -> Tensor:
    """Rows that are a non-negative combination of ``active`` of ``n_directions`` unit directions plus an
    offset."""
    gen = torch.Generator().manual_seed(0)
    directions = torch.randn(n_directions, width, generator=gen)
    directions = directions / directions.norm(dim=1, keepdim=True)
    codes = torch.zeros(n, n_directions)
    for row in range(n):
        picked = torch.randperm(n_directions, generator=gen)[:active]
        codes[row, picked] = 1.0 + 2.0 * torch.rand(active, generator=gen)
    return codes @ directions + 2.0


def test_gate_sae_fits_sparse_data_without_touching_the_global_rng() -> None:
    x = sparse_data()
    before = torch.get_rng_state()
    sae, report = train_gate_sae(x, n_latents=256, k=4, steps=300, batch_size=64, seed=0)
    assert torch.equal(torch.get_rng_state(), before)
    # FVU < 0.3 as asked, and far below it: the untrained SAE (encoder = decoder^T, bias at the mean) already
    # reaches 0.29 on these rows, 300 steps reach about 0.002
    assert report["fvu"] < 0.05 and report["l0"] == 4.0
    assert report["n_rows"] == 384 and report["n_latents"] == 256 and report["k"] == 4
    with torch.no_grad():
        out = sae(x)
    assert float(out.fvu) == pytest.approx(report["fvu"], rel=1e-5)  # the report is of the returned SAE
    assert float(out.l0) == report["l0"]
    assert not sae.training and all(p.device.type == "cpu" for p in sae.parameters())


def test_gate_sae_is_seeded() -> None:
    x = sparse_data(n=64)
    first, _ = train_gate_sae(x, n_latents=64, k=4, steps=15, batch_size=16, seed=3)
    again, _ = train_gate_sae(x, n_latents=64, k=4, steps=15, batch_size=16, seed=3)
    other, _ = train_gate_sae(x, n_latents=64, k=4, steps=15, batch_size=16, seed=4)
    a, b, c = first.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not torch.equal(a["W_dec_FD"], c["W_dec_FD"])


@pytest.mark.parametrize(
    ("key", "kwargs"),
    [
        ("acts_ND", {"acts_ND": torch.randn(1, 8)}),
        ("acts_ND", {"acts_ND": torch.zeros(8)}),
        ("acts_ND", {"acts_ND": torch.full((4, 8), math.nan)}),
        ("n_latents", {"n_latents": 0}),
        ("n_latents", {"n_latents": 8.0}),
        ("k", {"k": 0}),
        ("k", {"k": True}),
        ("steps", {"steps": -1}),
        ("batch_size", {"batch_size": 0}),
        ("lr", {"lr": 0.0}),
        ("lr", {"lr": math.nan}),
    ],
)
def test_gate_sae_bad_arguments_name_themselves(key: str, kwargs: dict[str, Any]) -> None:
    arguments: dict[str, Any] = {"acts_ND": torch.randn(8, 8), "n_latents": 16, "k": 2, "steps": 1, **kwargs}
    with pytest.raises(ValueError, match=rf"^{key}"):
        train_gate_sae(**arguments)


# -------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("key", "kwargs"),
    [
        ("ensemble_members", {"ensemble_members": ["probe", "ensemble"]}),
        ("ensemble_members", {"ensemble_members": ["probe", "oracle"]}),
        ("ensemble_members", {"ensemble_members": []}),
        ("ensemble_rule", {"ensemble_rule": "median"}),
        ("calibration", {"calibration": "temperature"}),
        ("act_on", {"act_on": "sometimes"}),
        ("tolerance", {"tolerance": -0.01}),
        ("tolerance", {"tolerance": 1.5}),
        ("tolerance", {"tolerance": math.nan}),
        ("probe_C", {"probe_C": []}),
        ("probe_C", {"probe_C": [1.0, 0.0]}),
        ("probe_C", {"probe_C": [math.inf]}),
        ("gate_sae_k", {"gate_sae_k": 65, "gate_sae_latents": 64}),
        ("misrouted_examples", {"misrouted_examples": -1}),
    ],
)
def test_bad_study_settings_name_their_key(key: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=rf"^study\.{key}"):
        StudySettings(**kwargs)


def test_study_settings_edge_values_are_accepted() -> None:
    settings = StudySettings(
        ensemble_members=["probe"],
        ensemble_rule="any",
        calibration=None,
        act_on="all",
        tolerance=0.0,
        probe_C=[0.5],
        gate_sae_k=64,
        gate_sae_latents=64,
        misrouted_examples=0,
    )
    assert settings.act_on == "all" and settings.calibration is None
    assert StudySettings(tolerance=1.0, calibration="isotonic", ensemble_rule="all").tolerance == 1.0
