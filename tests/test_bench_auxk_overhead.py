"""Smoke test of ``benchmarks/auxk_overhead.py`` in a tiny CPU setting (table, JSON, the agreement gate)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from tests.benchmark_scripts import load_benchmark, torch_globals_kept

TINY = ["--device", "cpu", "--d_model", "16", "--n_latents", "64,128", "--k", "4", "--batch", "32"]
TINY += ["--aux_k", "8", "--steps", "2", "--warmup", "1"]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """The benchmark script, imported from its path."""
    return load_benchmark("auxk_overhead")


@pytest.fixture(autouse=True)
def _restore_torch_globals() -> Iterator[None]:
    """The script sets torch globals; give the rest of the session its own back."""
    with torch_globals_kept():
        yield


def test_the_cpu_smoke_run_prints_the_table_and_writes_the_json(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = bench.main([*TINY, "--out", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(record))
    assert set(record["sizes"]) == {"64", "128"}
    for entry in record["sizes"].values():
        assert set(entry["kernels"]) == {"bag", "sddmm"}
        for times in entry["kernels"].values():
            dead, alive = times["dead"], times["no_dead"]
            assert dead["aux_steps"] == 3 and alive["aux_steps"] == 0  # AuxK in every dead step, no other
            assert times["overhead"] == pytest.approx(dead["step_ms_median"] / alive["step_ms_median"] - 1)
        assert all(0 <= rel <= 1e-3 for rel in entry["agreement_rel_diff"].values())
    out = capsys.readouterr().out
    assert "overhead" in out and "bar <= 15%" in out and f"wrote {tmp_path / 'r.json'}" in out


def test_a_kernel_that_disagrees_is_not_timed_and_fails_the_run(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = bench.loss_and_grads

    def skewed(sae: Any, x_BD: torch.Tensor, kernel: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        loss, grads = real(sae, x_BD, kernel)
        return (loss * 1.01, grads) if kernel == "sddmm" else (loss, grads)

    monkeypatch.setattr(bench, "loss_and_grads", skewed)
    with pytest.raises(SystemExit, match="kernels that disagree with bag: sddmm at 64"):
        bench.main([*TINY, "--n_latents", "64"])
    out = capsys.readouterr().out
    assert "kernel sddmm disagrees with bag at 64 latents: not timed" in out
    assert "disagrees with bag: not timed" in out.split("agreement", 1)[1]


@pytest.mark.parametrize(
    ("flag", "value"), [("--kernels", "bag,dense"), ("--dead_fraction", "0"), ("--steps", "0")]
)
def test_bad_arguments_are_refused(bench: ModuleType, flag: str, value: str) -> None:
    with pytest.raises(SystemExit) as err:
        bench.parse_args([*TINY, flag, value])
    assert err.value.code == 2
