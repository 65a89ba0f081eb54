"""Benchmark: greedy generation tokens/s with and without residual steering, batch 1 and batch 32.

One process, one device, the unsteered baseline measured in the same run. For each batch size: one short
untimed warm-up of each, then ``--repeats`` timed runs of each, interleaved (unsteered, steered,
unsteered, ...); tokens/s and the overhead come from the fastest run of each (the least disturbed by other
jobs on a shared machine), and the overhead of the medians is reported beside it. On CPU the same figures
in process CPU time are reported too: with one thread they hardly depend on other jobs sharing the cores.

Both runs go through :func:`sae_refusal.llm.batched.generate` (KV cache on); the steered one enters an
:class:`~sae_refusal.steer.interventions.Intervention` around each batch: a
:class:`~sae_refusal.steer.interventions.ResidualSteering` at one layer, positions ``"all"`` (the prefill
and every decode step), with a random unit vector times the layer's mean residual norm (strong enough to
change the answers; the script reports the share of tokens it changed). EOS is disabled so every run
generates exactly ``--new-tokens`` tokens per prompt (checked). The time spent inside the edit function
itself is added up too (``edit_time_share_pct``, of the steered run's wall time; meaningful on CPU), a
noise-free part of the overhead; the rest is the hook dispatch and position tracking of
:mod:`sae_refusal.llm.hooks`. Prints progress, a table and, last, one JSON line.

Examples::

    python benchmarks/steered_generation.py                                  # SmolLM2 on CPU, 1 thread
    python benchmarks/steered_generation.py --adapter checkpoints/refuse-smollm2
    python benchmarks/steered_generation.py --tiny --new-tokens 8 --repeats 1
    python benchmarks/steered_generation.py --device cuda --new-tokens 128 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from sae_refusal.data.chat import format_prompts
from sae_refusal.llm import LLMConfig, d_model, encode_prompts, load_model_and_tokenizer, num_layers
from sae_refusal.llm.batched import Generation, generate, iter_padded_batches, resolve_pad_id
from sae_refusal.llm.extraction import position_ids_from_mask
from sae_refusal.llm.hooks import StepContext, residual_hooks
from sae_refusal.llm.layers import input_device
from sae_refusal.steer.interventions import Intervention, ResidualSteering
from sae_refusal.testing import build_tiny_model, build_tiny_tokenizer

_TEXT = (
    "how do i bake bread at home tell me a story about a dragon please explain photosynthesis the water "
    "cycle and gravity in simple words what is the capital of france write a poem about the sea stars give "
    "me step by step instructions list of ideas short summary you are a helpful assistant the user asks"
)
_WORDS = _TEXT.split()


def build(args: argparse.Namespace) -> tuple[nn.Module, Any, str]:
    """The benchmarked model, its tokenizer and a name for it."""
    if args.tiny:
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model("llama", vocab_size=len(tokenizer), num_layers=8, hidden_size=64)
        return nn.Module.to(model, device=args.device), tokenizer, "tiny-llama (8 layers, d_model 64)"
    cfg = LLMConfig(name_or_path="smollm2", dtype="float32", device=args.device, adapter_path=args.adapter)
    model, tokenizer = load_model_and_tokenizer(cfg)
    return model, tokenizer, "smollm2" + (f" + {args.adapter}" if args.adapter else "")


def user_messages(n: int, seed: int = 0) -> list[str]:
    """``n`` questions of 6 to 20 words."""
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 20))).capitalize() + "?" for _ in range(n)
    ]


def mean_residual_norm(
    model: nn.Module, input_ids: Sequence[Sequence[int]], layer: int, pad_id: int
) -> float:
    """Mean L2 norm of the residual stream after block ``layer`` over every real prompt token."""
    norms: list[Tensor] = []

    def read(hidden_BTD: Tensor, ctx: StepContext) -> None:
        norms.append(hidden_BTD.float().norm(dim=-1)[ctx.real_BT].cpu())

    device = input_device(model)
    with torch.inference_mode():
        for batch in iter_padded_batches(input_ids, batch_size=8, pad_id=pad_id):
            mask = batch.attention_mask_BT.to(device)
            with residual_hooks(model, {layer: read}):
                model(
                    input_ids=batch.input_ids_BT.to(device),
                    attention_mask=mask,
                    position_ids=position_ids_from_mask(mask),
                    use_cache=False,
                )
    return float(torch.cat(norms).mean())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedEdit:
    """A hook function that also adds up the wall-clock time spent inside it (CPU runs: the edit's own cost,
    free of the noise of comparing two whole runs; on CUDA it would mostly time the wait for the GPU)."""

    def __init__(self, fn: Callable[[Tensor, StepContext], Tensor | None]) -> None:
        self.fn = fn
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, hidden_BTD: Tensor, ctx: StepContext) -> Tensor | None:
        start = time.perf_counter()
        try:
            return self.fn(hidden_BTD, ctx)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


class Timing(NamedTuple):
    """One timed ``generate``: wall-clock seconds, this process's CPU seconds, the generations."""

    wall_s: float
    cpu_s: float
    generations: list[Generation]


