"""Benchmark: last-token extraction, the naive ``output_hidden_states=True`` full forward vs early exit vs
early exit with length-aware batching (sorted token-budget passes: `iter_last_token_residuals`).

Every method runs on the same prompts in one process; the script prints prompts/s, real (non-pad) and padded
tokens/s, the share of the GPU's bf16 matmul rate (measured in the same run) the real tokens amount to
(``2 x parameters of the blocks that run x real tokens / time``), peak CUDA memory, and checks that all
methods give the same activations.

Methods:

* ``full_forward``: batches of ``--batch-size`` prompts in input order, the whole model with
  ``output_hidden_states=True`` (the baseline);
* ``early_exit``: the same batches, stopped after the deepest requested block;
* ``early_exit_sorted``: ``iter_last_token_residuals`` with ``--batch-size`` prompts per pass, sorted by
  length over the whole set, no token budget;
* ``early_exit_budget``: ``iter_last_token_residuals`` end to end (tokenisation included) with
  ``--token-budget`` padded tokens per pass, prompts sorted by length over the whole set;
* ``early_exit_packed`` (``--pack-length L``): the same with prompts packed into rows of ``L`` tokens, each
  attending only to itself (:mod:`sae_refusal.llm.packing`), passes of ``--token-budget`` tokens;
* ``early_exit_budget_compiled`` (``--compile``): the same with each block's norms and MLP compiled
  (``torch.compile(dynamic=True)``), a variant to measure; a failure is recorded, not fatal.

Prompts: ``--prompts synthetic`` (the old mix: 3 to ~120 words) or ``--prompts real`` (CoCoNot + contrast,
Alpaca, OR-Bench hard + toxic from ``--data-root``, through the chat template of ``--tokenizer``).

Examples::

    python benchmarks/bench_early_exit.py --model tiny-llama --n-prompts 64
    python benchmarks/bench_early_exit.py --model smollm2 --layers 6,12 --n-prompts 64 --batch-size 8
    python benchmarks/bench_early_exit.py --model llama3-8b-shape --layers 8 --n-prompts 512 \\
        --batch-size 64 --token-budget 16384 --compile --json-out $OUT/extract_synthetic.json
    python benchmarks/bench_early_exit.py --model llama3-8b-shape --layers 8 --prompts real \\
        --data-root .device/data --tokenizer .device/tok --n-prompts 2048 --batch-size 64 --token-budget 16384
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sae_refusal.llm import (
    LLMConfig,
    encode_prompts,
    full_forward_last_token,
    last_token_residuals,
    load_model_and_tokenizer,
    num_layers,
    pad_left,
)
from sae_refusal.llm.extraction import iter_last_token_residuals, plan_batches
from sae_refusal.llm.layers import decoder_layers
from sae_refusal.llm.packing import plan_packs
from sae_refusal.testing import build_llama3_8b_shape, build_tiny_model, build_tiny_tokenizer

_VOCABULARY = (
    "how do i bake bread at home tell me a story about a dragon please explain photosynthesis the water "
    "cycle and gravity in simple words what is the capital of france write a poem about the sea stars give "
    "me step by step instructions list of ideas short summary you are a helpful assistant the user asks"
)

_DEFAULT_LAYERS = {"tiny-llama": "1,2", "smollm2": "6,12", "llama3-8b-shape": "8,16"}


def build(model_name: str, device: str, dtype: str) -> tuple[nn.Module, Any]:
    """Build or load the benchmarked model and a tokenizer for it."""
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if model_name == "tiny-llama":
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model("llama", vocab_size=len(tokenizer), num_layers=8, hidden_size=64)
        return nn.Module.to(model, device=device, dtype=torch_dtype), tokenizer
    if model_name == "llama3-8b-shape":
        model = build_llama3_8b_shape(device, torch_dtype)
        return model, build_tiny_tokenizer()  # its ids are all valid in a 128k vocabulary
    return load_model_and_tokenizer(LLMConfig(name_or_path=model_name, device=device, dtype=dtype))


def synthetic_prompts(tokenizer: Any, n: int, seed: int = 0) -> list[str]:
    """Chat-formatted prompts of varied length (3 to ~120 words)."""
    rng = random.Random(seed)
    words = _VOCABULARY.split()
    texts = []
    for _ in range(n):
        n_words = int(rng.choice([3, 8, 15, 30, 60, 120]) * rng.uniform(0.6, 1.0))
        content = " ".join(rng.choice(words) for _ in range(max(n_words, 1))).capitalize() + "?"
        texts.append(_chat(tokenizer, content))
    return texts


def _chat(tokenizer: Any, content: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": content}]
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return content


_REAL_SOURCES = ("coconot", "coconot_contrast", "alpaca_train", "or_bench_hard", "or_bench_toxic")


def real_prompts(tokenizer: Any, data_root: str, n: int, seed: int = 0) -> tuple[list[str], dict[str, int]]:
    """``n`` prompts drawn (seeded) from CoCoNot, its contrast set, Alpaca and OR-Bench, chat-formatted."""
    from sae_refusal.data.sources import load_source, preset

    pool: list[str] = []
    counts: dict[str, int] = {}
    for name in _REAL_SOURCES:
        texts = load_source(preset(name, local=True), data_root=data_root).texts
        counts[name] = len(texts)
        pool.extend(texts)
    rng = random.Random(seed)
    chosen = rng.sample(pool, n) if n < len(pool) else pool
    return [_chat(tokenizer, text) for text in chosen], counts


def block_parameters(model: nn.Module, n_blocks: int) -> int:
    """Parameters of the first ``n_blocks`` decoder blocks (what an early exit after them multiplies)."""
    blocks = decoder_layers(model)
    return sum(p.numel() for block in list(blocks)[:n_blocks] for p in block.parameters())


def matmul_tflops(
    device: torch.device, dtype: torch.dtype, size: int = 8192, repeats: int = 20
) -> float | None:
    """The device's dense matmul rate in this dtype (TFLOP/s, best of ``repeats``); ``None`` on CPU."""
    if device.type != "cuda":
        return None
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


