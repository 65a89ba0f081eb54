"""Benchmark: TopK SAE seeds stacked into one batched module vs stepped side by side vs one seed alone.

Usage::

    # the issue's shape (d_model 4096, 65,536 latents, k 64, batch 4096, aux_k 256), half the latents dead
    python benchmarks/stacked_seeds.py --device cuda --tf32 --dead_fraction 0.5 --json > $OUT/stacked.json
    python benchmarks/stacked_seeds.py --device cuda --tf32 --dead_fraction 0.5 --encoder_dtype bfloat16
    python benchmarks/stacked_seeds.py --device cuda --tf32 --dead_fraction 0.5 --profile   # top kernels
    # CPU smoke (seconds)
    python benchmarks/stacked_seeds.py --device cpu --d_model 64 --n_latents 512 --k 8 --batch 256 \\
        --aux_k 32 --dead_fraction 0.5 --steps 3 --warmup 1 --threads 1

Three contenders, each timed on its own (built fresh from the seeds' generators, the CUDA peak-memory
counter reset first), stepped the way :class:`sae_refusal.sae.module.SAEModule` steps a batch: forward, one
backward of the summed losses, dead-latent bookkeeping (``update_firing``), ``remove_parallel_grads``, one
fused Adam step over all parameters, ``normalize_decoder``, ``zero_grad(set_to_none=True)``:

* ``one``: seed 0's :class:`~sae_refusal.sae.topk.TopKSAE` alone;
* ``separate``: ``--seeds`` TopK SAEs side by side (``SAEModule(stack_seeds=False)``, today's way);
* ``stacked``: the same seeds as one :class:`~sae_refusal.sae.stacked.StackedTopKSAE`
  (``SAEModule(stack_seeds=True)``).

``--dead_fraction f`` keeps a fixed random ``f`` of each seed's latents dead (its own subset per seed) so the
AuxK path runs every step. Before timing, the stacked and separate per-seed losses on the batch are compared
(``--agree_rtol``; TF32 and bfloat16 may move a top-k selection at the boundary, hence the default 1e-3): a
disagreement stops the run. Timing: ``--warmup`` untimed steps (``torch.compile`` of the decoder-norm kernels
happens there), then ``--steps`` steps each between CUDA events (``perf_counter`` on the CPU), the median
reported. The per-seed ratio ``stacked / one`` is the issue's bar (<= 0.6x per seed at 65,536 latents).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sae_refusal.sae.architectures import TopK
from sae_refusal.sae.base import SAEOutput
from sae_refusal.sae.stacked import StackedTopKSAE
from sae_refusal.sae.topk import TopKSAE

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from sae_throughput import cpu_name  # noqa: E402  (a sibling script: the CPU's name)

#: The issue's bar: stacked step time per seed over one seed alone.
BAR = 0.6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--d_model", type=int, default=4096)
    parser.add_argument("--n_latents", type=int, default=65536)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--aux_k", type=int, default=256)
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the separate and stacked contenders")
    parser.add_argument("--dead_fraction", type=float, default=0.0, help="latents kept dead per seed")
    parser.add_argument("--encoder_dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 float32 matmuls")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--agree_rtol", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--json", action="store_true", help="print the JSON record instead of the table")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON record here")
    parser.add_argument("--profile", action="store_true", help="print each contender's top kernels (1 step)")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.steps < 1 or args.warmup < 1:
        parser.error("--seeds, --steps and --warmup must be >= 1")
    if not 0.0 <= args.dead_fraction < 1.0:
        parser.error(f"--dead_fraction must be in [0, 1), got {args.dead_fraction}")
    return args


# ---------------------------------------------------------------------------------------------- contenders
def build_sae(args: argparse.Namespace, seed: int) -> TopKSAE:
    """The seed's SAE as ``SAEModule`` builds it (``TopK.build`` with the seed's generator), on the CPU."""
    arch = TopK(k=args.k, aux_k=args.aux_k, encoder_dtype=args.encoder_dtype)
    sae = arch.build(args.d_model, args.n_latents, torch.Generator().manual_seed(seed))
    if not isinstance(sae, TopKSAE):
        raise TypeError(f"TopK.build gave {type(sae).__name__}")
    return sae.train()


def build_saes(args: argparse.Namespace, seeds: list[int], device: torch.device) -> list[TopKSAE]:
    """Each seed's SAE (:func:`build_sae`) on ``device``."""
    return [build_sae(args, seed).to(device) for seed in seeds]


