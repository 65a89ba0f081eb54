"""``benchmarks/distributed_cache_rate.py`` reads the summary line the cache build logs, and runs on CPU."""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType

import pytest

from sae_refusal.activations.build import CacheConfig, _summary, cached_activations
from sae_refusal.activations.coordinator import RankStatus
from sae_refusal.data.prompt_set import Label, Prompt, PromptSet
from sae_refusal.llm import LLMConfig
from tests.benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """The benchmark script, imported from its path."""
    return load_benchmark("distributed_cache_rate")


def test_the_summary_pattern_reads_the_line_the_build_logs(
    bench: ModuleType, tmp_path: Path, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sae_refusal")
    prompts = PromptSet([Prompt(f"p{i}", f"Say {i} things.", Label.BENIGN) for i in range(5)])
    cache = cached_activations(
        prompts, LLMConfig(name_or_path=str(tiny_model_dir)), CacheConfig(root=str(tmp_path), layers=(1,))
    )
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cached ")]
    match = bench.SUMMARY.search(line)
    assert match is not None and match["prompts"] == "5" and match["folder"] == str(cache.folder)
    assert match["per_rank"] is None
    statuses = [
        RankStatus(0, None, {"rows": 3, "seconds": 1.0}),
        RankStatus(1, None, {"rows": 0, "seconds": 0.0}),
    ]
    several = f"cached 3 prompts at layers [1] in 2.0 s ({_summary(statuses, 2.0)}) -> /x"
    match = bench.SUMMARY.search(several)
    assert match is not None and match["rate"] == "1.5" and match["per_rank"] == "3.0, -"


@pytest.mark.slow
def test_the_benchmark_runs_on_cpu_with_the_tiny_model(bench: ModuleType) -> None:
    result = bench.main(["--devices", "2", "--prompts", "40", "--shard-rows", "8"])
    assert result["one_process"]["prompts"] == result["2_processes"]["prompts"] == 40
    assert len(result["2_processes"]["per_rank_prompts_per_s"]) == 2
    assert result["caches"]["bytes_equal"] and result["caches"]["max_abs_diff"] == 0.0
