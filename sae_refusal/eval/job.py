"""``sae-refusal eval``: refusal, over-refusal and capability of one model under one intervention.

One job = one column of the results table: a model (base LLM, refusal-token checkpoint, any HF causal LM) and
one :class:`~sae_refusal.eval.interventions.InterventionConfig` (unsteered, residual / SAS / latent steering,
ablation, a saved conditional gate), read from saved artifacts only. Stages (each prints its time; generation
prints prompts/s and an ETA):

1. **Refusal sets** (held-out ``test`` splits only, :mod:`sae_refusal.steer.sets`): CoCoNot H_c per category,
   OR-Bench toxic, WildGuardTest harmful (harmful refusal); CoCoNot contrast, OR-Bench hard-1k, WildGuardTest
   unharmful and held-out Alpaca (over-refusal). Greedy answers with the intervention in the path, every
   judge on every item (:mod:`sae_refusal.eval.judges`), rows with bootstrap CIs and item counts, judge
   agreement (:mod:`sae_refusal.eval.refusal_sets`).
2. **Capability** with the intervention at every position it acts on (:mod:`sae_refusal.eval.capability`):
   MMLU (k-shot log-likelihood of the answer letter), GSM8K (k-shot generation, exact match), TruthfulQA
   MC1 / MC2, the mean KL of the first-response-token distribution (steered vs unsteered) on held-out benign
   prompts, and the perplexity of reference answers (held-out CoCoNot contrast ``chosen`` and UltraChat
   answers of the model's own split) with the KL over their tokens. Subsample sizes are config keys; the
   item count is printed beside every score.
3. **Sweep** (optional, ``sweep.alphas``): the intervention at each alpha, per category and global; refusal
   and over-refusal (first-token judge, short generations) and KL / reference perplexity per point; curves and
   a Pareto plot.
4. **Report**: ``metrics.json`` (config, model fingerprint, intervention provenance, set manifest, every
   summary), ``report.md`` with tables and figures (PNG), ``generations.jsonl`` (one line per item: id, set,
   intervention, output, each judge's label) and ``capability.jsonl`` (per-item scores), TensorBoard scalars
   and figures under ``tensorboard/``.

Everything is written into a temporary sibling of ``out_dir`` and renamed at the end, so a failed run leaves
nothing half-written and an existing ``out_dir`` is never overwritten. Decoding is greedy and every bootstrap
is seeded, so a rerun with the same config gives the same numbers (timings aside, kept under ``timings``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sae_refusal.eval.config import (
    CAPABILITY_TASKS,
    CapabilitySettings,
    EvalJobConfig,
    GenerationSettings,
    JudgeSettings,
    SweepSettings,
)
from sae_refusal.eval.context import load_context, refusal_stage
from sae_refusal.progress import Stage

__all__ = [
    "CAPABILITY_TASKS",
    "CapabilitySettings",
    "EvalJobConfig",
    "GenerationSettings",
    "JudgeSettings",
    "SweepSettings",
    "run_eval_job",
]

log = logging.getLogger(__name__)


#: Capability measures a job may run.
def run_eval_job(cfg: EvalJobConfig, *, preloaded: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Run the job (see the module notes); returns its metrics (also in ``metrics.json``).

    Args:
        cfg: The job.
        preloaded: ``(model, tokenizer)`` already loaded from ``cfg.llm`` (jobs that run several columns on
            one model, e.g. ``sae-refusal transfer``); ``None`` loads them. The caller vouches that they are
            ``cfg.llm``'s: the fingerprint recorded is computed from ``cfg.llm``.

    Raises:
        FolderClaimedError: If ``out_dir`` exists or another job is writing it (naming it).
    """
    from sae_refusal.atomic import FolderClaim

    with FolderClaim(cfg.out_dir, key="out_dir"):  # owned from start to commit: a second job fails at once
        return _run_eval_job(cfg, preloaded=preloaded)


def _run_eval_job(cfg: EvalJobConfig, *, preloaded: tuple[Any, Any] | None = None) -> dict[str, Any]:
    from sae_refusal.atomic import AtomicFolder
    from sae_refusal.eval import capability_stage, report
    from sae_refusal.eval.interventions import load_intervention
    from sae_refusal.eval.refusal_sets import summarise
    from sae_refusal.steer.sets import build_steer_sets

    out_dir = Path(cfg.out_dir)
    job_start = time.perf_counter()
    timings: dict[str, float] = {}
    with Stage("eval", "prompt sets", timings):
        sets = build_steer_sets(cfg.sets)
        prompts, names = sets.with_set_names("test")
    ctx = load_context(cfg, timings, preloaded)
    loaded = load_intervention(cfg.intervention, ctx.model, fingerprint=ctx.fingerprint)
    print(
        f"[eval] intervention: {loaded.name}; judges: {[j.name for j in ctx.judges]} (table: {ctx.primary})"
    )
    with Stage("eval", f"refusal sets ({len(prompts)} test prompts)", timings):
        records = refusal_stage(
            ctx, loaded, prompts, names, sets.roles, max_new_tokens=cfg.generation.max_new_tokens
        )
        refusal = summarise(records, ctx.primary, n_boot=cfg.n_boot, seed=cfg.seed)
    capability: dict[str, Any] = {}
    capability_records: list[dict[str, Any]] = []
    if cfg.capability.tasks:
        with Stage("eval", "capability", timings):
            capability, capability_records = capability_stage.run_capability(ctx, loaded, sets)
    sweep: list[dict[str, Any]] = []
    if cfg.sweep.alphas:
        with Stage("eval", "sweep", timings):
            sweep = capability_stage.run_sweep(ctx, loaded, sets, prompts, names)
    metrics: dict[str, Any] = {
        "intervention": loaded.record,
        "model": {"llm": asdict(cfg.llm), "fingerprint": ctx.fingerprint},
        "sets": sets.manifest()["test"],
        "judges": {"names": [j.name for j in ctx.judges], "primary": ctx.primary},
        "refusal": refusal,
        "capability": capability,
        "sweep": sweep,
        "config": _jsonable(asdict(cfg)),
    }
    token_report = None
    if ctx.resolved is not None and any(j.name == "first_token" for j in ctx.judges):
        from sae_refusal.eval.refusal_sets import token_report as make_token_report

        token_report = make_token_report(records, prompts, ctx.resolved)
        metrics["refusal_token_report"] = {
            "accuracy": token_report.accuracy,
            "macro_f1": token_report.macro_f1,
            "n": token_report.n,
            "not_a_refusal_token_rate": token_report.not_a_refusal_token_rate,
        }
    with Stage("eval", "report", timings), AtomicFolder(out_dir, replace=False) as out:
        report.write_outputs(out.tmp, metrics, records, capability_records)
        if token_report is not None:
            token_report.save(out.tmp / "refusal_token_report")
        metrics["timings"] = {**timings, "total": round(time.perf_counter() - job_start, 2)}
        (out.tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        out.commit()
    print(report.headline(metrics, out_dir), flush=True)
    return metrics


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
