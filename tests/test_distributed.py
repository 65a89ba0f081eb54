"""The exit handler that destroys a gloo process group before interpreter finalisation."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch.distributed as dist

from sae_refusal import distributed


def test_without_a_process_group_nothing_is_registered() -> None:
    assert not dist.is_initialized()
    assert distributed.destroy_process_group_at_exit() is False


def test_the_handler_is_registered_once_and_destroys_the_group_at_exit(tmp_path: Path) -> None:
    # a child process with a one-rank gloo group exits normally; atexit runs handlers last-in first-out, so a
    # checker registered before the project's handler runs after it and must find the group destroyed
    script = textwrap.dedent(
        f"""
        import atexit
        import torch.distributed as dist
        from sae_refusal import distributed

        atexit.register(lambda: print("initialized at the end", dist.is_initialized()))
        dist.init_process_group("gloo", init_method="file://{tmp_path / "store"}", rank=0, world_size=1)
        before = atexit._ncallbacks()
        assert distributed.destroy_process_group_at_exit() is True
        assert distributed.destroy_process_group_at_exit() is True
        print("new handlers", atexit._ncallbacks() - before)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "new handlers 1" in out.stdout
    assert "initialized at the end False" in out.stdout


def test_the_registered_handler_destroys_the_default_group(tmp_path: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert distributed.destroy_process_group_at_exit() is True
        assert distributed._registered
        distributed._destroy_default_group()  # what atexit calls
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
