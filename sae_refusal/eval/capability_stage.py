"""The eval job's capability stage and alpha sweep: items -> intervention plan -> scores -> rows with CIs.

Each capability item's user-facing text (the MMLU / GSM8K / TruthfulQA question, the benign or reference
prompt) is what a conditional gate reads, so a gate steers capability items the way it would steer a user's
message; unconditional interventions give every item the same edit. The plan's per-batch context reaches
every forward and decode step of :mod:`sae_refusal.eval.capability`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from sae_refusal.data.capability import subsample
from sae_refusal.eval.stats import bootstrap_mean, bootstrap_ratio

if TYPE_CHECKING:
    from sae_refusal.data.prompt_set import Prompt
    from sae_refusal.eval.context import EvalContext
    from sae_refusal.eval.interventions import ItemPlan, LoadedIntervention
    from sae_refusal.steer.sets import SteerSets

__all__ = ["HeldOutPrompts", "held_out_prompts", "reference_prompts", "run_capability", "run_sweep"]


@dataclass
class HeldOutPrompts:
    """The held-out prompts of the KL and reference-perplexity measures, drawn once per job.

    Attributes:
        benign: Benign test prompts (next-token KL), capped at ``capability.kl_n``.
        references: Test prompts with a reference answer, capped at ``capability.reference_n``.
    """

    benign: list[Prompt]
    references: list[Prompt]


def held_out_prompts(ctx: EvalContext, sets: SteerSets) -> HeldOutPrompts:
    """Draw both lists (the model's prompt set is loaded and split once, not per measure or sweep point)."""
    cfg = ctx.cfg.capability
    benign = subsample(sets.get("test", ctx.cfg.sets.benign_source), cfg.kl_n, cfg.seed)
    references = reference_prompts(ctx, cfg.reference_n) if "reference" in cfg.tasks else []
    return HeldOutPrompts(benign=benign, references=references)


def reference_prompts(ctx: EvalContext, limit: int | None) -> list[Prompt]:
    """Held-out (``test``) prompts of the model's own prompt set that carry a reference answer."""
    from pathlib import Path

    from sae_refusal.data.sources import load_prompt_set
    from sae_refusal.data.splits import split_prompt_set

    sets_cfg = ctx.cfg.sets
    model_set = split_prompt_set(
        load_prompt_set(sets_cfg.model_prompts), sets_cfg.model_split, None, Path(sets_cfg.manifest_root)
    )
    rows = [p for p in model_set if p.split == "test" and p.response]
    return subsample(rows, limit, ctx.cfg.capability.seed)


def _row(values: list[float] | np.ndarray, ctx: EvalContext, salt: int, **extra: Any) -> dict[str, Any]:
    est = bootstrap_mean(
        np.asarray(values, dtype=np.float64), n_boot=ctx.cfg.n_boot, seed=ctx.cfg.seed + salt
    )
    return {**est.to_json(), **extra}


def _plan(ctx: EvalContext, loaded: LoadedIntervention, texts: list[str]) -> ItemPlan:
    cap = ctx.cfg.capability
    return loaded.plan(ctx.tokenizer, texts, batch_size=cap.batch_size, max_length=cap.max_length, **ctx.chat)


def _records(task: str, scores: list[Any], plan: ItemPlan, intervention: str) -> list[dict[str, Any]]:
    return [
        {
            "task": task,
            "id": s.id,
            "intervention": intervention,
            "value": s.value,
            **s.extra,
            **plan.item_record(i),
        }
        for i, s in enumerate(scores)
    ]


def _kl_and_reference(
    ctx: EvalContext,
    loaded: LoadedIntervention,
    held_out: HeldOutPrompts,
    out: dict[str, Any],
    records: list[dict[str, Any]],
) -> None:
    from sae_refusal.eval import capability as cap_fns

    cfg = ctx.cfg.capability
    model, tok, name = ctx.model, ctx.tokenizer, loaded.name
    if "next_token_kl" in cfg.tasks:
        benign = held_out.benign
        texts = [p.text for p in benign]
        plan = _plan(ctx, loaded, texts)
        scores = cap_fns.next_token_kl(
            model,
            tok,
            texts,
            ids=[p.id for p in benign],
            batch_size=cfg.batch_size,
            max_length=cfg.max_length,
            around=plan.around,
            progress=True,
            **ctx.chat,
        )
        out["next-token KL (benign)"] = _row([s.value for s in scores], ctx, 11)
        records += _records("next_token_kl", scores, plan, name)
    if "reference" in cfg.tasks:
        refs = held_out.references
        texts = [p.text for p in refs]
        plan = _plan(ctx, loaded, texts)
        scores = cap_fns.reference_answers(
            model,
            tok,
            texts,
            [str(p.response) for p in refs],
            ids=[p.id for p in refs],
            batch_size=cfg.batch_size,
            max_length=cfg.max_length,
            around=plan.around,
            progress=True,
            **ctx.chat,
        )
        nll_sum = np.array([s.extra["nll_sum"] for s in scores], dtype=np.float64)
        tokens = np.array([s.extra["n_tokens"] for s in scores], dtype=np.float64)
        est = bootstrap_ratio(nll_sum, tokens, n_boot=ctx.cfg.n_boot, seed=ctx.cfg.seed + 12)
        out["reference perplexity"] = {
            "value": float(np.exp(est.value)),
            "low": float(np.exp(est.low)),
            "high": float(np.exp(est.high)),
            "n": est.n,
            "n_tokens": int(tokens.sum()),
            "note": "exp of the token-weighted mean NLL of the reference answers; CI by resampling items",
        }
        out["reference KL per token"] = _row([s.extra["kl"] for s in scores], ctx, 13)
        records += _records("reference", scores, plan, name)


def run_capability(
    ctx: EvalContext, loaded: LoadedIntervention, sets: SteerSets
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every configured capability measure under the intervention: ``(rows, per-item records)``."""
    from sae_refusal.data import capability as data
    from sae_refusal.eval import capability as cap_fns

    cfg = ctx.cfg.capability
    model, tok, name = ctx.model, ctx.tokenizer, loaded.name
    out: dict[str, Any] = {}
    records: list[dict[str, Any]] = []
    if "mmlu" in cfg.tasks:
        items = data.load_mmlu(cfg.data_root, split="test", limit=cfg.mmlu_n, seed=cfg.seed)
        dev = data.load_mmlu(cfg.data_root, split="dev")
        plan = _plan(ctx, loaded, [i.question for i in items])
        scores = cap_fns.mmlu(
            model,
            tok,
            items,
            dev,
            k_shot=cfg.mmlu_k_shot,
            batch_size=cfg.batch_size,
            max_length=cfg.max_length,
            around=plan.around,
            progress=True,
        )
        out["MMLU accuracy"] = _row([s.value for s in scores], ctx, 1, k_shot=cfg.mmlu_k_shot)
        records += _records("mmlu", scores, plan, name)
        print(f"  MMLU: {out['MMLU accuracy']['value']:.3f} (n={len(scores)})", flush=True)
    if "gsm8k" in cfg.tasks:
        gsm_items = data.load_gsm8k(cfg.data_root, split="test", limit=cfg.gsm8k_n, seed=cfg.seed)
        shots = data.load_gsm8k(cfg.data_root, split="train", limit=max(cfg.gsm8k_k_shot, 1), seed=cfg.seed)
        plan = _plan(ctx, loaded, [i.question for i in gsm_items])
        scores = cap_fns.gsm8k(
            model,
            tok,
            gsm_items,
            shots,
            k_shot=cfg.gsm8k_k_shot,
            max_new_tokens=cfg.gsm8k_max_new_tokens,
            batch_size=cfg.batch_size,
            around=plan.around,
            progress=True,
            engine=ctx.cfg.generation.engine,
        )
        out["GSM8K exact match"] = _row([s.value for s in scores], ctx, 2, k_shot=cfg.gsm8k_k_shot)
        records += _records("gsm8k", scores, plan, name)
        print(f"  GSM8K: {out['GSM8K exact match']['value']:.3f} (n={len(scores)})", flush=True)
    if "truthfulqa" in cfg.tasks:
        tqa_items = data.load_truthfulqa(cfg.data_root, limit=cfg.truthfulqa_n, seed=cfg.seed)
        plan = _plan(ctx, loaded, [i.question for i in tqa_items])
        scores = cap_fns.truthfulqa_mc(
            model,
            tok,
            tqa_items,
            batch_size=cfg.batch_size,
            max_length=cfg.max_length,
            around=plan.around,
            progress=True,
        )
        out["TruthfulQA MC1"] = _row([s.value for s in scores], ctx, 3)
        out["TruthfulQA MC2"] = _row([s.extra["mc2"] for s in scores], ctx, 4)
        records += _records("truthfulqa", scores, plan, name)
        print(
            f"  TruthfulQA MC1/MC2: {out['TruthfulQA MC1']['value']:.3f} / "
            f"{out['TruthfulQA MC2']['value']:.3f} (n={len(scores)})",
            flush=True,
        )
    _kl_and_reference(ctx, loaded, held_out_prompts(ctx, sets), out, records)
    return out, records


def run_sweep(
    ctx: EvalContext, loaded: LoadedIntervention, sets: SteerSets, prompts: list[Prompt], names: list[str]
) -> list[dict[str, Any]]:
    """Refusal / over-refusal (and KL / reference perplexity) at each (category, alpha) of ``sweep``.

    Raises:
        ValueError: Naming ``sweep.intervention`` when the swept intervention is not residual or latent.
    """
    from dataclasses import replace

    from sae_refusal.eval.context import refusal_stage
    from sae_refusal.eval.interventions import load_intervention
    from sae_refusal.eval.refusal_sets import summarise

    sweep = ctx.cfg.sweep
    base = sweep.intervention or loaded.config
    if base.kind not in ("residual", "latent"):
        raise ValueError(
            f"sweep.intervention: the swept intervention must be residual or latent, got kind {base.kind!r} "
            "(set sweep.intervention)"
        )
    judge = [j for j in ctx.judges if j.name == ctx.primary]
    cap_settings = replace(
        ctx.cfg.capability, tasks=[t for t in ("next_token_kl", "reference") if t in ctx.cfg.capability.tasks]
    )
    sweep_ctx = replace(ctx, cfg=replace(ctx.cfg, capability=cap_settings))
    held_out = held_out_prompts(sweep_ctx, sets) if sweep.capability and cap_settings.tasks else None
    points: list[dict[str, Any]] = []
    cache: dict[float, dict[str, Any]] = {}
    for category in sweep.categories:
        for alpha in sorted({0.0, *sweep.alphas}):
            if alpha == 0.0 and 0.0 in cache:
                points.append({**cache[0.0], "category": category})
                continue
            cfg_i = base.with_alpha(alpha, category)
            loaded_i = load_intervention(cfg_i, ctx.model, fingerprint=ctx.fingerprint)
            records = refusal_stage(
                ctx,
                loaded_i,
                prompts,
                names,
                sets.roles,
                max_new_tokens=sweep.max_new_tokens,
                judges=judge,
                label=f"sweep {category} {alpha:+g}",
            )
            summary = summarise(records, ctx.primary, n_boot=ctx.cfg.n_boot, seed=ctx.cfg.seed)
            point: dict[str, Any] = {
                "category": category,
                "alpha": alpha,
                "harmful": summary["blocks"].get("harmful"),
                "over_refusal": summary["blocks"].get("over_refusal"),
                "sets": {k: v["value"] for k, v in summary["sets"].items()},
            }
            if held_out is not None:
                rows: dict[str, Any] = {}
                _kl_and_reference(sweep_ctx, loaded_i, held_out, rows, [])
                point["next_token_kl"] = rows.get("next-token KL (benign)")
                point["reference_ppl"] = rows.get("reference perplexity")
            if alpha == 0.0:
                cache[0.0] = point
            points.append(point)
            print(
                f"  sweep {category} {alpha:+g}: harmful {point['harmful']['value']:.3f}, "
                f"over-refusal {point['over_refusal']['value']:.3f}",
                flush=True,
            )
    return points
