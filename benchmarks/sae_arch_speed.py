"""Benchmark: training speed of each SAE architecture against TopK, same shapes, same run (issue 26).

Every contender is the project's own module, built by its architecture class (what ``sae-refusal fit``
builds) and stepped the way :class:`sae_refusal.sae.module.SAEModule` steps one seed: forward, backward,
``remove_parallel_grads``, Adam, ``normalize_decoder``, ``update_firing``. One fixed random batch (speed does
not depend on the values), warm-up steps first, ``torch.cuda.synchronize()`` around every timed step on CUDA.
Per architecture: samples/s, median step time, peak CUDA memory (reset before each is built), and the ratio
of its samples/s to TopK's measured in the same process (``speed_vs_topk``; above 1 is faster).

Architectures: ``topk`` (the baseline: sparse decoder and encoder backward, AuxK), ``batchtopk`` (dense codes,
batch-level top-k, AuxK), ``matryoshka`` (BatchTopK with prefix losses, ``--prefixes``), ``jumprelu``
(trainable thresholds, straight-through estimators, L0 penalty), ``l1`` (ReLU with the L1 penalty). All use
the same ``k`` where they have one; JumpReLU's and L1's sparsity does not change their cost (dense codes).

    # the GPU shape of the project's other SAE benchmarks: d_model 4096, 65,536 latents, batch 4096, k 64
    python benchmarks/sae_arch_speed.py --device cuda --out $OUT/sae_arch_speed.json
    # CPU smoke
    python benchmarks/sae_arch_speed.py --device cpu --d-model 32 --expansion 4 --k 8 --batch 128 \\
        --steps 3 --warmup 1 --threads 1 --out /tmp/sae_arch_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sae_refusal.sae.architectures import L1, SAEArchitecture, TopK
from sae_refusal.sae.base import SparseAutoencoder
from sae_refusal.sae.batchtopk import BatchTopK, MatryoshkaBatchTopK
from sae_refusal.sae.jumprelu_train import JumpReLU

ARCHITECTURES = ("topk", "batchtopk", "matryoshka", "jumprelu", "l1")


def architecture(name: str, k: int, aux_k: int, prefixes: Sequence[float]) -> SAEArchitecture:
    """The architecture ``name`` with the benchmark's settings."""
    if name == "topk":
        return TopK(k=k, aux_k=aux_k)
    if name == "batchtopk":
        return BatchTopK(k=k, aux_k=aux_k)
    if name == "matryoshka":
        return MatryoshkaBatchTopK(k=k, aux_k=aux_k, prefix_fractions=list(prefixes))
    if name == "jumprelu":
        return JumpReLU(l0_coef=1.0, bandwidth=0.05, init_threshold=0.3)
    if name == "l1":
        return L1(l1_coef=0.5)
    raise ValueError(f"--archs: unknown architecture {name!r}; choose from {', '.join(ARCHITECTURES)}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, x_BD: torch.Tensor) -> torch.Tensor:
    """One SAEModule-style training step of one seed; returns the loss (not synchronised)."""
    out = sae(x_BD)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    sae.remove_parallel_grads()
    optimizer.step()
    sae.normalize_decoder()
    sae.update_firing(out.fired_F)
    return out.loss.detach()


def time_architecture(
    name: str, args: argparse.Namespace, x_BD: torch.Tensor, device: torch.device
) -> dict[str, Any]:
    """Build ``name``, warm up, time ``args.steps`` steps; OOM and other failures are recorded, not raised."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        gen = torch.Generator().manual_seed(args.seed)
        arch = architecture(name, args.k, args.aux_k, args.prefixes)
        sae = arch.build(x_BD.shape[1], args.expansion * x_BD.shape[1], gen).to(device)
        sae.set_input_scale(1.0)
        sae.train()
        optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
        for _ in range(args.warmup):
            train_step(sae, optimizer, x_BD)
        synchronize(device)
        step_s: list[float] = []
        loss = x_BD.new_zeros(())
        for _ in range(args.steps):
            synchronize(device)
            start = time.perf_counter()
            loss = train_step(sae, optimizer, x_BD)
            synchronize(device)
            step_s.append(time.perf_counter() - start)
        with torch.no_grad():
            sae.eval()
            l0 = float((sae.encode(x_BD) != 0).sum(-1).float().mean())
    except (RuntimeError, torch.cuda.OutOfMemoryError) as err:  # OOM at large F: record and go on
        return {"status": f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "status": "ok",
        "samples_per_s": args.steps * x_BD.shape[0] / sum(step_s),
        "step_ms_median": 1e3 * statistics.median(step_s),
        "step_ms_min": 1e3 * min(step_s),
        "last_loss": float(loss),
        "eval_l0": l0,
        "peak_memory_gib": peak,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--d-model", type=int, default=4096)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--aux-k", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--prefixes", type=float, nargs="+", default=[0.0625, 0.25, 1.0])
    parser.add_argument("--archs", default=",".join(ARCHITECTURES), help="comma separated, topk always runs")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tf32", action="store_true", help="TF32 matmuls (fp32 storage)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    names = [n for n in args.archs.split(",") if n]
    for name in names:
        architecture(name, args.k, args.aux_k, args.prefixes)  # unknown names fail before any work
    names = ["topk", *[n for n in names if n != "topk"]]
    if args.steps < 1 or args.warmup < 1:
        raise SystemExit("--steps and --warmup must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    device = torch.device(args.device)
    x_BD = torch.randn(args.batch, args.d_model, generator=torch.Generator().manual_seed(1)).to(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"{device_name}: d_model {args.d_model}, {args.expansion * args.d_model} latents, k {args.k}, "
        f"batch {args.batch}, {args.steps} steps after {args.warmup} warm-up",
        flush=True,
    )
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        results[name] = time_architecture(name, args, x_BD, device)
        print(f"  {name}: {json.dumps(results[name])}", flush=True)
    base = results["topk"].get("samples_per_s")
    for row in results.values():
        if row["status"] == "ok" and base:
            row["speed_vs_topk"] = row["samples_per_s"] / base
    record = {
        "device": device_name,
        "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"out": str(args.out)},
        "results": results,
    }
    print("\n| architecture | samples/s | median step ms | vs TopK | peak GiB | eval L0 |")
    print("|---|---|---|---|---|---|")
    for name, row in results.items():
        if row["status"] != "ok":
            print(f"| {name} | {row['status']} | | | | |")
            continue
        peak = "n/a" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.2f}"
        print(
            f"| {name} | {row['samples_per_s']:,.0f} | {row['step_ms_median']:.2f} | "
            f"{row.get('speed_vs_topk', float('nan')):.2f}x | {peak} | {row['eval_l0']:.1f} |"
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(args.out)
        print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
