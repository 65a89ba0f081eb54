"""Does a compiled fast-generation step pay its compile once per job? Cold vs warm compile across processes.

Runs the same child twice in fresh processes that share one Inductor cache folder
(``TORCHINDUCTOR_CACHE_DIR``, Triton's kernels under it): the first compiles from nothing, the second
finds the FX-graph / AOTAutograd / Triton caches of the first. Each child builds the model, times Hugging
Face ``generate`` at the batch (the baseline, same process), then a
:class:`~sae_refusal.llm.fast_generate.StaticGenerator` with ``compile=True`` in ``"cuda_graph"`` mode:
its one-off setup (compile + capture) and its tokens/s.

    python benchmarks/compile_cache_reuse.py --device cuda --batch 32 --json $OUT/cc.json   # llama3-8b-shape
    python benchmarks/compile_cache_reuse.py --device cpu --model tiny --batch 4 --new-tokens 8   # smoke run

A job can point every process at one shared folder (``TORCHINDUCTOR_CACHE_DIR``, e.g. under the activation
cache root on a shared filesystem) so only the first process of the first job pays the compile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal, cast

import torch

HERE = Path(__file__).resolve().parent


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One process: HF generate baseline, then the compiled fast step (setup and tokens/s)."""
    sys.path.insert(0, str(HERE))
    from sae_refusal.llm.fast_generate import StaticGenerator
    from sae_refusal.llm.tokenize import pad_left
    from steered_generation import build_variants_model, random_prompts

    device = torch.device(args.device)
    started = time.perf_counter()
    model, tokenizer, label = build_variants_model(
        argparse.Namespace(model=args.model, device=args.device, seed=0, tiny=args.model == "tiny")
    )
    model.eval()
    vocab = int(cast(Any, model).config.vocab_size)
    prompts = random_prompts(args.batch, vocab, 60, 117, seed=0)
    width = max(len(p) for p in prompts)
    pad = int(tokenizer.pad_token_id or 0)
    ids_BT, mask_BT = (t.to(device) for t in pad_left(prompts, pad))
    n_tok = args.batch * args.new_tokens

    def timed(run: Any) -> float:
        times = []
        for _ in range(args.repeats):
            _sync(device)
            start = time.perf_counter()
            run()
            _sync(device)
            times.append(time.perf_counter() - start)
        return min(times)

    def hf() -> None:
        with torch.inference_mode():
            cast(Any, model).generate(
                input_ids=ids_BT,
                attention_mask=mask_BT,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )

    hf()  # warm-up
    hf_s = timed(hf)
    mode: Literal["static", "cuda_graph"] = "cuda_graph" if device.type == "cuda" else "static"
    gen = StaticGenerator(
        model, batch_size=args.batch, max_cache_len=width + args.new_tokens, mode=mode, compile=True
    )
    with gen:
        start = time.perf_counter()
        gen(ids_BT, mask_BT, args.new_tokens)  # compile + capture
        _sync(device)
        first_s = time.perf_counter() - start
        fast_s = timed(lambda: gen(ids_BT, mask_BT, args.new_tokens))
    return {
        "model": label,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "hf_tokens_per_s": round(n_tok / hf_s, 1),
        "compiled_tokens_per_s": round(n_tok / fast_s, 1),
        "speedup_vs_hf": round(hf_s / fast_s, 2),
        "setup_s": round(gen.setup_s, 2),
        "first_call_s": round(first_s, 2),
        "process_s": round(time.perf_counter() - started, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="llama3-8b-shape", choices=("llama3-8b-shape", "smollm2", "tiny"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", type=int, default=2, help="processes sharing the cache (default 2)")
    parser.add_argument(
        "--cache-dir", default=None, help="Inductor cache folder (default: a new temporary one)"
    )
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="inductor-cache-") as tmp:
        cache = Path(args.cache_dir or tmp)
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache / "triton")}
        runs: list[dict[str, Any]] = []
        for i in range(args.runs):
            cmd = [sys.executable, __file__, "--child", *sys.argv[1:]]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
                raise SystemExit(f"child {i} failed (exit {proc.returncode})")
            row = json.loads(lines[-1].removeprefix("RESULT "))
            row["run"] = "cold" if i == 0 else f"warm {i}"
            runs.append(row)
            print(
                f"{row['run']:<7} compile+capture {row['setup_s']:7.2f} s   "
                f"compiled {row['compiled_tokens_per_s']:9.1f} tok/s   "
                f"HF {row['hf_tokens_per_s']:9.1f} tok/s   {row['speedup_vs_hf']:.2f}x HF   "
                f"process {row['process_s']:.1f} s",
                flush=True,
            )
    warm = [r["setup_s"] for r in runs[1:]]
    summary = {
        "device": runs[0]["device"],
        "model": runs[0]["model"],
        "cold_setup_s": runs[0]["setup_s"],
        "warm_setup_s": statistics.median(warm) if warm else None,
        "speedup_vs_hf": [r["speedup_vs_hf"] for r in runs],
        "runs": runs,
    }
    print(
        f"{summary['device']}, {summary['model']}: compile+capture {summary['cold_setup_s']} s cold, "
        f"{summary['warm_setup_s']} s with the first process's cache; compiled step "
        f"{', '.join(str(s) for s in summary['speedup_vs_hf'])}x HF generate at batch {args.batch}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
