"""``benchmarks/sae_compare_table.py``: one row per (layer, architecture) from the sae-eval reports, the
steering layer first, and the figure."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest

from tests.benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("sae_compare_table")


def _summary(fvu: float, shared: float) -> dict[str, object]:
    stat = {"mean": 0.5, "std": 0.01}
    out: dict[str, object] = {
        "fvu": {"mean": fvu, "std": 0.0},
        "l0": {"mean": 32.0},
        "dead_share": {"mean": 0.25},
        "dense_share": {"mean": 0.01},
        "shrinkage": {"mean": 0.97},
        "max_cosine_mean": {"mean": 0.2},
        "head_accuracy": {"mean": 0.93, "std": 0.004},
        "absorption/full_absorption_rate": {"mean": 0.0},
        "absorption/main_miss_rate": {"mean": 0.05},
        "dense_probe/harmful_vs_benign": 0.96,
        "dense_probe/category_mean": 0.98,
        "stability/matched_share@0.7": 0.001,
        "stability/head_shared@0.7": shared,
        "stability/head_shared@0.5": 0.2,
    }
    for k in (1, 2, 5, 10, 20):
        out[f"sparse_probe_k{k}/harmful_vs_benign"] = stat
        out[f"sparse_probe_k{k}/category_mean"] = stat
    return out


def _write(root: Path, layer: int, arch: str, fvu: float, shared: float, seconds: int | None) -> None:
    folder = root / f"layer{layer}" / arch
    (folder / "sae_eval").mkdir(parents=True)
    report = {"summary": _summary(fvu, shared), "config": {"k": [1, 2, 5, 10, 20]}}
    (folder / "sae_eval" / "report.json").write_text(json.dumps(report))
    if seconds is not None:
        (folder / "fit_seconds.txt").write_text(str(seconds))


def test_rows_in_layer_and_architecture_order_with_their_numbers(bench: ModuleType, tmp_path: Path) -> None:
    _write(tmp_path, 12, "topk", 0.2, 0.0, 100)
    _write(tmp_path, 21, "l1", 0.3, 0.1, None)
    _write(tmp_path, 21, "topk", 0.1, 0.6, 280)
    reports = bench.load_reports(tmp_path)
    lines = bench.table(reports).splitlines()
    assert len(lines) == 2 + 3
    rows = [line.split(" | ") for line in lines[2:]]
    assert [(r[0], r[1]) for r in rows] == [("| 21", "TopK"), ("| 21", "ReLU-L1"), ("| 12", "TopK")]
    assert rows[0][2] == "0.100" and rows[0][3] == "32.0" and rows[0][4] == "25.0%"
    assert rows[0][13] == "0.600 / 0.200" and rows[0][14] == "280 |"
    assert rows[1][14] == "nan |"  # no fit time recorded
    out = tmp_path / "fig" / "compare.png"
    bench.figure(reports, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_empty_root_is_named(bench: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"--root: no <layer>/<arch>/sae_eval/report\.json under"):
        bench.load_reports(tmp_path)
