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

Variants suite (``--fast``, or ``--model llama3-8b-shape`` on the GPU): every variant in one process, batch
sizes ``--batch-sizes``, ``--new-tokens`` (default 64) greedy tokens per prompt with EOS disabled, random
prompt ids (60-120 tokens for the 8B shape), the steered layer the middle one:

* ``hf_dynamic``: plain ``model.generate`` with its default dynamic cache (the baseline);
* ``project_unsteered`` / ``project_residual`` / ``project_sae_latent``:
  :func:`sae_refusal.llm.batched.generate` with the project's hooks (``Intervention`` of
  ``ResidualSteering`` / ``LatentSteering``, positions all);
* ``static_no_graph_unsteered``: :class:`sae_refusal.llm.fast_generate.StaticGenerator` (static KV cache,
  fixed-shape decode step) run eagerly (CUDA only: on the CPU the fast path itself is this mode);
* ``fast_unsteered`` / ``fast_residual`` / ``fast_sae_latent_fp32enc`` / ``fast_sae_latent_bf16enc``: the
  same step captured once as a CUDA graph; the edits are static edits (``ResidualAdd``; ``SAELatentAdd``,
  the project's latent steering with a TopK SAE of 65,536 latents, k 64, random weights, encoder product in
  float32 or bfloat16);
* ``fast_gate_probe_separate``: a ``ProbeGate`` (random weights) scores the last-token residual from the
  project's early-exit extraction, then the picked rows are steered; ``fast_gate_probe_fused``: the same
  probe read inside the generation's own prefill (no extra forward); ``fast_gate_refusal_token_separate``:
  one full unsteered prefill, rows whose first greedy token is in a "refusal" set get steered;
  ``prefill_only``: one full prefill, the unit of a gate's cost;
* ``compiled_unsteered`` / ``compiled_residual`` (``--compile``, batch sizes ``--compile-batches``): the
  step ``torch.compile``d once, with a ``ResidualAdd`` edit, then captured; measured with alpha 0 (the
  unsteered values plus one add) and right after with alpha 1 set in place, reusing the compiled step and
  graph (one compile, about 31 s for the 8B shape, instead of two).

Each variant's first call (graph capture, compile) is untimed and reported as ``warmup_s``; a failing
variant is recorded as ``{"error": ...}`` and the run goes on; a variant that would start after
``--time-budget`` seconds is skipped. Per batch size the report gives ``overhead_pct_vs_unsteered`` (each
steered variant vs its own path's unsteered run), ``speedup_vs_hf_dynamic``, ``gate_cost`` (extra seconds
over ``fast_residual``, also in units of one prefill), ``token_agreement`` (identical-token share, first-token
agreement, mean identical prefix between paths: bf16 kernels differ, so greedy paths on random weights can
drift) and ``tokens_changed_by_steering``.

GPU command (one H200, from the repo root, ``PYTHONPATH`` set to the project)::

    python benchmarks/steered_generation.py --model llama3-8b-shape --device cuda --batch-sizes 1,32 \\
        --new-tokens 64 --repeats 3 --compile --time-budget 200 --json-out $OUT/generation.json

First H200 run (fix-up pending: the two separate gates failed, see below; compiled_residual skipped): at
batch 32 ``fast_unsteered`` (static cache, CUDA graph) was 1.98x ``hf_dynamic`` (target 2x; 2261 vs 1143
tok/s), ``compiled_unsteered`` 2.89x (3304 tok/s, after a 31 s compile); at batch 1 ``fast_unsteered`` was
3.37x. Steering overhead on the fast path: ``fast_residual`` -0.1 % (batch 32), the fused probe gate
+0.1 %. ``compiled_residual`` was skipped by the time budget (a second 31 s compile); it now reuses the
compiled step. ``fast_gate_probe_separate`` / ``fast_gate_refusal_token_separate`` failed at both batch
sizes with "Inplace update to inference tensor outside InferenceMode": ``ResidualAdd`` moved its alpha to
CUDA inside the generator's ``inference_mode`` (an inference tensor), and the separate gate's
``set_alpha`` outside it could not write it; fixed in ``ResidualAdd`` (buffers made with inference mode
off, placed on the first call on every device, so the CPU smoke run runs the same code).

CPU smoke run of the suite::

    python benchmarks/steered_generation.py --fast --tiny --new-tokens 8 --repeats 1 --batch-sizes 1,4
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from types import SimpleNamespace
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn

