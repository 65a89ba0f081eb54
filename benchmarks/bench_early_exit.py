"""Benchmark: early-exit last-token extraction vs the naive ``output_hidden_states=True`` full forward.

Both methods run on the same prompts and batches in one process; the script prints prompts/s for each,
peak CUDA memory on GPU, and checks that both give the same activations.

Examples::

    python benchmarks/bench_early_exit.py --model tiny-llama --n-prompts 64
    python benchmarks/bench_early_exit.py --model smollm2 --layers 6,12 --n-prompts 64 --batch-size 8
    python benchmarks/bench_early_exit.py --model llama3-8b-shape --device cuda --dtype bfloat16 --layers 8,16
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
from sae_refusal.testing import build_tiny_model, build_tiny_tokenizer

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
        from transformers import AutoModelForCausalLM, LlamaConfig

        config = LlamaConfig(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            max_position_embeddings=8192,
        )
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, attn_implementation="sdpa")
        model.eval().requires_grad_(False)
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
        messages = [{"role": "user", "content": content}]
        if getattr(tokenizer, "chat_template", None):
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        else:
            texts.append(content)
    return texts


def run(
    fn: Callable[..., dict[int, Tensor]],
    model: nn.Module,
    batches: Sequence[tuple[Tensor, Tensor]],
    layers: list[int],
    device: torch.device,
) -> tuple[float, int | None, dict[int, Tensor]]:
    """Time one pass of ``fn`` over all batches; returns (seconds, peak CUDA bytes or None, outputs)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    outputs: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    start = time.perf_counter()
    for input_ids, mask in batches:
        result = fn(model, input_ids, mask, layers)
        for layer in layers:
            outputs[layer].append(result[layer].float().cpu())
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    return seconds, peak, {layer: torch.cat(chunks) for layer, chunks in outputs.items()}


def compare(
    model: nn.Module,
    batches: Sequence[tuple[Tensor, Tensor]],
    layers: list[int],
    device: torch.device,
    repeats: int,
) -> dict[str, tuple[float, int | None, dict[int, Tensor]]]:
    """One untimed pass of each method over every batch (allocator, kernels and clocks warm up on all
    shapes), then ``repeats`` timed passes of each, interleaved; keeps the fastest pass of each."""
    methods = {"early_exit": last_token_residuals, "full_forward": full_forward_last_token}
    for fn in methods.values():
        run(fn, model, batches, layers, device)
    best: dict[str, tuple[float, int | None, dict[int, Tensor]]] = {}
    for _ in range(repeats):
        for name, fn in methods.items():
            timed = run(fn, model, batches, layers, device)
            if name not in best or timed[0] < best[name][0]:
                best[name] = timed
    return best


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", default="smollm2", help="smollm2 | tiny-llama | llama3-8b-shape | path | hub id"
    )
    parser.add_argument("--layers", default=None, help="comma-separated layer indices")
    parser.add_argument("--n-prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per method (fastest kept)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on CUDA)")
    parser.add_argument("--json-out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    layers_text = args.layers or _DEFAULT_LAYERS.get(args.model, "0")
    requested = [int(x) for x in layers_text.split(",") if x.strip()]

    t0 = time.perf_counter()
    model, tokenizer = build(args.model, args.device, dtype)
    load_s = time.perf_counter() - t0
    n_layers = num_layers(model)
    layers = sorted({layer % n_layers for layer in requested})
    device = next(model.parameters()).device

    texts = synthetic_prompts(tokenizer, args.n_prompts)
    encoded = encode_prompts(tokenizer, texts, max_length=args.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = [
        pad_left(encoded.input_ids[i : i + args.batch_size], pad_id)
        for i in range(0, len(encoded.input_ids), args.batch_size)
    ]
    n_tokens = [len(ids) for ids in encoded.input_ids]

    timings = compare(model, batches, layers, device, args.repeats)
    early_s, early_peak, early = timings["early_exit"]
    full_s, full_peak, full = timings["full_forward"]

    atol = 1e-4 if dtype == "float32" else 5e-2
    diffs = {layer: float((early[layer] - full[layer]).abs().max()) for layer in layers}
    scales = {layer: float(full[layer].abs().max()) for layer in layers}
    agree = all(torch.allclose(early[layer], full[layer], atol=atol, rtol=1e-2) for layer in layers)

    result: dict[str, Any] = {
        "model": args.model,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": dtype,
        "n_layers": n_layers,
        "layers": layers,
        "n_prompts": len(texts),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "tokens_mean": sum(n_tokens) / len(n_tokens),
        "tokens_max": max(n_tokens),
        "load_s": round(load_s, 2),
        "early_exit_prompts_per_s": len(texts) / early_s,
        "full_forward_prompts_per_s": len(texts) / full_s,
        "speedup": full_s / early_s,
        "early_exit_peak_mib": None if early_peak is None else early_peak / 2**20,
        "full_forward_peak_mib": None if full_peak is None else full_peak / 2**20,
        "max_abs_diff": diffs,
        "max_abs_value": scales,
        "agree": agree,
    }
    print(
        f"{args.model} on {result['device_name']} ({dtype}), {n_layers} layers, reading {layers}; "
        f"{len(texts)} prompts, batch {args.batch_size}, {result['tokens_mean']:.0f} tokens mean / "
        f"{result['tokens_max']} max"
    )
    for name, key in (("early exit", "early_exit"), ("full forward", "full_forward")):
        peak = result[f"{key}_peak_mib"]
        peak_text = f", peak {peak:,.0f} MiB" if peak is not None else ""
        print(f"  {name:12s}: {result[f'{key}_prompts_per_s']:8.1f} prompts/s{peak_text}")
    print(f"  speedup {result['speedup']:.2f}x; max |diff| {diffs}; agree={agree}")
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    if not agree:
        raise SystemExit("early-exit and full-forward activations disagree")
    return result


if __name__ == "__main__":
    main()
