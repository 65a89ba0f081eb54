"""An activation cache built by several processes is the cache one process builds, byte for byte (issue 27).

* Work units are the final shards; a 2-rank run (``sae-refusal cache --trainer.devices 2``, gloo on CPU)
  writes the same shard files, prompt rows and identity as one process.
* Shares are balanced by token count (greedy longest-processing-time) and deterministic.
* A stopped run keeps its finished shards in a hidden staging folder; the next run (any number of ranks)
  recomputes only the shards missing there, corrupt, or of another cache, and no manifest exists before then.
* A rank that fails makes every rank raise (no rank hangs at a collective); no manifest is written.
* A second job computing the same cache waits for the first one's claim and reuses its result.
* A 2-rank fit (``ddp_spawn``) fills a missing cache in the data module's ``setup``, both ranks taking part.

Multi-process runs start ``torch.multiprocessing`` workers (a gloo group over a file store), a Lightning
fit or the CLI in a subprocess; they are marked slow (each starts Python processes that import torch and
transformers, 10-20 s on 2 cores).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml

import sae_refusal.activations.build as build
from sae_refusal.activations import staging as staging_module
from sae_refusal.activations.build import CacheConfig, cached_activations, request_identity
from sae_refusal.activations.cache import (
    MANIFEST_NAME,
    ActivationCache,
    NonFiniteActivationsError,
    find_cache,
)
from sae_refusal.activations.coordinator import Coordinator, RankFailedError, RankStatus
from sae_refusal.activations.datamodule import ActivationDataModule
from sae_refusal.activations.shards import assign_longest_first, shard_costs, shard_plan
from sae_refusal.atomic import FolderClaim
from sae_refusal.data.prompt_set import Label, Prompt, PromptSet
from sae_refusal.data.sources import PromptSetConfig, PromptSourceConfig
from sae_refusal.data.splits import SplitConfig
from sae_refusal.llm import LLMConfig
from sae_refusal.llm.extraction import ResidualBatch

REPO = Path(__file__).resolve().parents[1]
#: Words per prompt: short and long ones mixed, so shards differ a lot in cost.
WORDS = [1, 40, 2, 3, 90, 1, 5, 60, 2, 1, 30, 4, 2, 70, 1, 3, 2, 50, 6, 1, 2, 80, 3, 1, 20, 2, 1]
SHARD_ROWS = 4  # 27 prompts: 7 shards, the last one of 3 rows


def prompts() -> PromptSet:
    return PromptSet(
        [
            Prompt(id=f"p{i}", text=f"Question {i}: " + "tell me more " * n, label=Label.BENIGN)
            for i, n in enumerate(WORDS)
        ]
    )


def cache_cfg(root: Path) -> CacheConfig:
    return CacheConfig(root=str(root), layers=(1, 2), batch_size=3, sort_window=2, shard_rows=SHARD_ROWS)


def shard_bytes(cache: ActivationCache) -> list[bytes]:
    return [(cache.folder / entry["file"]).read_bytes() for entry in cache.manifest["shards"]]


def assert_same_cache(a: ActivationCache, b: ActivationCache) -> None:
    """Same identity, prompt rows, shard list (sizes, sha256) and bytes; only ``extra.world_size`` differs."""
    assert a.manifest["identity"] == b.manifest["identity"]
    assert a.prompts == b.prompts
    assert a.manifest["shards"] == b.manifest["shards"]
    assert shard_bytes(a) == shard_bytes(b)
    extra_a, extra_b = dict(a.manifest["extra"]), dict(b.manifest["extra"])
    extra_a.pop("world_size"), extra_b.pop("world_size")
    assert extra_a == extra_b


def count_shards(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The shard indices extracted from now on (one entry per shard computed)."""
    extracted: list[int] = []
    real = build._extract_shard

    def counting(*args: Any, **kwargs: Any) -> Any:
        extracted.append(args[3].index)
        return real(*args, **kwargs)

    monkeypatch.setattr(build, "_extract_shard", counting)
    return extracted