from sae_refusal.data.chat import format_prompts
from sae_refusal.llm import LLMConfig, d_model, encode_prompts, load_model_and_tokenizer, num_layers
from sae_refusal.llm.batched import Generation, generate, iter_padded_batches, resolve_pad_id
from sae_refusal.llm.extraction import last_token_residuals, position_ids_from_mask
from sae_refusal.llm.fast_generate import Mode, ResidualAdd, StaticEdit, StaticGenerator
from sae_refusal.llm.hooks import StepContext, residual_hooks
from sae_refusal.llm.layers import input_device
from sae_refusal.llm.tokenize import pad_left
from sae_refusal.sae.topk import TopKSAE
from sae_refusal.steer.gates.probe import ProbeGate
from sae_refusal.steer.interventions import Intervention, LatentSteering, ResidualSteering
from sae_refusal.testing import build_llama3_8b_shape, build_tiny_model, build_tiny_tokenizer

GPU_COMMAND = (
    "python benchmarks/steered_generation.py --model llama3-8b-shape --device cuda --batch-sizes 1,32 "
    "--new-tokens 64 --repeats 3 --compile --time-budget 200 --json-out $OUT/generation.json"
)

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


def run_classic(args: argparse.Namespace) -> dict[str, Any]:
    """The CPU-oriented comparison: unsteered vs ResidualSteering through ``batched.generate``."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    batch_sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    args.new_tokens = args.new_tokens or 32
    args.repeats = args.repeats or 3

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


# ---------------------------------------------------------------------------------------------------------
# The variants suite (``--fast`` or ``--model llama3-8b-shape``): HF generate, the project's path and the
# static-cache fast path, unsteered and with each edit, in one process.


def build_variants_model(args: argparse.Namespace) -> tuple[nn.Module, Any, str]:
    """The model of the variants suite (random weights for the tiny and the Llama-3-8B-shaped model)."""
    if args.model == "llama3-8b-shape":
        model = build_llama3_8b_shape(args.device, torch.bfloat16, seed=args.seed)
        return model, build_tiny_tokenizer(), "llama3-8b-shape (random bf16 weights, sdpa)"
    if args.model == "smollm2":
        return build(args)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model("llama", vocab_size=len(tokenizer), num_layers=8, hidden_size=64)
    return nn.Module.to(model, device=args.device), tokenizer, "tiny-llama (8 layers, d_model 64)"


def random_prompts(n: int, vocab_size: int, low: int, high: int, seed: int) -> list[list[int]]:
    """``n`` prompts of random token ids (ids 3.. so no special token of the tiny tokenizer), lengths in
    ``[low, high]``."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab_size) for _ in range(rng.randint(low, high))] for _ in range(n)]


class SAELatentAdd:
    """:class:`~sae_refusal.steer.interventions.LatentSteering` (positions ``"all"``) as a static edit.

    ``x' = dec(z + alpha e_j) + (x - dec(z))`` with ``z = TopK-encode(x)``, as the project computes it
    (input scale, pre-encoder bias, top-k then ReLU), but with both decodes as sparse gathers of the active
    decoder rows (the same sums as the dense ``z @ W_dec``). The encoder's dense product runs in
    ``encoder_dtype`` (float32 like ``TopKSAE``'s default, or bfloat16 like ``encoder_dtype="bfloat16"``).
    Note that for this additive edit the result equals ``x + alpha W_dec[j] / input_scale`` whatever ``z``
    is: the encode is measured because clamping, ablating or conditional latent edits need it.
    """

    def __init__(self, sae: TopKSAE, latent: int, alpha: float, encoder_dtype: torch.dtype) -> None:
        self.k, self.latent, self.alpha = sae.k, latent, alpha
        self.W_enc_FD = sae.W_enc_FD.detach().to(encoder_dtype)
        self.b_enc_F = sae.b_enc_F.detach().to(encoder_dtype)
        self.W_dec_FD = sae.W_dec_FD.detach()
        self.b_dec_D = sae.b_dec_D.detach()
        self.scale = float(sae.input_scale)
        self.extra_v_N1 = torch.full((1, 1), alpha, device=self.W_dec_FD.device)
        self.extra_i_N1 = torch.full((1, 1), latent, dtype=torch.long, device=self.W_dec_FD.device)

    def _decode(self, values_NK: Tensor, indices_NK: Tensor) -> Tensor:
        return (values_NK[..., None] * self.W_dec_FD[indices_NK]).sum(dim=1) + self.b_dec_D

    def __call__(self, hidden_BTD: Tensor, prefill: bool) -> Tensor:
        x_ND = hidden_BTD.reshape(-1, hidden_BTD.shape[-1]).float()
        xs_ND = x_ND * self.scale - self.b_dec_D
        pre_NF = torch.addmm(self.b_enc_F, xs_ND.to(self.W_enc_FD.dtype), self.W_enc_FD.T)
        values_NK, indices_NK = pre_NF.topk(self.k, dim=-1, sorted=False)
        values_NK = values_NK.float().relu()
        n = values_NK.shape[0]
        edited_NK1 = torch.cat([values_NK, self.extra_v_N1.expand(n, 1)], dim=1)
        edited_idx = torch.cat([indices_NK, self.extra_i_N1.expand(n, 1)], dim=1)
        recon_ND = self._decode(values_NK, indices_NK)
        out_ND = (self._decode(edited_NK1, edited_idx) - recon_ND) / self.scale + x_ND
        return out_ND.to(hidden_BTD.dtype).reshape(hidden_BTD.shape)