def build_stacked(args: argparse.Namespace, seeds: list[int], device: torch.device) -> StackedTopKSAE:
    """The seeds' SAEs stacked (as ``SAEModule(stack_seeds=True)``: built one at a time), on ``device``."""
    saes = (build_sae(args, seed) for seed in seeds)
    return StackedTopKSAE.from_saes(saes, n_seeds=len(seeds)).to(device).train()


def dead_masks(args: argparse.Namespace, seeds: list[int], device: torch.device) -> Tensor | None:
    """``(S, F)``: a fixed random ``dead_fraction`` of each seed's latents (``None`` at fraction 0)."""
    n_dead = round(args.dead_fraction * args.n_latents)
    if n_dead == 0:
        return None
    mask_SF = torch.zeros(len(seeds), args.n_latents, dtype=torch.bool)
    for s, seed in enumerate(seeds):
        order = torch.randperm(args.n_latents, generator=torch.Generator().manual_seed(1000 + seed))
        mask_SF[s, order[:n_dead]] = True
    return mask_SF.to(device)


class Stepper:
    """One training step of some seeds as ``SAEModule`` does it (see the module docstring).

    Args:
        trained: The modules the optimiser steps (the SAEs, or the stack).
        forward: The seeds' outputs on a batch.
        mark_dead: Forces the dead subsets before each forward (``None``: nothing forced).
        update_firing: Counts the step's fired latents ``(S, F)``.
        lr: Adam learning rate.
    """

    def __init__(
        self,
        trained: list[nn.Module],
        forward: Callable[[Tensor], list[SAEOutput]],
        mark_dead: Callable[[], None] | None,
        update_firing: Callable[[Tensor], None],
        lr: float,
    ) -> None:
        self.trained, self.forward, self.mark_dead = trained, forward, mark_dead
        self.update_firing = update_firing
        params = [p for m in trained for p in m.parameters()]
        self.opt = torch.optim.Adam(params, lr=lr, fused=True)  # as SAEModule.configure_optimizers
        self.aux_steps = 0

    def step(self, x_BD: Tensor) -> list[Tensor]:
        """One step; returns each seed's loss (detached)."""
        if self.mark_dead is not None:
            self.mark_dead()
        outs = self.forward(x_BD)
        torch.stack([o.loss for o in outs]).sum().backward()
        self.update_firing(torch.stack([o.fired_F for o in outs]))
        for m in self.trained:
            m.remove_parallel_grads()  # type: ignore[operator]
        self.opt.step()
        for m in self.trained:
            m.normalize_decoder()  # type: ignore[operator]
        self.opt.zero_grad(set_to_none=True)
        self.aux_steps += int(all("aux" in o.parts for o in outs))
        return [o.loss.detach() for o in outs]


def mark_dead_separate(saes: list[TopKSAE], mask_SF: Tensor) -> None:
    """Keep each seed's subset dead (its counters at ``dead_after_steps``)."""
    for sae, mask_F in zip(saes, mask_SF, strict=True):
        sae.steps_since_fired_F.masked_fill_(mask_F, sae.dead_after_steps)


def mark_dead_stacked(stacked: StackedTopKSAE, mask_SF: Tensor) -> None:
    """:func:`mark_dead_separate` for the stack."""
    stacked.steps_since_fired_SF.masked_fill_(mask_SF, stacked.dead_after_steps)


