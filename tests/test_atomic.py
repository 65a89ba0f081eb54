"""Atomic writes leave the old artifact or the new one, never debris."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sae_refusal.atomic import AtomicFolder, _host_tag, atomic_write_text, remove_stale_siblings


def test_atomic_write_text_replaces_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.json"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["a.json"]


def test_atomic_folder_abort_keeps_the_old_folder(tmp_path: Path) -> None:
    target = tmp_path / "artifact"
    with AtomicFolder(target) as out:
        (out.tmp / "x").write_text("old")
        out.commit()
    with pytest.raises(KeyboardInterrupt), AtomicFolder(target) as out:
        (out.tmp / "x").write_text("half")
        raise KeyboardInterrupt
    assert (target / "x").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]


def test_atomic_folder_commit_replaces(tmp_path: Path) -> None:
    target = tmp_path / "artifact"
    for text in ("old", "new"):
        with AtomicFolder(target) as out:
            (out.tmp / "x").write_text(text)
            out.commit()
    assert (target / "x").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]


def test_atomic_folder_exception_mid_write_leaves_the_parent_as_before(tmp_path: Path) -> None:
    (tmp_path / "other").write_text("kept")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(RuntimeError, match="mid-write"), AtomicFolder(tmp_path / "artifact") as out:
        (out.tmp / "part").write_text("half")
        raise RuntimeError("mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def _sigterm_mid_write(folder: str) -> None:
    """Run in a child process: open an AtomicFolder, write, then get SIGTERM (as `docker stop` sends)."""
    import os
    import signal
    from pathlib import Path

    from sae_refusal.atomic import AtomicFolder

    with AtomicFolder(Path(folder) / "artifact") as out:
        (out.tmp / "part").write_text("half")
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not end the write")


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name != "posix", reason="POSIX signals")
def test_sigterm_mid_write_removes_the_temporary_folder(tmp_path: Path) -> None:
    child = multiprocessing.get_context("spawn").Process(target=_sigterm_mid_write, args=(str(tmp_path),))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 128 + signal.SIGTERM  # SystemExit(143), after the clean-up ran
    assert list(tmp_path.iterdir()) == []
    # and the handler is a loan: outside the block SIGTERM is what it was before
    before = signal.getsignal(signal.SIGTERM)
    with AtomicFolder(tmp_path / "a") as out:
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        out.commit()
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_handler_already_installed_for_sigterm_is_left_alone(tmp_path: Path) -> None:
    def handler(signum: int, frame: object) -> None:
        pass

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with AtomicFolder(tmp_path / "a") as out:
            assert signal.getsignal(signal.SIGTERM) is handler
            out.commit()
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def _dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    return int(child.stdout)


@pytest.mark.skipif(os.name != "posix", reason="the liveness probe is POSIX-only")
def test_leftovers_of_a_killed_writer_are_removed_by_the_next_write(tmp_path: Path) -> None:
    target = tmp_path / "artifact"
    host = _host_tag()
    dead = _dead_pid()
    killed = [
        tmp_path / f".artifact.tmp-{host}-{dead}-0badc0de",
        tmp_path / f".artifact.old-{host}-{dead}-00000001",
    ]
    kept = [
        tmp_path / f".artifact.tmp-{host}-{os.getpid()}-0a0a0a0a",  # a writer that still runs
        tmp_path / f".artifact.tmp-ffffffff-{dead}-0b0b0b0b",  # another host's (a shared filesystem)
        tmp_path / ".artifact.tmp-0c0c0c0c",  # the old naming records no owner
        tmp_path / f".artifact2.tmp-{host}-{dead}-0d0d0d0d",  # another artifact's
    ]
    for folder in [*killed, *kept]:
        folder.mkdir()
        (folder / "shard").write_text("half")
    with AtomicFolder(target) as out:
        (out.tmp / "x").write_text("new")
        out.commit()
    assert sorted(tmp_path.iterdir()) == sorted([target, *kept])
    text_target = tmp_path / "a.json"
    (tmp_path / f".a.json.tmp-{host}-{dead}-0e0e0e0e").write_text("{")
    atomic_write_text(text_target, "{}")
    assert not (tmp_path / f".a.json.tmp-{host}-{dead}-0e0e0e0e").exists()
    assert remove_stale_siblings(target) == []