class FusedProbeGate:
    """A probe gate read inside the generation's own prefill, then residual steering of the picked rows.

    In the prefill it scores the last-token residual at its layer (left padding: the last column), before
    the steering edit at that layer, exactly what :class:`~sae_refusal.steer.gates.probe.ProbeGate` reads
    from its separate early-exit pass (``P = sigmoid(((x - mean) / scale) . w + b)``), and writes
    ``alpha * [P > 0.5]`` per row into the steering edit's alpha buffer; no extra forward.
    """

    def __init__(self, gate: ProbeGate, steer: ResidualAdd, alpha: float) -> None:
        self.gate, self.steer, self.alpha = gate, steer, alpha
        self.tensors: tuple[Tensor, Tensor, Tensor] | None = None

    def __call__(self, hidden_BTD: Tensor, prefill: bool) -> Tensor:
        if prefill:
            if self.tensors is None:
                device = hidden_BTD.device
                self.tensors = (
                    self.gate.mean_F.to(device),
                    self.gate.scale_F.to(device),
                    self.gate.weight_F.to(device),
                )
            mean_F, scale_F, weight_F = self.tensors
            x_BF = (hidden_BTD[:, -1, :].float() - mean_F) / scale_F
            score_B = torch.sigmoid(x_BF @ weight_F + self.gate.bias)
            self.steer.set_alpha((score_B > 0.5).float() * self.alpha)
        return self.steer(hidden_BTD, prefill)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Tensor], repeats: int, device: torch.device) -> tuple[list[float], Tensor]:
    times: list[float] = []
    out = torch.empty(0)
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times, out


def _agreement(a_BN: Tensor, b_BN: Tensor) -> dict[str, float]:
    """Token agreement of two greedy runs: identical share, first-token agreement, mean identical prefix."""
    same_BN = a_BN == b_BN
    prefix_B = same_BN.long().cumprod(dim=1).sum(dim=1).float()
    return {
        "identical_fraction": round(float(same_BN.float().mean()), 4),
        "first_token_agree": round(float(same_BN[:, 0].float().mean()), 4),
        "mean_identical_prefix": round(float(prefix_B.mean()), 2),
    }


