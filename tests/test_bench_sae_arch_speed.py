"""Smoke test of ``benchmarks/sae_arch_speed.py`` (every architecture steps, TopK is the baseline)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.benchmark_scripts import load_benchmark, torch_globals_kept

TINY = ["--device", "cpu", "--d-model", "16", "--expansion", "4", "--k", "4", "--batch", "64"]
TINY += ["--steps", "2", "--warmup", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("sae_arch_speed")


@pytest.fixture(autouse=True)
def _restore_torch_globals() -> Iterator[None]:
    """The script sets torch globals; give the rest of the session its own back."""
    with torch_globals_kept():
        yield


def test_every_architecture_is_timed_against_topk(bench: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    record = bench.main([*TINY, "--archs", "matryoshka,batchtopk,jumprelu,l1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    results = record["results"]
    assert list(results) == ["topk", "matryoshka", "batchtopk", "jumprelu", "l1"]  # the baseline first
    for name, row in results.items():
        assert row["status"] == "ok", name
        assert row["samples_per_s"] > 0 and row["step_ms_median"] > 0
        assert row["speed_vs_topk"] == pytest.approx(row["samples_per_s"] / results["topk"]["samples_per_s"])
    assert results["topk"]["speed_vs_topk"] == 1.0
    # the TopK family keeps k latents per row (on average, for the batch-level ones) in eval mode
    assert results["topk"]["eval_l0"] == pytest.approx(4.0)


def test_an_unknown_architecture_is_named(bench: ModuleType) -> None:
    with pytest.raises(ValueError, match=r"--archs: unknown architecture 'gated'"):
        bench.main([*TINY, "--archs", "topk,gated"])
