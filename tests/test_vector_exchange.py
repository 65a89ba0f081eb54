"""Steering vectors out to lm-eval-harness and llama.cpp, and back in as eval columns.

The ``interop`` tests load the exported steer file with lm-eval's own ``SteeredModel`` (skipped, with the
reason, when ``lm_eval`` is not importable: ``pip install --no-deps lm_eval==0.4.13``) and compare its logits
with the project's interventions on the same weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from sae_refusal.cli import main
from sae_refusal.errors import ArtifactError, UserError
from sae_refusal.eval.config import InterventionConfig
from sae_refusal.eval.interventions import load_intervention
from sae_refusal.features.analysis import CLASS_NAMES
from sae_refusal.features.vectors import SteeringVectors
from sae_refusal.llm.hashing import file_sha256
from sae_refusal.steer.exchange import (
    ExportRequest,
    export_vectors,
    file_vector,
    model_shape,
    parse_export,
    read_control_vector,
    sidecar_path,
)
from sae_refusal.steer.gates import global_vector
from sae_refusal.steer.interventions import DirectionAblation, Intervention, ResidualSteering

LAYER = 2
FINGERPRINT = {"model": "tiny", "source": "folder", "weights_hash": "abc", "quantization": "none"}
IDS = torch.tensor([[5, 17, 42, 8, 99, 3], [7, 7, 120, 64, 2, 11]])


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture()
def vectors_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A vectors.json artifact at layer 2 of the tiny Llama (width 32), recording it as its model."""
    caa_CD = torch.randn(len(CLASS_NAMES) - 1, 32, generator=torch.Generator().manual_seed(1))
    metadata = {"layer": LAYER, "model": str(tiny_model_dir), "model_fingerprint": FINGERPRINT, "d_model": 32}
    return SteeringVectors(CLASS_NAMES, caa_CD, metadata=metadata).save(tmp_path / "vectors")


def request(vectors: Path, out: Path, **changes: Any) -> ExportRequest:
    fmt = "gguf-control-vector" if out.suffix == ".gguf" else "lm-eval"
    base = ExportRequest(vectors=vectors, format=fmt, category="safety", alpha=3.0, out=out)
    return dataclasses.replace(base, **changes)


def logits(model: Any, edits: dict[int, Any] | None) -> torch.Tensor:
    with torch.no_grad():
        if edits is None:
            return model(IDS).logits
        with Intervention(model, edits):
            return model(IDS).logits


def column_logits(model: Any, cfg: InterventionConfig, **kwargs: Any) -> torch.Tensor:
    plan = load_intervention(cfg, model, **kwargs).plan(None, ["x", "y"])
    assert plan.around is not None
    with torch.no_grad(), plan.around([0, 1]):
        return model(IDS).logits


# ------------------------------------------------------------------------------------------- lm-eval


