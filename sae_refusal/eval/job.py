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
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sae_refusal.eval.interventions import InterventionConfig, LoadedIntervention
from sae_refusal.llm.loading import LLMConfig
from sae_refusal.progress import RatePrinter, Stage
from sae_refusal.steer.sets import SetsConfig

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
CAPABILITY_TASKS: tuple[str, ...] = ("mmlu", "gsm8k", "truthfulqa", "next_token_kl", "reference")


@dataclass
class GenerationSettings:
    """How refusal-set answers are generated (greedy).

    Args:
        max_new_tokens: Most tokens per answer (the phrase judge reads these).
        batch_size: Prompts per ``generate`` call.
        max_length: Most prompt tokens kept (longer prompts lose their beginning).
    """

    max_new_tokens: int = 64
    batch_size: int = 32
    max_length: int = 1024

    def __post_init__(self) -> None:
        for key in ("max_new_tokens", "batch_size", "max_length"):
            if getattr(self, key) < 1:
                raise ValueError(f"generation.{key}: must be >= 1, got {getattr(self, key)}")


@dataclass
class JudgeSettings:
    """Which refusal judges run, and whose verdicts make the table.

    Args:
        names: Judges: ``first_token`` (refusal-token models: the first generated token), ``phrase`` (refusal
            phrases in the answer, any model), ``model`` (a local LLM judge or guard classifier,
            ``model_path``).
        primary: The judge whose rates fill the table; ``None``: ``first_token`` when the model has the
            refusal tokens and it is in ``names``, else ``phrase``, else the first name.
        model_path: Folder of the ``model`` judge.
        model_mode: ``auto``, ``classifier`` or ``chat``.
    """

    names: list[str] = field(default_factory=lambda: ["first_token", "phrase"])
    primary: str | None = None
    model_path: str | None = None
    model_mode: str = "auto"

    def __post_init__(self) -> None:
        if not self.names:
            raise ValueError("judges.names: give at least one judge")
        if self.primary is not None and self.primary not in self.names:
            raise ValueError(f"judges.primary: {self.primary!r} is not in judges.names {self.names}")


