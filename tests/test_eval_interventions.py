"""Eval interventions: built from saved artifacts, checked against the model, applied per item."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from sae_refusal.errors import ArtifactError
from sae_refusal.eval.interventions import InterventionConfig, load_intervention
from sae_refusal.features.analysis import CLASS_NAMES
from sae_refusal.features.vectors import SteeringVectors
from sae_refusal.llm.batched import iter_next_token_logits, rows_in_input_order
from sae_refusal.steer.gates import GatedSteering, GatePolicy, global_vector
from sae_refusal.steer.gates.base import GateScores
from sae_refusal.testing import build_tiny_model, build_tiny_tokenizer

FINGERPRINT = {"model": "tiny", "weights_hash": "abc", "adapter": ""}


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    return build_tiny_model("llama", hidden_size=32, num_layers=4), build_tiny_tokenizer()


def save_vectors(folder: Path, *, width: int = 32, layer: int | None = 2, fingerprint: Any = None) -> Path:
    caa_CD = torch.randn(len(CLASS_NAMES) - 1, width, generator=torch.Generator().manual_seed(1))
    metadata: dict[str, Any] = {} if layer is None else {"layer": layer}
    if fingerprint is not None:
        metadata["model_fingerprint"] = fingerprint
    return SteeringVectors(CLASS_NAMES, caa_CD, metadata=metadata).save(folder)


def _logits(model: Any, tokenizer: Any, around: Any) -> torch.Tensor:
    ids = [
        tokenizer("hello there sea", add_special_tokens=False)["input_ids"],
        tokenizer("a b", add_special_tokens=False)["input_ids"],
    ]
    batches = iter_next_token_logits(model, ids, pad_id=0, batch_size=2, around=around)
    return rows_in_input_order(((b.indices, b.logits_BV) for b in batches), len(ids))


def test_residual_column_reads_layer_category_and_acts(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    model, tokenizer = tiny
    folder = save_vectors(tmp_path / "v")
    vectors = SteeringVectors.load(folder)
    cfg = InterventionConfig(kind="residual", vectors=str(folder), category="safety", alpha=3.0)
    loaded = load_intervention(cfg, model)
    assert loaded.layer == 2
    assert torch.equal(loaded.vector, vectors.vector("safety"))
    assert loaded.record["vectors_files"] and loaded.record["layer"] == 2
    plan = loaded.plan(tokenizer, ["x", "y"])
    assert plan.around is not None and plan.alpha_N.tolist() == [3.0, 3.0]
    base = _logits(model, tokenizer, None)
    steered = _logits(model, tokenizer, plan.around)
    assert not torch.allclose(base, steered)
    # global = the mean of the category rows when the artifact records none
    glob = load_intervention(InterventionConfig(kind="residual", vectors=str(folder), alpha=1.0), model)
    assert torch.allclose(glob.vector, global_vector(vectors.caa_CD))
    # alpha 0 is the unsteered model: no context at all
    zero = load_intervention(InterventionConfig(kind="residual", vectors=str(folder), alpha=0.0), model)
    assert zero.plan(tokenizer, ["x"]).around is None


def test_ablation_acts_from_the_layer_to_the_last(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    model, tokenizer = tiny
    folder = save_vectors(tmp_path / "v")
    cfg = InterventionConfig(kind="ablation", vectors=str(folder), layer=1)
    plan = load_intervention(cfg, model).plan(tokenizer, ["x", "y"])
    assert plan.around is not None
    intervention = plan.around([0, 1])
    assert sorted(intervention.fns) == [1, 2, 3]
    assert not torch.allclose(_logits(model, tokenizer, None), _logits(model, tokenizer, plan.around))


def test_a_gate_folder_gives_its_recorded_global_vector(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    model, _ = tiny
    vectors_CD = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    recorded = torch.randn(32, generator=torch.Generator().manual_seed(3))

    class Fixed:
        kind = "refusal_token"
        layer = None
        d_model = None
        class_names = None

        def config(self) -> dict[str, Any]:
            return {}

        def tensors(self) -> dict[str, torch.Tensor]:
            return {}

    bundle = GatedSteering(Fixed(), GatePolicy(0.5, 0.5, 1.0, 1.0), 2, vectors_CD, recorded, CLASS_NAMES)  # type: ignore[arg-type]
    bundle.save(tmp_path / "gate")
    loaded = load_intervention(
        InterventionConfig(kind="residual", vectors=str(tmp_path / "gate"), alpha=1.0), model
    )
    assert torch.equal(loaded.vector, recorded) and loaded.layer == 2


def test_a_gate_column_gives_each_item_its_own_alpha(
    tiny: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    model, tokenizer = tiny
    folder = save_vectors(tmp_path / "v")
    cfg = InterventionConfig(kind="residual", vectors=str(folder), alpha=1.0)
    loaded = load_intervention(cfg, model)
    vectors_CD = SteeringVectors.load(folder).caa_CD

    class Scored:
        def __init__(self) -> None:
            self.layer, self.positions = 2, "all"

        def score_prompts(self, *args: Any, **kwargs: Any) -> GateScores:
            return GateScores(torch.tensor([0.9, 0.1]), torch.tensor([4, 4]))

        def plan(self, scores: GateScores) -> tuple[torch.Tensor, torch.Tensor]:
            alpha = torch.where(scores.score_N > 0.5, 2.0, 0.0)
            return vectors_CD[scores.category_N - 1], alpha

    loaded.config = InterventionConfig(kind="gate", gate="x")
    loaded.gate = Scored()
    plan = loaded.plan(tokenizer, ["harmful?", "benign"])
    assert plan.alpha_N.tolist() == [2.0, 0.0] and plan.gate_score_N is not None
    base = _logits(model, tokenizer, None)
    steered = _logits(model, tokenizer, plan.around)
    assert not torch.allclose(base[0], steered[0])  # item 0 steered
    assert torch.equal(base[1], steered[1])  # item 1 (alpha 0) bit-identical
    # a batch of unsteered items enters no hooks at all
    assert plan.around is not None and not hasattr(plan.around([1]), "fns")


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (dict(kind="residual", vectors="V", category="nope"), "intervention.category"),
        (dict(kind="residual", vectors="V", space="sas_decoded"), "intervention.space"),
        (dict(kind="residual", vectors="V", layer=9), "intervention.layer"),
    ],
)
def test_bad_settings_name_the_key(
    tiny: tuple[Any, Any], tmp_path: Path, cfg: dict[str, Any], match: str
) -> None:
    folder = save_vectors(tmp_path / "v")
    values = {k: (str(folder) if v == "V" else v) for k, v in cfg.items()}
    with pytest.raises(ValueError, match=match):
        load_intervention(InterventionConfig(**values), tiny[0])


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match=r"intervention\.kind"):
        InterventionConfig(kind="teleport")
    with pytest.raises(ValueError, match=r"intervention\.vectors"):
        InterventionConfig(kind="residual")
    with pytest.raises(ValueError, match=r"intervention\.sae"):
        InterventionConfig(kind="latent", vectors="x", space="sas")
    with pytest.raises(ValueError, match=r"intervention\.gate"):
        InterventionConfig(kind="gate")
    with pytest.raises(ValueError, match=r"intervention\.space"):
        InterventionConfig(kind="latent", vectors="x", space="caa", sae="s")


def test_width_and_model_mismatches_are_refused(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    model = tiny[0]
    wide = save_vectors(tmp_path / "wide", width=48)
    with pytest.raises(ValueError, match=r"intervention\.vectors: vectors of width 48"):
        load_intervention(InterventionConfig(kind="residual", vectors=str(wide)), model)
    other = save_vectors(tmp_path / "other", fingerprint={**FINGERPRINT, "weights_hash": "zzz"})
    cfg = InterventionConfig(kind="residual", vectors=str(other))
    with pytest.raises(ValueError, match="allow_other_model"):
        load_intervention(cfg, model, fingerprint=FINGERPRINT)
    allowed = InterventionConfig(kind="residual", vectors=str(other), allow_other_model=True)
    assert load_intervention(allowed, model, fingerprint=FINGERPRINT).layer == 2
    same = save_vectors(tmp_path / "same", fingerprint=FINGERPRINT)
    assert load_intervention(
        InterventionConfig(kind="residual", vectors=str(same)), model, fingerprint=FINGERPRINT
    )
    # the same weights loaded by another name (a staged copy of the file) are the same model
    moved = {**FINGERPRINT, "model": "/tmp/m/copy.gguf"}
    assert load_intervention(InterventionConfig(kind="residual", vectors=str(same)), model, fingerprint=moved)
    with pytest.raises(ValueError, match="adapter"):
        other_adapter = {**FINGERPRINT, "adapter": "another"}
        load_intervention(
            InterventionConfig(kind="residual", vectors=str(same)), model, fingerprint=other_adapter
        )
    with pytest.raises(FileNotFoundError, match=r"intervention\.vectors"):
        load_intervention(InterventionConfig(kind="residual", vectors=str(tmp_path)), model)


def test_an_all_zero_vector_is_refused_unless_allowed(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    """A category without training rows gets a zero vector: its column would be the unsteered model."""
    caa_CD = torch.randn(len(CLASS_NAMES) - 1, 32, generator=torch.Generator().manual_seed(1))
    caa_CD[CLASS_NAMES.index("safety") - 1] = 0.0
    folder = SteeringVectors(CLASS_NAMES, caa_CD, metadata={"layer": 2}).save(tmp_path / "v")
    cfg = InterventionConfig(kind="residual", vectors=str(folder), category="safety", alpha=4.0)
    with pytest.raises(
        ArtifactError,
        match=rf"intervention\.vectors: the caa vector of category 'safety' in {folder} "
        r"is all zeros .* set intervention\.allow_zero_vector: true",
    ):
        load_intervention(cfg, tiny[0])
    allowed = load_intervention(dataclasses.replace(cfg, allow_zero_vector=True), tiny[0])
    assert allowed.record["vector_norm"] == 0.0
    other = load_intervention(dataclasses.replace(cfg, category="humanizing"), tiny[0])  # other rows are fine
    assert other.record["vector_norm"] > 0


def test_vectors_without_a_fingerprint_are_used_with_a_warning(
    tiny: tuple[Any, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = save_vectors(tmp_path / "old")  # written before fingerprints were recorded
    with caplog.at_level("WARNING", logger="sae_refusal"):
        loaded = load_intervention(
            InterventionConfig(kind="residual", vectors=str(old)), tiny[0], fingerprint=FINGERPRINT
        )
    assert loaded.record["artifact_fingerprint"] is None
    assert f"intervention.vectors: {old} records no model fingerprint" in caplog.text


def test_the_sae_may_be_a_hub_id_and_is_verified(
    tiny: tuple[Any, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sae_refusal.sae import TopKSAE

    repo = tmp_path / "snapshot"
    export = TopKSAE(32, 64, 4, generator=torch.Generator().manual_seed(0)).save(repo / "layers.2")
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda *_a, **_k: str(repo))
    sas_CF = torch.rand(len(CLASS_NAMES) - 1, 64, generator=torch.Generator().manual_seed(2))
    vectors = SteeringVectors(
        CLASS_NAMES, torch.ones(len(CLASS_NAMES) - 1, 32), sas_CF=sas_CF, metadata={"layer": 2}
    )
    cfg = InterventionConfig(
        kind="latent", vectors=str(vectors.save(tmp_path / "v")), space="sas", sae="hf://owner/repo/layers.2"
    )
    assert load_intervention(cfg, tiny[0]).sae.n_latents == 64
    weights = bytearray((export / "sae.safetensors").read_bytes())
    weights[-1] ^= 0x01  # one bit of the last float
    (export / "sae.safetensors").write_bytes(bytes(weights))
    with pytest.raises(ArtifactError, match=r"layers\.2/sae\.safetensors: sha256 differs"):
        load_intervention(cfg, tiny[0])
    assert load_intervention(dataclasses.replace(cfg, verify_sae=False), tiny[0]).sae is not None
