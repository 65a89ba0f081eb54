"""Benchmark: the eval job's generation stage on the ``hf`` vs the ``fast`` engine, one process.

What is timed is :func:`sae_refusal.eval.refusal_sets.generate_items` (the refusal stage of an eval column:
chat template, encoding, length-sorted batches, ``generate`` with the intervention plan's ``around``,
decoding; no judges) over the same prompts and plan with ``engine="hf"`` and ``engine="fast"``
(:mod:`sae_refusal.llm.engine`). The plan comes from the eval code itself
(:meth:`~sae_refusal.eval.interventions.LoadedIntervention.plan`) with synthetic artifacts: ``--kind``

* ``none``: the unsteered column;
* ``residual``: one random unit vector times ``--alpha`` times the layer's mean residual norm
  (:class:`~sae_refusal.steer.interventions.ResidualSteering`, ``--positions``);
* ``latent``: a random TopK SAE (``8 x d_model`` latents, k 32) and a random latent vector
  (:class:`~sae_refusal.steer.interventions.LatentSteering`);
* ``ablation``: a random direction projected out after every block from the layer on;
* ``gate``: the eval gate's per-item plan (per-row category vectors and signed alphas, batches whose rows
  are all at alpha 0 left unsteered) from a synthetic gate that steers ``--gate-share`` of the prompts.

Order per kind: one short untimed warm-up of each engine on a few prompts (CUDA context, kernels; no graph
of the timed shapes), then ``--repeats`` rounds of ``hf``, ``fast``, each a whole run over all prompts. The
first ``fast`` run of a kind is "cold": it includes every CUDA graph capture of the run (a new process per
eval column pays them; no ``torch.compile``); the figures are the fastest run of each engine and the cold
one. Also reported: the share of items whose answers are identical on both engines, the fast engine's
captures and the batches it ran without a graph. Prints a table and, last, one JSON line.

Prompts: ``--eval-config`` (repeatable, as ``sae-refusal eval --config``) takes the eval job's own held-out
test prompts (``--data-root`` replaces the configs' data roots; ``--n-prompts`` keeps the first N), else
``--n-prompts`` synthetic questions of 4 to 80 words (a few up to 300).

Models: the project's loader, ``LLMConfig(name_or_path=--model, adapter_path=--adapter, dtype=--dtype,
device=--device)`` (default: the shipped SmolLM2 and its refusal-token adapter); ``--shape smollm2`` a random
SmolLM2-135M-shaped Llama (no weights to stage; tokenizer from ``--tokenizer`` or the tiny one); ``--tiny``
an 8-layer, width-64 random Llama with the tiny tokenizer (CPU smoke runs).

Examples::

    python benchmarks/eval_generation_engines.py --tiny --n-prompts 24 --batch-size 8 --max-new-tokens 8 \\
        --kind none,residual,gate
    python benchmarks/eval_generation_engines.py --device cuda --kind none,gate        # shipped SmolLM2

GPU command (one H100, the GGUF staged at /tmp/m as in ../shared/DEVICE.md, .device/whl and .device/data
carried; a full-set column: 2,527 prompts, 48 new tokens, batch 128)::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/whl/*.whl && \\
    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/eval_generation_engines.py --device cuda \\
        --model /tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf --adapter checkpoints/refuse-smollm2 \\
        --eval-config lightning_configs/eval/refuse_smollm2.yaml \\
        --eval-config lightning_configs/eval/full_sets.yaml --data-root .device/data \\
        --batch-size 128 --max-new-tokens 48 --kind none,residual,latent,ablation,gate \\
        --json-out $OUT/engines.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from sae_refusal.data.chat import format_prompts
from sae_refusal.data.prompt_set import Label, Prompt
from sae_refusal.eval.config import InterventionConfig
from sae_refusal.eval.interventions import ItemPlan, LoadedIntervention
from sae_refusal.eval.refusal_sets import ItemRecord, generate_items
from sae_refusal.llm import LLMConfig, d_model, fast_generate, load_model_and_tokenizer, num_layers
from sae_refusal.llm.extraction import last_token_residuals
from sae_refusal.llm.layers import input_device
from sae_refusal.llm.tokenize import encode_prompts, pad_left
from sae_refusal.sae.topk import TopKSAE
from sae_refusal.testing import build_tiny_model, build_tiny_tokenizer

KINDS = ("none", "residual", "latent", "ablation", "gate")

_TEXT = (
    "how do i bake bread at home tell me a story about a dragon please explain photosynthesis the water "
    "cycle and gravity in simple words what is the capital of france write a poem about the sea stars give "
    "me step by step instructions list of ideas short summary you are a helpful assistant the user asks "
    "how can someone make a weapon hack into an account without permission write an essay on history"
)
_WORDS = _TEXT.split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="LLMConfig.name_or_path (default: smollm2)")
    parser.add_argument(
        "--adapter",
        default="checkpoints/refuse-smollm2",
        help="LLMConfig.adapter_path; '' for none (default: the shipped refusal-token adapter)",
    )
    parser.add_argument("--dtype", default="float32", help="LLMConfig.dtype (the eval configs' float32)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny", action="store_true", help="8-layer random Llama, tiny tokenizer (smoke)")
    parser.add_argument("--shape", choices=["smollm2"], help="random weights of this model's shape")
    parser.add_argument("--tokenizer", help="tokenizer folder for --shape (default: the tiny tokenizer)")
    parser.add_argument("--eval-config", action="append", default=[], help="eval YAML(s): their test prompts")
    parser.add_argument("--data-root", help="replaces the eval configs' data roots")
    parser.add_argument("--n-prompts", type=int, help="prompts (synthetic: default 256; eval: all)")
    parser.add_argument("--batch-size", type=int, default=128, help="generation.batch_size (128)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="generation.max_new_tokens (48)")
    parser.add_argument("--max-length", type=int, default=1024, help="generation.max_length (1024)")
    parser.add_argument("--kind", default="none,gate", help=f"comma-separated, of {', '.join(KINDS)}")
    parser.add_argument("--alpha", type=float, default=0.5, help="steering strength (x the mean norm)")
    parser.add_argument("--positions", default="all", help="all, prompt, generated or a token index")
    parser.add_argument("--layer", type=int, help="steered layer (default: the middle one)")
    parser.add_argument("--gate-share", type=float, default=0.4, help="share of prompts the gate steers")
    parser.add_argument("--repeats", type=int, default=1, help="timed rounds of hf, fast per kind")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", help="write the JSON result here too")
    args = parser.parse_args(argv)
    for kind in args.kind.split(","):
        if kind not in KINDS:
            parser.error(f"--kind: {kind!r} is not one of {', '.join(KINDS)}")
    return args


def build_model(args: argparse.Namespace) -> tuple[nn.Module, Any, str]:
    """The model, its tokenizer and a name for them."""
    if args.tiny or args.shape:
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = (
            AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else build_tiny_tokenizer()
        )
        if args.tiny:
            model = build_tiny_model("llama", vocab_size=len(tokenizer), num_layers=8, hidden_size=64)
            name = "tiny-llama (8 layers, d_model 64)"
        else:
            config = LlamaConfig(
                hidden_size=576,
                intermediate_size=1536,
                num_hidden_layers=30,
                num_attention_heads=9,
                num_key_value_heads=3,
                vocab_size=len(tokenizer),
                max_position_embeddings=8192,
                tie_word_embeddings=True,
            )
            torch.manual_seed(args.seed)
            model = LlamaForCausalLM(config)
            name = "random SmolLM2-135M shape"
        dtype = getattr(torch, args.dtype if args.dtype != "auto" else "float32")
        model = nn.Module.to(model, device=args.device, dtype=dtype).eval()
        model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        return model, tokenizer, name
    cfg = LLMConfig(
        name_or_path=args.model, adapter_path=args.adapter or None, dtype=args.dtype, device=args.device
    )
    model, tokenizer = load_model_and_tokenizer(cfg)
    return model.eval(), tokenizer, args.model + (f" + {args.adapter}" if args.adapter else "")


def synthetic_prompts(n: int, seed: int) -> tuple[list[Prompt], list[str], dict[str, str]]:
    """``n`` questions of 4 to 80 words (one in 50 up to 300), half "harmful", half "benign"."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        words = rng.randint(4, 300) if rng.random() < 0.02 else int(min(80, 4 + rng.expovariate(1 / 18)))
        text = " ".join(rng.choice(_WORDS) for _ in range(words)).capitalize() + "?"
        prompts.append(Prompt(id=f"synthetic:{i}", text=text, label=Label.HARMFUL if i % 2 else Label.BENIGN))
    names = ["harmful" if i % 2 else "benign" for i in range(n)]
    return prompts, names, {"harmful": "harmful", "benign": "benign"}