def separate_stepper(saes: list[TopKSAE], mask_SF: Tensor | None, lr: float) -> Stepper:
    """The seeds side by side (``one`` is this with one seed)."""

    def update_firing(fired_SF: Tensor) -> None:
        for sae, fired_F in zip(saes, fired_SF, strict=True):
            sae.update_firing(fired_F)

    mark = None if mask_SF is None else lambda: mark_dead_separate(saes, mask_SF)
    return Stepper(list(saes), lambda x: [sae(x) for sae in saes], mark, update_firing, lr)


def stacked_stepper(stacked: StackedTopKSAE, mask_SF: Tensor | None, lr: float) -> Stepper:
    """The seeds as one :class:`StackedTopKSAE`."""
    mark = None if mask_SF is None else lambda: mark_dead_stacked(stacked, mask_SF)
    return Stepper([stacked], stacked, mark, stacked.update_firing, lr)


def build_stepper(name: str, args: argparse.Namespace, device: torch.device) -> Stepper:
    """``one``, ``separate`` or ``stacked``, built fresh."""
    seeds = [0] if name == "one" else list(range(args.seeds))
    mask_SF = dead_masks(args, seeds, device)
    if name == "stacked":
        return stacked_stepper(build_stacked(args, seeds, device), mask_SF, args.lr)
    return separate_stepper(build_saes(args, seeds, device), mask_SF, args.lr)


# ---------------------------------------------------------------------------------------------- measuring
def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Drop what the previous contender left; reset the CUDA peak counter (no-op on CPU)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model and thread count."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def check_agreement(args: argparse.Namespace, x_BD: Tensor) -> dict[str, Any]:
    """The stacked and separate per-seed losses on ``x_BD`` (training mode, the dead subsets marked).

    Raises:
        SystemExit: If a seed's losses differ by more than ``--agree_rtol``.
    """
    seeds = list(range(args.seeds))
    device = x_BD.device
    mask_SF = dead_masks(args, seeds, device)
    saes = build_saes(args, seeds, device)
    stacked = build_stacked(args, seeds, device)
    with torch.no_grad():
        if mask_SF is not None:
            mark_dead_separate(saes, mask_SF)
            mark_dead_stacked(stacked, mask_SF)
        theirs = [sae(x_BD) for sae in saes]
        mine = stacked(x_BD)
    pairs = [(float(a.loss), float(b.loss)) for a, b in zip(mine, theirs, strict=True)]
    rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in pairs)
    record = {
        "stacked_loss": [a for a, _ in pairs],
        "separate_loss": [b for _, b in pairs],
        "max_rel_diff": rel,
        "aux_in_every_seed": all("aux" in o.parts for o in mine) if mask_SF is not None else None,
        "rtol": args.agree_rtol,
    }
    del saes, stacked, theirs, mine
    if rel > args.agree_rtol:
        raise SystemExit(f"stacked and separate losses disagree (max rel diff {rel:.2e}): {record}")
    return record


def time_stepper(stepper: Stepper, x_BD: Tensor, steps: int, warmup: int) -> dict[str, Any]:
    """Warm up, then time ``steps`` steps one by one (CUDA events on CUDA)."""
    device = x_BD.device
    for _ in range(warmup):
        stepper.step(x_BD)
    synchronize(device)
    step_ms: list[float] = []
    losses: list[Tensor] = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            losses = stepper.step(x_BD)
            end.record()
            end.synchronize()
            step_ms.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            losses = stepper.step(x_BD)
            step_ms.append(1e3 * (time.perf_counter() - begin))
    return {
        "step_ms_median": statistics.median(step_ms),
        "step_ms_min": min(step_ms),
        "step_ms_mean": statistics.fmean(step_ms),
        "last_losses": [float(v) for v in losses],
        "aux_steps": stepper.aux_steps,
    }


