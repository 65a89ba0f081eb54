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

Jobs own their output folder for the whole run (:class:`FolderClaim`): a claim ``.<name>.claim/`` beside the
folder is made with one ``mkdir`` (atomic, also on NFS) when the job starts and removed when it ends, so a
second job on the same ``out_dir`` fails at once, naming the process that holds it; the job's final commit
(``AtomicFolder(..., replace=False)``) never replaces a folder that exists by then, and if one appeared
anyway (a writer that takes no claim) the job's results are kept beside it under a visible name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from sae_refusal.errors import FolderClaimedError, UserError

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


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary sibling of ``path`` for any writer (``torch.save``, a GGUF writer), then moved onto it.

    The block writes the yielded path; when it ends without an exception the file is fsynced and renamed
    onto ``path`` (replacing a file there), otherwise it is removed and ``path`` is left as it was.

    Raises:
        FileNotFoundError: If the block wrote nothing at the yielded path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    tmp = _sibling(path, "tmp")
    try:
        yield tmp
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def replace_folder(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Move the complete folder ``src`` onto ``dst`` (same filesystem), replacing a folder there.

    An existing ``dst`` is renamed to a hidden ``old`` sibling first and removed once ``src`` took its place:
    ``dst`` is never a mix of both, and is absent only between the two renames (an interrupt there leaves the
    old folder under its ``old`` name, removed by the next write of ``dst`` on this host,
    :func:`remove_stale_siblings`).

    Returns:
        ``dst``.
    """
    src, dst = Path(src), Path(dst)
    old = _sibling(dst, "old")
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)
    return dst


def _raise_system_exit(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


class AtomicFolder:
    """A folder filled under a temporary name and swapped into place on :meth:`commit`.

    Use as a context manager: write into :attr:`tmp`, call :meth:`commit` when complete. Leaving the block
    without a commit (an exception, Ctrl-C, ``SIGTERM``/``SIGHUP``; see the module notes) removes the
    temporary folder and leaves any existing folder at ``path`` untouched. A commit replaces an existing
    folder (renamed aside first, then removed). Entering removes what a killed writer of the same ``path``
    left behind (:func:`remove_stale_siblings`).

    With ``replace=False`` (a job's output folder, see :class:`FolderClaim`) a commit never replaces a
    folder: if one exists at ``path`` by then, the new results are renamed to a visible sibling
    (``<name>.kept-<time>-<pid>``) and :class:`~sae_refusal.errors.FolderClaimedError` says where they are.

    Args:
        path: Final folder.
        replace: Whether :meth:`commit` may replace an existing folder at ``path``.
        key: The config key or flag that named ``path`` (for error messages).
    """

    def __init__(self, path: str | os.PathLike[str], *, replace: bool = True, key: str = "out_dir"):
        self.path = Path(path)
        self.tmp = _sibling(self.path, "tmp")
        self.replace = replace
        self.key = key
        self.committed = False
        self._previous_handlers: dict[int, Any] = {}

    def __enter__(self) -> AtomicFolder:
        _check_parent(self.path, self.key)
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
        """Move the temporary folder to :attr:`path`; returns :attr:`path`.

        Raises:
            FolderClaimedError: With ``replace=False``, if a folder appeared at :attr:`path` (naming where
                the new results were kept instead).
        """
        if not self.replace:
            return self._commit_new()
        replace_folder(self.tmp, self.path)
        self.committed = True
        return self.path

    def _commit_new(self) -> Path:
        """Rename into place only where nothing is (``rename(2)`` never replaces a non-empty folder)."""
        try:
            if self.path.exists() or self.path.is_symlink():
                raise FileExistsError(errno.EEXIST, "exists", str(self.path))
            os.rename(self.tmp, self.path)
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            kept = self.path.with_name(
                f"{self.path.name}.kept-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            )
            os.rename(self.tmp, kept)
            self.committed = True
            raise FolderClaimedError(
                f"{self.key}: {self.path} appeared while this job ran (written by something that did not "
                f"claim it) and was left as it is; this job's results are in {kept}"
            ) from None
        self.committed = True
        return self.path


def _check_parent(path: Path, key: str) -> None:
    """Refuse a ``path`` whose parent (or an ancestor) is a file, naming ``key``."""
    for ancestor in path.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise UserError(f"{key}: {path} cannot be created: {ancestor} is a file, not a folder")
            return


#: The claim of a job's output folder: ``.<name>.claim`` beside it (see :class:`FolderClaim`).
_CLAIM_SUFFIX = ".claim"


def _claim_path(path: Path) -> Path:
    return path.parent / f".{path.name}{_CLAIM_SUFFIX}"


class FolderClaim:
    """A job's output folder, claimed for the job's whole run (a second job on it fails at once).

    Entering makes the claim ``.<name>.claim/`` beside ``path`` with one ``mkdir`` and writes the owner
    (host, process id, start time, command) into it, then refuses a ``path`` that exists (unless
    ``existing_ok``); leaving removes the claim. A claim whose process is no longer running on this host
    (a killed job) is taken over with a log line. Pair it with ``AtomicFolder(path, replace=False)`` for
    the commit.

    Args:
        path: The job's output folder.
        key: The config key or flag that named it (``out_dir``, ``--out``), for error messages.
        existing_ok: Claim a ``path`` that exists too (an artifact replaced whole at its commit, such as an
            activation cache, rather than a job's new output folder).

    Raises:
        FolderClaimedError: If another running job holds the claim (naming its process, host, start time
            and command) or ``path`` exists (without ``existing_ok``).
        UserError: If ``path`` cannot be created (a file where a parent folder should be).
    """

    def __init__(
        self, path: str | os.PathLike[str], *, key: str = "out_dir", existing_ok: bool = False
    ) -> None:
        self.path = Path(path)
        self.key = key
        self.existing_ok = existing_ok
        self.claim = _claim_path(self.path)
        self._token = uuid.uuid4().hex
        self._held = False
        self._made: list[Path] = []

    def _owner(self) -> dict[str, Any]:
        try:
            record = json.loads((self.claim / "owner.json").read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def _take(self) -> None:
        try:
            self.claim.mkdir()
        except FileExistsError:
            owner = self._owner()
            stale = owner.get("host_tag") == _host_tag() and not _pid_running(int(owner.get("pid", -1)))
            if not stale:
                if not owner:  # being written this very moment, or left by an older writer: name the claim
                    who = f"another job (claim {self.claim}, no owner recorded yet)"
                else:
                    who = (
                        f"process {owner.get('pid')} on {owner.get('host')} since {owner.get('started')} "
                        f"({owner.get('command')})"
                    )
                raise FolderClaimedError(
                    f"{self.key}: {self.path} is being written by {who}; wait for that job or choose "
                    f"another folder (remove {self.claim} only if no such job runs)"
                ) from None
            log.info("%s: taking over the claim of process %s (no longer running)", self.key, owner["pid"])
            shutil.rmtree(self.claim, ignore_errors=True)
            try:
                self.claim.mkdir()
            except FileExistsError:  # another job took it over first
                raise FolderClaimedError(
                    f"{self.key}: {self.path} was just claimed by another job; choose another folder"
                ) from None
        owner = {
            "host": socket.gethostname(),
            "host_tag": _host_tag(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:500],
            "token": self._token,
        }
        atomic_write_text(self.claim / "owner.json", json.dumps(owner, indent=2))
        self._held = True

    def __enter__(self) -> FolderClaim:
        _check_parent(self.path, self.key)
        self._made = [p for p in reversed(self.path.parents) if not p.exists()]  # removed again if empty
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._take()
        except BaseException:
            self._remove_made()
            raise
        if not self.existing_ok and (self.path.exists() or self.path.is_symlink()):
            self.release()
            raise FolderClaimedError(f"{self.key}: {self.path} exists; choose another folder or remove it")
        return self

    def release(self) -> None:
        """Remove the claim (only this job's own), and the parent folders it made if they stayed empty."""
        if self._held and self._owner().get("token") == self._token:
            shutil.rmtree(self.claim, ignore_errors=True)
        self._held = False
        self._remove_made()

    def _remove_made(self) -> None:
        for folder in reversed(self._made):
            with contextlib.suppress(OSError):  # not empty (the job's results are there), or gone
                folder.rmdir()
        self._made = []

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