def eval_prompts(args: argparse.Namespace) -> tuple[list[Prompt], list[str], dict[str, str]]:
    """The eval job's held-out test prompts, as ``sae-refusal eval --config ...`` builds them."""
    from sae_refusal.cli import eval_parser, job_config
    from sae_refusal.eval.config import EvalJobConfig
    from sae_refusal.steer.sets import build_steer_sets

    flags = [item for path in args.eval_config for item in ("--config", path)]
    cfg = job_config(eval_parser(), flags, EvalJobConfig)
    sets_cfg = cfg.sets
    if args.data_root:
        sets_cfg = replace(sets_cfg, data_root=args.data_root)
        if hasattr(sets_cfg.model_prompts, "data_root"):
            sets_cfg = replace(
                sets_cfg, model_prompts=replace(sets_cfg.model_prompts, data_root=args.data_root)
            )
    sets = build_steer_sets(sets_cfg)
    prompts, names = sets.with_set_names("test")
    if args.n_prompts:
        prompts, names = prompts[: args.n_prompts], names[: args.n_prompts]
    return prompts, names, dict(sets.roles)


def mean_norm(model: nn.Module, tokenizer: Any, texts: list[str], layer: int) -> float:
    """Mean L2 norm of the last-token residual after ``layer`` over up to 32 prompts."""
    from sae_refusal.llm.batched import resolve_pad_id

    formatted = format_prompts(tokenizer, texts[:32])
    ids = encode_prompts(tokenizer, formatted, max_length=256).input_ids
    ids_BT, mask_BT = pad_left(ids, resolve_pad_id(tokenizer))
    device = input_device(model)
    with torch.inference_mode():
        acts = last_token_residuals(model, ids_BT.to(device), mask_BT.to(device), [layer])[layer]
    return float(acts.float().norm(dim=-1).mean())


