"""What every stage of an eval job shares: the loaded model and judges (:class:`EvalContext`), and the
refusal stage (generate + judge a list of prompts under one intervention).

Below both :mod:`sae_refusal.eval.job` (which runs the stages) and :mod:`sae_refusal.eval.capability_stage`
(the capability measures and the alpha sweep, which reruns the refusal stage per point), so neither imports
the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sae_refusal.eval.config import EvalJobConfig, JudgeSettings
from sae_refusal.eval.interventions import LoadedIntervention
from sae_refusal.progress import RatePrinter, Stage

__all__ = ["EvalContext", "load_context", "primary_judge", "refusal_stage"]


def primary_judge(settings: JudgeSettings, has_tokens: bool) -> str:
    if settings.primary is not None:
        return settings.primary
    if has_tokens and "first_token" in settings.names:
        return "first_token"
    return "phrase" if "phrase" in settings.names else settings.names[0]


@dataclass
class EvalContext:
    """What every stage of an eval job needs: the config, the model, its refusal tokens, the judges."""

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


def load_context(
    cfg: EvalJobConfig, timings: dict[str, float], preloaded: tuple[Any, Any] | None = None
) -> EvalContext:
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
    primary = primary_judge(JudgeSettings(names=names, primary=cfg.judges.primary), resolved is not None)
    return EvalContext(cfg, model, tokenizer, resolved, judges, primary, fingerprint, timings)


def refusal_stage(
    ctx: EvalContext,
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
        engine=cfg.generation.engine,
        **ctx.chat,
    )
