"""SAE formats: hookpoint names, format detection, hub ids, `sae-refusal export`, foreign SAEs in commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from sae_refusal.cli import main
from sae_refusal.sae.formats import detect_format, resolve_sae_path, sae_metadata
from sae_refusal.sae.formats.hookpoints import hookpoint_for_layer, layer_of_hookpoint
from sae_refusal.sae.loading import find_sae_exports, load_any_sae, load_sae
from sae_refusal.sae.relu import ReLUSAE
from sae_refusal.sae.topk import TopKSAE


@pytest.mark.parametrize(
    ("name", "layer"),
    [
        ("layers.15", 15),
        ("model.layers.3", 3),
        ("blocks.15.hook_resid_post", 15),
        ("blocks.16.hook_resid_pre", 15),
        ("blocks.1.hook_resid_pre", 0),
    ],
)
def test_hookpoints_map_to_the_block_output_layer(name: str, layer: int) -> None:
    assert layer_of_hookpoint(name) == layer


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("blocks.0.hook_resid_pre", "embedding output"),
        ("blocks.4.hook_resid_mid", "not a residual-stream block output"),
        ("blocks.4.hook_mlp_out", "not a residual-stream block output"),
        ("transformer.h.4", "unknown naming"),
    ],
)
def test_other_hookpoints_are_refused_with_the_reason(name: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        layer_of_hookpoint(name)


def test_a_layer_maps_back_to_each_librarys_name() -> None:
    for layer in (0, 7, 31):
        for fmt in ("sparsify", "saelens"):
            assert layer_of_hookpoint(hookpoint_for_layer(layer, fmt)) == layer
    with pytest.raises(ValueError, match="format"):
        hookpoint_for_layer(1, "dictionary_learning")


def _trained_topk(folder: Path, layer: int = 2, scale: float = 0.37) -> tuple[TopKSAE, Path]:
    gen = torch.Generator().manual_seed(0)
    sae = TopKSAE(16, 64, k=4, generator=gen)
    sae.set_input_scale(scale)
    with torch.no_grad():
        sae.b_dec_D.normal_(generator=gen)
        sae.b_enc_F.normal_(std=0.1, generator=gen)
    return sae, sae.save(folder, metadata={"layer": layer, "model": "tiny", "seed": 0})


def test_export_writes_each_seed_in_the_librarys_layout_and_every_command_reads_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sae, _ = _trained_topk(tmp_path / "run" / "sae" / "seed0")
    _trained_topk(tmp_path / "run" / "sae" / "seed1")
    x = torch.randn(32, 16) * 3
    for fmt, hook in (("sparsify", "layers.2"), ("saelens", "blocks.2.hook_resid_post")):
        out = tmp_path / f"export_{fmt}"
        main(["export", "--sae_dir", str(tmp_path / "run" / "sae"), "--format", fmt, "--out", str(out)])
        printed = capsys.readouterr().out
        assert f"wrote 2 SAE(s) in {fmt} format" in printed and "max |diff|" in printed
        folder = out / "seed0" / hook
        assert detect_format(folder) == fmt
        loaded = load_sae(folder)  # the project's loader takes any format
        with torch.no_grad():
            torch.testing.assert_close(loaded(x).recon_BD, sae(x).recon_BD, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(loaded.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)
        meta = sae_metadata(folder)
        assert meta["layer"] == 2 and meta["format"] == fmt
        assert find_sae_exports(out / "seed0" / hook) == {hook: out / "seed0" / hook}
    with pytest.raises(SystemExit) as exit_info:  # never over an existing folder
        main(
            ["export", "--sae_dir", str(tmp_path / "run" / "sae"), "--format", "sparsify", "--out", str(out)]
        )
    assert exit_info.value.code == 2


def test_a_relu_sae_goes_to_saelens_but_not_to_sparsify(tmp_path: Path) -> None:
    sae = ReLUSAE(8, 32, generator=torch.Generator().manual_seed(0))
    sae.set_input_scale(2.0)
    sae.save(tmp_path / "relu", metadata={"layer": 1, "model": "tiny"})
    main(
        ["export", "--sae_dir", str(tmp_path / "relu"), "--format", "saelens", "--out", str(tmp_path / "ok")]
    )
    assert isinstance(load_any_sae(tmp_path / "ok" / "relu" / "blocks.1.hook_resid_post"), ReLUSAE)
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "export",
                "--sae_dir",
                str(tmp_path / "relu"),
                "--format",
                "sparsify",
                "--out",
                str(tmp_path / "no"),
            ]
        )
    assert exit_info.value.code == 2 and not (tmp_path / "no").exists()


def test_a_hub_id_downloads_only_its_hookpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, export = _trained_topk(tmp_path / "exports" / "seed0")
    repo = tmp_path / "hub_snapshot"
    main(["export", "--sae_dir", str(export), "--format", "sparsify", "--out", str(repo)])
    calls: list[tuple[str, Any]] = []

    def fake_download(repo_id: str, allow_patterns: Any = None, **_: Any) -> str:
        calls.append((repo_id, allow_patterns))
        return str(repo / "seed0")

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_download)
    monkeypatch.chdir(tmp_path)
    sae = load_sae("EleutherAI/sae-tiny-16x/layers.2")
    assert calls == [("EleutherAI/sae-tiny-16x", ["layers.2/*"])] and isinstance(sae, TopKSAE)
    assert (
        resolve_sae_path("hf://EleutherAI/sae-tiny-16x", hookpoint="layers.2") == repo / "seed0" / "layers.2"
    )
    with pytest.raises(FileNotFoundError, match=r"has no folder 'layers\.9'"):
        resolve_sae_path("EleutherAI/sae-tiny-16x/layers.9")
    # exported again from the hub: the provenance names the hub id, not the download cache's folder
    main(["export", "--sae_dir", "EleutherAI/sae-tiny-16x/layers.2", "--format", "saelens", "--out", "again"])
    again = sae_metadata(tmp_path / "again" / "layers.2" / "blocks.2.hook_resid_post")
    assert again["exported_from"] == "EleutherAI/sae-tiny-16x/layers.2" and again["layer"] == 2


def test_a_hub_failure_and_a_missing_local_folder_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*_: Any, **__: Any) -> str:
        raise OSError("offline mode")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"owner/repo.*could not be downloaded.*offline mode"):
        load_sae("owner/repo/layers.3")
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match=r"missing cfg\.json"):  # a local path: never sent to the hub
        load_sae("runs/sae/seed0")
    with pytest.raises(FileNotFoundError, match=r"missing cfg\.json"):  # deeper than owner/repo/hookpoint
        load_sae("other/run/sae/seed0")


def test_features_and_latent_steering_take_a_foreign_sae(tmp_path: Path) -> None:
    """A sparsify-layout SAE with no project metadata: its layer comes from the hookpoint folder name."""
    from sae_refusal.eval.interventions import InterventionConfig, load_intervention
    from sae_refusal.features.vectors import SteeringVectors
    from sae_refusal.sae.provenance import check_exports_match_data
    from sae_refusal.testing import build_tiny_model

    _, export = _trained_topk(tmp_path / "exports" / "seed0", layer=1)
    main(["export", "--sae_dir", str(export), "--format", "sparsify", "--out", str(tmp_path / "sp")])
    folder = tmp_path / "sp" / "seed0" / "layers.1"
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.pop("sae_refusal", None)  # as sparsify's own trainer writes it: no provenance
    (folder / "cfg.json").write_text(json.dumps(cfg))
    assert sae_metadata(folder)["layer"] == 1

    class _Data:  # what check_exports_match_data reads of a data module
        served_layer = 1
        llm = type("L", (), {"name_or_path": "tiny"})()

    check_exports_match_data({"layers.1": sae_metadata(folder)}, _Data())  # type: ignore[arg-type]
    vectors = SteeringVectors(
        class_names=["benign", "a"], caa_CD=torch.zeros(1, 16), sas_CF=torch.ones(1, 64)
    )
    vectors.save(tmp_path / "vec")
    model = build_tiny_model("llama", hidden_size=16, num_layers=2)
    cfg_i = InterventionConfig(
        kind="latent", vectors=str(tmp_path / "vec"), space="sas", sae=str(folder), layer=1
    )
    loaded = load_intervention(cfg_i, model)
    assert loaded.sae is not None and loaded.sae.n_latents == 64


@pytest.mark.interop
def test_an_sae_trained_by_sparsify_runs_in_features_and_latent_steering(
    tmp_path: Path, tiny_model_dir: Path, prompt_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tiny run of sparsify's own trainer: its hookpoint is our layer; features and steering use its SAE."""
    datasets = pytest.importorskip("datasets", reason="sparsify's trainer needs `datasets`")
    try:
        from sparsify.config import SparseCoderConfig, TrainConfig
        from sparsify.trainer import Trainer
    except ImportError as err:
        pytest.skip(f"eai-sparsify's trainer is not importable ({err}); pip install eai-sparsify")
    from transformers import AutoModelForCausalLM

    from sae_refusal.eval.interventions import InterventionConfig, load_intervention
    from sae_refusal.llm.extraction import last_token_residuals
    from tests.test_cli import tiny_config

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(0, 200, (128, 12), generator=torch.Generator().manual_seed(0))
    dataset = datasets.Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")
    train = TrainConfig(
        SparseCoderConfig(k=4, num_latents=64),
        batch_size=16,
        layers=[2],
        save_dir=str(tmp_path / "sparsify"),
        run_name="tiny",
        log_to_wandb=False,
        lr_warmup_steps=1,
    )
    precision = torch.get_float32_matmul_precision()
    try:
        Trainer(train, dataset, model).fit()
    finally:  # sparsify's trainer sets "high" (TF32) for the whole process
        torch.set_float32_matmul_precision(precision)
    folder = tmp_path / "sparsify" / "tiny" / "layers.2"
    assert detect_format(folder) == "sparsify" and sae_metadata(folder)["layer"] == 2
    # their hookpoint layers.2 (the output of block 2) is the project's layer 2, token for token
    seen: list[torch.Tensor] = []
    handle = model.model.layers[2].register_forward_hook(
        lambda _m, _i, out: seen.append((out[0] if isinstance(out, tuple) else out)[:, -1])
    )
    batch = ids[:8]
    with torch.no_grad():
        model(input_ids=batch)
    handle.remove()
    ours = last_token_residuals(model, batch, torch.ones_like(batch), [2])[2]
    torch.testing.assert_close(ours, seen[0])
    config = tiny_config(tmp_path, tiny_model_dir, prompt_file)  # data.layer 2
    out = tmp_path / "features"
    args = ["--sae_dir", str(folder), "--out", str(out), "--analysis.projections", "[]"]
    main(["features", "--config", str(config), *args])
    assert "feature analysis of 1 SAE(s)" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["seeds"]["layers.2"]["head"]["n_test"] > 0
    steer = InterventionConfig(
        kind="latent", vectors=str(out / "layers.2"), space="sas", sae=str(folder), alpha=4.0, layer=2
    )
    loaded = load_intervention(steer, model)
    plan = loaded.plan(None, ["x"] * 2)
    assert plan.around is not None
    prompt = ids[:2]
    with torch.no_grad():
        clean = model(input_ids=prompt).logits
        with plan.around([0, 1]):
            steered = model(input_ids=prompt).logits
    assert not torch.allclose(clean, steered)  # the SAS vector of sparsify's SAE moves the model