def measure_batch(setup: SimpleNamespace, batch: int) -> dict[str, Any]:
    """Every variant at one batch size: tokens/s, warm-up time, tokens (for the agreement checks)."""
    args, model, device, layer, width = setup.args, setup.model, setup.device, setup.layer, setup.width
    new_tokens, repeats, pad_id, prompts = setup.new_tokens, setup.repeats, setup.pad_id, setup.prompts
    vector, sae, latent, latent_alpha = setup.vector, setup.sae, setup.latent, setup.latent_alpha
    latent_vector, fast_mode, budget_end = setup.latent_vector, setup.fast_mode, setup.budget_end
    ids = prompts[:batch]
    ids_BT, mask_BT = pad_left(ids, pad_id)
    ids_dev, mask_dev = ids_BT.to(device), mask_BT.to(device)
    max_cache_len = ids_BT.shape[1] + new_tokens
    lengths = [len(x) for x in ids]
    print(f"batch {batch}: prompts of {min(lengths)}-{max(lengths)} tokens", flush=True)
    row: dict[str, Any] = {"batch_size": batch, "prompt_tokens": [min(lengths), max(lengths)]}
    variants: dict[str, dict[str, Any]] = {}
    holder: list[StaticGenerator] = []  # the fast variant being measured (closed after it)
    tokens: dict[str, Tensor] = {}
    decisions: dict[str, Tensor] = {}

    def record(
        label: str,
        make: Callable[[], Callable[[], Tensor]],
        cleanup: Callable[[], None] | None = None,
        only_if: bool = True,
        batch_size: int = batch,
        min_left_s: float = 0.0,
    ) -> None:
        if not only_if:
            return
        if time.perf_counter() > budget_end - min_left_s:
            variants[label] = {"skipped": f"time budget of {args.time_budget} s spent"}
            print(f"  {label:<32} skipped (time budget)", flush=True)
            return
        try:
            setup_start = time.perf_counter()
            run = make()
            run()  # warm-up: graph capture / compile / allocator
            _sync(device)
            setup_s = time.perf_counter() - setup_start
            times, out = _timed(run, repeats, device)
            out = out.cpu()
            if out.shape != (batch_size, new_tokens):
                raise RuntimeError(f"expected {(batch_size, new_tokens)} tokens, got {tuple(out.shape)}")
            tokens[label] = out
            n_tok = batch_size * new_tokens
            variants[label] = {
                "tokens_per_s": round(n_tok / min(times), 1),
                "tokens_per_s_median": round(n_tok / statistics.median(times), 1),
                "seconds": [round(t, 4) for t in times],
                "warmup_s": round(setup_s, 3),
            }
            if holder:  # the generator's one-off part of the warm-up: cache build, capture, compile
                variants[label]["capture_or_compile_s"] = round(holder[-1].setup_s, 3)
            print(
                f"  {label:<32} {n_tok / min(times):9.1f} tok/s  (best {min(times):.3f} s, "
                f"warm-up {setup_s:.2f} s)",
                flush=True,
            )
        except Exception as error:
            variants[label] = {"error": f"{type(error).__name__}: {error}"[:2000]}
            print(f"  {label:<32} FAILED: {type(error).__name__}: {str(error)[:300]}", flush=True)
        finally:
            if cleanup is not None:
                try:
                    cleanup()
                except Exception as error:
                    print(f"  {label}: cleanup failed: {error}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    # (a) Hugging Face generate, dynamic cache: the baseline
    def make_hf() -> Callable[[], Tensor]:
        def run() -> Tensor:
            with torch.inference_mode():
                out = cast(Any, model).generate(
                    input_ids=ids_dev,
                    attention_mask=mask_dev,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=pad_id,
                )
            return cast(Tensor, out[:, ids_BT.shape[1] :])

        return run

    record("hf_dynamic", make_hf)

    # (b) the project's path: batched.generate, with the project's hooks for the edits
    def make_project(
        around: Callable[[list[int]], AbstractContextManager[Any]] | None,
    ) -> Callable[[], Callable[[], Tensor]]:
        def factory() -> Callable[[], Tensor]:
            def run() -> Tensor:
                out = generate(
                    model,
                    ids,
                    max_new_tokens=new_tokens,
                    pad_id=pad_id,
                    stop_ids=[],
                    batch_size=batch,
                    around=around,
                )
                return torch.tensor([g.token_ids for g in out])

            return run

        return factory

    record("project_unsteered", make_project(None))
    record(
        "project_residual",
        make_project(lambda _i: Intervention(model, {layer: ResidualSteering(vector, alpha=1.0)})),
    )
    record(
        "project_sae_latent",
        make_project(lambda _i: Intervention(model, {layer: LatentSteering(sae, latent_vector, alpha=1.0)})),
        only_if=not args.skip_project_sae,
    )

    # (c) the fast path: static cache, fixed-shape decode step (one CUDA graph on CUDA)

    def close() -> None:
        while holder:
            holder.pop().close()

    def make_fast(
        edits: Mapping[int, StaticEdit] | None,
        mode: Mode = fast_mode,
        compile: bool = False,
        before: Callable[[], None] | None = None,
    ) -> Callable[[], Callable[[], Tensor]]:
        def factory() -> Callable[[], Tensor]:
            gen = StaticGenerator(
                model,
                batch_size=batch,
                max_cache_len=max_cache_len,
                edits=edits,
                mode=mode,
                compile=compile,
            )
            holder.append(gen)

            def run() -> Tensor:
                if before is not None:
                    before()
                return gen(ids_BT, mask_BT, new_tokens)

            return run

        return factory

    record("static_no_graph_unsteered", make_fast(None, mode="static"), close, only_if=fast_mode != "static")
    record("fast_unsteered", make_fast(None), close)
    record("fast_residual", make_fast({layer: ResidualAdd(vector, 1.0)}), close)
    for label, dtype in (
        ("fast_sae_latent_fp32enc", torch.float32),
        ("fast_sae_latent_bf16enc", torch.bfloat16),
    ):
        record(label, make_fast({layer: SAELatentAdd(sae, latent, latent_alpha, dtype)}), close)

    # conditional gates: a probe on the last-token residual at the steered layer (random, fitted to these
    # prompts' statistics so that about half are picked), and a refusal-token-style gate
    gate_generator = torch.Generator().manual_seed(args.seed + 1)
    gate = ProbeGate(
        layer=layer,
        class_names=["benign", "harmful"],
        mean_F=setup.gate_acts_ND.float().mean(0).cpu(),
        scale_F=setup.gate_acts_ND.float().std(0).clamp_min(1e-6).cpu(),
        weight_F=torch.randn(width, generator=gate_generator) / width**0.5,
        bias=0.0,
        category="mean",
        category_means_CF=torch.zeros(1, width),
    )
    steer_probe = ResidualAdd(vector, torch.zeros(batch))

    def probe_decide() -> None:
        steer_probe.set_alpha(torch.zeros(batch))  # the gate reads the unsteered prompt (alpha 0: a + 0 = a)
        acts = last_token_residuals(model, ids_dev, mask_dev, [layer])[layer]
        picked_B = (gate.score(acts).score_N > 0.5).float()
        decisions["fast_gate_probe_separate"] = picked_B.bool()
        steer_probe.set_alpha(picked_B)

    record("fast_gate_probe_separate", make_fast({layer: steer_probe}, before=probe_decide), close)
    steer_fused = ResidualAdd(vector, torch.zeros(batch))
    fused = FusedProbeGate(gate, steer_fused, 1.0)
    record("fast_gate_probe_fused", make_fast({layer: fused}), close)
    if "fast_gate_probe_fused" in tokens:
        decisions["fast_gate_probe_fused"] = steer_fused.alpha.cpu() > 0
    refusal_ids = set(tokens["fast_unsteered"][::2, 0].tolist()) if "fast_unsteered" in tokens else {0}
    refusal_ids_t = torch.tensor(sorted(refusal_ids), device=device)
    steer_refusal = ResidualAdd(vector, torch.zeros(batch))

    def refusal_decide() -> None:
        steer_refusal.set_alpha(torch.zeros(batch))  # the gate reads the unsteered prompt
        with torch.inference_mode():
            logits_BV = model(
                input_ids=ids_dev,
                attention_mask=mask_dev,
                position_ids=position_ids_from_mask(mask_dev),
                use_cache=False,
                logits_to_keep=1,
            ).logits[:, -1, :]
        picked_B = torch.isin(logits_BV.argmax(dim=-1), refusal_ids_t).float()
        decisions["fast_gate_refusal_token_separate"] = picked_B.bool().cpu()
        steer_refusal.set_alpha(picked_B)

    record(
        "fast_gate_refusal_token_separate",
        make_fast({layer: steer_refusal}, before=refusal_decide),
        close,
    )

    # one full prefill (no cache, last logits only): the unit a gate's cost is compared with
    def make_prefill() -> Callable[[], Tensor]:
        def run() -> Tensor:
            with torch.inference_mode():
                model(
                    input_ids=ids_dev,
                    attention_mask=mask_dev,
                    position_ids=position_ids_from_mask(mask_dev),
                    use_cache=False,
                    logits_to_keep=1,
                )
            return torch.zeros(batch, new_tokens, dtype=torch.long)

        return run

    record("prefill_only", make_prefill)
    variants.get("prefill_only", {}).pop("tokens_per_s", None)
    variants.get("prefill_only", {}).pop("tokens_per_s_median", None)
    tokens.pop("prefill_only", None)

    if args.compile and batch in args.compile_batches:
        # One compile (about 31 s for the 8B shape on an H200) serves both: the step is compiled and captured
        # with a ResidualAdd edit, measured with alpha 0 (a + 0 = a: the unsteered values, plus one add) as
        # compiled_unsteered, then, right after, with alpha 1 set in place (the same compiled step and graph)
        # as compiled_residual. A second compile would not fit the GPU command's time budget.
        compiled_steer = ResidualAdd(vector, 0.0)
        compiled_gen: list[StaticGenerator] = []

        def make_compiled(alpha: float) -> Callable[[], Callable[[], Tensor]]:
            def factory() -> Callable[[], Tensor]:
                if not compiled_gen:
                    gen = StaticGenerator(
                        model,
                        batch_size=batch,
                        max_cache_len=max_cache_len,
                        edits={layer: compiled_steer},
                        mode=fast_mode,
                        compile=True,
                    )
                    compiled_gen.append(gen)
                    holder.append(gen)  # its setup_s is reported; closed after compiled_residual
                gen = compiled_gen[0]

                def run() -> Tensor:
                    compiled_steer.set_alpha(alpha)
                    return gen(ids_BT, mask_BT, new_tokens)

                return run

            return factory

        def close_compiled() -> None:
            compiled_gen.clear()
            close()

        record("compiled_unsteered", make_compiled(0.0), min_left_s=args.compile_min_left)
        if "compiled_unsteered" in tokens:  # compiled and measured: the residual run reuses its step
            record("compiled_residual", make_compiled(1.0), close_compiled)
            if "tokens_per_s" in variants.get("compiled_residual", {}):
                variants["compiled_residual"]["capture_or_compile_s"] = 0.0
                variants["compiled_residual"]["reuses"] = "compiled_unsteered's compiled step and graph"
        else:
            close_compiled()
            variants["compiled_residual"] = {"skipped": "compiled_unsteered did not run"}

    row["variants"] = variants
    row.update(summarise(variants, tokens, decisions))
    print(json.dumps({k: v for k, v in row.items() if k != "variants"}), flush=True)
    return row


def run_variants(args: argparse.Namespace) -> dict[str, Any]:
    """All variants, every batch size, one process; one variant's failure is recorded and the run goes on."""
    wall0 = time.perf_counter()
    if args.threads > 0 and args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    new_tokens, repeats = args.new_tokens or 64, args.repeats or 3
    batch_sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    model, _tokenizer, name = build_variants_model(args)
    model.eval()
    load_s = time.perf_counter() - wall0
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.eos_token_id = None
    vocab = int(cast(Any, model).config.vocab_size)
    n_layers, width = num_layers(model), d_model(model)
    layer = n_layers // 2 if args.layer is None else args.layer % n_layers
    big = args.model == "llama3-8b-shape"
    low, high = (60, 120) if big else (6, 20)
    prompts = random_prompts(max(batch_sizes), vocab, low, high, args.seed)
    pad_id = 0
    norm = mean_residual_norm(model, prompts[: min(8, len(prompts))], layer, pad_id)
    generator = torch.Generator().manual_seed(args.seed)
    direction = torch.randn(width, generator=generator)
    vector = direction / direction.norm() * norm * args.alpha_scale
    fast_mode: Mode = "cuda_graph" if device.type == "cuda" else "static"
    all_ids_BT, all_mask_BT = pad_left(prompts, pad_id)
    gate_acts_ND = mean_last_token(model, all_ids_BT.to(device), all_mask_BT.to(device), layer).cpu()
    n_latents, k = (65536, 64) if big else (256, 8)
    sae = TopKSAE(width, n_latents, k, aux_k=0, generator=generator).to(device).eval()
    latent = int(torch.randint(n_latents, (1,), generator=generator))
    latent_alpha = norm * args.alpha_scale  # decoder rows have unit norm: the edit's size is the vector's
    latent_vector = torch.zeros(n_latents)
    latent_vector[latent] = latent_alpha
    budget_end = wall0 + args.time_budget
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"{name} on {device_name}, built in {load_s:.1f} s; layer {layer}/{n_layers}, "
        f"vector norm {norm:.2f}, "
        f"SAE {n_latents} latents k {k}; fast mode {fast_mode}; {new_tokens} new tokens, {repeats} repeats",
        flush=True,
    )
    results: list[dict[str, Any]] = []
    setup = SimpleNamespace(**locals())
    for batch in batch_sizes:
        row = measure_batch(setup, batch)
        results.append(row)

    report = {
        "benchmark": "steered_generation_variants",
        "model": name,
        "device": device_name,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "fast_mode": fast_mode,
        "layer": layer,
        "n_layers": n_layers,
        "vector_norm": round(norm * args.alpha_scale, 4),
        "sae": {"n_latents": n_latents, "k": k, "latent": latent},
        "new_tokens": new_tokens,
        "repeats": repeats,
        "greedy": True,
        "eos": "disabled (min_new_tokens = max_new_tokens for hf_dynamic)",
        "statistic": "tokens_per_s: fastest of repeats; warmup_s: the untimed first call (capture/compile)",
        "load_s": round(load_s, 2),
        "total_wall_s": round(time.perf_counter() - wall0, 1),
        "gpu_command": GPU_COMMAND,
        "results": results,
    }
    print_table(results)
    print(json.dumps(report))
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump(report, handle, indent=1)
    return report