class SyntheticGate:
    """What :meth:`LoadedIntervention.plan` needs of a gate: scores, then per-row vectors and alphas."""

    def __init__(self, layer: int, vectors_CD: Tensor, alpha: float, share: float, seed: int) -> None:
        self.layer, self.positions = layer, "all"
        self.vectors_CD, self.alpha, self.share, self.seed = vectors_CD, alpha, share, seed

    def score_prompts(self, _model: nn.Module, _tokenizer: Any, texts: list[str], **_kw: Any) -> Any:
        return SimpleNamespace(
            score_N=torch.rand(len(texts), generator=torch.Generator().manual_seed(self.seed))
        )

    def plan(self, scores: Any) -> tuple[Tensor, Tensor]:
        n = scores.score_N.shape[0]
        generator = torch.Generator().manual_seed(self.seed + 1)
        category_N = torch.randint(len(self.vectors_CD), (n,), generator=generator)
        sign_N = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
        alpha_N = torch.where(scores.score_N > 1 - self.share, self.alpha * sign_N, torch.zeros(n))
        return self.vectors_CD[category_N], alpha_N


def make_plan(
    kind: str, model: nn.Module, tokenizer: Any, texts: list[str], args: argparse.Namespace, scale: float
) -> ItemPlan:
    """The eval code's plan for ``kind`` with synthetic artifacts (see the module docstring)."""
    width, depth = d_model(model), num_layers(model)
    layer = args.layer if args.layer is not None else depth // 2
    generator = torch.Generator().manual_seed(args.seed + 7)
    unit_D = torch.randn(width, generator=generator)
    unit_D /= unit_D.norm()
    positions: Any = int(args.positions) if args.positions.isdigit() else args.positions
    common = {"vectors": "synthetic", "positions": positions}
    device = input_device(model)
    if kind == "none":
        loaded = LoadedIntervention(InterventionConfig(kind="none"), model)
    elif kind == "residual":
        cfg = InterventionConfig(kind="residual", alpha=args.alpha * scale, **common)
        loaded = LoadedIntervention(cfg, model, layer=layer, vector=unit_D)
    elif kind == "latent":
        sae = TopKSAE(width, 8 * width, 32, generator=generator).to(device).eval()
        latent_F = torch.randn(8 * width, generator=generator)
        cfg = InterventionConfig(
            kind="latent", space="sas", sae="synthetic", alpha=args.alpha * scale, **common
        )
        loaded = LoadedIntervention(cfg, model, layer=layer, vector=latent_F / latent_F.norm(), sae=sae)
    elif kind == "ablation":
        cfg = InterventionConfig(kind="ablation", alpha=1.0, **common)
        loaded = LoadedIntervention(cfg, model, layer=layer, vector=unit_D)
    else:
        vectors_CD = torch.randn(5, width, generator=generator)
        vectors_CD /= vectors_CD.norm(dim=1, keepdim=True)
        gate = SyntheticGate(layer, vectors_CD, args.alpha * scale, args.gate_share, args.seed)
        loaded = LoadedIntervention(
            InterventionConfig(kind="gate", gate="synthetic"), model, layer=layer, gate=gate
        )
    return loaded.plan(tokenizer, texts, batch_size=args.batch_size, max_length=args.max_length)


