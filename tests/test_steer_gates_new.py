"""The multi-layer probe, calibrated and ensemble gates: fits, rules by hand, save/load, model checks."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from sklearn.isotonic import IsotonicRegression
from torch import Tensor
from transformers import PreTrainedModel

import sae_refusal.steer.gates.multilayer as multilayer_module
from sae_refusal.features.vectors import caa_vectors
from sae_refusal.finetune.tokens import add_refusal_tokens
from sae_refusal.llm.refusal_tokens import RefusalVocabulary
from sae_refusal.steer.gates import (
    GATE_FILE,
    GATE_LOADERS,
    CalibratedGate,
    DistanceGate,
    EnsembleGate,
    Gate,
    GatedSteering,
    GatePolicy,
    GateScores,
    MultiLayerProbeGate,
    ProbeGate,
    RefusalTokenGate,
    gate_metrics,
    global_vector,
    load_gate,
)
from sae_refusal.steer.study import last_token_acts
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
Y_TEXTS = torch.tensor([0, 0, 1, 1, 2, 3])


def layer_blobs(
    n_per_class: int, seed: int, layers: Sequence[int] = (0, 2)
) -> tuple[dict[int, Tensor], Tensor]:
    """Per layer: benign rows around 0, category c around 4 (e_l + e_{l+c}) (noise std 0.5): separable at
    each layer, with a different harmful direction per layer."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(NAMES)).repeat_interleave(n_per_class)
    acts = {}
    for layer in layers:
        centers = torch.zeros(len(NAMES), D)
        for c in range(1, len(NAMES)):
            centers[c, layer] = centers[c, layer + 4 + c] = 4.0
        acts[layer] = centers[labels] + 0.5 * torch.randn(labels.shape[0], D, generator=gen)
    return acts, labels


def same_scores(a: GateScores, b: GateScores) -> bool:
    return torch.equal(a.score_N, b.score_N) and torch.equal(a.category_N, b.category_N)


# ----------------------------------------------------------------------------------- multi-layer probe


def test_multilayer_probe_separates_and_is_a_probe_on_the_concatenated_features() -> None:
    train_acts, train_y = layer_blobs(40, 0)
    test_acts, test_y = layer_blobs(20, 1)
    gate = MultiLayerProbeGate.fit(train_acts, train_y, NAMES, layers=[2, 0])
    assert isinstance(gate, Gate)
    assert gate.layers == (0, 2) and gate.layer == 2 and gate.d_model == D
    assert gate.class_names == tuple(NAMES)
    scores = gate.score(test_acts)
    assert scores.score_N.dtype == torch.float32 and scores.category_N.dtype == torch.long
    m = gate_metrics(scores.score_N, test_y > 0)
    assert (m.precision, m.recall, m.accuracy) == (1.0, 1.0, 1.0)
    harmful = test_y > 0
    assert torch.equal(scores.category_N[harmful], test_y[harmful])
    # the same as a ProbeGate fitted on the features concatenated by hand, in ascending layer order
    manual = ProbeGate.fit(torch.cat([train_acts[0], train_acts[2]], dim=1), train_y, NAMES, layer=2)
    assert same_scores(scores, manual.score(torch.cat([test_acts[0], test_acts[2]], dim=1)))
    # extra layers in the mapping are ignored
    assert same_scores(gate.score({**test_acts, 1: test_acts[0]}), scores)
    mean_rule = MultiLayerProbeGate.fit(train_acts, train_y, NAMES, layers=[0, 2], category="mean")
    assert torch.equal(mean_rule.score(test_acts).category_N[harmful], test_y[harmful])