@dataclass
class CapabilitySettings:
    """Capability measures and their subsample sizes (``None`` = the whole set).

    Args:
        tasks: Some of ``mmlu``, ``gsm8k``, ``truthfulqa``, ``next_token_kl``, ``reference``.
        data_root: Folder of the local MMLU / GSM8K / TruthfulQA copies.
        mmlu_n: MMLU test questions (a seeded draw over all subjects).
        mmlu_k_shot: Dev examples per question (same subject).
        gsm8k_n: GSM8K test problems.
        gsm8k_k_shot: Worked train examples in the prompt.
        gsm8k_max_new_tokens: Most tokens per solution.
        truthfulqa_n: TruthfulQA questions.
        kl_n: Held-out benign prompts for the next-token KL.
        reference_n: Held-out prompts with reference answers for perplexity.
        batch_size: Rows per forward.
        max_length: Most tokens per scored row.
        seed: Seed of the subsample draws.
    """

    tasks: list[str] = field(default_factory=lambda: list(CAPABILITY_TASKS))
    data_root: str = "../shared/data"
    mmlu_n: int | None = 200
    mmlu_k_shot: int = 5
    gsm8k_n: int | None = 50
    gsm8k_k_shot: int = 4
    gsm8k_max_new_tokens: int = 256
    truthfulqa_n: int | None = 200
    kl_n: int | None = 100
    reference_n: int | None = 100
    batch_size: int = 16
    max_length: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in CAPABILITY_TASKS]
        if unknown:
            raise ValueError(
                f"capability.tasks: unknown {unknown}; expected some of {list(CAPABILITY_TASKS)}"
            )
        for key in ("mmlu_n", "gsm8k_n", "truthfulqa_n", "kl_n", "reference_n"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"capability.{key}: must be >= 1 or null, got {value}")
        for key in ("batch_size", "max_length", "gsm8k_max_new_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"capability.{key}: must be >= 1")
        if self.mmlu_k_shot < 0 or self.gsm8k_k_shot < 0:
            raise ValueError("capability.mmlu_k_shot / gsm8k_k_shot: must be >= 0")


@dataclass
class SweepSettings:
    """Alpha sweep of one steering intervention, per category and global.

    Args:
        alphas: Signed alphas (0, the unsteered model, is added); empty: no sweep.
        categories: Category class names of the vectors, and/or ``global``.
        intervention: The swept intervention (residual or latent); ``None``: the job's own.
        max_new_tokens: Tokens generated per prompt at each point (the first-token judge needs one; the
            phrase judge reads these).
        capability: Also measure next-token KL and reference perplexity at each point.
    """

    alphas: list[float] = field(default_factory=list)
    categories: list[str] = field(default_factory=lambda: ["global"])
    intervention: InterventionConfig | None = None
    max_new_tokens: int = 8
    capability: bool = True

    def __post_init__(self) -> None:
        if not all(math.isfinite(a) for a in self.alphas):
            raise ValueError(f"sweep.alphas: must be finite, got {self.alphas}")
        if self.alphas and not self.categories:
            raise ValueError("sweep.categories: give at least one category (or global)")
        if self.max_new_tokens < 1:
            raise ValueError("sweep.max_new_tokens: must be >= 1")


@dataclass
class EvalJobConfig:
    """An eval job (``sae-refusal eval --config lightning_configs/eval/...``).

    Args:
        llm: The model evaluated (``adapter_path`` = a refusal-token artifact, ``null`` for the base model).
        sets: Prompt sets and splits (the model's fine-tuning prompt set and split, so its held-out
            prompts stay held out, and the external sets); only ``test`` splits are reported.
        intervention: What is applied (``kind: none`` = unsteered).
        generation: Generation settings of the refusal sets.
        judges: Refusal judges.
        capability: Capability measures.
        sweep: Optional alpha sweep.
        out_dir: Output folder; must not exist yet.
        chat_template: Template overriding the tokenizer's.
        system_prompt: Optional system message.
        n_boot: Bootstrap resamples per confidence interval.
        seed: Bootstrap seed.
    """

    llm: LLMConfig
    sets: SetsConfig
    intervention: InterventionConfig = field(default_factory=InterventionConfig)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    judges: JudgeSettings = field(default_factory=JudgeSettings)
    capability: CapabilitySettings = field(default_factory=CapabilitySettings)
    sweep: SweepSettings = field(default_factory=SweepSettings)
    out_dir: str = "runs/eval/unsteered"
    chat_template: str | None = None
    system_prompt: str | None = None
    n_boot: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_boot < 1:
            raise ValueError(f"n_boot: must be >= 1, got {self.n_boot}")


def _primary_judge(settings: JudgeSettings, has_tokens: bool) -> str:
    if settings.primary is not None:
        return settings.primary
    if has_tokens and "first_token" in settings.names:
        return "first_token"
    return "phrase" if "phrase" in settings.names else settings.names[0]


@dataclass
class _Context:
    """What every stage needs."""

    cfg: EvalJobConfig
    model: Any
    tokenizer: Any
    resolved: Any
    judges: list[Any]
    primary: str
    fingerprint: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def chat(self) -> dict[str, Any]:
        return {"chat_template": self.cfg.chat_template, "system_prompt": self.cfg.system_prompt}


def _load(
    cfg: EvalJobConfig, timings: dict[str, float], preloaded: tuple[Any, Any] | None = None
) -> _Context:
    from sae_refusal.eval.judges import build_judges
    from sae_refusal.llm.loading import load_model_and_tokenizer, model_fingerprint
    from sae_refusal.llm.refusal_tokens import RefusalVocabulary

    with Stage("eval", "load model" if preloaded is None else "model (already loaded)", timings):
        model, tokenizer = load_model_and_tokenizer(cfg.llm) if preloaded is None else preloaded
        model.eval()
        fingerprint = model_fingerprint(cfg.llm, model)
    try:
        resolved = RefusalVocabulary().resolve(tokenizer)
    except (ValueError, KeyError):
        resolved = None  # a model without the refusal tokens (e.g. the base model)
    names = list(cfg.judges.names)
    if resolved is None and "first_token" in names:
        if cfg.judges.primary == "first_token":
            raise ValueError("judges.primary: first_token needs a model with the refusal tokens")
        names.remove("first_token")
        print("[eval] the model has no refusal tokens: the first_token judge is skipped", flush=True)
    if not names:
        raise ValueError("judges.names: no judge applies to this model (it has no refusal tokens)")
    judges = build_judges(
        names, resolved=resolved, model_path=cfg.judges.model_path, model_mode=cfg.judges.model_mode
    )
    primary = _primary_judge(JudgeSettings(names=names, primary=cfg.judges.primary), resolved is not None)
    return _Context(cfg, model, tokenizer, resolved, judges, primary, fingerprint, timings)


def _refusal_stage(
    ctx: _Context,
    loaded: LoadedIntervention,
    prompts: list[Any],
    names: list[str],
    roles: dict[str, str],
    *,
    max_new_tokens: int,
    judges: list[Any] | None = None,
    label: str | None = None,
) -> list[Any]:
    from sae_refusal.eval.refusal_sets import generate_items

    cfg = ctx.cfg
    plan = loaded.plan(
        ctx.tokenizer,
        [p.text for p in prompts],
        batch_size=cfg.generation.batch_size,
        max_length=cfg.generation.max_length,
        **ctx.chat,
    )
    return generate_items(
        ctx.model,
        ctx.tokenizer,
        prompts,
        names,
        roles,
        plan,
        ctx.judges if judges is None else judges,
        intervention=label or loaded.name,
        max_new_tokens=max_new_tokens,
        batch_size=cfg.generation.batch_size,
        max_length=cfg.generation.max_length,
        progress=RatePrinter(f"generate ({label or loaded.name})"),
        **ctx.chat,
    )


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
    ctx = _load(cfg, timings, preloaded)
    loaded = load_intervention(cfg.intervention, ctx.model, fingerprint=ctx.fingerprint)
    print(
        f"[eval] intervention: {loaded.name}; judges: {[j.name for j in ctx.judges]} (table: {ctx.primary})"
    )
    with Stage("eval", f"refusal sets ({len(prompts)} test prompts)", timings):
        records = _refusal_stage(
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
