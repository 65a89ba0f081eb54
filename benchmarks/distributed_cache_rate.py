"""Benchmark: activation caching on one process and on N (``sae-refusal cache --trainer.devices N``).

Runs ``sae-refusal cache`` twice, each as its own command into its own temporary cache root: on one process,
then on ``--devices N`` (Lightning Fabric starts the processes: gloo on CPU, NCCL on GPUs). Reads the summary
line rank 0 logs and prints, as one JSON object: prompts/s of each run (over the whole command, start-up
and model loading included, and over the cache build as logged), each rank's own rate, the speedup, and
whether the two caches are the same (identity, prompt rows, shard list; ``bytes_equal`` and the largest
difference of any activation).

Every shard is extracted alone, so the two caches hold the same bytes when every process runs the same
kernels. On CPU, Lightning gives each of N processes 1/N of the cores unless ``OMP_NUM_THREADS`` is set, and
another thread count sums in another order: ``--threads 1`` (the default on CPU) runs every process with one
thread, for equal bytes; ``--threads 0`` leaves the environment as it is (the faster one-process baseline,
round-off differences).

Without ``--config`` it builds a tiny CPU setting: a random-weight tiny Llama and ``--prompts`` synthetic
prompts of mixed lengths (a smoke run, about a minute on 2 cores)::

    python benchmarks/distributed_cache_rate.py --devices 2

On GPUs, a real config (options after the known ones go to ``sae-refusal cache`` as they are)::

    python benchmarks/distributed_cache_rate.py --accelerator gpu --devices 8 \\
        --config lightning_configs/default.yaml --data lightning_configs/data/coconot_alpaca.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: The summary line rank 0 logs (``sae_refusal.activations.build.compute_cache``).
SUMMARY = re.compile(
    r"cached (?P<prompts>\d+) prompts at layers .* in (?P<seconds>[\d.]+) s "
    r"\((?P<rate>[\d.]+) prompts/s(?:; per rank: (?P<per_rank>[^)]*))?\) -> (?P<folder>.+)$",
    re.M,
)


def tiny_setting(folder: Path, n_prompts: int, shard_rows: int) -> list[str]:
    """Write a tiny model, a prompt file and a config under ``folder``; returns the ``--config`` options."""
    import yaml

    from sae_refusal.testing import save_tiny_model

    model = save_tiny_model(folder / "model", "llama")
    rows = [
        {"id": f"p{i}", "prompt": f"Question {i}: " + "tell me more " * (1 + (i * 37) % 60)}
        for i in range(n_prompts)
    ]
    (folder / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = {
        "model": {"class_path": "sae_refusal.sae.SAEModule"},
        "data": {
            "llm": {"name_or_path": str(model)},
            "prompts": {
                "data_root": str(folder),
                "sources": [{"name": "b", "label": "benign", "path": "prompts.jsonl", "id_column": "id"}],
            },
            "cache": {"layers": [1, 2], "batch_size": 8, "shard_rows": shard_rows},
        },
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return ["--config", str(path)]


def run_cache(options: list[str], accelerator: str, devices: int, root: Path, threads: int) -> dict[str, Any]:
    """One ``sae-refusal cache`` command; its wall time and the rates of its summary line.

    Raises:
        RuntimeError: If the command fails or logs no summary line (its stderr's end is in the message).
    """
    command = [sys.executable, "-m", "sae_refusal", "cache", *options]
    command += ["--trainer.accelerator", accelerator, "--trainer.devices", str(devices)]
    command += ["--data.cache.root", str(root)]
    env = dict(os.environ)
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    match = SUMMARY.search(done.stderr)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    prompts = int(match["prompts"])
    per_rank = [float(r) if r != "-" else 0.0 for r in (match["per_rank"] or match["rate"]).split(", ")]
    return {
        "devices": devices,
        "prompts": prompts,
        "wall_s": round(wall, 2),
        "prompts_per_s_wall": round(prompts / wall, 2),
        "build_s": float(match["seconds"]),
        "prompts_per_s_build": float(match["rate"]),
        "per_rank_prompts_per_s": per_rank,
        "folder": match["folder"].strip(),
    }


def compare(a: Path, b: Path) -> dict[str, Any]:
    """Whether two caches are the same: identity, prompt rows, shard list, bytes, largest difference."""
    import torch

    from sae_refusal.activations.cache import ActivationCache

    one, many = ActivationCache.open(a), ActivationCache.open(b)
    same_shards = one.manifest["shards"] == many.manifest["shards"]
    bytes_equal = same_shards and all(
        (one.folder / e["file"]).read_bytes() == (many.folder / e["file"]).read_bytes()
        for e in one.manifest["shards"]
    )
    max_diff = max(
        float((one.load(layer).float() - many.load(layer).float()).abs().max()) for layer in one.layers
    )
    return {
        "same_identity": one.identity == many.identity,
        "same_prompt_rows": one.prompts == many.prompts,
        "same_shard_rows": [e["rows"] for e in one.manifest["shards"]]
        == [e["rows"] for e in many.manifest["shards"]],
        "bytes_equal": bytes_equal,
        "max_abs_diff": max_diff,
        "allclose": all(
            torch.allclose(one.load(layer).float(), many.load(layer).float(), atol=1e-5, rtol=1e-4)
            for layer in one.layers
        ),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=2, help="processes of the second run")
    parser.add_argument("--accelerator", default="cpu", help="trainer.accelerator of both runs (cpu, gpu)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS of every process (0: leave the environment; default 1 on cpu, else 0)",
    )
    parser.add_argument("--prompts", type=int, default=400, help="prompts of the tiny setting (no --config)")
    parser.add_argument("--shard-rows", type=int, default=16, help="data.cache.shard_rows (tiny setting)")
    args, rest = parser.parse_known_args(argv)
    threads = args.threads if args.threads is not None else (1 if args.accelerator == "cpu" else 0)
    with tempfile.TemporaryDirectory(prefix="distributed-cache-rate-") as tmp:
        folder = Path(tmp)
        tiny = [] if "--config" in rest else tiny_setting(folder, args.prompts, args.shard_rows)
        options = [*tiny, *rest]
        one = run_cache(options, args.accelerator, 1, folder / "one", threads)
        many = run_cache(options, args.accelerator, args.devices, folder / "many", threads)
        equal = compare(Path(one.pop("folder")), Path(many.pop("folder")))
    result = {
        "accelerator": args.accelerator,
        "threads_per_process": threads or "environment",
        "one_process": one,
        f"{args.devices}_processes": many,
        "speedup_wall": round(one["wall_s"] / many["wall_s"], 2),
        "speedup_build": round(one["build_s"] / max(many["build_s"], 1e-9), 2),
        "caches": equal,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    outcome = main()
    caches = outcome["caches"]
    same = caches["same_identity"] and caches["same_prompt_rows"] and caches["same_shard_rows"]
    sys.exit(0 if same and caches["allclose"] else 1)
