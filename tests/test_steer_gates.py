"""Conditional steering gates: fits on separable blobs, policy boundaries, save/load, model-output gates."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedModel

from sae_refusal.features.vectors import caa_vectors
from sae_refusal.finetune.tokens import add_refusal_tokens
from sae_refusal.llm.batched import next_token_logits
from sae_refusal.llm.refusal_tokens import RefusalVocabulary
from sae_refusal.sae.relu import ReLUSAE
from sae_refusal.steer.gates import (
    GATE_FILE,
    DistanceGate,
    Gate,
    GatedSteering,
    GatePolicy,
    GuardGate,
    HeadGate,
    ProbeGate,
    RefusalTokenGate,
    gate_metrics,
    global_vector,
    load_gate,
    prompt_residuals,
    row_vectors,
)
from sae_refusal.steer.scoring import first_token_decisions
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
]


def blobs(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Benign rows around 0, category c around 6 (e_0 + e_c) (noise std 0.5 in D = 32 dims): separable,
    with a shared harmful direction e_0 (like a refusal direction) and one direction per category."""
    gen = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    for c in range(len(NAMES)):
        center = torch.zeros(D)
        if c:
            center[0] = center[c] = 6.0
        rows.append(center + 0.5 * torch.randn(n_per_class, D, generator=gen))
        labels += [c] * n_per_class
    return torch.cat(rows), torch.tensor(labels)


