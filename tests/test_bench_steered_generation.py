"""Smoke test of ``benchmarks/steered_generation.py``: its variants suite and its classic mode, tiny, CPU."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from tests.benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """The benchmark script, imported from its path."""
    return load_benchmark("steered_generation")


@pytest.fixture(autouse=True)
def _threads_restored() -> Iterator[None]:
    """The script sets torch's thread count (``--threads``, default 1); give the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_variants_suite(bench: ModuleType) -> None:
    report = bench.main(["--fast", "--tiny", "--new-tokens", "4", "--repeats", "1", "--batch-sizes", "1,3"])
    assert report["fast_mode"] == "static"
    assert [row["batch_size"] for row in report["results"]] == [1, 3]
    row = report["results"][1]
    errors = {label: v["error"] for label, v in row["variants"].items() if "error" in v}
    assert not errors
    for label in (
        "hf_dynamic",
        "project_residual",
        "fast_unsteered",
        "fast_sae_latent_bf16enc",
        "fast_gate_probe_fused",
    ):
        assert row["variants"][label]["tokens_per_s"] > 0
    agreement = row["token_agreement"]
    assert agreement["fast_unsteered_vs_hf_dynamic"]["identical_fraction"] == 1.0
    assert agreement["fast_residual_vs_project_residual"]["identical_fraction"] == 1.0
    assert agreement["fast_sae_fp32enc_vs_project_sae_latent"]["identical_fraction"] == 1.0
    assert row["tokens_changed_by_steering"]["fast_residual"]["changed_fraction"] > 0
    assert row["tokens_changed_by_steering"]["fast_gate_probe_fused"]["unpicked_rows_identical_to_unsteered"]
    assert row["probe_gate_fused_vs_separate_decisions_agree"] == 1.0
    assert set(row["gate_cost"]) == {
        "fast_gate_probe_separate",
        "fast_gate_probe_fused",
        "fast_gate_refusal_token_separate",
    }
    assert "fast_residual" in row["overhead_pct_vs_unsteered"]
    assert "fast_unsteered" in row["speedup_vs_hf_dynamic"]


def test_a_failing_variant_is_recorded(bench: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("no SAE today")

    monkeypatch.setattr(bench.SAELatentAdd, "__call__", broken)
    report = bench.main(["--fast", "--tiny", "--new-tokens", "2", "--repeats", "1", "--batch-sizes", "2"])
    variants = report["results"][0]["variants"]
    assert "no SAE today" in variants["fast_sae_latent_fp32enc"]["error"]
    assert variants["fast_gate_probe_fused"]["tokens_per_s"] > 0  # the run went on


def test_classic_mode(bench: ModuleType) -> None:
    report = bench.main(["--tiny", "--new-tokens", "3", "--repeats", "1", "--batch-sizes", "1,2"])
    assert report["benchmark"] == "steered_generation"
    assert [row["batch_size"] for row in report["results"]] == [1, 2]


def test_compiled_pair_shares_one_step(bench: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--compile``: one compiled generator serves compiled_unsteered (alpha 0) and compiled_residual."""
    compiled: list[object] = []

    def fake_compile(fn: object, **_kwargs: object) -> object:  # no inductor on the test CPU
        compiled.append(fn)
        return fn

    monkeypatch.setattr(bench.torch, "compile", fake_compile)
    argv = ["--fast", "--tiny", "--new-tokens", "3", "--repeats", "1", "--batch-sizes", "2"]
    report = bench.main([*argv, "--compile", "--compile-batches", "2", "--skip-project-sae"])
    row = report["results"][0]
    variants = row["variants"]
    assert len(compiled) == 1  # compiled once
    assert variants["compiled_unsteered"]["tokens_per_s"] > 0
    assert variants["compiled_residual"]["tokens_per_s"] > 0
    assert variants["compiled_residual"]["capture_or_compile_s"] == 0.0
    assert "fast_residual" in row["overhead_pct_vs_unsteered"]
    agreement = row["token_agreement"]
    assert agreement["compiled_unsteered_vs_fast_unsteered"]["identical_fraction"] == 1.0
    assert agreement["compiled_residual_vs_fast_residual"]["identical_fraction"] == 1.0