def test_multilayer_probe_errors_name_the_layer_and_the_width() -> None:
    acts, y = layer_blobs(10, 0)
    gate = MultiLayerProbeGate.fit(acts, y, NAMES, layers=[0, 2])
    with pytest.raises(ValueError, match=r"^acts_by_layer: no activations for layer 2"):
        gate.score({0: acts[0]})
    with pytest.raises(ValueError, match=rf"^acts_by_layer\[2\]: expected shape \({len(y)}, {D}\), got"):
        gate.score({0: acts[0], 2: acts[2][:, :5]})
    with pytest.raises(ValueError, match=r"^acts_by_layer\[2\]: expected shape"):  # rows disagree
        gate.score({0: acts[0], 2: acts[2][:3]})
    with pytest.raises(ValueError, match=r"^acts_by_layer\[0\]: expected shape \(N, 32\)"):
        gate.score({0: acts[0][0], 2: acts[2]})
    with pytest.raises(ValueError, match=r"^acts_by_layer: no activations for layer 2"):
        MultiLayerProbeGate.fit({0: acts[0]}, y, NAMES, layers=[0, 2])
    with pytest.raises(ValueError, match=r"^acts_by_layer\[2\]: expected shape \(40, 32\)"):
        MultiLayerProbeGate.fit({0: acts[0], 2: acts[2][:, :8]}, y, NAMES, layers=[0, 2])
    for layers in ([], [0, 0], [-1, 2], 2):
        with pytest.raises(ValueError, match=r"^layers: "):
            MultiLayerProbeGate.fit(acts, y, NAMES, layers=layers)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^probe: its width"):
        MultiLayerProbeGate(gate.probe, layers=[0, 1, 2], d_model=D)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    tokenizer = build_tiny_tokenizer()
    add_refusal_tokens(tokenizer, RefusalVocabulary())
    return tokenizer


@pytest.fixture(scope="module")
def model(tokenizer: Any) -> PreTrainedModel:
    return build_tiny_model("llama", vocab_size=len(tokenizer), num_layers=3, hidden_size=D)


@pytest.fixture(scope="module")
def prompt_acts(model: Any, tokenizer: Any) -> dict[int, Tensor]:
    return last_token_acts(model, tokenizer, TEXTS, [0, 1, 2], batch_size=3)