def mean_last_token(model: nn.Module, ids_BT: Tensor, mask_BT: Tensor, layer: int) -> Tensor:
    """The last-token residuals at ``layer`` (one early-exit forward)."""
    with torch.inference_mode():
        return last_token_residuals(model, ids_BT, mask_BT, [layer])[layer]


_STEERED_OF = {
    "project_residual": "project_unsteered",
    "project_sae_latent": "project_unsteered",
    "fast_residual": "fast_unsteered",
    "fast_sae_latent_fp32enc": "fast_unsteered",
    "fast_sae_latent_bf16enc": "fast_unsteered",
    "fast_gate_probe_separate": "fast_unsteered",
    "fast_gate_probe_fused": "fast_unsteered",
    "fast_gate_refusal_token_separate": "fast_unsteered",
    "compiled_residual": "compiled_unsteered",
}


def summarise(
    variants: Mapping[str, Mapping[str, Any]], tokens: Mapping[str, Tensor], decisions: Mapping[str, Tensor]
) -> dict[str, Any]:
    """Overheads, speedups, gate costs and token agreement of one batch size."""

    def seconds(label: str) -> float | None:
        times = variants.get(label, {}).get("seconds")
        return min(times) if times else None

    out: dict[str, Any] = {}
    overheads: dict[str, float] = {}
    for steered, base in _STEERED_OF.items():
        a, b = seconds(steered), seconds(base)
        if a is not None and b is not None:
            overheads[steered] = round(100.0 * (a / b - 1.0), 2)
    out["overhead_pct_vs_unsteered"] = overheads
    hf = seconds("hf_dynamic")
    out["speedup_vs_hf_dynamic"] = {
        label: round(hf / s, 3)
        for label in (
            "project_unsteered",
            "static_no_graph_unsteered",
            "fast_unsteered",
            "compiled_unsteered",
        )
        if hf is not None and (s := seconds(label)) is not None
    }
    prefill, residual = seconds("prefill_only"), seconds("fast_residual")
    gate_costs: dict[str, Any] = {}
    for label in ("fast_gate_probe_separate", "fast_gate_probe_fused", "fast_gate_refusal_token_separate"):
        s = seconds(label)
        if s is not None and residual is not None and prefill is not None:
            extra = s - residual
            gate_costs[label] = {
                "extra_s_vs_fast_residual": round(extra, 4),
                "in_prefills": round(extra / prefill, 3),
                "picked_rows": int(decisions[label].sum()) if label in decisions else None,
            }
    out["gate_cost"] = gate_costs
    if prefill is not None:
        out["prefill_s"] = round(prefill, 4)
    agreement: dict[str, Any] = {}
    pairs = {
        "project_unsteered_vs_hf_dynamic": ("project_unsteered", "hf_dynamic"),
        "fast_unsteered_vs_hf_dynamic": ("fast_unsteered", "hf_dynamic"),
        "fast_unsteered_vs_project_unsteered": ("fast_unsteered", "project_unsteered"),
        "fast_unsteered_vs_static_no_graph": ("fast_unsteered", "static_no_graph_unsteered"),
        "fast_residual_vs_project_residual": ("fast_residual", "project_residual"),
        "fast_sae_fp32enc_vs_project_sae_latent": ("fast_sae_latent_fp32enc", "project_sae_latent"),
        "compiled_unsteered_vs_fast_unsteered": ("compiled_unsteered", "fast_unsteered"),
        "compiled_residual_vs_fast_residual": ("compiled_residual", "fast_residual"),
    }
    for key, (a_label, b_label) in pairs.items():
        if a_label in tokens and b_label in tokens:
            agreement[key] = _agreement(tokens[a_label], tokens[b_label])
    out["token_agreement"] = agreement
    changed: dict[str, Any] = {}
    for steered, base in _STEERED_OF.items():
        if steered in tokens and base in tokens:
            diff_BN = tokens[steered] != tokens[base]
            entry: dict[str, Any] = {"changed_fraction": round(float(diff_BN.float().mean()), 4)}
            if steered in decisions:
                picked_B = decisions[steered].bool().cpu()
                entry["changed_fraction_picked_rows"] = (
                    round(float(diff_BN[picked_B].float().mean()), 4) if picked_B.any() else None
                )
                entry["unpicked_rows_identical_to_unsteered"] = bool((~diff_BN[~picked_B]).all())
            changed[steered] = entry
    out["tokens_changed_by_steering"] = changed
    if "fast_gate_probe_separate" in decisions and "fast_gate_probe_fused" in decisions:
        same = decisions["fast_gate_probe_separate"].cpu() == decisions["fast_gate_probe_fused"].cpu()
        out["probe_gate_fused_vs_separate_decisions_agree"] = round(float(same.float().mean()), 4)
    return out