def stop_after(monkeypatch: pytest.MonkeyPatch, n_shards: int) -> None:
    """Make the next build raise KeyboardInterrupt when it starts shard ``n_shards`` (shards in order)."""
    real = build._extract_shard
    started = itertools.count()

    def stopping(*args: Any, **kwargs: Any) -> Any:
        if next(started) == n_shards:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(build, "_extract_shard", stopping)


# ============================================================================== share-out (pure)


def test_shards_are_the_final_row_ranges_in_prompt_order() -> None:
    plan = shard_plan(27, 4)
    assert [(s.index, s.first_row, s.rows) for s in plan] == [(i, 4 * i, 4) for i in range(6)] + [(6, 24, 3)]
    assert shard_plan(0, 4) == [] and [s.rows for s in shard_plan(4, 4)] == [4]
    with pytest.raises(ValueError, match=r"data\.cache\.shard_rows must be >= 1"):
        shard_plan(3, 0)


def test_shares_are_balanced_by_token_count_and_deterministic() -> None:
    lengths = [3 * n + 10 for n in WORDS]  # token counts as the chat template makes them, roughly
    costs = shard_costs(lengths, shard_plan(len(lengths), SHARD_ROWS))
    assert costs == {i: sum(lengths[4 * i : 4 * i + 4]) for i in range(7)}
    for world in (2, 3):
        shares = assign_longest_first(costs, world)
        assert sorted(i for share in shares for i in share) == list(range(7))  # every shard once
        loads = [sum(costs[i] for i in share) for share in shares]
        # LPT: the busiest rank carries at most the mean plus one shard (and here beats round-robin)
        assert max(loads) <= sum(costs.values()) / world + max(costs.values())
        round_robin = [sum(costs[i] for i in range(r, 7, world)) for r in range(world)]
        assert max(loads) < max(round_robin)
        # the same whatever the order the costs come in
        assert assign_longest_first(dict(reversed(list(costs.items()))), world) == shares
        assert all(share == sorted(share) for share in shares)
    # costliest first, each to the least loaded rank (ties: lower shard index, lower rank)
    # 1 -> rank 0, 2 -> rank 1, 0 -> rank 0 (9 = 9), 4 -> rank 1 (13 < 14), 3 -> rank 1 (14 = 14)
    assert assign_longest_first({0: 5, 1: 9, 2: 9, 3: 1, 4: 4}, 2) == [[0, 1], [2, 3, 4]]
    assert assign_longest_first({0: 3}, 3) == [[0], [], []]  # more ranks than shards: some idle
    assert assign_longest_first({}, 2) == [[], []]
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        assign_longest_first(costs, 0)


# ============================================================================== coordination (one process)


class _RankOne(Coordinator):
    """Rank 1 of 2, as it sees the collectives: rank 0's results are given."""

    def __init__(self, rank0: Any) -> None:
        self.rank, self.world_size, self.rank0 = 1, 2, rank0

    def broadcast_object(self, obj: Any) -> Any:
        return self.rank0

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [self.rank0, obj]


def test_a_failed_rank_is_named_on_the_others_and_raises_its_own_error_itself() -> None:
    failed = RankStatus(0, "NonFiniteActivationsError: nan at layer 1")
    with pytest.raises(
        RankFailedError, match=r"^rank 0 failed while extracting: NonFiniteActivationsError: nan"
    ):
        _RankOne(failed).all_succeeded(None, "extracting")
    own = ValueError("mine")
    with pytest.raises(ValueError, match=r"^mine$"):
        _RankOne(failed).all_succeeded(own, "extracting")
    assert _RankOne(RankStatus(0, None, {"rows": 3})).all_succeeded(None, "x", {"rows": 2}) == [
        RankStatus(0, None, {"rows": 3}),
        RankStatus(1, None, {"rows": 2}),
    ]
    with pytest.raises(RankFailedError, match=r"^rank 0 failed while planning: OSError: disk full"):
        _RankOne(("OSError: disk full", None)).on_rank0(lambda: 1, "planning", share=True)
    assert _RankOne((None, {"plan": 1})).on_rank0(lambda: 0, "planning", share=True) == {"plan": 1}
    assert _RankOne((None, None)).on_rank0(lambda: 0, "planning") is None  # rank 0's work only
    with pytest.raises(KeyError):
        Coordinator().on_rank0(lambda: {}["x"], "x")  # one process: its own error, as raised


