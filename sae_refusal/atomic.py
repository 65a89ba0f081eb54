"""Atomic file and folder writes: every artifact appears whole or not at all.

Writers put their output in a hidden temporary sibling (``.<name>.tmp-<host>-<pid>-<random>``) on the same
filesystem and ``os.replace`` it into place once complete, so an interrupt leaves the previous artifact (or
nothing), never half of a new one.

No debris either:

* An exception, ``KeyboardInterrupt`` (Ctrl-C) or ``SystemExit`` inside the write removes the temporary
  sibling. While an :class:`AtomicFolder` is open in the main thread, ``SIGTERM`` and ``SIGHUP`` (``docker
  stop``, ``timeout``, a closed terminal) raise ``SystemExit(128 + signal)`` instead of killing the process
  outright, so the same clean-up runs; a handler someone else installed (Lightning's, during ``fit``) is left
  in charge.
* What cannot be caught (``SIGKILL``, the OOM killer, a power cut) leaves a temporary sibling whose name holds
  the host and process id of its writer; the next write of the same artifact on that host removes the
  siblings whose writer is no longer running (:func:`remove_stale_siblings`; the activation cache sweeps
  its whole root with :func:`remove_stale_temporaries`). Two hosts that share a filesystem and a hostname
  (containers started with one ``--hostname``) should not write the same folder at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import threading
import uuid
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

log = logging.getLogger(__name__)

#: Signals turned into ``SystemExit`` while an :class:`AtomicFolder` is open (when nobody else handles them).
_EXIT_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _sibling(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.{tag}-{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_running(pid: int) -> bool:
    if os.name != "posix":  # no cheap, harmless liveness probe: assume the writer still runs
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


#: ``.<name>.<tmp|old>-<host>-<pid>-<random>``: a writer's temporary sibling (see :func:`_sibling`).
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}$")


def remove_stale_temporaries(folder: str | os.PathLike[str], name: str | None = None) -> list[Path]:
    """Remove temporary siblings in ``folder`` left by a writer on this host that is no longer running.

    Temporaries of writers on other hosts (a shared filesystem), of running processes, and in the older
    ``.<name>.tmp-<random>`` form (no owner recorded) are kept.

    Args:
        folder: The folder holding the artifacts.
        name: Only the temporaries of the artifact with this name; ``None``: all of them.

    Returns:
        The removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    host = _host_tag()
    removed = []
    for entry in sorted(folder.iterdir()):
        match = _TEMPORARY.match(entry.name)
        if match is None or match["host"] != host or (name is not None and match["name"] != name):
            continue
        if _pid_running(int(match["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        log.info("removed %s, left by an interrupted write (process %s)", entry, match["pid"])
        removed.append(entry)
    return removed


def remove_stale_siblings(path: str | os.PathLike[str]) -> list[Path]:
    """:func:`remove_stale_temporaries` of the artifact at ``path`` only."""
    path = Path(path)
    return remove_stale_temporaries(path.parent, name=path.name)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a fsynced temporary sibling file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    tmp = _sibling(path, "tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _raise_system_exit(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


class AtomicFolder:
    """A folder filled under a temporary name and swapped into place on :meth:`commit`.

    Use as a context manager: write into :attr:`tmp`, call :meth:`commit` when complete. Leaving the block
    without a commit (an exception, Ctrl-C, ``SIGTERM``/``SIGHUP``; see the module notes) removes the
    temporary folder and leaves any existing folder at ``path`` untouched. A commit replaces an existing
    folder (renamed aside first, then removed). Entering removes what a killed writer of the same ``path``
    left behind (:func:`remove_stale_siblings`).

    Args:
        path: Final folder.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.tmp = _sibling(self.path, "tmp")
        self.committed = False
        self._previous_handlers: dict[int, Any] = {}

    def __enter__(self) -> AtomicFolder:
        remove_stale_siblings(self.path)
        self.tmp.mkdir(parents=True, exist_ok=False)
        self._catch_exit_signals()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if not self.committed:
                shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            self._restore_signals()

    def _catch_exit_signals(self) -> None:
        """Turn default-action ``SIGTERM``/``SIGHUP`` into ``SystemExit`` until the block is left."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in _EXIT_SIGNALS:
            with contextlib.suppress(ValueError, OSError):
                if signal.getsignal(signum) is signal.SIG_DFL:
                    self._previous_handlers[signum] = signal.signal(signum, _raise_system_exit)

    def _restore_signals(self) -> None:
        for signum, handler in self._previous_handlers.items():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(signum, handler)
        self._previous_handlers = {}

    def commit(self) -> Path:
        """Move the temporary folder to :attr:`path`; returns :attr:`path`."""
        old = _sibling(self.path, "old")
        if self.path.exists():
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        self.committed = True
        shutil.rmtree(old, ignore_errors=True)
        return self.path