def timed_generate(
    model: nn.Module,
    input_ids: Sequence[Sequence[int]],
    new_tokens: int,
    pad_id: int,
    around: Callable[[list[int]], AbstractContextManager[Any]] | None,
) -> Timing:
    """One greedy ``generate`` over ``input_ids`` as one batch, timed.

    Raises:
        RuntimeError: If a prompt did not get exactly ``new_tokens`` tokens.
    """
    device = input_device(model)
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    out = generate(
        model,
        input_ids,
        max_new_tokens=new_tokens,
        pad_id=pad_id,
        stop_ids=[],
        batch_size=len(input_ids),
        around=around,
    )
    sync(device)
    timing = Timing(time.perf_counter() - wall, time.process_time() - cpu, out)
    lengths = {len(g.token_ids) for g in out}
    if lengths != {new_tokens}:
        raise RuntimeError(f"expected {new_tokens} new tokens per prompt, got lengths {sorted(lengths)}")
    return timing


def _overhead(steered: float, unsteered: float) -> float:
    return 100.0 * (steered / unsteered - 1.0)


def measure(
    model: nn.Module,
    input_ids: Sequence[Sequence[int]],
    *,
    new_tokens: int,
    repeats: int,
    pad_id: int,
    around: Callable[[list[int]], AbstractContextManager[Any]],
    edit: TimedEdit,
) -> dict[str, Any]:
    """Unsteered vs steered tokens/s for one batch (warm-up, then ``repeats`` interleaved timed runs).

    On CPU the process's CPU time is reported beside the wall clock: with one thread it hardly depends on
    other jobs sharing the cores, which the wall clock does.
    """
    batch, n_tokens = len(input_ids), len(input_ids) * new_tokens
    for steer in (None, around):  # warm-up: allocator, kernels and the hook path on these shapes
        timed_generate(model, input_ids, min(new_tokens, 4), pad_id, steer)
    runs: dict[str, list[Timing]] = {"unsteered": [], "steered": []}
    edit_shares: list[float] = []
    for repeat in range(repeats):
        for name, steer in (("unsteered", None), ("steered", around)):
            edit.seconds, edit.calls = 0.0, 0
            timing = timed_generate(model, input_ids, new_tokens, pad_id, steer)
            runs[name].append(timing)
            if steer is not None:
                edit_shares.append(edit.seconds / timing.wall_s)
            print(
                f"  batch {batch:>2}  run {repeat + 1}/{repeats}  {name:<9} {timing.wall_s:7.3f} s "
                f"({timing.cpu_s:7.3f} s CPU)  {n_tokens / timing.wall_s:8.1f} tokens/s",
                flush=True,
            )
    wall = {name: [t.wall_s for t in timings] for name, timings in runs.items()}
    cpu = {name: [t.cpu_s for t in timings] for name, timings in runs.items()}
    best = {name: min(values) for name, values in wall.items()}
    median = {name: statistics.median(values) for name, values in wall.items()}
    best_cpu = {name: min(values) for name, values in cpu.items()}
    changed = sum(
        a != b
        for before, after in zip(
            runs["unsteered"][-1].generations, runs["steered"][-1].generations, strict=True
        )
        for a, b in zip(before.token_ids, after.token_ids, strict=True)
    )
    return {
        "batch_size": batch,
        "new_tokens_per_prompt": new_tokens,
        "unsteered_tokens_per_s": n_tokens / best["unsteered"],
        "steered_tokens_per_s": n_tokens / best["steered"],
        "overhead_pct": _overhead(best["steered"], best["unsteered"]),
        "overhead_pct_median": _overhead(median["steered"], median["unsteered"]),
        "unsteered_tokens_per_cpu_s": n_tokens / best_cpu["unsteered"],
        "steered_tokens_per_cpu_s": n_tokens / best_cpu["steered"],
        "overhead_pct_cpu_time": _overhead(best_cpu["steered"], best_cpu["unsteered"]),
        "unsteered_s": [round(t, 4) for t in wall["unsteered"]],
        "steered_s": [round(t, 4) for t in wall["steered"]],
        "unsteered_cpu_s": [round(t, 4) for t in cpu["unsteered"]],
        "steered_cpu_s": [round(t, 4) for t in cpu["steered"]],
        "edit_calls_per_run": edit.calls,
        "edit_time_share_pct": 100.0 * statistics.median(edit_shares),
        "tokens_changed_by_steering": changed / n_tokens,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2")
    parser.add_argument(
        "--adapter", default=None, help="refusal-token artifact, e.g. checkpoints/refuse-smollm2"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1; 0 = torch's own)"
    )
    parser.add_argument("--batch-sizes", default="1,32", help="comma-separated batch sizes (default 1,32)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, fastest kept (default 3)")
    parser.add_argument("--layer", type=int, default=None, help="steered layer (default: the middle one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    batch_sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]

    t0 = time.perf_counter()
    model, tokenizer, name = build(args)
    load_s = time.perf_counter() - t0
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.eos_token_id = None  # a fixed number of new tokens in every run
    n_layers = num_layers(model)
    layer = n_layers // 2 if args.layer is None else args.layer % n_layers
    pad_id = resolve_pad_id(tokenizer)
    texts = format_prompts(tokenizer, user_messages(max(batch_sizes), args.seed))
    input_ids = encode_prompts(tokenizer, texts, max_length=512).input_ids
    norm = mean_residual_norm(model, input_ids, layer, pad_id)
    generator = torch.Generator().manual_seed(args.seed)
    direction = torch.randn(d_model(model), generator=generator)
    vector = direction / direction.norm() * norm
    edit = TimedEdit(ResidualSteering(vector, alpha=1.0, positions="all"))

    def around(_indices: list[int]) -> Intervention:
        return Intervention(model, {layer: edit})

    device = input_device(model)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"{name} on {device_name}, {torch.get_num_threads()} thread(s), loaded in {load_s:.1f} s; "
        f"steering layer {layer} of {n_layers} with a random vector of norm {norm:.2f} (the layer's mean "
        f"residual norm), positions all; {args.new_tokens} new tokens per prompt, "
        f"{args.repeats} timed run(s) of each",
        flush=True,
    )
    results = []
    for batch in batch_sizes:
        prompt_tokens = [len(ids) for ids in input_ids[:batch]]
        print(f"batch {batch}: prompts of {min(prompt_tokens)}-{max(prompt_tokens)} tokens", flush=True)
        results.append(
            measure(
                model,
                input_ids[:batch],
                new_tokens=args.new_tokens,
                repeats=args.repeats,
                pad_id=pad_id,
                around=around,
                edit=edit,
            )
        )
    cpu_run = device.type == "cpu"
    print(
        f"\n{'batch':>5} {'unsteered tok/s':>16} {'steered tok/s':>14} {'overhead':>9} {'(medians)':>10}"
        + (f" {'overhead in CPU time':>21} {'time in edit':>13}" if cpu_run else "")
        + f" {'tokens changed':>15}"
    )
    for row in results:
        print(
            f"{row['batch_size']:>5} {row['unsteered_tokens_per_s']:>16.1f} "
            f"{row['steered_tokens_per_s']:>14.1f} {row['overhead_pct']:>8.1f}% "
            f"{row['overhead_pct_median']:>9.1f}%"
            + (
                f" {row['overhead_pct_cpu_time']:>20.1f}% {row['edit_time_share_pct']:>12.2f}%"
                if cpu_run
                else ""
            )
            + f" {row['tokens_changed_by_steering']:>14.0%}"
        )
    report = {
        "benchmark": "steered_generation",
        "model": name,
        "device": device_name,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "layer": layer,
        "n_layers": n_layers,
        "vector_norm": round(norm, 4),
        "positions": "all",
        "kv_cache": True,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "statistic": "fastest of repeats (overhead_pct_median: of the medians)",
        "load_s": round(load_s, 2),
        "results": results,
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