# ============================================================================== resume (one process)


def test_a_rerun_recomputes_only_missing_corrupt_and_foreign_shards(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = LLMConfig(name_or_path=str(tiny_model_dir))
    fresh = cached_activations(prompts(), llm, cache_cfg(tmp_path / "fresh"))
    root = tmp_path / "cache"
    cfg = cache_cfg(root)
    stop_after(monkeypatch, 5)  # shards 0-4 finished, then Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        cached_activations(prompts(), llm, cfg)
    identity = request_identity(prompts(), llm, cfg)
    staged = root / f".{identity.key()}.partial"
    assert find_cache(root, identity) is None and not (root / identity.key()).exists()  # no manifest yet
    assert sorted(p.name for p in staged.iterdir()) == sorted(
        f"shard-{i:05d}.{ext}" for i in range(5) for ext in ("json", "safetensors")
    )
    corrupt = staged / "shard-00001.safetensors"
    data = bytearray(corrupt.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes: only the sha256 tells
    corrupt.write_bytes(bytes(data))
    foreign = json.loads((staged / "shard-00003.json").read_text())
    (staged / "shard-00003.json").write_text(json.dumps({**foreign, "identity_key": "0" * 16}))
    (staged / "shard-00002.json").unlink()  # a file whose sidecar never got written
    (staged / ".shard-00005.safetensors.tmp-0-0-0").write_bytes(b"half")  # debris of a killed write
    monkeypatch.undo()
    extracted = count_shards(monkeypatch)
    resumed = cached_activations(prompts(), llm, cfg)
    assert sorted(extracted) == [1, 2, 3, 5, 6]  # 0 and 4 were kept
    assert not staged.exists()
    assert_same_cache(resumed, fresh)
    assert (resumed.folder / MANIFEST_NAME).read_bytes() == (fresh.folder / MANIFEST_NAME).read_bytes()
    assert sorted(p.name for p in resumed.folder.iterdir()) == sorted(p.name for p in fresh.folder.iterdir())


def test_staged_shards_of_another_shard_size_are_not_reused(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = LLMConfig(name_or_path=str(tiny_model_dir))
    root = tmp_path / "cache"
    stop_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        cached_activations(prompts(), llm, cache_cfg(root))
    monkeypatch.undo()
    extracted = count_shards(monkeypatch)
    other = dataclasses.replace(cache_cfg(root), shard_rows=5)
    cache = cached_activations(prompts(), llm, other)
    assert sorted(extracted) == list(range(6)) and [s["rows"] for s in cache.manifest["shards"]][-1] == 2


def test_a_failed_build_that_finished_no_shard_leaves_no_staging_folder(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def non_finite(*args: Any, **kwargs: Any) -> Iterator[ResidualBatch]:
        for batch in real(*args, **kwargs):
            batch.acts = {layer: torch.full_like(a, float("nan")) for layer, a in batch.acts.items()}
            yield batch

    real = build.iter_last_token_residuals
    monkeypatch.setattr(build, "iter_last_token_residuals", non_finite)
    root = tmp_path / "cache"
    with pytest.raises(NonFiniteActivationsError, match="for prompt 'p0'"):
        cached_activations(prompts(), LLMConfig(name_or_path=str(tiny_model_dir)), cache_cfg(root))
    assert not root.exists()  # nor the claim, nor the root the claim made


def test_a_second_job_waits_for_the_first_and_reuses_its_cache(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sae_refusal")
    llm = LLMConfig(name_or_path=str(tiny_model_dir))
    done = cached_activations(prompts(), llm, cache_cfg(tmp_path / "elsewhere"))
    root = tmp_path / "cache"
    folder = root / done.folder.name
    first_job = FolderClaim(folder, existing_ok=True).__enter__()  # a running job computing the same cache

    def first_job_finishes() -> None:
        shutil.copytree(done.folder, folder)
        first_job.release()

    monkeypatch.setattr(staging_module, "CLAIM_POLL_S", 0.05)
    extracted = count_shards(monkeypatch)
    timer = threading.Timer(0.5, first_job_finishes)
    timer.start()
    try:
        cache = cached_activations(prompts(), llm, cache_cfg(root))
    finally:
        timer.join()
    assert extracted == [] and cache.folder == folder
    assert any(
        "waiting for another job computing the same activation cache" in r.message for r in caplog.records
    )
    assert sorted(p.name for p in root.iterdir()) == [folder.name]  # the claim is gone, no staging left


# ============================================================================== several processes


def _rank_main(rank: int, world: int, store: str, out: str, job: dict[str, Any]) -> None:
    """One rank of a spawned run: builds the cache of ``job`` and reports what it did in ``rank{r}.json``."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    extracted: list[int] = []
    real_extract, real_iter = build._extract_shard, build.iter_last_token_residuals

    def counting(*args: Any, **kwargs: Any) -> Any:
        extracted.append(args[3].index)
        return real_extract(*args, **kwargs)

    def non_finite(*args: Any, **kwargs: Any) -> Iterator[ResidualBatch]:
        for batch in real_iter(*args, **kwargs):
            batch.acts = {layer: torch.full_like(a, float("inf")) for layer, a in batch.acts.items()}
            yield batch

    build._extract_shard = counting  # type: ignore[assignment]
    if job.get("fail_on_rank") == rank:
        build.iter_last_token_residuals = non_finite  # type: ignore[assignment]
    result: dict[str, Any] = {}
    try:
        cache = cached_activations(
            prompts(), LLMConfig(name_or_path=job["model"]), cache_cfg(Path(job["root"]))
        )
        result["folder"] = str(cache.folder)
    except Exception as err:
        result.update(error=type(err).__name__, message=str(err))
    finally:
        result["extracted"] = extracted
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()


def run_ranks(
    tmp_path: Path, job: dict[str, Any], world: int = 2, timeout: float = 240.0
) -> list[dict[str, Any]]:
    """Run ``job`` on ``world`` spawned gloo ranks; fail (killing them) if not done within ``timeout`` s."""
    out = tmp_path / f"ranks-{time.monotonic_ns()}"
    out.mkdir()
    context = torch.multiprocessing.start_processes(
        _rank_main,
        args=(world, str(out / "store"), str(out), job),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the ranks did not end within {timeout} s (a rank hangs at a collective)")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.slow
def test_two_ranks_resume_what_one_process_left(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = LLMConfig(name_or_path=str(tiny_model_dir))
    fresh = cached_activations(prompts(), llm, cache_cfg(tmp_path / "fresh"))
    root = tmp_path / "cache"
    stop_after(monkeypatch, 2)  # one process finished shards 0 and 1
    with pytest.raises(KeyboardInterrupt):
        cached_activations(prompts(), llm, cache_cfg(root))
    monkeypatch.undo()
    ranks = run_ranks(tmp_path, {"model": str(tiny_model_dir), "root": str(root)})
    assert [r.get("error") for r in ranks] == [None, None]
    done = [set(r["extracted"]) for r in ranks]
    assert done[0] and done[1] and done[0].isdisjoint(done[1])  # both ranks worked, on different shards
    assert sorted(done[0] | done[1]) == [2, 3, 4, 5, 6]
    assert ranks[0]["folder"] == ranks[1]["folder"]
    cache = ActivationCache.open(ranks[0]["folder"])
    assert cache.manifest["extra"]["world_size"] == 2
    assert_same_cache(cache, fresh)


@pytest.mark.slow
def test_a_failing_rank_makes_every_rank_raise_and_writes_no_manifest(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    root = tmp_path / "cache"
    ranks = run_ranks(tmp_path, {"model": str(tiny_model_dir), "root": str(root), "fail_on_rank": 1})
    assert ranks[1]["error"] == "NonFiniteActivationsError"
    assert "produced non-finite activations" in ranks[1]["message"]
    assert ranks[0]["error"] == "RankFailedError"
    assert ranks[0]["message"].startswith(
        "rank 1 failed while extracting activations: NonFiniteActivationsError:"
    )
    assert not list(root.glob(f"*/{MANIFEST_NAME}"))  # no cache
    # rank 0's shards were finished and stay staged for the next run; rank 1's first one failed
    (staged,) = root.glob(".*.partial")
    assert sorted(p.name for p in staged.glob("*.json")) == [
        f"shard-{i:05d}.json" for i in ranks[0]["extracted"]
    ]
    assert [p.name for p in root.iterdir() if p.name.endswith(".claim")] == []


def _cli_config(tmp_path: Path, model: Path, root: Path) -> Path:
    rows = [{"id": f"p{i}", "prompt": f"Question {i}: " + "tell me more " * n} for i, n in enumerate(WORDS)]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = {
        "trainer": {"accelerator": "cpu", "devices": 1},
        "model": {"class_path": "sae_refusal.sae.SAEModule"},
        "data": {
            "llm": {"name_or_path": str(model)},
            "prompts": {
                "data_root": str(tmp_path),
                "sources": [{"name": "b", "label": "benign", "path": "prompts.jsonl", "id_column": "id"}],
            },
            "cache": {"root": str(root), "layers": [1, 2], "batch_size": 3, "shard_rows": SHARD_ROWS},
        },
    }
    path = tmp_path / "cache.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_the_cache_command_on_two_processes_writes_the_one_process_cache(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    config = _cli_config(tmp_path, tiny_model_dir, tmp_path / "cache")
    command = [sys.executable, "-m", "sae_refusal", "cache", "--config", str(config)]
    # one torch thread per process in both runs: Lightning's launcher would otherwise split the cores
    # among the ranks, and another thread count sums in another order (round-off, not the same bytes)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [*command, "--data.cache.root", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [*command, "--trainer.devices", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert two.returncode == 0, two.stderr
    assert "caching activations [rank 0/2]" in two.stderr and "caching activations [rank 1/2]" in two.stderr
    assert "(27 prompts, layers [1, 2], 2 process(es))" in two.stderr
    assert "prompts/s; per rank: " in two.stderr
    assert two.stdout.count("activation cache: ") == 1  # rank 0 reports
    (a,), (b,) = (list(tmp_path.glob(f"{root}/*/{MANIFEST_NAME}")) for root in ("one", "cache"))
    cache_one, cache_two = ActivationCache.open(a.parent), ActivationCache.open(b.parent)
    assert cache_two.manifest["extra"]["world_size"] == 2 and len(cache_two.manifest["shards"]) == 7
    assert_same_cache(cache_two, cache_one)


class _Probe(L.LightningModule):
    """A linear probe that trains on nothing (lr 0): the fit is only there to run the data module."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(32, 1)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.layer(batch["acts"]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.slow
@pytest.mark.usefixtures("lightning_globals_restored")  # ddp_spawn leaves MASTER_PORT set
def test_a_two_rank_fit_fills_a_missing_cache_in_setup_on_both_ranks(
    tmp_path: Path, tiny_model_dir: Path, prompt_file: Path
) -> None:
    sources = [
        PromptSourceConfig(
            name="h", label="harmful", path="harmful.jsonl", id_column="id", category_column="category"
        ),
        PromptSourceConfig(name="b", label="benign", path="benign.json", text_column="instruction"),
    ]
    dm = ActivationDataModule(
        llm=LLMConfig(name_or_path=str(tiny_model_dir)),
        prompts=PromptSetConfig(data_root=str(prompt_file), sources=sources),
        split=SplitConfig(test_fraction=0.25, val_fraction=0.0, seed=0),
        cache=CacheConfig(root=str(tmp_path / "cache"), layers=(1, 2), batch_size=3, shard_rows=5),
        batch_size=4,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(_Probe(), datamodule=dm)
    (manifest,) = (tmp_path / "cache").glob(f"*/{MANIFEST_NAME}")
    cache = ActivationCache.open(manifest.parent)
    assert cache.manifest["extra"]["world_size"] == 2  # both ranks took part
    assert [s["rows"] for s in cache.manifest["shards"]] == [5, 5, 5, 5, 4]
    assert cache.identity == request_identity(dm.load_prompts(), dm.llm, dm.cache)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")) == []