def identity_sae() -> ReLUSAE:
    """An SAE whose codes are relu(x) and relu(-x): separable blobs stay separable in latent space."""
    sae = ReLUSAE(D, 2 * D, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eye = torch.eye(D)
        sae.W_enc_DF.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec_FD.copy_(torch.cat([eye, -eye], dim=0))
    return sae


def fit_gate(name: str, acts: torch.Tensor, y: torch.Tensor, sae_path: Path | None = None) -> Any:
    if name == "probe_head":
        return ProbeGate.fit(acts, y, NAMES, layer=1)
    if name == "probe_mean":
        return ProbeGate.fit(acts, y, NAMES, layer=1, category="mean")
    if name == "probe_sae":
        return ProbeGate.fit(acts, y, NAMES, layer=1, sae=identity_sae(), sae_path=sae_path)
    if name == "distance":
        return DistanceGate.fit(acts, y, NAMES, layer=1)
    if name == "distance_sae":
        return DistanceGate.fit(acts, y, NAMES, layer=1, sae=identity_sae(), sae_path=sae_path)
    if name == "head_sklearn":
        return HeadGate.fit(acts, y, NAMES, layer=1, sae=identity_sae(), sae_path=sae_path)
    if name == "head_torch":
        return HeadGate.fit(acts, y, NAMES, layer=1, sae=identity_sae(), method="torch", l1=1e-2, steps=60)
    raise ValueError(name)


RESIDUAL_GATES = [
    "probe_head",
    "probe_mean",
    "probe_sae",
    "distance",
    "distance_sae",
    "head_sklearn",
    "head_torch",
]


@pytest.fixture(scope="module")
def train() -> tuple[torch.Tensor, torch.Tensor]:
    return blobs(50, 0)


@pytest.fixture(scope="module")
def test() -> tuple[torch.Tensor, torch.Tensor]:
    return blobs(20, 1)


@pytest.mark.parametrize("name", RESIDUAL_GATES)
def test_residual_gates_separate_blobs_perfectly(name: str, train: Any, test: Any) -> None:
    gate = fit_gate(name, *train)
    assert isinstance(gate, Gate)
    acts, y = test
    scores = gate.score(acts)
    assert scores.score_N.dtype == torch.float32 and scores.category_N.dtype == torch.long
    assert bool(((scores.score_N >= 0) & (scores.score_N <= 1)).all())
    metrics = gate_metrics(scores.score_N, y > 0)
    assert (metrics.precision, metrics.recall, metrics.accuracy) == (1.0, 1.0, 1.0)
    harmful = y > 0
    assert torch.equal(scores.category_N[harmful], y[harmful])  # the right category, too
    assert bool(((scores.category_N >= 1) & (scores.category_N <= 3)).all())  # always names one


def test_gate_metrics_by_hand() -> None:
    m = gate_metrics(torch.tensor([0.9, 0.5, 0.4, 0.1, 0.6]), torch.tensor([True, False, True, False, True]))
    assert (m.tp, m.fp, m.fn, m.tn) == (2, 1, 1, 1)  # 0.5 counts as harmful: the threshold is inclusive
    assert m.precision == pytest.approx(2 / 3) and m.recall == pytest.approx(2 / 3) and m.accuracy == 0.6
    none = gate_metrics(torch.tensor([0.1, 0.2]), torch.tensor([True, False]))
    assert none.precision != none.precision and none.recall == 0.0  # NaN precision: nothing called harmful
    with pytest.raises(ValueError, match="harmful_N"):
        gate_metrics(torch.tensor([0.1, 0.2]), torch.tensor([True]))


def test_gate_metrics_f1_empty_denominators_and_labels_as_integers() -> None:
    # tp 2, fp 1, fn 2, tn 0: precision 2/3, recall 1/2, f1 = 2pr / (p + r) = 4/7 (p != r: the formula shows)
    m = gate_metrics(torch.tensor([0.9, 0.8, 0.7, 0.3, 0.2]), torch.tensor([1, 1, 0, 1, 1]))  # int labels
    assert (m.tp, m.fp, m.fn, m.tn) == (2, 1, 2, 0)
    assert (m.precision, m.recall, m.f1) == pytest.approx((2 / 3, 1 / 2, 4 / 7))
    assert m.to_dict() == {
        "precision": m.precision,
        "recall": m.recall,
        "f1": m.f1,
        "accuracy": 0.4,
        "tp": 2,
        "fp": 1,
        "fn": 2,
        "tn": 0,
        "threshold": 0.5,
    }
    # tp == fp == fn: shares 1/2, not NaN; precision == recall: f1 equals them
    even = gate_metrics(torch.tensor([0.9, 0.8, 0.1]), torch.tensor([True, False, True]))
    assert (even.precision, even.recall, even.f1) == (0.5, 0.5, 0.5)
    # something called harmful, nothing right: p = r = 0 and f1 0 (not NaN, not a division by zero)
    wrong = gate_metrics(torch.tensor([0.9, 0.1]), torch.tensor([False, True]))
    assert (wrong.precision, wrong.recall, wrong.f1) == (0.0, 0.0, 0.0)
    # no harmful prompts: recall (and f1) NaN; nothing called harmful: precision (and f1) NaN
    no_harmful = gate_metrics(torch.tensor([0.9, 0.1]), torch.tensor([False, False]), threshold=0.3)
    assert math.isnan(no_harmful.recall) and math.isnan(no_harmful.f1) and no_harmful.threshold == 0.3
    assert math.isnan(gate_metrics(torch.tensor([0.1]), torch.tensor([True])).f1)
    one = gate_metrics(torch.tensor([0.7]), torch.tensor([True]))  # a single prompt is a set
    assert (one.precision, one.recall, one.accuracy) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"^score_N, harmful_N: expected equal non-empty"):
        gate_metrics(torch.tensor([]), torch.tensor([], dtype=torch.bool))


def test_fit_errors_name_the_argument(train: Any) -> None:
    acts, y = train
    with pytest.raises(ValueError, match="y_N"):
        ProbeGate.fit(acts, torch.zeros_like(y), NAMES, layer=1)  # no harmful rows
    with pytest.raises(ValueError, match="y_N"):
        DistanceGate.fit(acts, y, NAMES[:2], layer=1)  # labels beyond the class names
    with pytest.raises(ValueError, match="layer"):
        DistanceGate.fit(acts, y, NAMES, layer=-1)
    with pytest.raises(ValueError, match="acts_ND"):
        DistanceGate.fit(acts, y, NAMES, layer=1).score(acts[:, :5])


# ------------------------------------------------------------------------------------------- policy


