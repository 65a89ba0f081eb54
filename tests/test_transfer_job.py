"""`sae-refusal transfer` end to end on tiny models: identity, width mismatch, linear map, eval columns."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from sae_refusal.cli import main
from sae_refusal.sae.topk import TopKSAE
from sae_refusal.testing.tiny import widen_model
from tests.test_steer_job import model_prompts
from tests.test_steer_job import write_config as write_steer_config

LAYER = 2
CONFIGS = Path(__file__).resolve().parents[1] / "lightning_configs"


def _save_sae(folder: Path, d_model: int, model: str) -> Path:
    sae = TopKSAE(d_model, 4 * d_model, k=8, generator=torch.Generator().manual_seed(0))
    sae.set_input_scale(0.5)
    return sae.save(folder, metadata={"layer": LAYER, "model": model, "seed": 0})


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Model A (a tiny refusal-token model) with an SAE, vectors and gates; B = A with perturbed weights."""
    tmp = tmp_path_factory.mktemp("transfer")
    steer_config = write_steer_config(tmp)
    study = yaml.safe_load(steer_config.read_text())
    study["study"]["layers"] = [LAYER]
    study["study"]["gates"] = ["refusal_token", "probe"]
    steer_config.write_text(yaml.safe_dump(study))
    main(["steer", "--config", str(steer_config)])
    model_a = Path(study["llm"]["name_or_path"])
    model = AutoModelForCausalLM.from_pretrained(model_a)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * param.std() * torch.randn(param.shape, generator=generator))
    model_b = tmp / "model_b"
    model.save_pretrained(model_b)
    AutoTokenizer.from_pretrained(model_a).save_pretrained(model_b)
    wide = widen_model(AutoModelForCausalLM.from_pretrained(model_a), 48, scale=2.5, seed=3)
    model_wide = tmp / "model_wide"
    wide[0].save_pretrained(model_wide)
    AutoTokenizer.from_pretrained(model_a).save_pretrained(model_wide)
    return {
        "tmp": tmp,
        "data": Path(study["sets"]["data_root"]),
        "sets": study["sets"],
        "a": model_a,
        "b": model_b,
        "wide": model_wide,
        "known_map": wide[1],
        "sae": _save_sae(tmp / "sae" / "seed0", 32, str(model_a)),
        "study": Path(study["out_dir"]),
    }


