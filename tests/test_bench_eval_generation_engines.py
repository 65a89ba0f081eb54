"""Smoke test of ``benchmarks/eval_generation_engines.py``: eval generation on both engines, tiny, CPU."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from sae_refusal.llm import fast_generate
from tests.benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """The benchmark script, imported from its path."""
    return load_benchmark("eval_generation_engines")


@pytest.fixture(autouse=True)
def _threads_restored() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_both_engines_give_the_same_answers(bench: ModuleType, tmp_path: Path) -> None:
    generator_class = fast_generate.StaticGenerator
    out = tmp_path / "engines.json"
    args = ["--tiny", "--n-prompts", "10", "--batch-size", "4", "--max-new-tokens", "4", "--threads", "1"]
    report = bench.main([*args, "--kind", "none,gate", "--json-out", str(out)])
    assert out.is_file() and fast_generate.StaticGenerator is generator_class  # the counter is undone
    assert [row["kind"] for row in report["kinds"]] == ["none", "gate"]
    for row in report["kinds"]:
        assert row["prompts"] == 10 and row["identical_outputs"] == 1.0
        assert row["hf_prompts_per_s"] > 0 and row["fast_prompts_per_s"] > 0
        assert row["fast_engine"]["generators"] >= 1 and row["fast_engine"]["eager_batches"] == 0
    gate = report["kinds"][1]
    assert 0 < gate["steered_prompts"] < 10
