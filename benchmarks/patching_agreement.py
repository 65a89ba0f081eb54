"""Does attribution patching rank units like real activation patching on the shipped refusal-token model?

For each CoCoNot category, held-out harmful prompts that the refusal-token SmolLM2 refuses with that
category's token are paired with benign Alpaca prompts it answers (``[respond]``). The metric is
``logit[category token] - logit[respond]`` at the answer position; at ``--layer`` the script compares
attribution scores with activation-patching effects (:mod:`sae_refusal.steer.patching`) over three kinds
of units: all residual dims at the answer position, the whole residual vector at each of the last
``--positions`` positions (aligned from the end: the chat template's shared suffix), and SAE latents at the
answer position (those active in either run, plus random inactive ones, ``--max-latents`` in all).

Per category and unit it reports the Spearman rank correlation (mean and minimum over pairs, and pooled
over all pairs' units), the goal being >= 0.8. Where a category misses it, two checks say why:

* **small step**: patch only ``--check-step`` of the way from clean to corrupted. Attribution is the
  first-order term of that patch, so a Spearman near 1 there proves the gradients right and puts the miss
  on the metric's nonlinearity over the full step.
* **effect sizes**: the Spearman over the units with the largest patching effects (``--top``) and the
  share of the summed ``|effect|`` they carry; a low overall Spearman with a high top-k one means the ranks
  of near-zero effects (noise-level, or tied at exactly 0) drag the statistic down, not the units that
  matter.

Example (CPU, 2 shared cores; about 6 minutes)::

    python benchmarks/patching_agreement.py --out /tmp/patching_agreement.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sae_refusal.categories import CATEGORY_SHORT_NAMES, COCONOT_CATEGORIES
from sae_refusal.data.chat import format_prompts
from sae_refusal.llm import LLMConfig, RefusalVocabulary, load_model_and_tokenizer
from sae_refusal.llm.tokenize import encode_prompts
from sae_refusal.sae.base import SparseAutoencoder
from sae_refusal.sae.loading import load_sae
from sae_refusal.steer.patching import (
    MetricFn,
    PatchingComparison,
    Unit,
    compare_patching,
    logit_diff_metric,
    residual_at,
    spearman,
)
from sae_refusal.steer.scoring import first_token_decisions

DEFAULT_SAE = "/tmp/mainjob2/runs/default/tensorboard/version_0/sae/seed0"
UNIT_KINDS: tuple[Unit, ...] = ("dims", "positions", "latents")
GOAL = 0.8


@dataclass
class Pair:
    """A clean (refused) and a corrupted (benign) prompt, and the metric of the clean prompt's category."""

    category: str
    clean_text: str
    corrupt_text: str
    clean_ids: Tensor
    corrupt_ids: Tensor
    metric: MetricFn


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sae", default=DEFAULT_SAE, help="SAE export trained at --layer")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--adapter", default="checkpoints/refuse-smollm2", help="refusal-token artifact")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--coconot", default="/work/shared/data/coconot/coconot_eval.jsonl")
    parser.add_argument("--benign", default="/work/shared/data/benign/alpaca_harmless_test.json")
    parser.add_argument("--pairs", type=int, default=4, help="prompt pairs per category")
    parser.add_argument("--candidates", type=int, default=12, help="harmful prompts tried per category")
    parser.add_argument("--positions", type=int, default=6, help="last positions patched one by one")
    parser.add_argument("--max-latents", type=int, default=128)
    parser.add_argument("--check-step", type=float, default=0.1, help="interpolation step of the check")
    parser.add_argument("--top", type=int, default=20, help="units with the largest effects, for the check")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--categories", default="", help="comma-separated short names (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    return parser.parse_args()


def load_texts(args: argparse.Namespace) -> tuple[dict[str, list[str]], list[str]]:
    """Shuffled held-out harmful prompts per category and benign instructions."""
    rng = random.Random(args.seed)
    by_category: dict[str, list[str]] = {}
    for line in Path(args.coconot).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_category.setdefault(row["category"], []).append(row["prompt"])
    wanted = {c.strip() for c in args.categories.split(",") if c.strip()}
    harmful = {}
    for category in COCONOT_CATEGORIES:
        if wanted and CATEGORY_SHORT_NAMES[category] not in wanted:
            continue
        texts = by_category.get(category, [])
        rng.shuffle(texts)
        harmful[category] = texts[: args.candidates]
    benign = [row["instruction"] for row in json.loads(Path(args.benign).read_text())]
    rng.shuffle(benign)
    return harmful, benign[: args.candidates + args.pairs * len(harmful)]


def build_pairs(model: Any, tokenizer: Any, resolved: Any, args: argparse.Namespace) -> list[Pair]:
    """Keep prompts refused with their own category token, and benign prompts answered with respond."""
    harmful, benign = load_texts(args)
    texts = [t for ts in harmful.values() for t in ts] + benign
    decided = first_token_decisions(model, tokenizer, texts, resolved, batch_size=16).pred_class_N.tolist()
    answered = [t for t, d in zip(benign, decided[len(texts) - len(benign) :], strict=True) if d == 0]
    print(f"benign: {len(answered)} of {len(benign)} answered with [respond]")
    pairs: list[Pair] = []
    start = 0
    for category, candidates in harmful.items():
        own = resolved.class_index(category)
        metric = logit_diff_metric(resolved.token_ids[own], resolved.respond_id)
        mine = decided[start : start + len(candidates)]
        start += len(candidates)
        refused = [t for t, d in zip(candidates, mine, strict=True) if d == own][: args.pairs]
        name = CATEGORY_SHORT_NAMES[category]
        print(f"{name}: {len(refused)} pairs ({sum(d == own for d in mine)} of {len(candidates)} refused)")
        for clean in refused:
            corrupt = answered[len(pairs) % len(answered)]
            clean_ids, corrupt_ids = encode(tokenizer, [clean, corrupt])
            pairs.append(Pair(category, clean, corrupt, clean_ids, corrupt_ids, metric))
    return pairs


def encode(tokenizer: Any, texts: Sequence[str]) -> list[Tensor]:
    ids = encode_prompts(tokenizer, format_prompts(tokenizer, texts), max_length=1024).input_ids
    return [torch.tensor(row) for row in ids]


def latent_units(
    model: Any, sae: SparseAutoencoder, pair: Pair, layer: int, cap: int, rng: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Latents active in either run (all of them, up to ``cap``), then random inactive ones up to ``cap``."""
    with torch.no_grad():
        x_2D = torch.stack([residual_at(model, ids, layer)[-1] for ids in (pair.clean_ids, pair.corrupt_ids)])
        active_F = (sae.encode(x_2D) != 0).any(dim=0)
    active = active_F.nonzero().flatten()[:cap]
    others = (~active_F).nonzero().flatten()
    extra = others[torch.randperm(others.numel(), generator=rng)[: max(0, cap - active.numel())]]
    units = torch.cat([active, extra])
    return units, torch.isin(units, active)


def top_check(result: PatchingComparison, top: int) -> dict[str, float]:
    order = result.patching_U.abs().argsort(descending=True)[:top]
    total = float(result.patching_U.abs().sum())
    return {
        "spearman_top": spearman(result.attribution_U[order], result.patching_U[order]),
        "top_share_of_abs_effect": float(result.patching_U[order].abs().sum()) / total if total else math.nan,
    }


def compare_pair(
    model: Any, sae: SparseAutoencoder, pair: Pair, unit: Unit, args: argparse.Namespace, rng: torch.Generator
) -> tuple[PatchingComparison, dict[str, Any]]:
    units, active = (None, None)
    if unit == "latents":
        units, active = latent_units(model, sae, pair, args.layer, args.max_latents, rng)
    start = time.perf_counter()
    result = compare_patching(
        model,
        pair.clean_ids,
        pair.corrupt_ids,
        args.layer,
        pair.metric,
        unit,
        sae=sae,
        n_positions=args.positions,
        units=units,
        batch_size=args.batch_size,
    )
    record: dict[str, Any] = {
        "category": CATEGORY_SHORT_NAMES[pair.category],
        "unit": unit,
        "clean": pair.clean_text[:80],
        "corrupt": pair.corrupt_text[:80],
        "n_units": result.n_units,
        "spearman": result.spearman,
        "clean_metric": result.clean_metric,
        "corrupt_metric": result.corrupt_metric,
        "sum_patching": float(result.patching_U.sum()),
        "sum_attribution": float(result.attribution_U.sum()),
        "max_abs_patching": float(result.patching_U.abs().max()),
        "seconds": time.perf_counter() - start,
        **top_check(result, args.top),
    }
    if unit == "positions":
        P = args.positions
        record["suffix_tokens_shared"] = bool(torch.equal(pair.clean_ids[-P:], pair.corrupt_ids[-P:]))
        record["attribution"] = result.attribution_U.tolist()
        record["patching"] = result.patching_U.tolist()
    if active is not None:
        record["n_active"] = int(active.sum())
        record["spearman_active"] = spearman(result.attribution_U[active], result.patching_U[active])
    return result, record


def small_step_check(
    model: Any, sae: SparseAutoencoder, pair: Pair, unit: Unit, units: Tensor, args: argparse.Namespace
) -> float:
    result = compare_patching(
        model,
        pair.clean_ids,
        pair.corrupt_ids,
        args.layer,
        pair.metric,
        unit,
        sae=sae,
        n_positions=args.positions,
        units=units,
        step=args.check_step,
        batch_size=args.batch_size,
    )
    return result.spearman


def nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def summarise(records: list[dict[str, Any]], pooled: dict[tuple[str, str], list[PatchingComparison]]) -> list:
    rows = []
    for (category, unit), results in pooled.items():
        mine = [r for r in records if r["category"] == category and r["unit"] == unit]
        attribution = torch.cat([r.attribution_U for r in results])
        patching = torch.cat([r.patching_U for r in results])
        row = {
            "category": category,
            "unit": unit,
            "pairs": len(mine),
            "units_per_pair": nanmean([r["n_units"] for r in mine]),
            "spearman_mean": nanmean([r["spearman"] for r in mine]),
            "spearman_min": min(r["spearman"] for r in mine),
            "spearman_pooled": spearman(attribution, patching),
            "spearman_top_mean": nanmean([r["spearman_top"] for r in mine]),
            "top_share_mean": nanmean([r["top_share_of_abs_effect"] for r in mine]),
            "seconds": sum(r["seconds"] for r in mine),
        }
        if unit == "latents":
            row["spearman_active_mean"] = nanmean([r["spearman_active"] for r in mine])
        row["meets_goal"] = bool(row["spearman_mean"] >= GOAL and row["spearman_pooled"] >= GOAL)
        rows.append(row)
    return rows


def fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        "\n| category | unit | pairs | units/pair | Spearman mean (min) | pooled | goal >= 0.8 | "
        "top-k Spearman | top-k share of abs effect | small-step Spearman |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        extra = f" (active only: {fmt(r['spearman_active_mean'])})" if "spearman_active_mean" in r else ""
        print(
            f"| {r['category']} | {r['unit']} | {r['pairs']} | {r['units_per_pair']:.0f} | "
            f"{fmt(r['spearman_mean'])} ({fmt(r['spearman_min'])}){extra} | {fmt(r['spearman_pooled'])} | "
            f"{'yes' if r['meets_goal'] else 'no'} | {fmt(r['spearman_top_mean'])} | "
            f"{fmt(r['top_share_mean'])} | "
            f"{fmt(r.get('small_step_spearman_mean'))} |"
        )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    llm = LLMConfig(name_or_path=args.model, dtype="float32", adapter_path=args.adapter)
    model, tokenizer = load_model_and_tokenizer(llm)
    model.eval()
    resolved = RefusalVocabulary().resolve(tokenizer)
    sae = load_sae(args.sae).eval()
    k = sae.config().get("k")
    print(f"loaded model + SAE ({sae.n_latents} latents, k={k}) in {time.perf_counter() - wall:.0f} s")

    pairs = build_pairs(model, tokenizer, resolved, args)
    rng = torch.Generator().manual_seed(args.seed)
    records: list[dict[str, Any]] = []
    pooled: dict[tuple[str, str], list[PatchingComparison]] = {}
    kept: list[tuple[Pair, Unit, PatchingComparison, dict[str, Any]]] = []
    for index, pair in enumerate(pairs):
        for unit in UNIT_KINDS:
            result, record = compare_pair(model, sae, pair, unit, args, rng)
            records.append(record)
            pooled.setdefault((record["category"], unit), []).append(result)
            kept.append((pair, unit, result, record))
            print(
                f"[{index + 1}/{len(pairs)}] {record['category']:13s} {unit:9s} units={result.n_units:4d} "
                f"spearman={result.spearman:.3f} M clean={result.clean_metric:.2f} "
                f"corrupt={result.corrupt_metric:.2f} ({record['seconds']:.1f} s)"
            )
    rows = summarise(records, pooled)

    missed = {(r["category"], r["unit"]) for r in rows if not r["meets_goal"]}
    for pair, unit, result, record in kept:
        if (record["category"], unit) in missed:
            record["small_step_spearman"] = small_step_check(model, sae, pair, unit, result.units_U, args)
            print(
                f"check {record['category']:13s} {unit:9s} step={args.check_step}: "
                f"spearman={record['small_step_spearman']:.3f} (full step {result.spearman:.3f})"
            )
    for row in rows:
        if (row["category"], row["unit"]) in missed:
            mine = [r for r in records if r["category"] == row["category"] and r["unit"] == row["unit"]]
            row["small_step_spearman_mean"] = nanmean([r["small_step_spearman"] for r in mine])

    report = {
        "config": vars(args),
        "wall_seconds": time.perf_counter() - wall,
        "summary": rows,
        "pairs": records,
    }
    text = json.dumps(report, indent=2, default=float)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    print_table(rows)
    print(
        f"\nwall time {report['wall_seconds']:.0f} s; goal: Spearman >= {GOAL} (mean over pairs and pooled)"
    )


if __name__ == "__main__":
    main()