def _config(pair: dict[str, Any], name: str, target: Path, **extra: Any) -> Path:
    config = {
        "source": {
            "label": "A",
            "llm": {"name_or_path": str(pair["a"]), "dtype": "float32"},
            "sae": str(pair["tmp"] / "sae"),
        },
        "target": {"label": "B", "llm": {"name_or_path": str(target), "dtype": "float32"}},
        "data": {
            "prompts": model_prompts(pair["data"]),
            "split": {"test_fraction": 0.3, "val_fraction": 0.1, "seed": 0},
            "cache": {"root": str(pair["tmp"] / "cache"), "layers": [LAYER], "batch_size": 16},
            "layer": LAYER,
        },
        "features": {"projections": [], "n_permutations": 3, "top_k_features": 5},
        "splice": {"n_prompts": 8, "batch_size": 4, "max_length": 64},
        "n_boot": 200,
        "out_dir": str(pair["tmp"] / "runs" / name),
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path = pair["tmp"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _metrics(path: Path) -> dict[str, Any]:
    return json.loads((path / "metrics.json").read_text())


def test_transfer_onto_the_same_model_is_the_identity(pair: dict[str, Any]) -> None:
    main(["transfer", "--config", str(_config(pair, "self", pair["a"]))])
    out = pair["tmp"] / "runs" / "self"
    m = _metrics(out)
    quality = m["sae_quality"]["seed0"]
    assert quality["a_on_b"] == pytest.approx(quality["a_on_a"])
    assert quality["a_on_a"]["fvu"] > 0.0 and quality["a_on_a"]["l0"] == pytest.approx(8.0)
    assert m["splice"]["a_on_b"]["seed0"] == pytest.approx(m["splice"]["a_on_a"]["seed0"])
    seed = m["features"]["per_seed"]["seed0"]
    assert all(c == pytest.approx(1.0) for c in seed["compare"]["caa_cosine"].values())
    assert all(j == 1.0 for j in seed["compare"]["head_topk_jaccard"].values() if not math.isnan(j))
    assert seed["head"]["a_on_b"]["accuracy"] == pytest.approx(seed["head"]["a_on_a"]["accuracy"])
    assert seed["clusters"]["b_on_a_topk"] == pytest.approx(seed["clusters"]["a_topk"], nan_ok=True)
    for name in ("report.md", "features/source/report.json", "features/target/seed0/vectors.json"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert str(out) in m["vectors"]["target"]  # paths recorded inside point to the final folder
    assert ".tmp" not in (out / "metrics.json").read_text()
    report = (out / "report.md").read_text()
    assert "# Transfer: A -> B" in report and "cos(CAA A, CAA B)" in report


def test_a_width_mismatch_names_both_widths_and_writes_nothing(pair: dict[str, Any]) -> None:
    config = _config(pair, "mismatch", pair["wide"])
    with pytest.raises(SystemExit) as exit_info:
        main(["transfer", "--config", str(config)])
    assert exit_info.value.code == 2
    assert not (pair["tmp"] / "runs" / "mismatch").exists()
    from sae_refusal.cli import job_config, transfer_parser
    from sae_refusal.transfer.job import TransferJobConfig, run_transfer_job

    cfg = job_config(transfer_parser(), ["--config", str(config)], TransferJobConfig)
    with pytest.raises(ValueError, match=r"map\.kind: .*width 32.*width 48.*least_squares"):
        run_transfer_job(cfg)


def test_the_linear_map_carries_a_wider_copy_of_the_model(pair: dict[str, Any]) -> None:
    from sae_refusal.transfer.linear_map import LinearMap

    config = _config(pair, "wide", pair["wide"], map={"kind": "least_squares", "ridge": 1e-8})
    main(["transfer", "--config", str(config)])
    out = pair["tmp"] / "runs" / "wide"
    m = _metrics(out)
    assert m["target"]["d_model"] == 48 and m["source"]["d_model"] == 32
    assert m["map"]["a_to_b"]["test"]["r2"] > 0.999 and m["map"]["b_to_a"]["test"]["r2"] > 0.999
    fitted = LinearMap.load(out / "maps" / "a_to_b")
    torch.testing.assert_close(fitted.W_DE, pair["known_map"].float(), atol=1e-2, rtol=0)  # scale 2.5
    quality = m["sae_quality"]["seed0"]
    assert quality["a_on_b"]["fvu"] == pytest.approx(quality["a_on_a"]["fvu"], rel=1e-3)
    seed = m["features"]["per_seed"]["seed0"]
    assert min(seed["compare"]["caa_cosine"].values()) > 0.999
    assert seed["head"]["a_on_b"]["accuracy"] == pytest.approx(seed["head"]["a_on_a"]["accuracy"])
    # A's vectors reach B through the map (width 48), ready for residual columns on B
    mapped = json.loads((out / "vectors" / "source_mapped" / "vectors.json").read_text())
    assert mapped["metadata"]["carried_by_map"] == "maps/a_to_b"


def test_an_sae_of_another_layer_or_model_is_refused_before_any_work(
    pair: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from sae_refusal.cli import job_config, transfer_parser
    from sae_refusal.llm.loading import LLMConfig, model_fingerprint
    from sae_refusal.transfer.job import TransferJobConfig, _check_sae_provenance

    sae = pair["sae"].parent
    fingerprinted = pair["tmp"] / "sae-fingerprinted" / "seed0"
    TopKSAE(32, 128, k=8).save(
        fingerprinted,
        metadata={
            "layer": LAYER,
            "model": str(pair["a"]),
            "model_fingerprint": model_fingerprint(LLMConfig(str(pair["a"]))),
        },
    )
    on_b = {"label": "A", "llm": {"name_or_path": str(pair["b"]), "dtype": "float32"}}
    cases = {
        "layer": (
            {"data": {"layer": 1}},
            "source.sae: seed0 was trained at layer 2, data.layer serves 1. Use the run's own config, or "
            "source.allow_other_model: true",
        ),
        "name": (
            {"source": {**on_b, "sae": str(sae)}},
            f"source.sae: seed0 was trained on {str(pair['a'])!r}, source.llm is {str(pair['b'])!r}",
        ),
        "weights": (
            {"source": {**on_b, "sae": str(fingerprinted.parent)}},
            f"source.sae: seed0 was trained on model {str(pair['a'])!r} whose weights differ from source.llm",
        ),
    }
    for name, (extra, message) in cases.items():
        config = _config(pair, f"refused-{name}", pair["a"], **extra)
        with pytest.raises(SystemExit) as exit_:
            main(["transfer", "--config", str(config)])
        assert exit_.value.code == 2
        assert f"sae-refusal: error: {message}" in capsys.readouterr().err
        assert not (pair["tmp"] / "runs" / f"refused-{name}").exists()
        allowed = job_config(transfer_parser(), ["--config", str(config)], TransferJobConfig)
        allowed.source.allow_other_model = True
        _check_sae_provenance(allowed.source, "source", allowed.data)  # on purpose: no error


def test_eval_columns_on_b_report_paired_deltas(pair: dict[str, Any]) -> None:
    gates = [str(pair["study"] / "gates" / g) for g in ("refusal_token", "probe")]
    sets = {**pair["sets"], "manifest_root": str(pair["tmp"] / "eval_splits"), "max_per_set": 8}
    columns = [
        {"owner": "source", "kind": "residual", "space": "caa", "alpha": 0.0, "name": "A zero"},
        {"owner": "source", "kind": "residual", "space": "caa", "alpha": 4.0},
        {"owner": "target", "kind": "residual", "space": "caa", "alpha": 4.0},
        {"owner": "source", "kind": "latent", "space": "sas", "alpha": 4.0},
        {"owner": "source", "kind": "gate", "gate": "probe"},
    ]
    config = _config(
        pair,
        "eval",
        pair["b"],
        source={
            "label": "A",
            "llm": {"name_or_path": str(pair["a"]), "dtype": "float32"},
            "sae": str(pair["tmp"] / "sae"),
            "gates": gates,
        },
        eval={
            "sets": sets,
            "columns": columns,
            "generation": {"max_new_tokens": 2, "batch_size": 8, "max_length": 128},
            "capability": {"tasks": []},
        },
        splice={"n_prompts": 0},
    )
    main(["transfer", "--config", str(config)])
    out = pair["tmp"] / "runs" / "eval"
    m = _metrics(out)
    names = [c["name"] for c in m["eval"]]
    assert names[0] == "B unsteered" and len(names) == 1 + len(columns)
    assert all("skipped" not in c for c in m["eval"]), [c.get("skipped") for c in m["eval"]]
    zero = m["eval"][1]["delta"]["refusal"]
    assert all(row["value"] == 0.0 for row in zero["sets"].values())
    # each delta is the paired difference of the per-item verdicts in the two columns' records
    judge = m["eval"][0]["judge"]

    def refused(folder: str) -> dict[tuple[str, str], float]:
        lines = (Path(folder) / "generations.jsonl").read_text().splitlines()
        return {
            (r["set"], r["id"]): float(r["judges"][judge]["verdict"] == "refused")
            for r in map(json.loads, lines)
        }

    base = refused(m["eval"][0]["folder"])
    for column in m["eval"][2:]:
        rows = refused(column["folder"])
        for set_name, row in column["delta"]["refusal"]["sets"].items():
            diffs = [rows[k] - base[k] for k in rows if k[0] == set_name]
            assert row["value"] == pytest.approx(sum(diffs) / len(diffs)) and row["n"] == len(diffs)
    gate = json.loads((Path(m["eval"][-1]["folder"]) / "metrics.json").read_text())
    assert gate["intervention"]["config"]["allow_other_model"] is True
    assert gate["intervention"]["config"]["gate"].endswith("probe")
    assert "Interventions on B" in (out / "report.md").read_text()


def test_a_gate_missing_from_its_owner_is_named(
    pair: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sae_refusal.cli import job_config, transfer_parser
    from sae_refusal.transfer.job import TransferJobConfig, run_transfer_job

    config = _config(
        pair,
        "nogate",
        pair["b"],
        eval={"sets": pair["sets"], "columns": [{"owner": "target", "kind": "gate", "gate": "probe"}]},
        splice={"n_prompts": 0},
    )
    cfg = job_config(transfer_parser(), ["--config", str(config)], TransferJobConfig)
    started = []
    monkeypatch.setattr("sae_refusal.transfer.job._load_side", lambda *a, **k: started.append(a))
    with pytest.raises(ValueError, match=r"eval\.columns\[0\]: gate 'probe' is not among target\.gates"):
        run_transfer_job(cfg)
    assert not started, "columns are checked before any model runs"
    assert not (pair["tmp"] / "runs" / "nogate").exists()
    cfg.source.gates = [str(pair["tmp"] / "no_such_gate")]
    with pytest.raises(FileNotFoundError, match=r"source\.gates\[0\]"):
        run_transfer_job(cfg)


def test_bad_settings_name_their_key() -> None:
    from sae_refusal.llm.loading import LLMConfig
    from sae_refusal.transfer.config import ColumnSpec, MapSettings, ModelSide, TransferJobConfig

    with pytest.raises(ValueError, match=r"map\.kind"):
        MapSettings(kind="procrustes")
    with pytest.raises(ValueError, match=r"map\.ridge"):
        MapSettings(ridge=-1.0)
    with pytest.raises(ValueError, match=r"eval\.columns: owner"):
        ColumnSpec(owner="both")
    with pytest.raises(ValueError, match=r"eval\.columns: a gate column"):
        ColumnSpec(kind="gate")
    with pytest.raises(ValueError, match=r"source\.sae"):
        TransferJobConfig(source=ModelSide(llm=LLMConfig()), target=ModelSide(llm=LLMConfig()))
    with pytest.raises(ValueError, match=r"labels? .*differ"):
        TransferJobConfig(
            source=ModelSide(llm=LLMConfig(), sae="x", label="m"),
            target=ModelSide(llm=LLMConfig(), label="m"),
        )


TRANSFER_CONFIGS = sorted(p for p in (CONFIGS / "transfer").glob("*_to_*.yaml"))


@pytest.mark.parametrize("path", TRANSFER_CONFIGS, ids=lambda p: p.name)
def test_every_transfer_config_parses_into_a_job_config(path: Path) -> None:
    from sae_refusal.cli import job_config, transfer_parser
    from sae_refusal.transfer.job import TransferJobConfig

    cfg = job_config(transfer_parser(), ["--config", str(path)], TransferJobConfig)
    assert cfg.source.sae and cfg.data.layer == 21 and cfg.eval is not None and cfg.eval.columns
    assert {cfg.source.llm.adapter_path, cfg.target.llm.adapter_path} == {None, "checkpoints/refuse-smollm2"}


def test_the_base_sae_config_fragment_parses_with_the_fit_configs() -> None:
    from tests.test_cli import parse

    cfg = parse(
        [
            "--config",
            str(CONFIGS / "default.yaml"),
            "--config",
            str(CONFIGS / "eval" / "sae_layer21.yaml"),
            "--config",
            str(CONFIGS / "transfer" / "sae_layer21_base.yaml"),
        ]
    )
    assert cfg.data.llm.adapter_path is None and cfg.data.layer == 21
    assert cfg.trainer.default_root_dir == "runs/eval_sae21_base"