def profile_step(stepper: Stepper, x_BD: Tensor, rows: int = 15) -> str:
    """The top kernels of one step (``torch.profiler``), sorted by device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x_BD.is_cuda else [])
    with profile(activities=activities) as prof:
        stepper.step(x_BD)
        synchronize(x_BD.device)
    key = "cuda_time_total" if x_BD.is_cuda else "cpu_time_total"
    return str(prof.key_averages().table(sort_by=key, row_limit=rows))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Agreement check, then each contender timed on its own; the JSON record."""
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
    gen = torch.Generator().manual_seed(0)
    x_BD = (torch.randn(args.batch, args.d_model, generator=gen) + 0.5).to(device)
    release(device)
    agreement = check_agreement(args, x_BD)
    results: dict[str, Any] = {}
    profiles: dict[str, str] = {}
    for name in ("one", "separate", "stacked"):
        release(device)
        stepper = build_stepper(name, args, device)
        result = time_stepper(stepper, x_BD, args.steps, args.warmup)
        n_seeds = 1 if name == "one" else args.seeds
        result["seeds"] = n_seeds
        result["per_seed_ms"] = result["step_ms_median"] / n_seeds
        result["peak_mem_gib"] = (
            torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        )
        if args.profile:
            profiles[name] = profile_step(stepper, x_BD)
        results[name] = result
        del stepper
    one = results["one"]["per_seed_ms"]
    ratios = {
        "stacked_per_seed_over_one": results["stacked"]["per_seed_ms"] / one,
        "separate_per_seed_over_one": results["separate"]["per_seed_ms"] / one,
        "stacked_over_separate": results["stacked"]["step_ms_median"] / results["separate"]["step_ms_median"],
    }
    return {
        "device": device_name(device),
        "config": {
            key: getattr(args, key)
            for key in (
                "d_model",
                "n_latents",
                "k",
                "batch",
                "aux_k",
                "seeds",
                "dead_fraction",
                "encoder_dtype",
                "tf32",
                "lr",
                "steps",
                "warmup",
            )
        },
        "torch": torch.__version__,
        "agreement": agreement,
        "results": results,
        "ratios": ratios,
        "bar": {"stacked_per_seed_over_one_at_most": BAR, "met": ratios["stacked_per_seed_over_one"] <= BAR},
        **({"profiles": profiles} if profiles else {}),
    }


def table(record: dict[str, Any]) -> str:
    """The record as a text table."""
    cfg = record["config"]
    lines = [
        f"device: {record['device']} (torch {record['torch']})",
        f"d_model {cfg['d_model']}, latents {cfg['n_latents']:,}, k {cfg['k']}, batch {cfg['batch']}, "
        f"aux_k {cfg['aux_k']}, dead fraction {cfg['dead_fraction']}, encoder {cfg['encoder_dtype']}, "
        f"tf32 {'on' if cfg['tf32'] else 'off'}; median of {cfg['steps']} steps after {cfg['warmup']} "
        "warm-up",
        f"stacked vs separate losses: max rel diff {record['agreement']['max_rel_diff']:.1e}",
        "",
        f"{'contender':<12} {'seeds':>5} {'step ms':>10} {'per seed ms':>12} {'per seed / one':>15} "
        f"{'peak GiB':>9} {'aux steps':>9}",
    ]
    one = record["results"]["one"]["per_seed_ms"]
    for name, r in record["results"].items():
        peak = "n/a" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"
        lines.append(
            f"{name:<12} {r['seeds']:>5} {r['step_ms_median']:>10.2f} {r['per_seed_ms']:>12.2f} "
            f"{r['per_seed_ms'] / one:>14.2f}x {peak:>9} {r['aux_steps']:>9}"
        )
    ratio, bar = record["ratios"]["stacked_per_seed_over_one"], record["bar"]
    lines += [
        "",
        f"stacked per seed / one alone: {ratio:.2f}x (bar <= {bar['stacked_per_seed_over_one_at_most']}x: "
        f"{'met' if bar['met'] else 'missed'}); stacked / separate: "
        f"{record['ratios']['stacked_over_separate']:.2f}x",
    ]
    for name, text in record.get("profiles", {}).items():
        lines += ["", f"--- {name}: top kernels of one step", text]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the table (or the JSON with ``--json``); return the record."""
    args = parse_args(argv)
    record = run(args)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2) if args.json else table(record))
    return record


if __name__ == "__main__":
    main()
