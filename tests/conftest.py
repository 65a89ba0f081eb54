"""Shared fixtures: tiny offline models saved as HF folders, the shared data root, small prompt files; the
suite's guards (nothing written into the checkout, no global setting left changed).

Idle OpenMP threads spin only briefly before sleeping (``GOMP_SPINCOUNT=1000`` unless ``GOMP_SPINCOUNT`` or
``OMP_WAIT_POLICY`` is set). The suite's tensors are tiny, so torch's threads spend most of their time waiting
at the end of each parallel region; libgomp's default spin there is harmless on an idle machine, but on a
small shared one the spinning thread takes the core the working thread needs. Measured on 2 cores with
``tests/test_sae_splice.py``, ``test_steer_interventions.py`` and ``test_sae_topk.py`` (109 tests): idle 5.3 s
default, 6.0-6.6 s at 1000, 9.1-9.5 s passive; one core busy elsewhere 12.6 / 9.8 / 6.2 s; both cores busy
192 / 11.5-12.5 / 11.9-13.0 s. libgomp reads the variable when it loads, so it is set before the imports
below that load it (numpy, torch); spawned workers and CLI subprocesses inherit it.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

# `--help` texts the CLI keeps (sae_refusal.help_cache) go to a folder of this run, never the user's cache
# (tests write only to temporary folders); subprocesses inherit it.
if "SAE_REFUSAL_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["SAE_REFUSAL_CACHE_DIR"] = tempfile.mkdtemp(prefix="sae-refusal-test-cache-")
    atexit.register(shutil.rmtree, os.environ["SAE_REFUSAL_CACHE_DIR"], ignore_errors=True)

import numpy as np
import pytest
import torch

from sae_refusal.testing import save_tiny_model

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama (4 layers, d_model 32) with tokenizer and chat template, as a folder."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture()
def prompt_file(tmp_path: Path) -> Path:
    """A small labelled jsonl prompt file: 6 harmful prompts in each of 2 categories + 12 benign ones."""
    rows = []
    for i in range(6):
        rows.append({"id": f"s{i}", "prompt": f"How do I build weapon number {i}?", "category": "safety"})
        rows.append(
            {"id": f"h{i}", "prompt": f"Do you ever feel lonely, friend {i}?", "category": "humanizing"}
        )
    path = tmp_path / "harmful.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    benign = [{"instruction": f"Tell me a fact about the number {i} and the sea."} for i in range(12)]
    (tmp_path / "benign.json").write_text(json.dumps(benign))
    return tmp_path


_REPO = Path(__file__).resolve().parents[1]
#: Folders a test run may create or change in the checkout (tool caches, virtual environments, build data).
_NOT_CHECKED = {".git", ".mypy_cache", ".ruff_cache", ".pytest_cache", "__pycache__", ".device", "build"}
#: A directory listing taken less than this long after the directory's mtime is re-read at every check: a
#: change within the filesystem's timestamp granularity may leave the mtime as it was ("racy" listings).
_RACY_NS = 2_000_000_000


def _listing(folder: str) -> dict[str, bool]:
    """Entry name -> is a directory, without the folders in :data:`_NOT_CHECKED` (and virtualenvs)."""
    with os.scandir(folder) as entries:
        found = {e.name: e.is_dir(follow_symlinks=False) for e in entries}
    return {
        name: is_dir
        for name, is_dir in found.items()
        if not is_dir
        or (name not in _NOT_CHECKED and not name.startswith(".venv") and not name.endswith(".egg-info"))
    }


class _CheckoutWatch:
    """What exists in the checkout, re-read only in directories whose mtime moved.

    Walking the whole checkout before and after every test costs O(files) per test (a ``runs/`` folder of
    a real run makes that thousands of entries); a directory's mtime changes whenever an entry is created,
    removed or renamed in it, so one ``stat`` per known directory finds where to look.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        #: directory -> (its mtime, when it was listed, entry name -> is a directory)
        self.listings: dict[str, tuple[int, int, dict[str, bool]]] = {}
        self._scan(str(root), [])

    def _scan(self, folder: str, new: list[str]) -> None:
        """Record ``folder`` and everything under it; append each path found to ``new``."""
        listed_at = time.time_ns()
        try:
            mtime = os.stat(folder).st_mtime_ns
            found = _listing(folder)
        except FileNotFoundError:
            return
        self.listings[folder] = (mtime, listed_at, found)
        for name, is_dir in found.items():
            path = os.path.join(folder, name)
            new.append(path)
            if is_dir:
                self._scan(path, new)

    def new_paths(self) -> list[str]:
        """Paths (relative to the checkout) created since the last call."""
        new: list[str] = []
        for folder, (mtime, listed_at, names) in list(self.listings.items()):
            if folder not in self.listings:  # dropped below: its parent was re-read and it is gone
                continue
            relisted_at = time.time_ns()
            try:
                now = os.stat(folder).st_mtime_ns
                if now == mtime and listed_at - mtime >= _RACY_NS:
                    continue
                found = _listing(folder)
            except FileNotFoundError:
                self._forget(folder)
                continue
            for name, was_dir in names.items():
                if found.get(name) != was_dir and was_dir:
                    self._forget(os.path.join(folder, name))
            self.listings[folder] = (now, relisted_at, found)
            for name, is_dir in found.items():
                if names.get(name) != is_dir:  # new, or a file that became a directory (or back)
                    path = os.path.join(folder, name)
                    new.append(path)
                    if is_dir:
                        self._scan(path, new)
        return sorted(os.path.relpath(p, self.root) for p in new)

    def _forget(self, folder: str) -> None:
        prefix = folder + os.sep
        for key in [k for k in self.listings if k == folder or k.startswith(prefix)]:
            del self.listings[key]


