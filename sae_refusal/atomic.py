"""Atomic file and folder writes: every artifact appears whole or not at all.

Writers put their output in a hidden temporary sibling (``.<name>.tmp-<random>``) on the same filesystem
and ``os.replace`` it into place once complete, so an interrupt leaves the previous artifact (or nothing),
never half of a new one.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from types import TracebackType


def _sibling(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}"


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a fsynced temporary sibling file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class AtomicFolder:
    """A folder filled under a temporary name and swapped into place on :meth:`commit`.

    Use as a context manager: write into :attr:`tmp`, call :meth:`commit` when complete. Leaving the block
    without a commit (an exception, an interrupt) removes the temporary folder and leaves any existing
    folder at ``path`` untouched. A commit replaces an existing folder (renamed aside first, then removed).

    Args:
        path: Final folder.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.tmp = _sibling(self.path, "tmp")
        self.committed = False

    def __enter__(self) -> AtomicFolder:
        self.tmp.mkdir(parents=True, exist_ok=False)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def commit(self) -> Path:
        """Move the temporary folder to :attr:`path`; returns :attr:`path`."""
        old = _sibling(self.path, "old")
        if self.path.exists():
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        self.committed = True
        shutil.rmtree(old, ignore_errors=True)
        return self.path
