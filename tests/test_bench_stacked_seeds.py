"""Smoke test of ``benchmarks/stacked_seeds.py`` in a tiny CPU setting (table, JSON, the loss check)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.benchmark_scripts import load_benchmark, torch_globals_kept

TINY = ["--device", "cpu", "--d_model", "16", "--n_latents", "64", "--k", "4", "--batch", "32"]
TINY += ["--aux_k", "8", "--steps", "2", "--warmup", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """The benchmark script, imported from its path."""
    return load_benchmark("stacked_seeds")


@pytest.fixture(autouse=True)
def _restore_torch_globals() -> Iterator[None]:
    """The script sets torch globals; give the rest of the session its own back."""
    with torch_globals_kept():
        yield


def test_the_cpu_smoke_run_prints_the_table_and_writes_the_json(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = bench.main([*TINY, "--dead_fraction", "0.5", "--out", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(record))
    table = capsys.readouterr().out
    assert "stacked per seed / one alone" in table and "bar <= 0.6x" in table
    assert record["agreement"]["max_rel_diff"] < 1e-6  # float32 round-off at most (bit for bit here)
    assert record["agreement"]["aux_in_every_seed"] is True
    for name, seeds in (("one", 1), ("separate", 3), ("stacked", 3)):
        result = record["results"][name]
        assert result["seeds"] == seeds and result["step_ms_median"] > 0 and result["peak_mem_gib"] is None
        assert result["aux_steps"] == 3  # the dead subsets keep AuxK on every step
    # the same seeds, batch and steps: the stack trains what the separate seeds train
    assert record["results"]["stacked"]["last_losses"] == pytest.approx(
        record["results"]["separate"]["last_losses"], rel=1e-5
    )
    assert record["ratios"]["stacked_per_seed_over_one"] == pytest.approx(
        record["results"]["stacked"]["per_seed_ms"] / record["results"]["one"]["per_seed_ms"]
    )


def test_json_flag_prints_the_record(bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    record = bench.main([*TINY, "--json", "--encoder_dtype", "bfloat16", "--seeds", "2"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(record))
    assert record["config"]["encoder_dtype"] == "bfloat16" and record["results"]["stacked"]["seeds"] == 2
    assert record["agreement"]["aux_in_every_seed"] is None  # nothing forced dead


def test_a_disagreement_stops_the_run(bench: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    real = bench.StackedTopKSAE.forward

    def off(self, x_BD, return_latents=False):  # type: ignore[no-untyped-def]
        return [out._replace(loss=out.loss * 1.01) for out in real(self, x_BD, return_latents)]

    monkeypatch.setattr(bench.StackedTopKSAE, "forward", off)
    with pytest.raises(SystemExit, match="stacked and separate losses disagree"):
        bench.main(TINY)