def print_table(results: Sequence[Mapping[str, Any]]) -> None:
    """tokens/s per variant and batch size, with the overhead vs the matching unsteered path."""
    labels: list[str] = []
    for row in results:
        labels += [label for label in row["variants"] if label not in labels and label != "prefill_only"]
    print(f"\n{'variant':<34}" + "".join(f"{'batch ' + str(r['batch_size']):>26}" for r in results))
    for label in labels:
        cells = []
        for row in results:
            entry = row["variants"].get(label, {})
            if "tokens_per_s" in entry:
                overhead = row["overhead_pct_vs_unsteered"].get(label)
                extra = f" ({overhead:+.1f}%)" if overhead is not None else ""
                cells.append(f"{entry['tokens_per_s']:.1f} tok/s{extra}")
            else:
                cells.append("error" if "error" in entry else "skipped")
        print(f"{label:<34}" + "".join(f"{cell:>26}" for cell in cells))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2")
    parser.add_argument(
        "--model",
        choices=("smollm2", "tiny", "llama3-8b-shape"),
        default=None,
        help="the variants suite's model (llama3-8b-shape implies --fast; default: tiny with --tiny)",
    )
    parser.add_argument(
        "--fast", action="store_true", help="run the variants suite (HF / project / static fast path)"
    )
    parser.add_argument(
        "--adapter", default=None, help="refusal-token artifact, e.g. checkpoints/refuse-smollm2"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1; 0 = torch's own)"
    )
    parser.add_argument("--batch-sizes", default="1,32", help="comma-separated batch sizes (default 1,32)")
    parser.add_argument(
        "--new-tokens", type=int, default=0, help="tokens per prompt (default 32; variants suite 64)"
    )
    parser.add_argument("--repeats", type=int, default=0, help="timed runs of each, fastest kept (default 3)")
    parser.add_argument("--layer", type=int, default=None, help="steered layer (default: the middle one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--alpha-scale", type=float, default=1.0, help="steering size in mean residual norms (variants suite)"
    )
    parser.add_argument("--compile", action="store_true", help="variants suite: also torch.compile the step")
    parser.add_argument(
        "--compile-batches", default="32", help="batch sizes of the compiled variants (default 32)"
    )
    parser.add_argument(
        "--skip-project-sae", action="store_true", help="variants suite: skip the project-path SAE variant"
    )
    parser.add_argument(
        "--time-budget", type=float, default=220.0, help="variants suite: skip what starts after this (s)"
    )
    parser.add_argument(
        "--compile-min-left",
        type=float,
        default=45.0,
        help="start a compiled variant only with this much budget left",
    )
    parser.add_argument("--json-out", default=None, help="variants suite: also write the report here")
    args = parser.parse_args(argv)
    args.compile_batches = [int(x) for x in args.compile_batches.split(",") if x.strip()]
    if args.model == "llama3-8b-shape" or args.fast or args.model is not None:
        if args.model is None:
            args.model = "tiny" if args.tiny else "smollm2"
        args.tiny = args.model == "tiny"
        return run_variants(args)
    return run_classic(args)


if __name__ == "__main__":
    main()