def test_policy_boundaries() -> None:
    policy = GatePolicy(t_low=0.3, t_high=0.7, alpha_pos=2.0, alpha_neg=1.0, alpha_mid=0.5)
    scores = torch.tensor([0.0, 0.2999, 0.3, 0.5, 0.6999, 0.7, 1.0])
    # score < t_low -> -alpha_neg (t_low itself is in the middle band); score >= t_high -> +alpha_pos
    assert policy.alphas(scores).tolist() == [-1.0, -1.0, 0.5, 0.5, 0.5, 2.0, 2.0]
    no_middle = GatePolicy(t_low=0.5, t_high=0.5, alpha_pos=3.0, alpha_neg=1.0)
    assert no_middle.alphas(torch.tensor([0.4999, 0.5])).tolist() == [-1.0, 3.0]
    assert GatePolicy(0.2, 0.8, 1.0, 1.0).alphas(torch.tensor([0.5])).tolist() == [0.0]  # alpha_mid 0
    for kwargs, key in (
        ({"t_low": 0.8, "t_high": 0.2}, "t_low"),
        ({"t_high": 1.5}, "t_high"),
        ({"alpha_pos": -1.0}, "alpha_pos"),
        ({"alpha_neg": float("nan")}, "alpha_neg"),
        ({"vector": "nearest"}, "vector"),
    ):
        args: dict[str, Any] = {"t_low": 0.2, "t_high": 0.8, "alpha_pos": 1.0, "alpha_neg": 1.0, **kwargs}
        with pytest.raises(ValueError, match=key):
            GatePolicy(**args)
    with pytest.raises(ValueError, match="score_N"):
        policy.alphas(torch.tensor([float("nan")]))
    for value in (True, "0.5"):  # a bool is not a threshold; a string is refused by name, not a TypeError
        with pytest.raises(ValueError, match=r"^t_low: expected a finite number"):
            GatePolicy(t_low=value, t_high=0.8, alpha_pos=1.0, alpha_neg=1.0)  # type: ignore[arg-type]


