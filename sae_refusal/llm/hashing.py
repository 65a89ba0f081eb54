"""The project's one whole-file sha256: weight fingerprints and refusal-token artifact files both use it.

Digests are memoised per process by (resolved path, size, mtime_ns, inode), so a multi-GB weight file is read
once however often its fingerprint is asked for; a file modified within the last two seconds is never
memoised (its mtime may not yet tell a same-size rewrite apart).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

__all__ = ["file_sha256"]

#: A file modified less than this long before it is hashed is not memoised: a rewrite within the same
#: mtime tick (coarse on some filesystems) with the same size would otherwise reuse a stale digest.
_RACY_WINDOW_NS = 2_000_000_000

_FILE_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def _read_sha256(path: Path) -> str:
    """sha256 of the whole file, read from disk (the only place files are read for digests)."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a whole file, memoised per process by (resolved path, size, mtime_ns, inode).

    A file modified within the last two seconds is hashed again on every call (its mtime may not yet tell
    a same-size rewrite apart), so the memo never returns a stale digest for a file being written.

    Args:
        path: The file.

    Returns:
        The hex digest.

    Raises:
        FileNotFoundError: If it does not exist.
    """
    resolved = Path(path).resolve()
    now_ns = time.time_ns()
    stat = resolved.stat()
    key = (str(resolved), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    digest = _FILE_DIGESTS.get(key)
    if digest is None:
        digest = _read_sha256(resolved)
        if now_ns - stat.st_mtime_ns > _RACY_WINDOW_NS:
            _FILE_DIGESTS[key] = digest
    return digest
