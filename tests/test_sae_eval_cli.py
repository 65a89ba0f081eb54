"""``sae-refusal sae-eval`` end to end on a tiny model's activations, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sae_refusal.cli import activation_datamodule, main
from sae_refusal.sae import L1, TopK
from tests.test_cli import tiny_config


@pytest.fixture()
def run(tmp_path: Path, tiny_model_dir: Path, prompt_file: Path) -> tuple[Path, Path]:
    """A tiny fit config and two SAE exports (TopK and ReLU seeds) made on its activations."""
    config = tiny_config(tmp_path, tiny_model_dir, prompt_file)
    datamodule = activation_datamodule(["--config", str(config)])
    datamodule.setup("fit")
    sae_dir = tmp_path / "run" / "sae"
    for seed, arch in enumerate((TopK(k=4), L1())):
        sae = arch.build(datamodule.d_model, 64, torch.Generator().manual_seed(seed))
        sae.save(sae_dir / f"seed{seed}", metadata={**datamodule.provenance(), "seed": seed, "epoch": 2})
    return config, sae_dir


def test_sae_eval_writes_the_report_and_prints_the_headline(
    run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, sae_dir = run
    main(["sae-eval", "--config", str(config), "--sae_dir", str(sae_dir), "--k", "1,2"])
    out = sae_dir.parent / "sae_eval"  # the default: beside the exports
    assert sorted(p.name for p in out.iterdir()) == ["density.png", "report.json", "report.md"]
    printed = capsys.readouterr().out
    assert f"wrote report.json, report.md, density.png to {out}" in printed
    assert (
        "k-sparse probe accuracy, harmful vs benign: k=1" in printed
        and "stability (cosine >= 0.7)" in printed
    )
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["k"] == [1, 2]
    meta = report["metadata"]
    assert (
        meta["layer"] == 2
        and meta["epoch"] == 2
        and meta["sae_paths"] == {"seed0": "../sae/seed0", "seed1": "../sae/seed1"}
    )
    assert meta["config_files"] == [str(config)]
    seeds = report["seeds"]
    assert sorted(seeds) == ["seed0", "seed1"] and seeds["seed1"]["architecture"] == "relu_l1"
    core = seeds["seed0"]["core"]
    assert core["l0"] <= 4 and core["explained_variance"] == pytest.approx(1 - core["fvu"])
    assert sum(core["density_histogram"]["counts"]) + core["density_histogram"]["dead"] == 64
    assert set(seeds["seed0"]["probing"]["tasks"]) == {"harmful_vs_benign", *report["class_names"][1:]}
    assert {"seed0->seed1", "seed1->seed0"} == set(report["stability"]["pairs"])
    assert report["summary"]["fvu"]["n"] == 2
    assert "## k-sparse probing" in (out / "report.md").read_text()
    # the folder is the job's: a second run on it fails at once, the report untouched
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["sae-eval", "--config", str(config), "--sae_dir", str(sae_dir), "--out", str(out)])
    assert exit_.value.code == 2 and "--out" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--k", "0,1"], "sae-refusal: error: --k must be distinct integers >= 1, got [0, 1]"),
        (["--dense_threshold", "1.5"], "sae-refusal: error: --dense_threshold must be in [0, 1)"),
        (["--fit_split", "nope"], "sae-refusal: error: --fit_split 'nope' is not a split of the data"),
        (
            ["--data.layer", "1"],
            "sae-refusal: error: --sae_dir: seed0 was trained at layer 2, data.layer serves 1",
        ),
    ],
)
def test_bad_options_are_one_line_naming_the_option_and_write_nothing(
    run: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    config, sae_dir = run
    out = tmp_path / "never_written"
    with pytest.raises(SystemExit) as exit_:
        main(["sae-eval", "--config", str(config), "--sae_dir", str(sae_dir), "--out", str(out), *extra])
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sae-refusal: error:")]
    assert len(errors) == 1 and errors[0].startswith(message)
    assert not out.exists()


def test_bad_inputs_name_the_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "fit.yaml"
    config.write_text("data: {}\n")
    with pytest.raises(SystemExit) as exit_:
        main(["sae-eval", "--config", str(config), "--sae_dir", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("sae-refusal: error: --sae_dir") and "no cfg.json" in err
    with pytest.raises(SystemExit):
        main(["sae-eval", "--config", str(config), "--sae_dir", str(tmp_path / "missing")])
    assert "--out: give an output folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sae-eval", "--config", str(config), "--sae_dir", str(tmp_path), "--k", "1,x"])
    assert "--k: expected comma-separated integers, got '1,x'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sae-eval", "--sae_dir", str(tmp_path)])
    assert "--config" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path.parent / "sae_eval").exists()
