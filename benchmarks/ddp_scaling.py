"""Benchmark: SAE training throughput with DDP on two GPUs against one GPU, and the exports of both.

What runs is ``sae-refusal fit``'s training path: a Lightning ``Trainer`` (strategy ``ddp`` over
``torchrun`` processes, as ``lightning_configs/trainer/ddp.yaml``; one process for one GPU) fitting
:class:`~sae_refusal.sae.module.SAEModule` (TopK SAE, its fused Adam, dead latents OR-ed over ranks, decoder
renormalised after each step, AuxK normaliser averaged over ranks). The batches are random Gaussian rows
made on the GPU (a pool of a few batches, cycled: throughput does not depend on the data), so no host copy
is timed. Two phases per world size (1, then 2), each in fresh processes:

* Latents count as dead after ``--dead-after`` (1) silent steps, so AuxK (and its all-reduce of the
  normaliser) runs in every step, as in a long fit that has dead latents (random rows fire most latents).
* **throughput**: per-GPU batch ``--batch`` (global batch ``batch x world``), ``--warmup`` untimed steps,
  then ``--steps`` timed steps (``torch.cuda.synchronize()`` at each step's start and after the last; the
  time between steps, Lightning's loop, counts). Reports samples/s; ``speedup`` = 2-GPU / 1-GPU samples/s
  (target >= 1.8) and ``scaling_efficiency`` = speedup / 2. Exports are skipped in this phase. With more
  than one process it runs once per ``--variants`` entry (same processes, one fresh Trainer each), so one
  run compares the DDP settings (``throughput_variants`` per world size, ``speedup_variants``):

  - ``plain``: ``strategy="ddp"`` as ``lightning_configs/trainer/ddp.yaml`` (fp32 gradients all-reduced in
    25 MB buckets; each bucket is copied into DDP's flat buffer and back into ``.grad``).
  - ``bucket_view``: ``DDPStrategy(gradient_as_bucket_view=True, bucket_cap_mb=--bucket-mb)``: the
    ``.grad`` tensors are views of the buckets (no copy in or out, 2 GiB less memory traffic and memory per
    step at the default size); the same fp32 all-reduce, the same numbers.
  - ``bf16_hook``: ``bucket_view`` plus ``ddp_comm_hook=default_hooks.bf16_compress_hook``: the buckets
    are cast to bfloat16 for the all-reduce (half the traffic) and back to fp32 (the averaged gradient is
    rounded to bfloat16's 8 significant bits; the master weights and Adam's state stay fp32). Not exact:
    a DDP fit with it no longer matches the one-GPU fit to round-off.
* **exports**: ``--compare-steps`` steps on the same global batches (``--batch`` rows, split across the
  ranks: per-rank ``batch / world``), full fp32 (TF32 off, so only summation order differs), AuxK running
  (latents dead after ``--compare-dead-after`` steps), then the module's own export on rank zero; reports
  the max abs difference per tensor between the 1-GPU and 2-GPU exports. ``fit_start`` checks what must
  not depend on summation order at all: each export's ``input_scale`` against
  ``mean_norm_scale(training split)`` (exact) and the decoder bias's distance from its start (the scaled
  training mean; at most ``steps x lr`` with Adam). Beyond that, Adam's first steps move each weight by about
  ``lr x sign(gradient)``: an entry whose gradient is within round-off of zero (random rows give many)
  can move either way in the two runs, and a flipped top-k choice changes a latent's whole update, so the
  weights of the two fits drift apart by a few ``lr`` per step in a few entries (see ``entries_above_atol``
  and ``max_abs_diff_in_lr``); the CPU comparison (tests/test_sae_ddp_metrics.py) is the exact one.

Before the fit-start fix in ``SAEModule.on_fit_start`` (wait for the device), the 2-GPU fit trained with
``input_scale`` 1 and a zero decoder bias: Lightning builds the DDP wrapper on a side CUDA stream, and DDP's
initial broadcast copies the (old) parameters and buffers back on that stream after ``on_fit_start`` had set
them (``input_scale`` 1.000256 vs 1.0, ``b_dec_D`` relative difference 0.997 on 2 H200s).

Examples::

    # two GPUs (about 2.5 minutes): d_model 4096, 65,536 latents, k 64, per-GPU batch 4096, TF32,
    # 2-GPU throughput of plain / bucket_view / bf16_hook
    python benchmarks/ddp_scaling.py --out $OUT/ddp.json
    # CPU smoke (gloo)
    python benchmarks/ddp_scaling.py --device cpu --d-model 64 --n-latents 256 --k 8 --batch 128 --steps 3 \\
        --variants plain,bucket_view --out /tmp/ddp.json

NCCL: NVLink multicast (NVLS) is turned off (``NCCL_NVLS_ENABLE=0``) before any process group starts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # before torch.distributed starts anything

import torch

SCRIPT = Path(__file__).resolve()


# ---------------------------------------------------------------------------------------------- worker
def fit_start_sample(d_model: int) -> torch.Tensor:
    """The training split the module's fit-start statistics come from (CPU, seeded: the same everywhere)."""
    return torch.randn(1024, d_model, generator=torch.Generator().manual_seed(0))


