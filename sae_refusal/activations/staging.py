"""The staging folder of a cache being built: finished shards kept across runs, committed by one rename.

Layout, beside the caches under ``data.cache.root`` (hidden, so
:func:`~sae_refusal.activations.cache.find_cache` never serves it)::

    .<identity key>.partial/
        shard-00003.safetensors   a finished shard, the bytes it has in the committed cache
        shard-00003.json          its sidecar: identity_key, shard_rows, index, first_row, rows, bytes,
                                  sha256, n_truncated

A shard file is written under a temporary name and renamed, then its sidecar is written the same way, so a
shard counts as done only once both are whole. :meth:`Staging.resume` (one process, before any extraction)
keeps the shards whose sidecar matches this cache (identity key, ``shard_rows``, row range) and whose file
matches the sidecar's size and sha256, and deletes everything else. :meth:`Staging.commit` writes
``prompts.jsonl`` and ``manifest.json`` beside the shards, drops the sidecars and renames the folder onto the
final cache folder (replacing one there only at that moment: :func:`~sae_refusal.atomic.replace_folder`).

While a build runs, its first process holds a claim on the final folder (``.<identity key>.claim/``,
:func:`claim_cache_folder`), so two jobs never write one staging folder; a second job computing the same cache
waits for the first and then reuses its result.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from sae_refusal.activations.cache import (
    CacheError,
    CacheIdentity,
    file_sha256,
    save_shard,
    shard_name,
    write_manifest,
)
from sae_refusal.activations.config import KEY
from sae_refusal.activations.shards import ShardSpec
from sae_refusal.atomic import FolderClaim, atomic_file, atomic_write_text, replace_folder
from sae_refusal.errors import FolderClaimedError

__all__ = ["Staging", "claim_cache_folder"]

log = logging.getLogger(__name__)

#: Seconds between two looks at another job's claim, and between two log lines about waiting for it.
CLAIM_POLL_S = 2.0
CLAIM_LOG_EVERY_S = 300.0


def claim_cache_folder(folder: Path) -> FolderClaim:
    """Claim the cache folder ``folder`` for this build, waiting while another running job holds it.

    Returns:
        The held claim; :meth:`~sae_refusal.atomic.FolderClaim.release` it when the build ends.
    """
    claim = FolderClaim(folder, key=f"{KEY}.root", existing_ok=True)
    last_said = -CLAIM_LOG_EVERY_S
    while True:
        try:
            claim.__enter__()
        except FolderClaimedError as err:
            if time.monotonic() - last_said >= CLAIM_LOG_EVERY_S:
                log.warning("waiting for another job computing the same activation cache: %s", err)
                last_said = time.monotonic()
            time.sleep(CLAIM_POLL_S)
            continue
        return claim


class Staging:
    """The staging folder of the cache ``identity`` under ``root``; see the module notes.

    Args:
        root: The cache root (``data.cache.root``).
        identity: What the cache is of.
        shard_rows: Rows per shard (``data.cache.shard_rows``).
    """

    def __init__(self, root: Path, identity: CacheIdentity, shard_rows: int) -> None:
        self.identity = identity
        self.key = identity.key()
        self.shard_rows = shard_rows
        self.folder = Path(root) / f".{self.key}.partial"

    def shard_path(self, index: int) -> Path:
        return self.folder / shard_name(index)

    def sidecar_path(self, index: int) -> Path:
        return self.folder / f"shard-{index:05d}.json"

    # ------------------------------------------------------------------------------------------ reading
    def _sidecar(self, shard: ShardSpec, *, check_hash: bool) -> dict[str, Any] | None:
        """The sidecar of ``shard`` if it and the shard file are whole and belong to this cache, else None."""
        try:
            record = json.loads(self.sidecar_path(shard.index).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        expected = {
            "identity_key": self.key,
            "shard_rows": self.shard_rows,
            "index": shard.index,
            "first_row": shard.first_row,
            "rows": shard.rows,
        }
        if not isinstance(record, dict) or any(record.get(k) != v for k, v in expected.items()):
            return None
        n_truncated = record.get("n_truncated")
        if not isinstance(n_truncated, int) or not 0 <= n_truncated <= shard.rows:
            return None
        path = self.shard_path(shard.index)
        try:
            if path.stat().st_size != record.get("bytes"):
                return None
        except OSError:
            return None
        if check_hash and file_sha256(path) != record.get("sha256"):
            return None
        return record

    def resume(self, shards: Sequence[ShardSpec]) -> list[int]:
        """The indices of ``shards`` already done here; everything else in the folder is deleted.

        Run by one process before any extraction starts (it deletes what it does not recognise). Each
        kept shard file is hashed once.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        done: list[int] = []
        keep: set[str] = set()
        for shard in shards:
            if self._sidecar(shard, check_hash=True) is not None:
                done.append(shard.index)
                keep |= {self.shard_path(shard.index).name, self.sidecar_path(shard.index).name}
        for entry in sorted(self.folder.iterdir()):
            if entry.name in keep:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        return done

    # ------------------------------------------------------------------------------------------ writing
    def write(self, shard: ShardSpec, acts_by_layer: dict[int, torch.Tensor], n_truncated: int) -> None:
        """Write one finished shard: its file (temporary name, fsync, rename), then its sidecar likewise.

        Raises:
            ValueError: If the tensors do not hold the shard's rows.
        """
        sizes = {int(t.shape[0]) for t in acts_by_layer.values()}
        if sizes != {shard.rows}:
            raise ValueError(f"shard {shard.index} holds {shard.rows} rows, got tensors of {sorted(sizes)}")
        with atomic_file(self.shard_path(shard.index)) as tmp:
            entry = save_shard(tmp, acts_by_layer)
        record = {
            "identity_key": self.key,
            "shard_rows": self.shard_rows,
            "index": shard.index,
            "first_row": shard.first_row,
            "rows": shard.rows,
            "bytes": entry["bytes"],
            "sha256": entry["sha256"],
            "n_truncated": n_truncated,
        }
        atomic_write_text(self.sidecar_path(shard.index), json.dumps(record, indent=2))

    def discard_if_empty(self) -> None:
        """Remove the folder if it holds no finished shard (a failed build that saved nothing)."""
        if self.folder.is_dir() and not any(self.folder.glob("shard-*.json")):
            shutil.rmtree(self.folder, ignore_errors=True)

    def commit(
        self,
        final: Path,
        shards: Sequence[ShardSpec],
        prompt_rows: Sequence[dict[str, Any]],
        extra: dict[str, Any],
    ) -> Path:
        """Make the staged shards the cache at ``final``: prompts, manifest, then one rename.

        Args:
            final: The cache folder (``<root>/<identity key>``); a folder there is replaced.
            shards: Every shard of the cache, in order.
            prompt_rows: One metadata dict per row, in row order.
            extra: Facts for the manifest's ``extra``; ``n_truncated`` (the sidecars' sum) goes first.

        Returns:
            ``final``.

        Raises:
            CacheError: If a shard is missing or does not match its sidecar (names it).
        """
        entries: list[dict[str, Any]] = []
        n_truncated = 0
        for shard in shards:
            record = self._sidecar(shard, check_hash=False)
            if record is None:
                raise CacheError(
                    f"activation cache shard {self.shard_path(shard.index)} is missing or does not match its "
                    f"sidecar at commit; the cache was not written (run again to recompute that shard)"
                )
            entries.append(
                {
                    "file": shard_name(shard.index),
                    "rows": shard.rows,
                    "bytes": record["bytes"],
                    "sha256": record["sha256"],
                }
            )
            n_truncated += int(record["n_truncated"])
        with safe_open(str(self.shard_path(shards[0].index)), framework="pt") as fh:
            d_model = int(fh.get_slice(next(iter(fh.keys()))).get_shape()[1])
        write_manifest(
            self.folder, self.identity, d_model, entries, prompt_rows, {"n_truncated": n_truncated, **extra}
        )
        for shard in shards:
            self.sidecar_path(shard.index).unlink()
        return replace_folder(self.folder, final)
