"""Where the time of one fast-generation decode step goes (torch.profiler, CUDA kernels), against its bound.

    python benchmarks/profile_decode_step.py --device cuda --batch 32 --json $OUT/decode_profile.json
    python benchmarks/profile_decode_step.py --device cpu --model tiny --batch 4      # smoke run

Runs :class:`~sae_refusal.llm.fast_generate.StaticGenerator` in ``"static"`` mode (the kernels the CUDA graph
replays, launched eagerly so the profiler names them) on the Llama-3-8B-shaped model with random bf16
weights, and prints the kernels that took the most device time per decode step, grouped into matmuls,
attention, and everything else (norms, rotary, activations, copies), next to the step's memory bound: the
weight bytes read once per step at the device's bandwidth (``--bandwidth_gbs``, default the H100 SXM's
3,350 GB/s).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, cast

import torch
from torch.profiler import ProfilerActivity, profile

HERE = Path(__file__).resolve().parent


def kernel_group(name: str) -> str:
    """``"matmul"``, ``"attention"`` or ``"other"`` for a kernel name."""
    low = name.lower()
    if any(
        tag in low for tag in ("gemm", "gemv", "matmul", "cutlass", "sm90_xmma", "ampere_", "nvjet", "mm")
    ):
        return "matmul"
    if any(tag in low for tag in ("flash", "attention", "fmha", "sdpa", "softmax")):
        return "attention"
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="llama3-8b-shape", choices=("llama3-8b-shape", "smollm2", "tiny"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16, help="decode steps profiled per call")
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--bandwidth_gbs", type=float, default=3350.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from profile_topk_step import kernel_events
    from sae_refusal.llm.fast_generate import StaticGenerator
    from sae_refusal.llm.tokenize import pad_left
    from steered_generation import build_variants_model, random_prompts

    device = torch.device(args.device)
    model, tokenizer, label = build_variants_model(
        argparse.Namespace(model=args.model, device=args.device, seed=0, tiny=args.model == "tiny")
    )
    model.eval()
    prompts = random_prompts(args.batch, int(cast(Any, model).config.vocab_size), 60, 117, seed=0)
    width = max(len(p) for p in prompts)
    pad = int(tokenizer.pad_token_id or 0)
    ids_BT, mask_BT = (t.to(device) for t in pad_left(prompts, pad))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with StaticGenerator(
        model, batch_size=args.batch, max_cache_len=width + args.new_tokens, mode="static"
    ) as gen:
        gen(ids_BT, mask_BT, args.new_tokens)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prefill_prof:
            gen(ids_BT, mask_BT, 1)
            if device.type == "cuda":
                torch.cuda.synchronize()
        prefill_only = kernel_events(list(prefill_prof.key_averages()), device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            gen(ids_BT, mask_BT, args.new_tokens)
            if device.type == "cuda":
                torch.cuda.synchronize()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"

    def per_kernel(events: list[Any]) -> dict[str, tuple[float, int]]:
        return {e.key: (float(getattr(e, attr, 0.0) or 0.0), int(e.count)) for e in events}

    full, pre = per_kernel(kernel_events(list(prof.key_averages()), device)), per_kernel(prefill_only)
    steps = args.new_tokens - 1  # decode steps of the call (its first token comes from the prefill)
    decode = {
        k: ((us - pre.get(k, (0.0, 0))[0]) / steps, (n - pre.get(k, (0.0, 0))[1]) / steps)
        for k, (us, n) in full.items()
    }
    rows = sorted(decode.items(), key=lambda kv: kv[1][0], reverse=True)
    total_us = sum(us for us, _ in decode.values() if us > 0)
    groups: dict[str, float] = {}
    for name, (us, _) in decode.items():
        groups[kernel_group(name)] = groups.get(kernel_group(name), 0.0) + max(us, 0.0)
    bound_ms = weight_bytes / (args.bandwidth_gbs * 1e9) * 1e3
    print(
        f"{label}, batch {args.batch}, "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
    )
    print(
        f"decode step: {total_us / 1e3:.2f} ms of kernels; weights {weight_bytes / 2**30:.1f} GiB -> "
        f"bound {bound_ms:.2f} ms"
    )
    for group, us in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {group:<10} {us / 1e3:7.3f} ms  ({us / max(total_us, 1e-9):.0%})")
    for name, (us, calls) in rows[: args.rows]:
        print(f"  {us / 1e3:8.3f} ms  {calls:6.1f} calls  {kernel_group(name):<9} {name[:90]}")
    if args.json:
        record = {
            "model": label,
            "batch": args.batch,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "decode_step_ms": total_us / 1e3,
            "weight_bound_ms": bound_ms,
            "groups_ms": {k: v / 1e3 for k, v in groups.items()},
            "kernels": [
                {"name": n, "ms": us / 1e3, "calls": c, "group": kernel_group(n)}
                for n, (us, c) in rows[: args.rows]
            ],
        }
        Path(args.json).write_text(json.dumps(record, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