def _world() -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun's environment (one process: 0, 0, 1)."""
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("LOCAL_RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
    )


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


VARIANTS = ("plain", "bucket_view", "bf16_hook")


def _strategy(variant: str, world: int, bucket_mb: float) -> Any:
    """The Trainer's strategy for a DDP ``variant`` (module docstring); ``"auto"`` for one process."""
    if world == 1:
        return "auto"
    from lightning.pytorch.strategies import DDPStrategy

    if variant == "plain":
        return DDPStrategy()
    kwargs: dict[str, Any] = {"gradient_as_bucket_view": True, "bucket_cap_mb": bucket_mb}
    if variant == "bf16_hook":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        kwargs["ddp_comm_hook"] = default_hooks.bf16_compress_hook
    return DDPStrategy(**kwargs)


def run_phase(args: argparse.Namespace, phase: str, root: Path, variant: str = "plain") -> dict[str, Any]:
    """One Lightning fit of ``phase`` (``throughput`` or ``exports``) in this process (one rank)."""
    import lightning as L
    from torch.utils.data import IterableDataset

    from sae_refusal.activations.datamodule import ActivationBatch
    from sae_refusal.sae import SAEModule, TopK
    from sae_refusal.sae.topk import TopKSAE

    rank, _, world = _world()
    device = args.device
    throughput = phase == "throughput"
    tf32 = throughput and args.tf32 and device == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    per_rank = args.batch if throughput else args.batch // world
    n_steps = args.warmup + args.steps if throughput else args.compare_steps

    class GaussianRows(IterableDataset[dict[str, torch.Tensor]]):
        """Batches made on this process's device: a cycled pool (throughput), or this rank's share of
        seeded global batches (exports: every rank draws the same global batch and keeps its rows)."""

        def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
            dev = (
                torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
            )
            gen = torch.Generator(device=dev).manual_seed(1234)
            if throughput:
                pool = [torch.randn(per_rank, args.d_model, device=dev, generator=gen) for _ in range(4)]
                for step in range(n_steps):
                    yield {"acts": pool[step % len(pool)]}
            else:
                for _ in range(n_steps):
                    global_BD = torch.randn(args.batch, args.d_model, device=dev, generator=gen)
                    yield {"acts": global_BD[rank * per_rank : (rank + 1) * per_rank]}

    class Data(L.LightningDataModule):
        def __init__(self) -> None:
            super().__init__()
            # the module sets its input scale and decoder bias from the training split (same on every rank)
            sample = fit_start_sample(args.d_model)
            self.splits = {
                "train": ActivationBatch(
                    sample, torch.zeros(1024, dtype=torch.long), torch.zeros(1024, dtype=torch.long), []
                )
            }

        def train_dataloader(self) -> Any:
            return torch.utils.data.DataLoader(GaussianRows(), batch_size=None)

    class NoExport(SAEModule):
        def export(self, folder: str | Path) -> dict[int, Path]:
            return {}  # the throughput phase writes nothing (2 GiB per SAE at the full size)

    class Timer(L.Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.end = 0.0
            self.aux_steps = 0

        def on_train_batch_start(self, trainer: Any, pl_module: Any, *rest: Any) -> None:
            _sync(device)
            self.starts.append(time.perf_counter())
            self.aux_steps += int(any(bool(s.dead_F.any()) for _, s in pl_module.named_saes()))

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *rest: Any) -> None:
            _sync(device)
            self.end = time.perf_counter()

    dead_after = args.dead_after if throughput else args.compare_dead_after
    architecture = TopK(k=args.k, aux_k=args.aux_k, dead_after_steps=dead_after)
    expansion = args.n_latents // args.d_model
    module_cls = NoExport if throughput else SAEModule
    module = module_cls(
        d_model=args.d_model, architecture=architecture, expansion_factor=expansion, seeds=[0], lr=args.lr
    )
    timer = Timer()
    trainer = L.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=world,
        strategy=_strategy(variant, world, args.bucket_mb),
        precision="32-true",
        max_steps=n_steps,
        max_epochs=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root / f"{phase}_{variant}_world{world}"),
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=Data())
    out: dict[str, Any] = {
        "variant": variant if world > 1 else "single",
        "world_size": world,
        "per_rank_batch": per_rank,
        "steps": n_steps,
        "aux_steps": timer.aux_steps,
        "tf32": tf32,
        "rank_mean_in_topk": hasattr(TopKSAE(4, 8, 2), "rank_mean"),
    }
    if throughput:
        starts = timer.starts[args.warmup :]
        elapsed = timer.end - starts[0]
        step_s = [b - a for a, b in zip(starts, [*starts[1:], timer.end], strict=True)]
        out.update(
            samples_per_s=args.steps * per_rank * world / elapsed,
            timed_steps=args.steps,
            elapsed_s=elapsed,
            median_step_ms=1e3 * statistics.median(step_s),
            peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        )
    else:
        out["export"] = str(root / f"{phase}_{variant}_world{world}" / "sae" / "seed0")
    return out


