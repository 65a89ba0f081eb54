"""Smoke test of ``benchmarks/sae_throughput.py`` in a tiny CPU setting (throughput and quality modes)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from tests.benchmark_scripts import load_benchmark, torch_globals_kept

TINY = ["--device", "cpu", "--d-model", "32", "--expansion", "4", "--k", "8", "--batch", "128"]
TINY += ["--threads", "1"]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """The benchmark script, imported from its path."""
    return load_benchmark("sae_throughput")


@pytest.fixture(autouse=True)
def _restore_torch_globals() -> Iterator[None]:
    """The script sets torch globals; give the rest of the session its own back."""
    with torch_globals_kept():
        yield


def _run(bench: ModuleType, args: list[str], out: Path) -> dict[str, Any]:
    record = bench.main([*args, "--out", str(out)])
    stored = json.loads(out.read_text())
    assert stored == json.loads(json.dumps(record))
    return stored


def test_throughput_mode(bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record = _run(bench, [*TINY, "--steps", "2", "--warmup", "1"], tmp_path / "t.json")
    assert record["mode"] == "throughput"
    assert record["config"]["tf32"] is False and record["config"]["n_latents"] == 128
    for name in ("ours", "plain"):
        result = record["contenders"][name]
        assert result["status"] == "ok"
        assert result["samples_per_s"] > 0
        assert result["peak_mem_gib"] is None  # n/a on CPU
    # same seed, same batch: both start from the same SAE, so their first-step MSE agrees
    assert math.isclose(
        record["contenders"]["ours"]["first_step_mse"],
        record["contenders"]["plain"]["first_step_mse"],
        rel_tol=1e-4,
    )
    assert record["speedup_ours_over_plain"] > 0
    printed = capsys.readouterr().out
    assert "| ours |" in printed and "| plain |" in printed and "speed ours/plain" in printed
    assert "no AuxK" in printed
    if "saelens" not in record["contenders"]:
        assert "SAELens is not installed" in printed


def test_throughput_mode_with_auxk_active(bench: ModuleType, tmp_path: Path) -> None:
    args = [*TINY, "--steps", "2", "--warmup", "1", "--dead-fraction", "0.5", "--no-saelens"]
    record = _run(bench, args, tmp_path / "t.json")
    assert record["contenders"]["ours"]["aux_steps"] == 3  # every step ran the AuxK path
    assert record["contenders"]["ours"]["samples_per_s"] > 0


def _check_quality(record: dict[str, Any], k: int) -> None:
    assert record["mode"] == "quality"
    for name in ("ours", "plain"):
        result = record["contenders"][name]
        assert result["status"] == "ok"
        assert math.isfinite(result["fvu"]) and result["fvu"] >= 0.0
        assert math.isfinite(result["l0"]) and 0.0 < result["l0"] <= k
    assert math.isfinite(record["fvu_ours_minus_plain"])


def test_quality_mode_synthetic(bench: ModuleType, tmp_path: Path) -> None:
    # F = 1024 latents but only 16 * 8 active per batch: most latents sit out a step, so with a dead window
    # of 2 steps AuxK runs
    args = [*TINY, "--expansion", "32", "--batch", "16", "--quality", "--quality-steps", "12"]
    args += ["--eval-rows", "256", "--dead-after", "2"]
    record = _run(bench, args, tmp_path / "q.json")
    _check_quality(record, k=8)
    assert record["data"].startswith("synthetic")
    assert record["contenders"]["ours"]["aux_steps"] > 0  # dead after 2 steps: AuxK got exercised
    assert record["contenders"]["plain"]["aux_steps"] == 0


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_quality_mode_from_file(bench: ModuleType, tmp_path: Path, suffix: str) -> None:
    acts_ND = torch.randn(600, 24, generator=torch.Generator().manual_seed(0)) + 3.0
    path = tmp_path / f"acts{suffix}"
    if suffix == ".pt":
        torch.save(acts_ND, path)
    else:
        from safetensors.torch import save_file

        save_file({"layer_3": acts_ND}, str(path))
    args = [*TINY, "--quality", "--quality-steps", "5", "--acts", str(path), "--no-saelens"]
    record = _run(bench, args, tmp_path / "q.json")
    _check_quality(record, k=8)
    assert record["config"]["d_model"] == 24 and record["config"]["n_latents"] == 96
    assert record["eval_rows"] == 120  # a fifth of the rows are held out


def test_scale_mode_runs_every_size_fraction_and_contender(bench: ModuleType, tmp_path: Path) -> None:
    """One command: two sizes x two dead fractions, ours-bf16, sparsify (or its recorded skip), seeds."""
    args = [*TINY, "--steps", "2", "--warmup", "1", "--no-saelens", "--n-latents", "64,96"]
    args += ["--dead-fraction", "0,0.5", "--bf16", "--sparsify", "--seeds", "3"]
    record = _run(bench, args, tmp_path / "s.json")
    runs = record["runs"]
    assert [(r["n_latents"], r["dead_fraction"]) for r in runs] == [
        (64, 0.0),
        (64, 0.5),
        (96, 0.0),
        (96, 0.5),
    ]
    for run in runs:
        results = run["contenders"]
        for name in ("ours", "ours-bf16", "plain"):
            assert results[name]["status"] == "ok", results[name]
        assert results["sparsify"]["status"] in ("ok", "skipped")
        if results["sparsify"]["status"] == "ok":
            assert "ours/sparsify" in run["ratios"] and "ours-bf16/sparsify" in run["ratios"]
        assert run["ratios"]["ours/plain"] > 0
        if run["dead_fraction"] == 0.0:
            seeds = results["ours-bf16-x3"]
            assert seeds["status"] == "ok" and seeds["seeds"] == 3
            assert seeds["step_ms_median_per_seed"] == pytest.approx(seeds["step_ms_median"] / 3)
            assert "ours-bf16-x3 per-seed step / alone" in run["ratios"]
        else:
            assert results["ours"]["aux_steps"] == 3 and results["ours-bf16"]["aux_steps"] == 3
            assert "ours-bf16-x3" not in results
    assert set(record["auxk_step_time_overhead"]) >= {"ours F=64 dead=0.5", "ours-bf16 F=96 dead=0.5"}
    assert record["contenders"] == runs[0]["contenders"]


def test_a_failing_contender_is_recorded_and_the_run_goes_on(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Any, x_BD: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(bench.PlainContender, "step", broken)
    record = _run(bench, [*TINY, "--steps", "2", "--warmup", "1", "--no-saelens"], tmp_path / "f.json")
    assert record["contenders"]["plain"] == {
        "status": "failed",
        "error": "RuntimeError: kernel exploded",
        "peak_mem_gib": None,
    }
    assert record["contenders"]["ours"]["status"] == "ok"


def test_quality_mode_with_bf16_encoder(bench: ModuleType, tmp_path: Path) -> None:
    args = [*TINY, "--quality", "--quality-steps", "5", "--eval-rows", "256", "--bf16", "--no-saelens"]
    record = _run(bench, args, tmp_path / "q.json")
    assert record["contenders"]["ours-bf16"]["status"] == "ok"
    assert abs(record["fvu_ours_bf16_minus_ours"]) < 0.05


def test_sparsify_status_line(bench: ModuleType) -> None:
    ok, line = bench.sparsify_status()
    assert line.startswith("eai-sparsify" if ok else "sparsify is not importable")