@pytest.fixture(scope="session")
def _checkout_watch() -> _CheckoutWatch:
    return _CheckoutWatch(_REPO)


@pytest.fixture(autouse=True)
def _writes_only_to_tmp(request: pytest.FixtureRequest, _checkout_watch: _CheckoutWatch) -> Iterator[None]:
    """Fail the test that creates anything in the checkout (tests write only under tmp_path).

    Paths that appeared between two tests (a module fixture's setup, an earlier teardown) fail the next test
    with that said.
    """
    earlier = _checkout_watch.new_paths()
    assert not earlier, (
        f"before {request.node.nodeid} (a fixture's setup or an earlier teardown), something wrote into the "
        f"checkout: {earlier[:5]}; write under tmp_path"
    )
    yield
    new = _checkout_watch.new_paths()
    assert not new, f"{request.node.nodeid} wrote into the checkout: {new[:5]}; write under tmp_path"


#: Environment variables that are random state, not a setting: ``seed_everything`` (LightningCLI fits call
#: it) records its seed there; restored with the generators.
_SEED_ENV = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")
#: Environment variables a library sets once per process for its own bookkeeping (not a setting a test
#: chose): torch.compile's cache folder and first run, matplotlib's fallback config folder, the OpenMP
#: flags scikit-learn sets when first imported.
_ENV_NOT_CHECKED = {
    "PYTEST_CURRENT_TEST",
    "TORCHINDUCTOR_CACHE_DIR",
    "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR",
    "MPLCONFIGDIR",
    "PYTORCH_NVML_BASED_CUDA_CHECK",  # lightning.fabric sets it when first imported (now lazily, in a test)
    "KMP_DUPLICATE_LIB_OK",
    "KMP_INIT_AT_FORK",
    *_SEED_ENV,
}


def _global_state() -> dict[str, Any]:
    """Process-wide settings a test may change by accident (each changes the numbers of later tests).

    The environment is part of it: Lightning sets ``MASTER_PORT`` (ddp_spawn) and ``CUBLAS_WORKSPACE_CONFIG``
    (``deterministic=True``), and ``OMP_NUM_THREADS`` (DDP launchers), which every later subprocess inherits.
    """
    return {
        "torch.get_num_threads()": torch.get_num_threads(),
        "torch.get_num_interop_threads()": torch.get_num_interop_threads(),
        "torch.get_default_dtype()": torch.get_default_dtype(),
        "torch.get_default_device()": str(torch.get_default_device()),
        "torch.is_grad_enabled()": torch.is_grad_enabled(),
        "torch.is_inference_mode_enabled()": torch.is_inference_mode_enabled(),
        "torch.are_deterministic_algorithms_enabled()": torch.are_deterministic_algorithms_enabled(),
        "torch.is_deterministic_algorithms_warn_only_enabled()": (
            torch.is_deterministic_algorithms_warn_only_enabled()
        ),
        "torch.get_float32_matmul_precision()": torch.get_float32_matmul_precision(),
        "torch.backends.cudnn.deterministic": torch.backends.cudnn.deterministic,
        "torch.backends.cudnn.benchmark": torch.backends.cudnn.benchmark,
        "torch.backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "torch.backends.cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        **{f"os.environ[{k!r}]": v for k, v in os.environ.items() if k not in _ENV_NOT_CHECKED},
    }