Method = Callable[[], dict[int, Tensor]]


def fixed_batches(
    fn: Callable[..., dict[int, Tensor]],
    model: nn.Module,
    batches: Sequence[tuple[Tensor, Tensor]],
    layers: list[int],
) -> Method:
    """``fn`` over pre-padded input-order batches; outputs on the CPU in input order."""

    def run() -> dict[int, Tensor]:
        outputs: dict[int, list[Tensor]] = {layer: [] for layer in layers}
        for input_ids, mask in batches:
            result = fn(model, input_ids, mask, layers)
            for layer in layers:
                outputs[layer].append(result[layer].cpu())
        return {layer: torch.cat(chunks) for layer, chunks in outputs.items()}

    return run


def budget_method(
    model: nn.Module,
    tokenizer: Any,
    texts: list[str],
    layers: list[int],
    args: argparse.Namespace,
    rows: int,
    token_budget: int | None,
    pack_length: int | None = None,
) -> Method:
    """The library's path: ``iter_last_token_residuals`` over all prompts sorted by length (one window),
    passes of at most ``rows`` prompts and ``token_budget`` padded tokens (or, with ``pack_length``, packed
    rows of that many tokens in passes of ``token_budget`` tokens)."""

    def run() -> dict[int, Tensor]:
        outputs: dict[int, list[Tensor]] = {layer: [] for layer in layers}
        for batch in iter_last_token_residuals(
            model,
            tokenizer,
            texts,
            layers,
            batch_size=rows,
            max_length=args.max_length,
            sort_window=max(2, -(-len(texts) // rows)),  # 1 would keep input order
            token_budget=token_budget,
            pack_length=pack_length,
        ):
            for layer in layers:
                outputs[layer].append(batch.acts[layer])
        return {layer: torch.cat(chunks) for layer, chunks in outputs.items()}

    return run


def compile_blocks(model: nn.Module, n_blocks: int) -> None:
    """Compile the norms and MLP of the first ``n_blocks`` blocks (dynamic shapes: one graph per module)."""
    for block in list(decoder_layers(model))[:n_blocks]:
        for name in ("input_layernorm", "post_attention_layernorm", "mlp"):
            module = getattr(block, name, None)
            if isinstance(module, nn.Module):
                module.compile(dynamic=True)


def time_methods(methods: dict[str, Method], device: torch.device, repeats: int) -> dict[str, dict[str, Any]]:
    """One untimed pass of each (allocator, kernels, compilation), then ``repeats`` timed passes of each,
    interleaved; the fastest pass of each is kept. A method that fails is recorded with its error."""
    cuda = device.type == "cuda"
    results: dict[str, dict[str, Any]] = {}
    for name, fn in methods.items():
        start = time.perf_counter()
        try:
            fn()
        except Exception as err:  # a variant may fail (e.g. compile)
            results[name] = {"error": f"{type(err).__name__}: {err}"[:500]}
            print(f"  {name}: FAILED {results[name]['error']}", flush=True)
            continue
        results[name] = {"warmup_s": time.perf_counter() - start, "seconds": float("inf")}
        print(f"  {name}: warm-up {results[name]['warmup_s']:.1f} s", flush=True)
    for _ in range(repeats):
        for name, fn in methods.items():
            if "error" in results[name]:
                continue
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            outputs = fn()
            if cuda:
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            if seconds < results[name]["seconds"]:
                results[name].update(
                    seconds=seconds,
                    peak_mib=torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
                    outputs=outputs,
                )
    return results


def profile_pass(method: Method, device: torch.device, path: str, rows: int = 30) -> None:
    """One pass of ``method`` under torch.profiler; the kernels with the most device time go to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        method()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=60)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(table)
    print(f"wrote the profile of one budgeted pass to {path}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", default="smollm2", help="smollm2 | tiny-llama | llama3-8b-shape | path | hub id"
    )
    parser.add_argument("--layers", default=None, help="comma-separated layer indices")
    parser.add_argument("--prompts", default="synthetic", choices=("synthetic", "real"))
    parser.add_argument("--data-root", default="../shared/data", help="datasets root for --prompts real")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's own)")
    parser.add_argument("--n-prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per pass of the fixed-batch methods")
    parser.add_argument("--token-budget", type=int, default=None, help="padded tokens per budgeted pass")
    parser.add_argument("--budget-rows", type=int, default=512, help="most rows per budgeted pass")
    parser.add_argument("--compile", action="store_true", help="also time the budgeted path compiled")
    parser.add_argument(
        "--pack-length", type=int, default=None, help="also time packed passes (rows of this many tokens)"
    )
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per method (fastest kept)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--json-out", default=None, help="write the results as JSON here")
    parser.add_argument("--profile", default=None, help="write a kernel table of one budgeted pass here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    layers_text = args.layers or _DEFAULT_LAYERS.get(args.model, "0")
    requested = [int(x) for x in layers_text.split(",") if x.strip()]
    if args.token_budget is None:
        args.token_budget = 16384 if args.device.startswith("cuda") else 2048

    t0 = time.perf_counter()
    model, tokenizer = build(args.model, args.device, dtype)
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    load_s = time.perf_counter() - t0
    n_layers = num_layers(model)
    layers = sorted({layer % n_layers for layer in requested})
    n_blocks = layers[-1] + 1
    device = next(model.parameters()).device

    sources: dict[str, int] = {}
    if args.prompts == "real":
        texts, sources = real_prompts(tokenizer, args.data_root, args.n_prompts)
    else:
        texts = synthetic_prompts(tokenizer, args.n_prompts)
    from sae_refusal.llm.tokenize import default_max_length

    args.max_length = min(args.max_length, default_max_length(model, tokenizer, cap=args.max_length))
    encoded = encode_prompts(tokenizer, texts, max_length=args.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = [
        pad_left(encoded.input_ids[i : i + args.batch_size], pad_id)
        for i in range(0, len(encoded.input_ids), args.batch_size)
    ]
    n_tokens = [len(ids) for ids in encoded.input_ids]
    real_tokens = sum(n_tokens)
    fixed_padded = sum(int(ids.numel()) for ids, _ in batches)
    budget_passes = plan_batches(n_tokens, batch_size=args.budget_rows, token_budget=args.token_budget)
    budget_padded = sum(len(p) * max(n_tokens[i] for i in p) for p in budget_passes)
    sorted_passes = plan_batches(n_tokens, batch_size=args.batch_size)
    sorted_padded = sum(len(p) * max(n_tokens[i] for i in p) for p in sorted_passes)

    methods: dict[str, Method] = {
        "full_forward": fixed_batches(full_forward_last_token, model, batches, layers),
        "early_exit": fixed_batches(last_token_residuals, model, batches, layers),
        "early_exit_sorted": budget_method(model, tokenizer, texts, layers, args, args.batch_size, None),
        "early_exit_budget": budget_method(
            model, tokenizer, texts, layers, args, args.budget_rows, args.token_budget
        ),
    }
    packed_padded = None
    if args.pack_length:
        # one window: every prompt packed together, passes of token_budget tokens
        rows_cap = len(texts)
        methods["early_exit_packed"] = budget_method(
            model, tokenizer, texts, layers, args, rows_cap, args.token_budget, args.pack_length
        )
        packs = plan_packs(n_tokens, pack_length=args.pack_length, token_budget=args.token_budget)
        packed_padded = sum(len(p) * max(sum(n_tokens[i] for i in row) for row in p) for p in packs)
    print(
        f"{args.model} on {device} ({dtype}), {n_layers} layers, reading {layers} ({n_blocks} blocks run); "
        f"{len(texts)} {args.prompts} prompts, {real_tokens / len(texts):.0f} tokens mean / "
        f"{max(n_tokens)} max; "
        f"padded tokens: fixed batches of {args.batch_size} {fixed_padded:,}, budget {args.token_budget} "
        f"({len(budget_passes)} passes) {budget_padded:,}, real {real_tokens:,}",
        flush=True,
    )
    timings = time_methods(methods, device, args.repeats)
    if args.compile:
        try:
            compile_blocks(model, n_blocks)
            compiled = time_methods(
                {"early_exit_budget_compiled": methods["early_exit_budget"]}, device, args.repeats
            )
        except Exception as err:
            compiled = {"early_exit_budget_compiled": {"error": f"{type(err).__name__}: {err}"[:500]}}
        timings.update(compiled)

    if args.profile:
        profile_pass(methods["early_exit_budget"], device, args.profile)
    peak = matmul_tflops(device, getattr(torch, dtype))
    params = block_parameters(model, n_blocks)
    if "error" in timings["full_forward"]:
        raise SystemExit(f"the baseline failed: {timings['full_forward']['error']}")
    reference = timings["full_forward"]["outputs"]
    # a wrong row or position gives an O(1) error; re-batching alone changes the rounding: about 1e-6 in
    # float32, 1-2% in bfloat16 (SmolLM2 on the CPU 1.0-1.2%, the 8B shape on an H200 1.9%: docs/RESULTS.md)
    rel_tol = 1e-5 if dtype == "float32" else 5e-2
    methods_out: dict[str, Any] = {}
    all_agree = True
    for name, timing in timings.items():
        if "error" in timing:
            methods_out[name] = {"error": timing["error"]}
            continue
        seconds = timing["seconds"]
        padded = {
            "full_forward": fixed_padded,
            "early_exit": fixed_padded,
            "early_exit_sorted": sorted_padded,
            "early_exit_packed": packed_padded or budget_padded,
        }.get(name, budget_padded)
        tflops = 2 * params * real_tokens / seconds / 1e12
        out = timing["outputs"]
        diff = max(float((out[layer].float() - reference[layer].float()).abs().max()) for layer in layers)
        scale = max(float(reference[layer].float().abs().max()) for layer in layers)
        # another batch composition changes the rounding (bf16: a few units in the last place of the largest
        # entries): compared as the relative Frobenius error of the whole (N, D) matrix
        rel_error = max(
            float((out[layer].float() - reference[layer].float()).norm() / reference[layer].float().norm())
            for layer in layers
        )
        agree = rel_error <= rel_tol
        all_agree = all_agree and agree
        methods_out[name] = {
            "seconds": seconds,
            "warmup_s": timing["warmup_s"],
            "prompts_per_s": len(texts) / seconds,
            "real_tokens_per_s": real_tokens / seconds,
            "padded_tokens_per_s": padded / seconds,
            "padding_share": 1 - real_tokens / padded,
            "real_token_tflops": tflops,
            "share_of_matmul_peak": None if peak is None else tflops / peak,
            "peak_mib": timing["peak_mib"],
            "max_abs_diff_vs_full_forward": diff,
            "max_abs_value": scale,
            "relative_error_vs_full_forward": rel_error,
            "agree": agree,
        }
    base = methods_out["full_forward"]["seconds"]
    for row in methods_out.values():
        if "seconds" in row:
            row["speedup_vs_full_forward"] = base / row["seconds"]

    result: dict[str, Any] = {
        "model": args.model,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": dtype,
        "n_layers": n_layers,
        "layers": layers,
        "blocks_run": n_blocks,
        "block_parameters": params,
        "prompts": args.prompts,
        "sources": sources,
        "n_prompts": len(texts),
        "batch_size": args.batch_size,
        "token_budget": args.token_budget,
        "budget_rows": args.budget_rows,
        "repeats": args.repeats,
        "tokens_mean": real_tokens / len(texts),
        "tokens_max": max(n_tokens),
        "load_s": round(load_s, 2),
        "matmul_peak_tflops": peak,
        "methods": methods_out,
        "agree": all_agree,
    }
    for name, row in methods_out.items():
        if "error" in row:
            print(f"  {name:28s}: FAILED {row['error']}")
            continue
        share = row["share_of_matmul_peak"]
        share_text = (
            f", {100 * share:4.1f}% of the {peak:.0f} TFLOP/s matmul peak" if share is not None else ""
        )
        mem = row["peak_mib"]
        mem_text = f", peak {mem:,.0f} MiB" if mem is not None else ""
        print(
            f"  {name:28s}: {row['prompts_per_s']:8.1f} prompts/s ({row['speedup_vs_full_forward']:.2f}x), "
            f"{row['real_tokens_per_s']:9.0f} real tokens/s, padding {100 * row['padding_share']:4.1f}%"
            f"{share_text}{mem_text}, max |diff| {row['max_abs_diff_vs_full_forward']:.2g} of "
            f"{row['max_abs_value']:.3g}"
        )
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
        print(f"wrote {args.json_out}")
    if not all_agree:
        raise SystemExit("the methods' activations disagree")
    return result


if __name__ == "__main__":
    main()