def test_row_vectors_and_global_vector(train: Any) -> None:
    acts, y = train
    vectors_CD, counts_K = caa_vectors(acts, y, len(NAMES))
    pooled = acts[y > 0].mean(0) - acts[y == 0].mean(0)
    torch.testing.assert_close(global_vector(vectors_CD, counts_K[1:]), pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(global_vector(vectors_CD), vectors_CD.mean(0))
    vectors_CD[2] = 0.0  # a category without rows
    g = global_vector(vectors_CD)
    torch.testing.assert_close(g, vectors_CD[:2].mean(0))  # zero rows do not count
    rows = row_vectors(torch.tensor([0, 1, 2, 3]), vectors_CD, g, "category")
    assert torch.equal(rows, torch.stack([g, vectors_CD[0], vectors_CD[1], g]))
    assert torch.equal(row_vectors(torch.tensor([1, 2]), vectors_CD, g, "global"), torch.stack([g, g]))
    with pytest.raises(ValueError, match="category_N"):
        row_vectors(torch.tensor([4]), vectors_CD, g, "category")
    # each category's own row decides whether it is usable (category 1 empty, 2 not)
    first_empty = vectors_CD.clone()
    first_empty[0] = 0.0
    rows = row_vectors([1, 2], first_empty, g, "category")
    assert torch.equal(rows, torch.stack([g, first_empty[1]]))
    with pytest.raises(ValueError, match=r"^global_D: width"):
        row_vectors(torch.tensor([1]), vectors_CD, g[:5], "category")
    with pytest.raises(ValueError, match=r"^vector: expected one of \['category', 'global', 'category_pos"):
        row_vectors(torch.tensor([1]), vectors_CD, g, "nearest")  # type: ignore[arg-type]


def test_global_vector_weights_and_bad_inputs() -> None:
    vectors_CD = torch.tensor([[1.0, 0.0], [0.0, 2.0], [4.0, 4.0]])
    # a category without training rows weighs 0; weights need only a positive sum (here 1)
    torch.testing.assert_close(global_vector(vectors_CD, torch.tensor([3, 0, 1])), torch.tensor([1.75, 1.0]))
    torch.testing.assert_close(global_vector(vectors_CD, torch.tensor([1.0, 0.0, 0.0])), vectors_CD[0])
    torch.testing.assert_close(global_vector(vectors_CD[:1]), vectors_CD[0])  # one category
    for weights in (torch.tensor([1.0, -1.0, 1.0]), torch.tensor([1.0, 1.0])):
        with pytest.raises(ValueError, match=r"^weights_C: expected 3 non-negative weights"):
            global_vector(vectors_CD, weights)
    with pytest.raises(ValueError, match=r"^vectors_CD: all category rows are zero"):
        global_vector(vectors_CD, torch.zeros(3))
    for bad in (vectors_CD[0], torch.zeros(0, 2)):
        with pytest.raises(ValueError, match=r"^vectors_CD: expected \(C, D\), got shape"):
            global_vector(bad)


# ------------------------------------------------------------------------------------- save / load


def bundle(gate: Any, train: Any, layer: int = 1) -> GatedSteering:
    vectors_CD, counts_K = caa_vectors(*train, len(NAMES))
    return GatedSteering(
        gate=gate,
        policy=GatePolicy(t_low=0.3, t_high=0.6, alpha_pos=2.0, alpha_neg=1.0, alpha_mid=0.5),
        layer=layer,
        vectors_CD=vectors_CD,
        global_D=global_vector(vectors_CD, counts_K[1:]),
        class_names=NAMES,
        provenance={"floor": 0.9, "sets": {"sizes": {"harmful": 3}}},
    )


@pytest.mark.parametrize("name", RESIDUAL_GATES)
def test_save_load_round_trip_gives_identical_scores(
    name: str, train: Any, test: Any, tmp_path: Path
) -> None:
    sae_path = tmp_path / "sae"
    identity_sae().save(sae_path)
    gate = fit_gate(name, *train, sae_path=sae_path)
    steering = bundle(gate, train)
    steering.save(tmp_path / "gate")
    sae = identity_sae() if name == "head_torch" else None  # no recorded path: passed in
    loaded = load_gate(tmp_path / "gate", sae=sae)
    acts, _ = test
    before, after = gate.score(acts), loaded.gate.score(acts)
    assert torch.equal(before.score_N, after.score_N) and torch.equal(before.category_N, after.category_N)
    assert loaded.policy == steering.policy and loaded.provenance == steering.provenance
    assert tuple(loaded.class_names) == tuple(NAMES) and loaded.layer == 1
    for a, b in zip(steering.plan(before), loaded.plan(after), strict=True):
        assert torch.equal(a, b)
    record = json.loads((tmp_path / "gate" / GATE_FILE).read_text())
    assert record["gate"]["kind"] == gate.kind and record["steering"]["d_model"] == D


def test_a_latent_gate_without_its_sae_is_refused(train: Any, tmp_path: Path) -> None:
    gate = fit_gate("distance_sae", *train)  # no sae_path recorded
    bundle(gate, train).save(tmp_path / "gate")
    with pytest.raises(ValueError, match="sae"):
        load_gate(tmp_path / "gate")
    with pytest.raises(ValueError, match=r"sae\.n_latents"):
        load_gate(tmp_path / "gate", sae=ReLUSAE(D, D))


@pytest.fixture(scope="module")
def refusal_tokenizer() -> Any:
    tokenizer = build_tiny_tokenizer()
    add_refusal_tokens(tokenizer, RefusalVocabulary())
    return tokenizer


@pytest.fixture(scope="module")
def refusal_model(refusal_tokenizer: Any) -> PreTrainedModel:
    return build_tiny_model("llama", vocab_size=len(refusal_tokenizer), num_layers=2, hidden_size=D)


def test_a_folder_that_does_not_fit_the_model_is_refused(train: Any, tmp_path: Path) -> None:
    steering = bundle(fit_gate("distance", *train), train, layer=3)
    steering.save(tmp_path / "deep")
    shallow = build_tiny_model("llama", num_layers=2, hidden_size=D)  # layers 0..1
    with pytest.raises(ValueError, match=r"^layer"):
        load_gate(tmp_path / "deep", model=shallow)
    bundle(fit_gate("distance", *train), train, layer=1).save(tmp_path / "ok")
    assert load_gate(tmp_path / "ok", model=shallow).layer == 1
    wide = build_tiny_model("llama", num_layers=2, hidden_size=64)
    with pytest.raises(ValueError, match=r"^d_model"):
        load_gate(tmp_path / "ok", model=wide)
    gate_too_deep = bundle(DistanceGate.fit(*train, NAMES, layer=5), train, layer=1)
    with pytest.raises(ValueError, match=r"^gate\.layer"):
        gate_too_deep.check_model(shallow)
    record = json.loads((tmp_path / "ok" / GATE_FILE).read_text())
    record["gate"]["kind"] = "oracle"
    (tmp_path / "ok" / GATE_FILE).write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"gate\.kind"):
        load_gate(tmp_path / "ok")