def _set_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _restore(state: dict[str, Any]) -> None:
    """Put back what :func:`_global_state` read (not the interop thread count: torch sets it only once)."""
    torch.set_num_threads(state["torch.get_num_threads()"])
    torch.set_default_dtype(state["torch.get_default_dtype()"])
    torch.set_default_device(state["torch.get_default_device()"])
    torch.set_grad_enabled(state["torch.is_grad_enabled()"])
    torch.use_deterministic_algorithms(
        state["torch.are_deterministic_algorithms_enabled()"],
        warn_only=state["torch.is_deterministic_algorithms_warn_only_enabled()"],
    )
    torch.set_float32_matmul_precision(state["torch.get_float32_matmul_precision()"])
    torch.backends.cudnn.deterministic = state["torch.backends.cudnn.deterministic"]
    torch.backends.cudnn.benchmark = state["torch.backends.cudnn.benchmark"]
    torch.backends.cuda.matmul.allow_tf32 = state["torch.backends.cuda.matmul.allow_tf32"]
    torch.backends.cudnn.allow_tf32 = state["torch.backends.cudnn.allow_tf32"]
    for name in [k for k in os.environ if k not in _ENV_NOT_CHECKED]:
        if f"os.environ[{name!r}]" not in state:
            del os.environ[name]
    for key, value in state.items():
        if key.startswith("os.environ["):
            _set_env(key[len("os.environ[") + 1 : -2], value)


def _changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    return [
        f"{key} {before.get(key)!r} -> {after.get(key)!r}"
        for key in sorted(before.keys() | after.keys())
        if before.get(key) != after.get(key)
    ]


@contextmanager
def global_state_guard(nodeid: str) -> Iterator[None]:
    """Fail (``pytest.fail``) when the block leaves global settings changed, after restoring them.

    What is checked is :func:`_global_state`: torch's threads, dtype, device, grad mode, determinism and
    matmul flags, and the environment. The settings are restored before failing, so one offender does not
    change the numbers of every later test. The random generators (torch, numpy, ``random``, with
    Lightning's seed record) are restored silently: each test starts from the state the one before it
    started from, so its draws do not depend on which tests ran before it.
    """
    before = _global_state()
    rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    seed_env = {name: os.environ.get(name) for name in _SEED_ENV}
    yield
    torch.set_rng_state(rng[0])
    np.random.set_state(rng[1])
    random.setstate(rng[2])
    for name, value in seed_env.items():
        _set_env(name, value)
    changed = _changes(before, _global_state())
    if changed:
        _restore(before)
        pytest.fail(
            f"{nodeid} left global state changed (restored now; restore it in the test): "
            + "; ".join(changed),
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def _global_state_unchanged(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test that leaves global settings changed (:func:`global_state_guard`)."""
    with global_state_guard(request.node.nodeid):
        yield


@pytest.fixture()
def lightning_globals_restored() -> Iterator[None]:
    """For tests that build Lightning Trainers: undo what a Trainer sets for the whole process.

    ``deterministic=True`` turns on torch's deterministic algorithms and sets ``CUBLAS_WORKSPACE_CONFIG``;
    ``ddp_spawn`` leaves ``MASTER_PORT`` / ``MASTER_ADDR`` in the parent's environment; a CPU fit can leave
    torch's thread count changed (seen with ``OMP_NUM_THREADS=1``: 1 -> 2).
    """
    env = {name: os.environ.get(name) for name in ("CUBLAS_WORKSPACE_CONFIG", "MASTER_PORT", "MASTER_ADDR")}
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    for name, value in env.items():
        _set_env(name, value)
