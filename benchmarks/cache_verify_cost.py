"""Benchmark: what checking an activation cache on open costs, next to loading its tensors.

Writes a synthetic cache (random rows, no model) into a temporary folder and times, best of ``--repeats``:

* ``open_none``: :meth:`ActivationCache.open` with ``verify="none"`` (manifest and prompt rows only);
* ``open_size``: ``verify="size"`` (byte sizes of the files);
* ``sha256_only``: sha256 of every file, nothing else;
* ``open_hash``: ``verify="hash"`` (sha256 of every file plus a finiteness check of every shard, the
  default);
* ``load``: reading every cached layer as one tensor after a ``verify="none"`` open, what a data module
  does next anyway.

Files are in the page cache (written just before), so the numbers are the CPU cost of checking, not disk
speed; on a cold disk both hashing and loading wait for the same reads. Prints one JSON object.

Example::

    python benchmarks/cache_verify_cost.py --rows 20000 --d-model 576 --layers 2 --dtype float16
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from sae_refusal.activations.cache import ActivationCache, ActivationCacheWriter, CacheIdentity


def _identity(layers: int, dtype: str) -> CacheIdentity:
    return CacheIdentity(
        model="synthetic",
        revision="local",
        weights_hash="0" * 64,
        adapter_hash="",
        model_dtype="float32",
        quantization="none",
        attn_implementation="",
        trust_remote_code=False,
        tokenizer_hash="0" * 64,
        chat_template_hash="0" * 64,
        system_prompt_hash="0" * 64,
        layers=tuple(range(layers)),
        prompt_set_hash="0" * 64,
        dtype=dtype,
        max_length=4096,
        overflow="truncate_left",
    )


def write_cache(folder: Path, rows: int, d_model: int, layers: int, dtype: str, shard_rows: int) -> None:
    """Write ``rows`` random rows per layer as a cache at ``folder``."""
    identity = _identity(layers, dtype)
    gen = torch.Generator().manual_seed(0)
    with ActivationCacheWriter(folder, identity, d_model=d_model, shard_rows=shard_rows) as writer:
        for start in range(0, rows, 1024):
            n = min(1024, rows - start)
            writer.add({layer: torch.randn(n, d_model, generator=gen) for layer in identity.layers})
        writer.commit([{"id": f"p{i}"} for i in range(rows)])


def best_of(repeats: int, fn: Callable[[], Any]) -> float:
    """Smallest wall time of ``repeats`` calls of ``fn``, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", nargs="+", default=["float16", "float32"])
    parser.add_argument("--shard-rows", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtype:
            folder = Path(tmp) / dtype
            write_cache(folder, args.rows, args.d_model, args.layers, dtype, args.shard_rows)
            files = sorted(folder.iterdir())
            n_bytes = sum(p.stat().st_size for p in files)

            def sha256_all(files: list[Path] = files) -> None:
                for path in files:
                    with path.open("rb") as fh:
                        hashlib.file_digest(fh, "sha256")

            def load_all(folder: Path = folder) -> None:
                cache = ActivationCache.open(folder, verify="none")
                for layer in cache.layers:
                    cache.load(layer)

            row: dict[str, Any] = {"dtype": dtype, "mib": round(n_bytes / 2**20, 1)}
            timed: list[tuple[str, Callable[[], object]]] = [
                ("open_none", partial(ActivationCache.open, folder, verify="none")),
                ("open_size", partial(ActivationCache.open, folder, verify="size")),
                ("sha256_only", sha256_all),
                ("open_hash", partial(ActivationCache.open, folder, verify="hash")),
                ("load", load_all),
            ]
            for name, fn in timed:
                row[f"{name}_s"] = round(best_of(args.repeats, fn), 4)
            row["open_hash_over_load"] = round(row["open_hash_s"] / row["load_s"], 2)
            results.append(row)
    print(
        json.dumps(
            {
                "rows": args.rows,
                "d_model": args.d_model,
                "layers": args.layers,
                "shard_rows": args.shard_rows,
                "threads": 1,
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