def test_the_lm_eval_file_holds_the_hookpoint_entry_and_the_sidecar_what_made_it(
    vectors_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "steer.pt"
    export_vectors(request(vectors_dir, out, unit_norm=True), print_fn=None)
    payload = torch.load(out, weights_only=True)  # plain tensors and numbers: no pickled objects
    vector = SteeringVectors.load(vectors_dir).vector("safety")
    assert list(payload) == [f"layers.{LAYER}"]
    entry = payload[f"layers.{LAYER}"]
    assert entry["action"] == "add" and entry["steering_coefficient"] == 3.0
    assert entry["bias"] is None and entry["head_index"] is None
    torch.testing.assert_close(entry["steering_vector"], vector / vector.norm(), rtol=0, atol=0)
    record = json.loads(sidecar_path(out).read_text())
    assert record["file_sha256"] == file_sha256(out)
    assert record["source"]["files_sha256"]["vectors.safetensors"] == file_sha256(
        vectors_dir / "vectors.safetensors"
    )
    assert (record["category"], record["space"], record["layer"], record["alpha"]) == (
        "safety",
        "caa",
        2,
        3.0,
    )
    assert record["unit_norm"] is True and record["action"] == "add"
    assert record["model"] == str(tiny_model_dir) and record["model_fingerprint"] == FINGERPRINT
    assert record["mapped_on"]["n_layers"] == 4 and record["entries"] == ["layers.2"]


def test_hookpoints_are_the_decoder_blocks_names_under_base_model(model: Any) -> None:
    shape = model_shape(model)
    assert shape.hookpoints == ("layers.0", "layers.1", "layers.2", "layers.3")
    assert (shape.n_layers, shape.d_model, shape.model_type) == (4, 32, "llama")
    names = dict(model.base_model.named_modules())
    assert names[shape.hookpoints[LAYER]] is model.model.layers[LAYER]


@pytest.fixture(scope="module")
def hf_steered() -> Any:
    """lm-eval's ``hf_steered`` module (skipped with the reason when lm_eval is not installed).

    Importing lm_eval sets ``HF_XET_HIGH_PERFORMANCE`` in the environment; it is put back.
    """
    before = dict(os.environ)
    try:
        return pytest.importorskip(
            "lm_eval.models.hf_steered",
            reason="lm_eval is not installed (pip install --no-deps lm_eval==0.4.13)",
        )
    finally:
        for name in set(os.environ) - set(before):
            del os.environ[name]
        os.environ.update(before)


def _steered_model(steer: Any, folder: Path, out: Path) -> Any:
    return steer.SteeredModel(pretrained=str(folder), steer_path=str(out), device="cpu", dtype="float32")


@pytest.mark.interop
@pytest.mark.parametrize(
    ("action", "unit_norm", "alpha"), [("add", False, 3.0), ("add", True, -4.0), ("ablate", False, 1.0)]
)
def test_lm_evals_steered_model_computes_the_projects_intervention(
    hf_steered: Any,
    vectors_dir: Path,
    tiny_model_dir: Path,
    tmp_path: Path,
    action: str,
    unit_norm: bool,
    alpha: float,
) -> None:
    out = tmp_path / "steer.pt"
    export_vectors(request(vectors_dir, out, action=action, unit_norm=unit_norm, alpha=alpha), print_fn=None)
    steered = _steered_model(hf_steered, tiny_model_dir, out)
    with torch.no_grad():
        theirs = steered._model_call(IDS)  # lm-eval's hooks are on only inside its calls
    ours_model = steered.model
    vector = SteeringVectors.load(vectors_dir).vector("safety")
    if action == "add":
        edits: dict[int, Any] = {LAYER: ResidualSteering(vector, alpha, positions="all", unit_norm=unit_norm)}
    else:
        edits = dict.fromkeys(range(LAYER, 4), DirectionAblation(vector, alpha))
    ours = logits(ours_model, edits)
    assert not torch.allclose(ours, logits(ours_model, None), atol=1e-3)  # the edit matters
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ llama.cpp


def test_the_control_vector_gguf_is_what_llama_cpp_and_repeng_read(vectors_dir: Path, tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    out = tmp_path / "safety.gguf"
    record = export_vectors(request(vectors_dir, out, alpha=2.5), print_fn=None)
    reader = gguf.GGUFReader(str(out))

    def string(key: str) -> str:
        return bytes(reader.get_field(key).parts[-1]).decode()

    assert string("general.architecture") == "controlvector"
    assert string("controlvector.model_hint") == "llama"
    assert int(reader.get_field("controlvector.layer_count").parts[-1][0]) == 1
    assert [t.name for t in reader.tensors] == [f"direction.{LAYER}"]
    tensor = reader.tensors[0]
    assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
    vector = SteeringVectors.load(vectors_dir).vector("safety")
    assert torch.equal(torch.from_numpy(tensor.data.copy()), 2.5 * vector)  # alpha baked in, bit for bit
    assert record["entries"] == [f"direction.{LAYER}"] and record["file_sha256"] == file_sha256(out)
    back = read_control_vector(out)
    assert back.model_hint == "llama" and back.layer_count == 1 and list(back.directions) == [LAYER]
    assert torch.equal(back.directions[LAYER], 2.5 * vector)
    assert back.provenance is not None and back.provenance["model_fingerprint"] == FINGERPRINT


def test_a_repeng_style_gguf_with_many_layers_gives_the_requested_one(model: Any, tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    directions = {i: torch.randn(32, generator=torch.Generator().manual_seed(i)) for i in (1, 2, 3)}
    path = tmp_path / "repeng.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")  # exactly what repeng's export_gguf writes
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", len(directions))
    for layer, direction in directions.items():
        writer.add_tensor(f"direction.{layer}", direction.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    found = file_vector(path, model, kind="residual", layer=3)
    assert found.format == "gguf-control-vector" and found.file_layers == (1, 2, 3)
    assert torch.equal(found.vector, directions[3]) and found.fingerprint is None
    with pytest.raises(ValueError, match=r"intervention\.layer: .* holds vectors for layers \[1, 2, 3\]"):
        file_vector(path, model, kind="residual")
    with pytest.raises(ValueError, match=r"intervention\.vectors: .* has no vector for layer 0"):
        file_vector(path, model, kind="residual", layer=0)


# ------------------------------------------------------------------------------- back in as eval columns


@pytest.mark.parametrize("suffix", [".pt", ".gguf"])
def test_an_exported_file_is_the_same_eval_column_as_its_folder(
    model: Any, vectors_dir: Path, tmp_path: Path, suffix: str
) -> None:
    if suffix == ".gguf":
        pytest.importorskip("gguf")
    out = tmp_path / f"steer{suffix}"
    export_vectors(request(vectors_dir, out, alpha=3.0), print_fn=None)
    folder_cfg = InterventionConfig(kind="residual", vectors=str(vectors_dir), category="safety", alpha=3.0)
    file_cfg = InterventionConfig(kind="residual", vectors=str(out), alpha=1.0)  # the file's own edit
    loaded = load_intervention(file_cfg, model, fingerprint=FINGERPRINT)
    assert loaded.layer == LAYER and loaded.record["vectors_files"] == {out.name: file_sha256(out)}
    assert loaded.record["artifact_fingerprint"] == FINGERPRINT  # from the sidecar
    torch.testing.assert_close(loaded.vector, 3.0 * SteeringVectors.load(vectors_dir).vector("safety"))
    expected = column_logits(model, folder_cfg)
    torch.testing.assert_close(column_logits(model, file_cfg), expected, rtol=0, atol=1e-6)
    # the sidecar's fingerprint is checked as a folder's is
    with pytest.raises(ArtifactError, match=r"intervention\.vectors: the artifact was made on another model"):
        load_intervention(file_cfg, model, fingerprint={**FINGERPRINT, "weights_hash": "other"})


def test_global_and_ablation_columns_round_trip(model: Any, vectors_dir: Path, tmp_path: Path) -> None:
    rows = SteeringVectors.load(vectors_dir).caa_CD
    out = tmp_path / "global.pt"
    export_vectors(request(vectors_dir, out, category="global", alpha=-2.0), print_fn=None)
    loaded = load_intervention(InterventionConfig(kind="residual", vectors=str(out)), model)
    torch.testing.assert_close(loaded.vector, -2.0 * global_vector(rows))
    ablate = tmp_path / "ablate.pt"
    export_vectors(request(vectors_dir, ablate, action="ablate", alpha=1.0), print_fn=None)
    assert list(torch.load(ablate, weights_only=True)) == ["layers.2", "layers.3"]
    file_cfg = InterventionConfig(kind="ablation", vectors=str(ablate))
    folder_cfg = InterventionConfig(kind="ablation", vectors=str(vectors_dir), category="safety")
    plan = load_intervention(file_cfg, model).plan(None, ["x"])
    assert plan.around is not None and sorted(plan.around([0]).fns) == [2, 3]
    torch.testing.assert_close(column_logits(model, file_cfg), column_logits(model, folder_cfg))
    with pytest.raises(ValueError, match=r"intervention\.vectors: .* ablates at layer 2 .* kind: ablation"):
        load_intervention(InterventionConfig(kind="residual", vectors=str(ablate)), model)


def test_a_steering_vectors_library_file_is_an_eval_column(model: Any, tmp_path: Path) -> None:
    vector = torch.randn(32, generator=torch.Generator().manual_seed(5))
    path = tmp_path / "sv.pt"
    torch.save(
        {"layer_activations": {1: vector}, "layer_type": "decoder_block"}, path
    )  # asdict(SteeringVector)
    cfg = InterventionConfig(kind="residual", vectors=str(path), alpha=2.0)
    loaded = load_intervention(cfg, model)
    assert loaded.layer == 1 and loaded.record["vectors_format"] == "steering-vectors"
    expected = logits(model, {1: ResidualSteering(vector, 2.0)})
    torch.testing.assert_close(column_logits(model, cfg), expected, rtol=0, atol=0)
    wrong = dataclasses.replace(cfg, vectors_format="lm-eval")
    with pytest.raises(
        ArtifactError, match=r"intervention\.vectors: .* holds a steering-vectors file, not lm-eval"
    ):
        load_intervention(wrong, model)


# ------------------------------------------------------------------------------------------ bad inputs


def test_bad_export_options_name_the_flag(vectors_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "steer.pt"
    with pytest.raises(ValueError, match=r"--category: unknown category 'nope'; the vectors in .* 'global'"):
        export_vectors(request(vectors_dir, out, category="nope"), print_fn=None)
    with pytest.raises(ValueError, match=r"--layer: layer 7 is out of range for a model with 4 decoder"):
        export_vectors(request(vectors_dir, out, layer=7), print_fn=None)
    with pytest.raises(ValueError, match=r"--space: .* has no 'sas_decoded' vectors"):
        export_vectors(request(vectors_dir, out, space="sas_decoded"), print_fn=None)
    with pytest.raises(UserError, match=r"--alpha: lm-eval's clamp action .* got 0\.5"):
        export_vectors(request(vectors_dir, out, action="ablate", alpha=0.5), print_fn=None)
    with pytest.raises(FileNotFoundError, match=r"--vectors: folder .*missing does not exist"):
        export_vectors(request(tmp_path / "missing", out), print_fn=None)
    gguf_out = tmp_path / "steer.gguf"
    with pytest.raises(UserError, match=r"--layer: llama\.cpp has no control-vector slot for layer 0"):
        export_vectors(request(vectors_dir, gguf_out, layer=0), print_fn=None)
    with pytest.raises(UserError, match=r"--action: llama\.cpp control vectors only add"):
        export_vectors(request(vectors_dir, gguf_out, action="ablate"), print_fn=None)
    assert not out.exists() and not gguf_out.exists() and not sidecar_path(out).exists()
    export_vectors(request(vectors_dir, out), print_fn=None)
    before = out.read_bytes()
    with pytest.raises(UserError, match=r"--out: .*steer\.pt exists; .* --force"):
        export_vectors(request(vectors_dir, out, alpha=5.0), print_fn=None)
    assert out.read_bytes() == before
    export_vectors(request(vectors_dir, out, alpha=5.0, force=True), print_fn=None)
    assert torch.load(out, weights_only=True)["layers.2"]["steering_coefficient"] == 5.0
    with pytest.raises(
        UserError, match=r"--out: .*steer\.txt must end with \.pt or \.pth for --format lm-eval"
    ):
        parse_export(
            [
                *("--vectors", str(vectors_dir), "--format", "lm-eval", "--category", "safety"),
                *("--alpha", "1", "--out", str(tmp_path / "steer.txt")),
            ]
        )


def test_the_command_line_writes_and_refuses(
    vectors_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli" / "steer.pt"
    args = ["export-vectors", "--vectors", str(vectors_dir), "--category", "safety", "--alpha", "2"]
    main([*args, "--format", "lm-eval", "--out", str(out)])
    said = capsys.readouterr().out
    assert f"wrote {out} (lm-eval" in said and "layers.2" in said and "lm_eval --model steered" in said
    assert out.is_file() and sidecar_path(out).is_file()
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--format", "onnx", "--out", str(out)])
    assert exit_.value.code == 2 and "--format: invalid choice: 'onnx'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--format", "lm-eval", "--out", str(tmp_path / "new.pt"), "--category", "nope"])
    assert exit_.value.code == 2 and "error: --category: unknown category 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--format", "lm-eval", "--out", str(out)])
    assert "--out: " in capsys.readouterr().err


def test_bad_files_as_eval_columns_name_the_key(model: Any, vectors_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "steer.pt"
    export_vectors(request(vectors_dir, out), print_fn=None)
    with pytest.raises(
        ValueError, match=r"intervention\.vectors: .* has no vector for layer 1 \(it has layers \[2\]"
    ):
        load_intervention(InterventionConfig(kind="residual", vectors=str(out), layer=1), model)
    with pytest.raises(ValueError, match=r"intervention\.vectors_format: expected one of"):
        InterventionConfig(kind="residual", vectors=str(out), vectors_format="onnx")
    with pytest.raises(FileNotFoundError, match=r"intervention\.vectors: file .*gone\.gguf does not exist"):
        load_intervention(InterventionConfig(kind="residual", vectors=str(tmp_path / "gone.gguf")), model)
    pickled = tmp_path / "object.pt"
    torch.save({"a": Path("x")}, pickled)  # a pickled object, not plain tensors
    with pytest.raises(ArtifactError, match=r"intervention\.vectors: .*object\.pt"):
        load_intervention(InterventionConfig(kind="residual", vectors=str(pickled)), model)
    other = tmp_path / "other.pt"
    torch.save({"layers.9": {"steering_vector": torch.ones(32), "action": "add"}}, other)
    with pytest.raises(
        ValueError, match=r"intervention\.vectors: hookpoint 'layers\.9' of .* no decoder block"
    ):
        load_intervention(InterventionConfig(kind="residual", vectors=str(other)), model)


def test_atomic_file_replaces_whole_or_leaves_the_old_file(tmp_path: Path) -> None:
    from sae_refusal.atomic import atomic_file

    target = tmp_path / "out" / "steer.pt"
    with atomic_file(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_bytes(b"first")
    assert target.read_bytes() == b"first"
    with pytest.raises(RuntimeError, match="writer failed"), atomic_file(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"first" and sorted(p.name for p in target.parent.iterdir()) == ["steer.pt"]
