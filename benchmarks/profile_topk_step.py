"""Where the time of one TopK SAE training step goes (torch.profiler, CUDA kernels), for tuning.

    python benchmarks/profile_topk_step.py --device cuda [--tf32] [--dead-fraction 0.5] \
        [--encoder-dtype bfloat16] [--expansion 32] [--json $OUT/profile.json]

Prints the kernels that took the most device time over a few profiled steps of
:class:`~sae_refusal.sae.TopKSAE` (forward, backward, fused Adam, decoder-norm duties).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from sae_refusal.sae import TopKSAE


def kernel_events(events: list[Any], device: torch.device) -> list[Any]:
    """The events whose device time is a kernel's own (CUDA: the kernel rows only).

    On CUDA, ``key_averages()`` lists each kernel twice: as its own row and inside the self device time of
    the operator that launched it (``aten::mm`` and its ``nvjet...`` kernel); summing every row counts the
    time about twice. On the CPU every row is an operator and self times do not overlap.
    """
    if device.type != "cuda":
        return events
    return [e for e in events if getattr(e, "device_type", None) == DeviceType.CUDA]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--d-model", type=int, default=4096)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tf32", action="store_true")
    parser.add_argument("--dead-fraction", type=float, default=0.0)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--shapes", action="store_true", help="group the table by input shapes too")
    parser.add_argument(
        "--encoder-dtype", default="float32", help="TopKSAE encoder_dtype (float32 | bfloat16)"
    )
    parser.add_argument(
        "--json", default=None, help="also write the top kernels (--rows of them) here as JSON"
    )
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    sae = TopKSAE(args.d_model, args.expansion * args.d_model, args.k, encoder_dtype=args.encoder_dtype)
    sae = sae.to(device)
    params = list(sae.parameters())
    opt = torch.optim.Adam(params, lr=1e-3, fused=device.type == "cuda")
    x = torch.randn(args.batch, args.d_model, device=device, generator=gen)
    n_dead = int(args.dead_fraction * sae.n_latents)

    def step() -> None:
        if n_dead:
            sae.steps_since_fired_F[:n_dead] = sae.dead_after_steps
        out = sae(x)
        out.loss.backward()
        sae.update_firing(out.fired_F)
        sae.remove_parallel_grads()
        opt.step()
        sae.normalize_decoder()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=args.shapes) as prof:
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages(group_by_input_shape=args.shapes)
    print(
        averages.table(sort_by=key, row_limit=args.rows, max_name_column_width=60, max_shapes_column_width=70)
    )
    if args.json:
        attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        rows = sorted(averages, key=lambda e: float(getattr(e, attr, 0.0) or 0.0), reverse=True)[: args.rows]
        record = {
            "config": {**vars(args), "n_latents": sae.n_latents, "device_name": str(device)},
            "per_step_total_ms": sum(
                float(getattr(e, attr, 0.0) or 0.0) for e in kernel_events(list(averages), device)
            )
            / 1e3
            / args.steps,
            "kernels": [
                {
                    "name": e.key,
                    "ms_per_step": float(getattr(e, attr, 0.0) or 0.0) / 1e3 / args.steps,
                    "calls_per_step": e.count / args.steps,
                    **({"shapes": str(e.input_shapes)} if args.shapes else {}),
                }
                for e in rows
            ],
        }
        if device.type == "cuda":
            record["config"]["device_name"] = torch.cuda.get_device_name(device)
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