def test_bundle_checks_class_names_and_widths(train: Any) -> None:
    gate = fit_gate("distance", *train)
    steering = bundle(gate, train)
    with pytest.raises(ValueError, match="class_names"):
        GatedSteering(gate, steering.policy, 1, steering.vectors_CD, steering.global_D, ["b", "x", "y", "z"])
    with pytest.raises(ValueError, match="global_D"):
        GatedSteering(gate, steering.policy, 1, steering.vectors_CD, steering.global_D[:3], NAMES)


# ---------------------------------------------------------------------------- on a real (tiny) model


def test_prompt_scores_and_per_row_edits_on_a_tiny_model(refusal_model: Any, refusal_tokenizer: Any) -> None:
    acts = prompt_residuals(refusal_model, refusal_tokenizer, TEXTS, 1, batch_size=4)
    y = torch.tensor([0, 0, 1, 1, 2, 3])
    gate = DistanceGate.fit(acts, y, NAMES, layer=1)
    scores = gate.score_prompts(refusal_model, refusal_tokenizer, TEXTS, batch_size=3)
    direct = gate.score(acts)
    torch.testing.assert_close(scores.score_N, direct.score_N)
    assert torch.equal(scores.category_N, direct.category_N)
    vectors_CD, _ = caa_vectors(acts, y, len(NAMES))
    mid = float(scores.score_N.sort().values[2])  # at least the two lowest scores fall below t_low
    policy = GatePolicy(t_low=mid, t_high=1.0, alpha_pos=0.0, alpha_neg=50.0)
    steering = GatedSteering(gate, policy, 0, vectors_CD, global_vector(vectors_CD), NAMES)
    resolved = RefusalVocabulary().resolve(refusal_tokenizer)
    # Both passes batch the prompts alike (4 per forward): a row is bit-identical only to itself computed in
    # a batch of the same shape (another batch size pads it differently, and the kernels may then block
    # their sums differently: at one thread they do).
    plain = first_token_decisions(refusal_model, refusal_tokenizer, TEXTS, resolved, batch_size=4)
    steered = first_token_decisions(
        refusal_model, refusal_tokenizer, TEXTS, resolved, edits=steering.edits(scores), batch_size=4
    )
    _, alpha_N = steering.plan(scores)
    untouched = alpha_N == 0
    assert 0 < int(untouched.sum()) < len(TEXTS)
    assert torch.equal(steered.probs_NC[untouched], plain.probs_NC[untouched])  # bit-identical rows
    assert not torch.allclose(steered.probs_NC[~untouched], plain.probs_NC[~untouched])


def test_refusal_token_gate_reads_the_first_token(refusal_model: Any, refusal_tokenizer: Any) -> None:
    # no category keeps its class index of the refusal vocabulary (COCONOT order): the mapping must work
    names = ["benign", "unsupported", "safety", "humanizing", "incomplete", "indeterminate"]
    resolved = RefusalVocabulary().resolve(refusal_tokenizer)
    benign = RefusalTokenGate(names, respond_bias=1e4).score_prompts(refusal_model, refusal_tokenizer, TEXTS)
    assert benign.score_N.tolist() == [0.0] * len(TEXTS) and benign.category_N.tolist() == [0] * len(TEXTS)
    gate = RefusalTokenGate(names, RefusalVocabulary(), respond_bias=-1e4)
    refused = gate.score_prompts(refusal_model, refusal_tokenizer, TEXTS)
    decisions = first_token_decisions(refusal_model, refusal_tokenizer, TEXTS, resolved, respond_bias=-1e4)
    assert refused.score_N.tolist() == [1.0] * len(TEXTS)
    expected = [names.index(resolved.class_names[int(c)]) for c in decisions.pred_class_N]
    assert refused.category_N.tolist() == expected and all(c > 0 for c in expected)
    graded = RefusalTokenGate(names, graded=True).score_prompts(refusal_model, refusal_tokenizer, TEXTS)
    unbiased = first_token_decisions(refusal_model, refusal_tokenizer, TEXTS, resolved)
    torch.testing.assert_close(graded.score_N, 1.0 - unbiased.probs_NC[:, 0])
    rebuilt = RefusalTokenGate.from_saved(gate.config(), {})
    assert torch.equal(
        rebuilt.score_prompts(refusal_model, refusal_tokenizer, TEXTS).category_N, refused.category_N
    )