def test_multilayer_score_prompts_reads_all_layers_in_one_pass(
    model: Any, tokenizer: Any, prompt_acts: dict[int, Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = MultiLayerProbeGate.fit(prompt_acts, Y_TEXTS, NAMES, layers=[0, 2])
    calls: list[list[int]] = []

    def counted(*args: Any, **kwargs: Any) -> dict[int, Tensor]:
        calls.append(list(args[3]))
        return last_token_acts(*args, **kwargs)

    monkeypatch.setattr(multilayer_module, "last_token_acts", counted)
    scores = gate.score_prompts(model, tokenizer, TEXTS, batch_size=3)
    assert calls == [[0, 2]]  # one early-exit pass for both layers
    direct = gate.score(prompt_acts)
    torch.testing.assert_close(scores.score_N, direct.score_N)
    assert torch.equal(scores.category_N, direct.category_N)
    deep = MultiLayerProbeGate(gate.probe, layers=[0, 5], d_model=D)  # the same probe, a layer too deep
    with pytest.raises(ValueError, match=r"^layers: layer 5 is out of range"):
        deep.score_prompts(model, tokenizer, TEXTS)


# --------------------------------------------------------------------------------------- calibrated


class Fixed:
    """A stub gate answering fixed scores (a registered kind only in the tests' own loaders)."""

    kind: ClassVar[str] = "fixed"

    def __init__(
        self,
        score_N: Sequence[float],
        category_N: Sequence[int] | None = None,
        *,
        layer: int | None = None,
        d_model: int | None = None,
        class_names: Sequence[str] | None = tuple(NAMES),
    ) -> None:
        self.score_N = torch.tensor(score_N, dtype=torch.float32)
        self.category_N = torch.tensor([0] * len(score_N) if category_N is None else category_N)
        self.layer, self.d_model = layer, d_model
        self.class_names = None if class_names is None else tuple(class_names)
        self.refused_N: Tensor | None = None  # the model's own decisions, when the stub is to give them

    def score_prompts(self, model: Any, tokenizer: Any, texts: Sequence[str], **kwargs: Any) -> GateScores:
        return GateScores(self.score_N.clone(), self.category_N.clone(), self.refused_N)

    def config(self) -> dict[str, Any]:
        return {"layer": self.layer, "d_model": self.d_model, "class_names": self.class_names}

    def tensors(self) -> dict[str, Tensor]:
        return {"score_N": self.score_N, "category_N": self.category_N}

    @classmethod
    def from_saved(cls, config: Mapping[str, Any], tensors: Mapping[str, Tensor], sae: Any = None) -> Fixed:
        return cls(
            tensors["score_N"].tolist(),
            tensors["category_N"].tolist(),
            layer=config["layer"],
            d_model=config["d_model"],
            class_names=config["class_names"],
        )


def noisy_validation(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Scores of a useful but imperfect gate: harmful rows score higher on average."""
    gen = torch.Generator().manual_seed(seed)
    harmful = torch.rand(n, generator=gen) < 0.4
    z = torch.randn(n, generator=gen) + 1.5 * harmful.float() - 0.5
    return torch.sigmoid(z), harmful


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_calibration_is_monotone_non_decreasing_on_a_dense_grid(method: str) -> None:
    score_N, harmful_N = noisy_validation(400, 0)
    gate = CalibratedGate.fit(Fixed(score_N.tolist()), score_N, harmful_N, method=method)  # type: ignore[arg-type]
    grid = torch.cat(
        [torch.linspace(0.0, 1.0, 20001), score_N.sort().values, torch.tensor([0.0, 1.0])]
    ).sort()
    out = gate.transform(grid.values)
    assert out.dtype == torch.float32 and out.shape == grid.values.shape
    assert bool(((out >= 0) & (out <= 1)).all())
    assert bool((out[1:] >= out[:-1]).all())
    assert float(out[-1]) > float(out[0])  # not a constant: the scores carry information


def test_platt_recovers_a_known_logistic_model() -> None:
    gen = torch.Generator().manual_seed(0)
    z = 2.0 * torch.randn(20000, generator=gen, dtype=torch.float64)
    a, b = 1.5, -0.5
    harmful = torch.rand(20000, generator=gen, dtype=torch.float64) < torch.sigmoid(a * z + b)
    score_N = torch.sigmoid(z)
    gate = CalibratedGate.fit(Fixed([0.5]), score_N, harmful, method="platt")
    assert gate.slope == pytest.approx(a, abs=0.1) and gate.intercept == pytest.approx(b, abs=0.1)
    truth = torch.sigmoid(a * z + b).float()
    torch.testing.assert_close(gate.transform(score_N), truth, atol=0.03, rtol=0)


def test_isotonic_matches_sklearn_at_the_fitted_points_and_between() -> None:
    score_N, harmful_N = noisy_validation(300, 1)
    gate = CalibratedGate.fit(Fixed([0.5]), score_N, harmful_N, method="isotonic")
    iso = IsotonicRegression(increasing=True, out_of_bounds="clip", y_min=0, y_max=1)
    iso.fit(score_N.double().numpy(), harmful_N.numpy())
    expected = torch.from_numpy(iso.predict(score_N.double().numpy())).float()
    torch.testing.assert_close(gate.transform(score_N), expected, atol=1e-7, rtol=0)
    grid = np.linspace(0.0, 1.0, 1001)
    torch.testing.assert_close(
        gate.transform(torch.from_numpy(grid)), torch.from_numpy(iso.predict(grid)).float(), atol=1e-7, rtol=0
    )
    # the breakpoints are tensors: no sklearn object is saved
    assert set(gate.tensors()) == {"inner.score_N", "inner.category_N", "calibration_x_K", "calibration_y_K"}


def test_an_anti_correlated_validation_set_is_refused_by_platt() -> None:
    score_N, harmful_N = noisy_validation(300, 2)
    with pytest.raises(
        ValueError, match=r"^score_N, harmful_N: the fitted Platt slope is negative.*backwards"
    ):
        CalibratedGate.fit(Fixed([0.5]), score_N, ~harmful_N, method="platt")


def test_calibration_fit_errors_name_the_argument() -> None:
    score_N, harmful_N = noisy_validation(50, 3)
    inner: Any = Fixed([0.5])
    for bad_scores, key in ((score_N * 3, "score_N"), (score_N[:, None], "score_N")):
        with pytest.raises(ValueError, match=rf"^{key}"):
            CalibratedGate.fit(inner, bad_scores, harmful_N)
    with pytest.raises(ValueError, match=r"^harmful_N: calibration needs harmful and benign"):
        CalibratedGate.fit(inner, score_N, torch.zeros(50, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^harmful_N: expected one label per score"):
        CalibratedGate.fit(inner, score_N, harmful_N[:3])
    with pytest.raises(ValueError, match=r"^method"):
        CalibratedGate.fit(inner, score_N, harmful_N, method="beta")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^inner"):
        CalibratedGate.fit(object(), score_N, harmful_N)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^slope"):
        CalibratedGate(inner, method="platt", slope=-1.0, intercept=0.0)


def test_calibrated_scores_keep_the_category_and_further_fields() -> None:
    score_N, harmful_N = noisy_validation(200, 4)
    inner = Fixed([0.1, 0.6, 0.9], [2, 0, 3])
    gate = CalibratedGate.fit(inner, score_N, harmful_N, method="platt")
    assert gate.layer is None and gate.d_model is None and gate.class_names == tuple(NAMES)
    scores = gate.score_prompts(None, None, TEXTS[:3])  # type: ignore[arg-type]
    assert scores.category_N.tolist() == [2, 0, 3]
    torch.testing.assert_close(scores.score_N, gate.transform(inner.score_N))
    refused = torch.tensor([True, False, True])
    inner.refused_N = refused
    extended = gate.score_prompts(None, None, TEXTS[:3])  # type: ignore[arg-type]
    assert extended.refused_N is refused and extended.category_N.tolist() == [2, 0, 3]
    with pytest.raises(TypeError, match=r"^inner: a 'fixed' gate has no score"):
        gate.score(torch.zeros(3, D))


def test_calibrated_score_delegates_to_a_residual_inner_gate() -> None:
    acts, y = layer_blobs(30, 0)
    probe = ProbeGate.fit(acts[0], y, NAMES, layer=0, C=0.01)
    val_acts, val_y = layer_blobs(30, 1)
    inner_scores = probe.score(val_acts[0])
    gate = CalibratedGate.fit(probe, inner_scores.score_N, val_y > 0, method="isotonic")
    assert gate.layer == 0 and gate.d_model == D and gate.class_names == tuple(NAMES)
    scores = gate.score(val_acts[0])
    assert torch.equal(scores.category_N, inner_scores.category_N)
    assert torch.equal(scores.score_N, gate.transform(inner_scores.score_N))


# ----------------------------------------------------------------------------------------- ensemble

# member scores (rows: members) and categories of four prompts
S = [[0.9, 0.2, 0.6, 0.1], [0.7, 0.8, 0.4, 0.3], [0.5, 0.5, 0.9, 0.0]]
K = [[0, 2, 0, 0], [3, 1, 0, 0], [1, 3, 2, 0]]


def members(**kwargs: Any) -> list[Any]:
    return [Fixed(s, k, **kwargs) for s, k in zip(S, K, strict=True)]


@pytest.mark.parametrize(
    ("rule", "weights", "expected"),
    [
        ("mean", None, [2.1 / 3, 1.5 / 3, 1.9 / 3, 0.4 / 3]),
        ("mean", [2.0, 1.0, 1.0], [3.0 / 4, 1.7 / 4, 2.5 / 4, 0.5 / 4]),
        ("mean", [0.0, 1.0, 0.0], S[1]),
        ("all", None, [0.5, 0.2, 0.4, 0.0]),
        ("any", None, [0.9, 0.8, 0.9, 0.3]),
    ],
)
def test_ensemble_rules_by_hand(rule: str, weights: list[float] | None, expected: list[float]) -> None:
    gate = EnsembleGate(members(), rule=rule, weights=weights)  # type: ignore[arg-type]
    member_scores = [GateScores(torch.tensor(s), torch.tensor(k)) for s, k in zip(S, K, strict=True)]
    combined = gate.combine(member_scores)
    torch.testing.assert_close(combined.score_N, torch.tensor(expected), atol=1e-6, rtol=0)
    assert combined.score_N.dtype == torch.float32 and combined.category_N.dtype == torch.long
    # the category: the first member naming one, row by row (row 3: none does)
    assert combined.category_N.tolist() == [3, 2, 2, 0]
    assert same_scores(gate.score_prompts(None, None, TEXTS[:4]), combined)  # type: ignore[arg-type]


def test_ensemble_category_follows_member_order() -> None:
    reordered = EnsembleGate(members()[::-1])
    assert reordered.score_prompts(None, None, TEXTS[:4]).category_N.tolist() == [1, 3, 2, 0]  # type: ignore[arg-type]


def test_ensemble_passes_on_the_first_known_model_decision() -> None:
    gate = EnsembleGate(members())
    assert gate.score_prompts(None, None, TEXTS[:4]).refused_N is None  # type: ignore[arg-type]
    second, third = torch.tensor([True, False, False, True]), torch.tensor([False, False, True, True])
    gate.members[1].refused_N, gate.members[2].refused_N = second, third  # type: ignore[attr-defined]
    assert torch.equal(gate.score_prompts(None, None, TEXTS[:4]).refused_N, second)  # type: ignore[arg-type]
    gate.members[1].refused_N = second[:2]  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=r"^member_scores: refused_N of shape \(2,\) for \(4,\) rows"):
        gate.score_prompts(None, None, TEXTS[:4])  # type: ignore[arg-type]


def test_ensemble_checks_its_members() -> None:
    gate = EnsembleGate(
        [
            Fixed([0.1], layer=3, d_model=D),
            Fixed([0.2], class_names=None),
            Fixed([0.3], layer=1, d_model=D),
            Fixed([0.4]),
        ]
    )
    assert gate.layer == 3 and gate.d_model == D and gate.class_names == tuple(NAMES)
    no_residuals = EnsembleGate([Fixed([0.1], class_names=None), Fixed([0.2], class_names=None)])
    assert no_residuals.layer is None and no_residuals.d_model is None and no_residuals.class_names is None
    with pytest.raises(ValueError, match=r"^members: their class_names disagree"):
        EnsembleGate([Fixed([0.1]), Fixed([0.2], class_names=None), Fixed([0.3], class_names=["b", "x"])])
    with pytest.raises(ValueError, match=r"^members: their residual widths disagree \(\{0: 32, 2: 64\}\)"):
        EnsembleGate([Fixed([0.1], d_model=D), Fixed([0.2]), Fixed([0.3], d_model=64)])
    with pytest.raises(ValueError, match=r"^members: expected a non-empty"):
        EnsembleGate([])
    with pytest.raises(TypeError, match=r"^members\[1\]"):
        EnsembleGate([Fixed([0.1]), "probe"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"^rule"):
        EnsembleGate(members(), rule="vote")  # type: ignore[arg-type]
    for weights in ([1.0, 1.0], [1.0, -1.0, 1.0], [0.0, 0.0, 0.0], [1.0, float("nan"), 1.0]):
        with pytest.raises(ValueError, match=r"^weights: expected 3"):
            EnsembleGate(members(), weights=weights)
    with pytest.raises(ValueError, match=r"^weights: only rule='mean'"):
        EnsembleGate(members(), rule="all", weights=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"^member_scores: expected one GateScores per member"):
        EnsembleGate(members()).combine([GateScores(torch.tensor(S[0]), torch.tensor(K[0]))])
    uneven = [
        GateScores(torch.tensor(s[: 4 - i]), torch.tensor(k[: 4 - i]))
        for i, (s, k) in enumerate(zip(S, K, strict=True))
    ]
    with pytest.raises(ValueError, match=r"^member_scores: expected vectors of one length"):
        EnsembleGate(members()).combine(uneven)


def test_nested_gates_rebuild_through_the_given_loaders() -> None:
    loaders: dict[str, Any] = {**GATE_LOADERS, Fixed.kind: Fixed.from_saved}
    loaders[CalibratedGate.kind] = partial(
        CalibratedGate.from_saved, loaders=loaders
    )  # as steering.py binds it
    calibrated = CalibratedGate(Fixed(S[0], K[0]), method="platt", slope=2.0, intercept=-1.0)
    gate = EnsembleGate([calibrated, *members()[1:]], rule="any")
    config = json.loads(json.dumps(gate.config()))  # JSON all through
    rebuilt = EnsembleGate.from_saved(config, gate.tensors(), loaders=loaders)
    assert same_scores(
        rebuilt.score_prompts(None, None, TEXTS[:4]),  # type: ignore[arg-type]
        gate.score_prompts(None, None, TEXTS[:4]),  # type: ignore[arg-type]
    )
    assert config["members"][0]["kind"] == "calibrated" and config["members"][0]["inner"]["kind"] == "fixed"
    assert set(gate.tensors()) == {
        "m0.inner.score_N",
        "m0.inner.category_N",
        "m1.score_N",
        "m1.category_N",
        "m2.score_N",
        "m2.category_N",
    }
    with pytest.raises(ValueError, match=r"^loaders: "):
        EnsembleGate.from_saved(config, gate.tensors())
    with pytest.raises(ValueError, match=r"^members\[1\]\.kind: unknown gate 'fixed'"):
        EnsembleGate.from_saved(
            config, gate.tensors(), loaders={**GATE_LOADERS, "calibrated": loaders["calibrated"]}
        )


# ---------------------------------------------------------------------------------- save / load


def build_gate(name: str, acts: dict[int, Tensor]) -> Any:
    probe = MultiLayerProbeGate.fit(acts, Y_TEXTS, NAMES, layers=[0, 2], C=0.1)
    harmful = Y_TEXTS > 0
    if name == "multilayer":
        return probe
    if name in ("calibrated_platt", "calibrated_isotonic"):
        method = name.removeprefix("calibrated_")
        return CalibratedGate.fit(probe, probe.score(acts).score_N, harmful, method=method)  # type: ignore[arg-type]
    if name == "ensemble":
        distance = DistanceGate.fit(acts[1], Y_TEXTS, NAMES, layer=1)
        members: list[Gate] = [
            CalibratedGate.fit(probe, probe.score(acts).score_N, harmful, method="isotonic"),
            CalibratedGate.fit(distance, distance.score(acts[1]).score_N, harmful, method="platt"),
            RefusalTokenGate(NAMES, RefusalVocabulary(), graded=True),
        ]
        return EnsembleGate(members, rule="mean", weights=[2.0, 1.0, 1.0])
    raise ValueError(name)


NEW_GATES = ["multilayer", "calibrated_platt", "calibrated_isotonic", "ensemble"]


def steering_of(gate: Any, acts: dict[int, Tensor], width: int = D) -> GatedSteering:
    vectors_CD, counts_K = caa_vectors(acts[1], Y_TEXTS, len(NAMES))
    if width != D:
        vectors_CD = torch.cat([vectors_CD, torch.zeros(vectors_CD.shape[0], width - D)], dim=1)
    policy = GatePolicy(t_low=0.3, t_high=0.6, alpha_pos=2.0, alpha_neg=1.0)
    return GatedSteering(gate, policy, 0, vectors_CD, global_vector(vectors_CD, counts_K[1:]), NAMES)


@pytest.mark.parametrize("name", NEW_GATES)
def test_new_gates_save_and_load_with_identical_scores(
    name: str, model: Any, tokenizer: Any, prompt_acts: dict[int, Tensor], tmp_path: Path
) -> None:
    gate = build_gate(name, prompt_acts)
    assert isinstance(gate, Gate) and gate.layer == 2 and gate.d_model == D
    steering_of(gate, prompt_acts).save(tmp_path / "gate")
    loaded = load_gate(tmp_path / "gate", model=model)
    assert type(loaded.gate) is type(gate) and loaded.gate.config() == gate.config()
    before = gate.score_prompts(model, tokenizer, TEXTS, batch_size=3)
    after = loaded.gate.score_prompts(model, tokenizer, TEXTS, batch_size=3)
    assert same_scores(before, after)
    if name != "ensemble":  # residual gates: also on activations
        assert same_scores(gate.score(prompt_acts), loaded.gate.score(prompt_acts))  # type: ignore[attr-defined]
    record = json.loads((tmp_path / "gate" / GATE_FILE).read_text())
    assert record["gate"]["kind"] == gate.kind


@pytest.mark.parametrize("name", NEW_GATES)
def test_a_model_too_shallow_or_of_another_width_is_refused(
    name: str, prompt_acts: dict[int, Tensor], tmp_path: Path
) -> None:
    gate = build_gate(name, prompt_acts)
    steering_of(gate, prompt_acts).save(tmp_path / "gate")
    shallow = build_tiny_model("llama", num_layers=2, hidden_size=D)  # layers 0..1; the gate reads layer 2
    with pytest.raises(ValueError, match=r"^gate\.layer: recorded layer 2"):
        load_gate(tmp_path / "gate", model=shallow)
    wide = build_tiny_model("llama", num_layers=3, hidden_size=2 * D)
    with pytest.raises(ValueError, match=r"d_model: recorded width 32"):
        load_gate(tmp_path / "gate", model=wide)
    # vectors as wide as the model: the gate's own width is what does not fit
    steering_of(gate, prompt_acts, width=2 * D).save(tmp_path / "wide-vectors")
    with pytest.raises(ValueError, match=r"^gate\.d_model: recorded width 32 != the model's width 64"):
        load_gate(tmp_path / "wide-vectors", model=wide)