def sync(model: nn.Module) -> None:
    device = input_device(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Generators:
    """Every ``StaticGenerator`` the fast engine builds in the block (their captures and setup time)."""

    def __init__(self) -> None:
        self.made: list[fast_generate.StaticGenerator] = []
        self._original = fast_generate.StaticGenerator

    def __enter__(self) -> Generators:
        made = self.made

        class Counted(self._original):  # type: ignore[name-defined]
            def __init__(self, *a: Any, **kw: Any) -> None:
                super().__init__(*a, **kw)
                made.append(self)

        fast_generate.StaticGenerator = Counted  # type: ignore[misc]
        return self

    def __exit__(self, *exc: object) -> None:
        fast_generate.StaticGenerator = self._original  # type: ignore[misc]

    def take(self) -> dict[str, Any]:
        """Counts of the generators made since the last call."""
        out = {
            "generators": len(self.made),
            "captures": sum(g.captures for g in self.made),
            "eager_batches": sum(g.eager_batches for g in self.made),
            "setup_s": round(sum(g.setup_s for g in self.made), 3),
        }
        self.made.clear()
        return out


def run_stage(
    model: nn.Module,
    tokenizer: Any,
    data: tuple[list[Prompt], list[str], dict[str, str]],
    plan: ItemPlan,
    args: argparse.Namespace,
    engine: str,
    kind: str,
) -> tuple[float, list[ItemRecord]]:
    prompts, names, roles = data
    sync(model)
    start = time.perf_counter()
    records = generate_items(
        model,
        tokenizer,
        prompts,
        names,
        roles,
        plan,
        [],
        intervention=kind,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        max_length=args.max_length,
        engine=engine,
    )
    sync(model)
    return time.perf_counter() - start, records


def measure_kind(
    kind: str,
    model: nn.Module,
    tokenizer: Any,
    data: tuple[list[Prompt], list[str], dict[str, str]],
    args: argparse.Namespace,
    scale: float,
    generators: Generators,
) -> dict[str, Any]:
    prompts, names, roles = data
    plan = make_plan(kind, model, tokenizer, [p.text for p in prompts], args, scale)
    n = len(prompts)
    few = (prompts[:4], names[:4], roles)
    few_plan = make_plan(kind, model, tokenizer, [p.text for p in few[0]], args, scale)
    for engine in ("hf", "fast"):  # warm-up: CUDA context, kernels, allocator (other shapes than timed)
        run_stage(model, tokenizer, few, few_plan, args, engine, kind)
    generators.take()
    times: dict[str, list[float]] = {"hf": [], "fast": []}
    outputs: dict[str, list[str]] = {}
    fast_counts: dict[str, Any] = {}
    for repeat in range(args.repeats):
        for engine in ("hf", "fast"):
            seconds, records = run_stage(model, tokenizer, data, plan, args, engine, kind)
            times[engine].append(seconds)
            outputs.setdefault(engine, [r.output for r in records])
            if engine == "fast" and repeat == 0:
                fast_counts = generators.take()
            print(
                f"  {kind:<9} {engine:<4} run {repeat + 1}/{args.repeats}: {seconds:8.2f} s  "
                f"{n / seconds:8.1f} prompts/s",
                flush=True,
            )
    same = sum(a == b for a, b in zip(outputs["hf"], outputs["fast"], strict=True)) / max(n, 1)
    steered = int((plan.alpha_N != 0).sum())
    hf_best, fast_best, fast_cold = min(times["hf"]), min(times["fast"]), times["fast"][0]
    return {
        "kind": kind,
        "prompts": n,
        "steered_prompts": steered,
        "hf_s": [round(t, 3) for t in times["hf"]],
        "fast_s": [round(t, 3) for t in times["fast"]],
        "hf_prompts_per_s": round(n / hf_best, 2),
        "fast_prompts_per_s": round(n / fast_best, 2),
        "speedup": round(hf_best / fast_best, 3),
        "speedup_cold": round(hf_best / fast_cold, 3),
        "identical_outputs": round(same, 4),
        "fast_engine": fast_counts,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    kinds = args.kind.split(",")
    if args.threads > 0 and args.device == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    wall0 = time.perf_counter()
    model, tokenizer, name = build_model(args)
    data = eval_prompts(args) if args.eval_config else synthetic_prompts(args.n_prompts or 256, args.seed)
    texts = [p.text for p in data[0]]
    layer = args.layer if args.layer is not None else num_layers(model) // 2
    scale = mean_norm(model, tokenizer, texts, layer)
    encoded = encode_prompts(tokenizer, format_prompts(tokenizer, texts), max_length=args.max_length)
    token_lengths = [len(ids) for ids in encoded.input_ids]
    device = input_device(model)
    print(
        f"model {name} on {device} ({next(model.parameters()).dtype}); {len(texts)} prompts "
        f"({min(token_lengths)}-{max(token_lengths)} tokens, median {statistics.median(token_lengths):.0f}); "
        f"batch {args.batch_size}, {args.max_new_tokens} new tokens; layer {layer}, mean residual norm "
        f"{scale:.3g}",
        flush=True,
    )
    with Generators() as generators:
        rows = [measure_kind(kind, model, tokenizer, data, args, scale, generators) for kind in kinds]
    print(f"\n{'kind':<9} {'hf p/s':>9} {'fast p/s':>9} {'speedup':>8} {'cold':>6} {'same':>6} captures")
    for row in rows:
        counts = row["fast_engine"]
        print(
            f"{row['kind']:<9} {row['hf_prompts_per_s']:>9.1f} {row['fast_prompts_per_s']:>9.1f} "
            f"{row['speedup']:>7.2f}x {row['speedup_cold']:>5.2f}x {row['identical_outputs']:>6.3f} "
            f"{counts.get('captures', 0)} (eager batches {counts.get('eager_batches', 0)})"
        )
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    result = {
        "benchmark": "eval_generation_engines",
        "model": name,
        "device": str(device),
        "gpu": gpu,
        "dtype": str(next(model.parameters()).dtype),
        "prompts": len(texts),
        "prompt_tokens": {
            "min": min(token_lengths),
            "median": statistics.median(token_lengths),
            "max": max(token_lengths),
        },
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "layer": layer,
        "kinds": rows,
        "wall_s": round(time.perf_counter() - wall0, 1),
    }
    line = json.dumps(result)
    print(line, flush=True)
    if args.json_out:
        with open(args.json_out, "w") as handle:
            handle.write(line + "\n")
    return result


if __name__ == "__main__":
    main()
