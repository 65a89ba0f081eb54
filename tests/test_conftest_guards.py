"""The suite's own guards (tests/conftest.py): writes into the checkout and global state left changed."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import _CheckoutWatch, global_state_guard

HOUR_NS = 3600 * 10**9


def _age(path: Path, ns: int = HOUR_NS) -> None:
    """Move ``path``'s mtime an hour back (a listing taken now is then not racy)."""
    old = time.time_ns() - ns
    os.utime(path, ns=(old, old))


def test_the_watch_reports_new_files_and_folders_at_any_depth(tmp_path: Path) -> None:
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "sub" / "a.py").write_text("x")
    for folder in (tmp_path, tmp_path / "pkg", tmp_path / "pkg" / "sub"):
        _age(folder)
    watch = _CheckoutWatch(tmp_path)
    assert watch.new_paths() == []
    (tmp_path / "pkg" / "sub" / "b.txt").write_text("new")
    (tmp_path / "runs" / "x").mkdir(parents=True)
    (tmp_path / "runs" / "x" / "out.json").write_text("{}")
    assert watch.new_paths() == ["pkg/sub/b.txt", "runs", "runs/x", "runs/x/out.json"]
    assert watch.new_paths() == []  # reported once
    # removed and created again: nothing new; a file that becomes a folder is new
    (tmp_path / "pkg" / "sub" / "a.py").unlink()
    (tmp_path / "pkg" / "sub" / "a.py").write_text("again")
    (tmp_path / "pkg" / "sub" / "b.txt").unlink()
    (tmp_path / "pkg" / "sub" / "b.txt").mkdir()
    assert watch.new_paths() == ["pkg/sub/b.txt"]


def test_the_watch_skips_tool_caches_and_virtualenvs(tmp_path: Path) -> None:
    watch = _CheckoutWatch(tmp_path)
    for name in ("__pycache__", ".venv-ci", "x.egg-info", ".mypy_cache"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("")
    (tmp_path / "__pycache__.txt").write_text("")  # a file of that name is not a cache folder
    assert watch.new_paths() == ["__pycache__.txt"]


def test_a_write_that_keeps_the_folder_mtime_is_found_while_the_listing_is_racy(tmp_path: Path) -> None:
    # listed within the filesystem's timestamp granularity of its last change: re-read at every check
    watch = _CheckoutWatch(tmp_path)
    mtime = tmp_path.stat().st_mtime_ns
    (tmp_path / "same_tick.txt").write_text("")
    os.utime(tmp_path, ns=(mtime, mtime))
    assert watch.new_paths() == ["same_tick.txt"]


def test_an_unchanged_old_folder_costs_one_stat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(3):
        (tmp_path / f"d{i}").mkdir()
        _age(tmp_path / f"d{i}")
    _age(tmp_path)
    watch = _CheckoutWatch(tmp_path)
    listed: list[str] = []
    scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: (listed.append(str(path)), scandir(path))[1])
    assert watch.new_paths() == [] and listed == []
    (tmp_path / "d1" / "new").write_text("")
    assert watch.new_paths() == ["d1/new"] and listed == [str(tmp_path / "d1")]


def test_the_state_guard_restores_and_names_a_changed_thread_count_and_variable() -> None:
    threads = torch.get_num_threads()
    assert "SAE_REFUSAL_GUARD_TEST" not in os.environ
    with pytest.raises(pytest.fail.Exception) as failed, global_state_guard("t::x"):
        torch.set_num_threads(threads + 1)
        os.environ["SAE_REFUSAL_GUARD_TEST"] = "1"
    message = str(failed.value)
    assert message.startswith("t::x left global state changed")
    assert f"torch.get_num_threads() {threads} -> {threads + 1}" in message
    assert "os.environ['SAE_REFUSAL_GUARD_TEST'] None -> '1'" in message
    assert torch.get_num_threads() == threads and "SAE_REFUSAL_GUARD_TEST" not in os.environ


@pytest.mark.parametrize(
    "change",
    [
        lambda: torch.set_default_dtype(torch.float64),
        lambda: torch.set_grad_enabled(False),
        lambda: torch.use_deterministic_algorithms(True),
        lambda: torch.set_float32_matmul_precision("medium"),
    ],
    ids=["default_dtype", "grad_mode", "deterministic", "matmul_precision"],
)
def test_the_state_guard_catches_each_torch_setting(change: object) -> None:
    with pytest.raises(pytest.fail.Exception), global_state_guard("t::x"):
        change()  # type: ignore[operator]
    assert torch.get_default_dtype() == torch.float32 and torch.is_grad_enabled()
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.get_float32_matmul_precision() == "highest"


def test_the_random_generators_are_restored_silently() -> None:
    state = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    seed_env = os.environ.get("PL_GLOBAL_SEED")
    with global_state_guard("t::x"):
        torch.manual_seed(5)
        np.random.seed(5)
        random.seed(5)
        os.environ["PL_GLOBAL_SEED"] = "5"
    assert torch.equal(torch.get_rng_state(), state[0])
    assert np.array_equal(np.random.get_state()[1], state[1]) and random.getstate() == state[2]
    assert os.environ.get("PL_GLOBAL_SEED") == seed_env
