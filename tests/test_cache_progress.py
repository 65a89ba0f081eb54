"""Filling an activation cache shows how far it is, says what it did, and leaves nothing half-written.

The progress bar (stderr) moves after every forward pass, not once per length-sorting window; a summary line
(prompts, layers, seconds, prompts/s, folder) goes to the log; an exception or Ctrl-C in the middle of a
write leaves no cache and nothing half-written: the cache root as it was, plus a hidden staging folder of the
shards finished before the stop, from which the next run resumes.
"""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import sae_refusal.activations.build as build
from sae_refusal.activations.build import CacheConfig, cached_activations, request_identity
from sae_refusal.atomic import _host_tag
from sae_refusal.data.chat import format_prompts
from sae_refusal.data.prompt_set import Label, Prompt, PromptSet
from sae_refusal.llm import LLMConfig, load_model, load_tokenizer
from sae_refusal.llm.extraction import ResidualBatch, iter_last_token_residuals

PROMPTS = PromptSet(
    [
        Prompt(id=f"p{i}", text=f"Tell me fact number {i} about {'the sea ' * (i % 4)}.", label=Label.BENIGN)
        for i in range(11)
    ]
)


def tree(root: Path) -> list[str]:
    """Every path under ``root`` (hidden ones too), relative, sorted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_progress_is_reported_after_every_forward_pass(tiny_model_dir: Path) -> None:
    llm = LLMConfig(name_or_path=str(tiny_model_dir))
    tokenizer, model = load_tokenizer(llm), load_model(llm)
    texts = format_prompts(tokenizer, PROMPTS.texts)
    events: list[tuple[str, int]] = []
    batches = iter_last_token_residuals(
        model,
        tokenizer,
        texts,
        [1],
        batch_size=3,
        sort_window=2,
        progress=lambda n: events.append(("forward", n)),
    )
    for batch in batches:
        events.append(("batch", len(batch.indices)))
    # windows of 6 prompts: both forwards of a window run before its batches are yielded
    assert events == [
        ("forward", 3),
        ("forward", 3),
        ("batch", 3),
        ("batch", 3),
        ("forward", 3),
        ("forward", 2),
        ("batch", 3),
        ("batch", 2),
    ]


def test_caching_shows_a_progress_bar_and_logs_a_summary(
    tmp_path: Path,
    tiny_model_dir: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sae_refusal")
    cfg = CacheConfig(root=str(tmp_path / "cache"), layers=(1, 2), batch_size=4)
    cache = cached_activations(PROMPTS, LLMConfig(name_or_path=str(tiny_model_dir)), cfg)
    err = capsys.readouterr().err
    assert "caching activations" in err and "11/11" in err and "prompt/s" in err
    (summary,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cached ")]
    assert summary.startswith("cached 11 prompts at layers [1, 2] in ")
    assert summary.endswith(f" prompts/s) -> {cache.folder}")


class Interrupt(KeyboardInterrupt):
    pass


@pytest.mark.parametrize("error", [Interrupt, RuntimeError])
def test_a_cache_stopped_mid_write_keeps_only_finished_shards_and_the_rerun_resumes(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, error: type[BaseException]
) -> None:
    """No cache and nothing half-written: the root as it was plus the staging folder of whole shards."""
    llm = LLMConfig(name_or_path=str(tiny_model_dir))
    root = tmp_path / "cache"
    done = cached_activations(PROMPTS, llm, CacheConfig(root=str(root), layers=(1,), batch_size=2))
    (root / "splits-abc.json").write_text("{}")
    before = tree(root)
    real = build.iter_last_token_residuals
    seen = itertools.count()

    def stops_at_the_fourth_batch(*args: Any, **kwargs: Any) -> Iterator[ResidualBatch]:
        for batch in real(*args, **kwargs):
            if next(seen) == 3:
                raise error("stopped mid-write")
            yield batch

    monkeypatch.setattr(build, "iter_last_token_residuals", stops_at_the_fourth_batch)
    # shard_rows=2 = batch_size: one batch per shard; shards 0-2 are finished when the write stops
    cfg = CacheConfig(root=str(root), layers=(1, 2), batch_size=2, shard_rows=2)
    with pytest.raises(error, match="stopped mid-write"):
        cached_activations(PROMPTS, llm, cfg)
    staged = f".{request_identity(PROMPTS, llm, cfg).key()}.partial"
    finished = [f"{staged}/shard-{i:05d}.{ext}" for i in range(3) for ext in ("json", "safetensors")]
    assert tree(root) == sorted([*before, staged, *finished])
    assert done.folder.name in before
    calls = itertools.count()

    def counted(*args: Any, **kwargs: Any) -> Iterator[ResidualBatch]:
        next(calls)
        yield from real(*args, **kwargs)

    monkeypatch.setattr(build, "iter_last_token_residuals", counted)
    cache = cached_activations(PROMPTS, llm, cfg)
    assert next(calls) == 3  # shards 3, 4 and 5 (1 row) only
    shards = [entry["file"] for entry in cache.manifest["shards"]]
    assert tree(root) == sorted(
        [
            *before,
            cache.folder.name,
            *(f"{cache.folder.name}/{f}" for f in [*shards, "manifest.json", "prompts.jsonl"]),
        ]
    )
    assert len(shards) == 6


@pytest.mark.skipif(os.name != "posix", reason="the liveness probe is POSIX-only")
def test_a_new_cache_removes_what_a_killed_run_left_under_the_root(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """SIGKILL (or the OOM killer) leaves a temporary folder; the next cache write there removes it."""
    root = tmp_path / "cache"
    root.mkdir()
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead = int(child.stdout)
    killed = root / f".0123456789abcdef.tmp-{_host_tag()}-{dead}-0badc0de"  # another identity's
    running = root / f".0123456789abcdef.tmp-{_host_tag()}-{os.getpid()}-0a0a0a0a"
    for folder in (killed, running):
        folder.mkdir()
        (folder / "shard-00000.safetensors").write_bytes(b"half")
    llm = LLMConfig(name_or_path=str(tiny_model_dir))
    cache = cached_activations(PROMPTS, llm, CacheConfig(root=str(root), layers=(1,)))
    assert sorted(p.name for p in root.iterdir()) == sorted([cache.folder.name, running.name])