# ------------------------------------------------------------------------------------------- guard


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LlamaForSequenceClassification with 2 labels, saved with its tokenizer."""
    folder = tmp_path_factory.mktemp("guard-classifier")
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForSequenceClassification(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_guard_classifier_wiring(classifier_dir: Path, tmp_path: Path) -> None:
    gate = GuardGate(classifier_dir, harmful_label=1)
    scores = gate.score_prompts(None, None, TEXTS, batch_size=4)  # type: ignore[arg-type]
    model = LlamaForSequenceClassification.from_pretrained(classifier_dir).eval()
    tokenizer = build_tiny_tokenizer()
    with torch.no_grad():
        alone = [torch.softmax(model(**tokenizer(t, return_tensors="pt")).logits, -1)[0, 1] for t in TEXTS]
    torch.testing.assert_close(scores.score_N, torch.stack(alone), atol=1e-5, rtol=1e-5)  # padding-proof
    assert scores.category_N.tolist() == [0] * len(TEXTS)
    by_name = GuardGate(classifier_dir, harmful_label="LABEL_1").score_prompts(None, None, TEXTS)  # type: ignore[arg-type]
    torch.testing.assert_close(by_name.score_N, scores.score_N)
    with pytest.raises(ValueError, match="harmful_label"):
        GuardGate(classifier_dir, harmful_label=2).score_prompts(None, None, TEXTS)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="harmful_label"):
        GuardGate(classifier_dir, harmful_label="toxic").score_prompts(None, None, TEXTS)  # type: ignore[arg-type]
    # saved in a bundle and loaded back: same scores
    vectors_CD = torch.randn(3, D, generator=torch.Generator().manual_seed(0))
    policy = GatePolicy(t_low=0.4, t_high=0.6, alpha_pos=1.0, alpha_neg=1.0, vector="global")
    GatedSteering(gate, policy, 1, vectors_CD, global_vector(vectors_CD), NAMES).save(tmp_path / "g")
    loaded = load_gate(tmp_path / "g")
    assert torch.equal(loaded.gate.score_prompts(None, None, TEXTS).score_N, scores.score_N)  # type: ignore[arg-type]


def test_guard_chat_wiring(tiny_model_dir: Path) -> None:
    fmt = "Is this request harmful? {prompt} Answer:"
    gate = GuardGate(tiny_model_dir, mode="chat", prompt_format=fmt, answers=("unsafe", "safe"))
    scores = gate.score_prompts(None, None, TEXTS, batch_size=4)  # type: ignore[arg-type]
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model("llama")  # what save_tiny_model wrote
    ids = [tokenizer.encode(a, add_special_tokens=False)[0] for a in ("unsafe", "safe")]
    questions = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": fmt.format(prompt=t)}], tokenize=False, add_generation_prompt=True
        )
        for t in TEXTS
    ]
    encoded = [tokenizer.encode(q, add_special_tokens=False) for q in questions]
    logits = next_token_logits(model, encoded, batch_size=1, pad_id=0)
    torch.testing.assert_close(
        scores.score_N, torch.softmax(logits[:, ids], dim=1)[:, 0], atol=1e-5, rtol=1e-5
    )
    with pytest.raises(ValueError, match="prompt_format"):
        GuardGate(tiny_model_dir, mode="chat", prompt_format="no field")
    with pytest.raises(ValueError, match="answers"):
        GuardGate(tiny_model_dir, mode="chat", answers=("yes", "yes"))
    with pytest.raises(ValueError, match="mode"):
        GuardGate(tiny_model_dir, mode="judge")  # type: ignore[arg-type]