def worker(args: argparse.Namespace) -> None:
    """Both phases in this process (one rank); rank zero writes ``args.result``."""
    rank, _, world = _world()
    root = Path(args.workdir)
    result: dict[str, Any] = {}
    variants = args.variants if world > 1 else ["plain"]
    jobs = [("throughput", v) for v in variants] + [("exports", "plain")]
    for phase, variant in jobs:
        try:
            out = run_phase(args, phase, root, variant)
        except Exception as error:  # reported in the JSON; the other phase still runs
            out = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
            if world > 1:
                raise  # the other rank would wait for this one in a collective
        if phase == "throughput":
            result.setdefault("throughput_variants", {})[variant] = out
            if variant == variants[0]:
                result["throughput"] = out
        else:
            result[phase] = out
    if rank == 0:
        Path(args.result).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------- launcher
def launch(args: argparse.Namespace, argv: list[str], world: int, workdir: Path) -> dict[str, Any]:
    """Run :func:`worker` in ``world`` fresh processes (torchrun for more than one); its JSON result."""
    result = workdir / f"result_world{world}.json"
    worker_args = [str(SCRIPT), "--worker", "--result", str(result), "--workdir", str(workdir), *argv]
    if world == 1:
        cmd = [sys.executable, *worker_args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={world}",
            *worker_args,
        ]
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "OMP_NUM_THREADS": str(args.threads)}
    if args.device == "cuda":
        env.setdefault("CUDA_VISIBLE_DEVICES", ",".join(str(i) for i in range(world)))
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - started
    if proc.returncode != 0 or not result.exists():
        return {"error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-4000:], "wall_s": wall}
    return {**json.loads(result.read_text()), "wall_s": wall}


def compare_exports(
    one: str, two: str, rtol: float, atol: float, lr: float, steps: int, d_model: int
) -> dict[str, Any]:
    """Per tensor of the two exports: max abs difference (also in units of ``lr``), entries above ``atol``,
    and the relative Frobenius difference ``||a - b|| / ||a||`` (within tolerance: at most ``rtol`` for
    every float tensor, integer buffers equal); ``fit_start``: each export's ``input_scale`` against the
    expected one and its decoder bias's largest distance from the expected start (at most ``steps x lr``
    with Adam; a zero start is off by the training mean's largest entry)."""
    from safetensors.torch import load_file

    from sae_refusal.sae.base import mean_norm_scale

    a, b = load_file(str(Path(one) / "sae.safetensors")), load_file(str(Path(two) / "sae.safetensors"))
    sample = fit_start_sample(d_model)
    scale = mean_norm_scale(sample)
    b_dec_start = sample.mean(0).double() * scale
    fit_start: dict[str, Any] = {"expected_input_scale": scale, "b_dec_bound": steps * lr}
    for name, export in (("world1", a), ("worldN", b)):
        moved = float((export["b_dec_D"].double() - b_dec_start).abs().max())
        fit_start[name] = {
            "input_scale": float(export["input_scale"]),
            "input_scale_ok": abs(float(export["input_scale"]) - scale) <= 1e-6 * scale,
            "b_dec_max_move": moved,
            "b_dec_ok": moved <= 1.01 * steps * lr,
        }
    fit_start["ok"] = all(
        fit_start[n]["input_scale_ok"] and fit_start[n]["b_dec_ok"] for n in ("world1", "worldN")
    )
    floats = [k for k in a if a[k].is_floating_point()]
    diff = {k: (a[k].double() - b[k].double()).abs() for k in floats}
    rel = {k: float(diff[k].norm() / a[k].double().norm().clamp_min(1e-30)) for k in floats}
    int_equal = {k: bool(torch.equal(a[k], b[k])) for k in a if k not in diff}
    return {
        "fit_start": fit_start,
        "max_abs_diff": {k: float(d.max()) for k, d in diff.items()},
        "max_abs_diff_in_lr": {k: float(d.max()) / lr for k, d in diff.items()},
        "entries_above_atol": {k: int((d > atol).sum()) for k, d in diff.items()},
        "entries": {k: d.numel() for k, d in diff.items()},
        "rel_fro_diff": rel,
        "integer_buffers_equal": int_equal,
        "rtol": rtol,
        "atol": atol,
        "within_tolerance": all(r <= rtol for r in rel.values()) and all(int_equal.values()),
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--d-model", type=int, default=4096)
    parser.add_argument("--n-latents", type=int, default=65536)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--aux-k", type=int, default=256)
    parser.add_argument(
        "--batch", type=int, default=4096, help="per-GPU batch (throughput); global (exports)"
    )
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument(
        "--dead-after", type=int, default=1, help="dead_after_steps (throughput); 1: AuxK runs every step"
    )
    parser.add_argument("--compare-steps", type=int, default=20)
    parser.add_argument("--compare-dead-after", type=int, default=1)
    parser.add_argument(
        "--rtol", type=float, default=1e-4, help="exports: relative Frobenius difference allowed"
    )
    parser.add_argument("--atol", type=float, default=1e-5, help="exports: count entries differing by more")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default.yaml's)")
    parser.add_argument("--no-tf32", dest="tf32", action="store_false")
    parser.add_argument(
        "--variants",
        type=lambda text: [v for v in text.split(",") if v],
        default=list(VARIANTS),
        help=f"DDP settings timed with more than one process, comma-separated: {','.join(VARIANTS)}",
    )
    parser.add_argument(
        "--bucket-mb", type=float, default=25.0, help="bucket_cap_mb of bucket_view/bf16_hook"
    )
    parser.add_argument("--world", type=int, default=2, help="the multi-process world size")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per world size")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        parser.error(f"--variants: choose from {','.join(VARIANTS)}, got {args.variants}")
    if args.n_latents % args.d_model:
        parser.error("--n-latents must be a multiple of --d-model (SAEModule's expansion_factor)")
    if args.batch % args.world:
        parser.error("--batch must divide by --world (the exports phase splits it across the ranks)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.worker:
        worker(args)
        return {}
    report: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k not in ("worker", "result", "workdir", "out")},
        "host": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if args.device == "cuda"
            else [],
        },
        "note": "SAEModule (one seed) fitted by Lightning; ddp over torchrun for >1 process; data on device",
    }
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        report["error"] = f"{torch.cuda.device_count()} GPU(s) visible, {args.world} needed"
    else:
        with tempfile.TemporaryDirectory(prefix="ddp_scaling_") as tmp:
            raw = sys.argv[1:] if argv is None else list(argv)
            runs = {w: launch(args, raw, w, Path(tmp)) for w in (1, args.world)}
            report["runs"] = {f"world{w}": r for w, r in runs.items()}
            one, many = runs[1].get("throughput", {}), runs[args.world].get("throughput", {})
            if "samples_per_s" in one and "samples_per_s" in many:
                speedup = many["samples_per_s"] / one["samples_per_s"]
                report.update(
                    samples_per_s={"1": one["samples_per_s"], str(args.world): many["samples_per_s"]},
                    speedup=speedup,
                    scaling_efficiency=speedup / args.world,
                    speedup_target_met=speedup >= 0.9 * args.world,
                )
                report["speedup_variants"] = {
                    v: r["samples_per_s"] / one["samples_per_s"]
                    for v, r in runs[args.world].get("throughput_variants", {}).items()
                    if "samples_per_s" in r
                }
            ex1, ex2 = runs[1].get("exports", {}), runs[args.world].get("exports", {})
            if "export" in ex1 and "export" in ex2:
                try:
                    report["exports"] = compare_exports(
                        ex1["export"],
                        ex2["export"],
                        args.rtol,
                        args.atol,
                        args.lr,
                        args.compare_steps,
                        args.d_model,
                    )
                except Exception as error:
                    report["exports"] = {"error": f"{type(error).__name__}: {error}"}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return report


if __name__ == "__main__":
    main()
