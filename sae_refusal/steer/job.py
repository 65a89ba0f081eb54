"""``sae-refusal steer``: the steering study on a refusal-token model, from prompts to a report.

Stages (each prints its time; the sweeps print prompts/s and an ETA):

1. **Vectors.** Last-token residuals of the TRAIN split (harmful per category vs benign) at each candidate
   layer; CAA vectors per category and the pooled (global) one.
2. **Layer.** Unless ``study.layer`` is set: on VALIDATION benign prompts, each category's vector at each
   specificity alpha; the chosen layer is the one whose best single alpha has the highest *minimum*
   specificity over categories (ties: the earlier layer), the alpha is the smallest reaching
   ``specificity_goal`` at that layer (else the best one).
3. **Specificity** on TEST benign prompts at that layer and alpha: the confusion table (steered category x
   first token). **Ablation**: each category's CAA direction projected out of every layer from the chosen
   one; the category's refusal on its TEST harmful prompts before and after.
4. **Outcome tables.** Every validation and test prompt's decision under each alpha of ``sweep_alphas``
   along the global vector (one pass per alpha; alpha 0 is the unsteered model). Unconditional steering and
   every gate's policy are read from these tables, so no gate reruns the model.
5. **Gates** (``study.gates``), fitted on TRAIN splits (the model's sources and the external sets' own train
   splits), tuned on VALIDATION tables (least over-refusal subject to the harmful-refusal floor: the
   unsteered validation rate + ``floor_gain``), evaluated on TEST: chosen policy, Pareto front on test,
   precision / recall of the harmful call.
6. **Report**: ``metrics.json``, ``report.md``, ``pareto.png``, TensorBoard scalars; the vectors
   (``vectors/``), each tuned gate (``gates/<kind>/``) and the outcome tables (``tables.safetensors``).

Everything is written into a temporary sibling of ``out_dir`` and renamed at the end, so a failed or
interrupted run leaves nothing half-written, and an existing ``out_dir`` is never overwritten.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from sae_refusal.atomic import AtomicFolder
from sae_refusal.data.prompt_set import Prompt
from sae_refusal.features.vectors import SteeringVectors
from sae_refusal.llm.loading import load_model_and_tokenizer, model_fingerprint
from sae_refusal.llm.refusal_tokens import RefusalVocabulary
from sae_refusal.progress import RatePrinter, Stage
from sae_refusal.steer.config import SteerJobConfig, StudySettings
from sae_refusal.steer.gates import (
    DistanceGate,
    GatedSteering,
    ProbeGate,
    RefusalTokenGate,
    gate_metrics,
    global_vector,
)
from sae_refusal.steer.scoring import JUDGES
from sae_refusal.steer.sets import build_steer_sets, is_harmful
from sae_refusal.steer.study import (
    caa_by_category,
    direction_ablation_rates,
    last_token_acts,
    specificity_table,
)
from sae_refusal.steer.tuning import (
    OutcomeTable,
    PolicyPoint,
    build_outcome_table,
    evaluate_policy,
    policy_columns,
    tune_policy,
    unconditional_curve,
)

__all__ = ["SteerJobConfig", "StudySettings", "run_steer_job"]

log = logging.getLogger(__name__)


def _texts(prompts: Sequence[Prompt]) -> list[str]:
    return [p.text for p in prompts]


def _class_codes(prompts: Sequence[Prompt], class_names: Sequence[str], short: dict[str, str]) -> Tensor:
    """0 for benign / ambiguous prompts, the category's class code for harmful ones."""
    codes = []
    for prompt in prompts:
        if not is_harmful(prompt):
            codes.append(0)
        else:
            codes.append(class_names.index(short[str(prompt.category)]))
    return torch.tensor(codes)


def _judged(tables: tuple[Tensor, Tensor], judge: str) -> Tensor:
    """The restricted or the emitted confusion table of :func:`specificity_table`."""
    return tables[0] if judge == "restricted" else tables[1]


def _specificities(table: Tensor, n: int) -> list[float]:
    """Per category: the share of ``n`` steered prompts whose token is the category's (confusion table)."""
    return [float(table[c, c + 1]) / n for c in range(table.shape[0])]


def _choose_layer(tables: dict[int, dict[float, Tensor]], n: int, goal: float) -> tuple[int, float, float]:
    """(layer, alpha, min specificity) by the rule in the module notes."""
    best: tuple[float, int, float] | None = None
    for layer, by_alpha in tables.items():
        for alpha, table in sorted(by_alpha.items()):
            spec = min(_specificities(table, n))
            if best is None or spec > best[0] + 1e-12:
                best = (spec, layer, alpha)
    assert best is not None  # layers and alphas are non-empty (checked in StudySettings)
    layer = best[1]
    reaching = [a for a, t in sorted(tables[layer].items()) if min(_specificities(t, n)) >= goal]
    alpha = reaching[0] if reaching else best[2]
    return layer, alpha, min(_specificities(tables[layer][alpha], n))


def _per_set_rates(table: OutcomeTable, column_N: Tensor) -> dict[str, dict[str, float]]:
    refused = table.refused_NA[torch.arange(column_N.shape[0]), column_N]
    out: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(table.groups):
        mask = torch.tensor([g == name for g in table.groups])
        out[name] = {"refused": float(refused[mask].float().mean()), "n": int(mask.sum())}
    return out


def _table(
    model: Any,
    tokenizer: Any,
    resolved: Any,
    prompts: list[Prompt],
    groups: list[str],
    cfg: SteerJobConfig,
    layer: int,
    vector_D: Tensor,
    split: str,
) -> OutcomeTable:
    alphas = sorted({0.0, *cfg.study.sweep_alphas})
    rate = RatePrinter(f"{split} outcome table ({len(prompts)} prompts)", len(prompts))
    start = time.perf_counter()
    table = build_outcome_table(
        model,
        tokenizer,
        _texts(prompts),
        resolved,
        layer=layer,
        vectors_ND=vector_D,
        alphas=alphas,
        harmful_N=torch.tensor([is_harmful(p) for p in prompts]),
        groups=groups,
        batch_size=cfg.study.batch_size,
        chat_template=cfg.chat_template,
        system_prompt=cfg.system_prompt,
        progress=rate,
        judge=cfg.study.judge,
    )
    log.debug("table %s: %.1f s", split, time.perf_counter() - start)
    return table


def run_steer_job(cfg: SteerJobConfig) -> dict[str, Any]:
    """Run the study (see the module notes) and return its metrics (also written to ``metrics.json``).

    Raises:
        FolderClaimedError: If ``out_dir`` exists or another job is writing it (naming it).
    """
    from sae_refusal.atomic import FolderClaim

    with FolderClaim(cfg.out_dir, key="out_dir"):  # owned from start to commit: a second job fails at once
        return _run_steer_job(cfg)


def _run_steer_job(cfg: SteerJobConfig) -> dict[str, Any]:
    out_dir = Path(cfg.out_dir)
    job_start = time.perf_counter()
    study = cfg.study
    with Stage("steer", "load model and prompt sets"):
        model, tokenizer = load_model_and_tokenizer(cfg.llm)
        model.eval()
        resolved = RefusalVocabulary().resolve(tokenizer)
        sets = build_steer_sets(cfg.sets)
        fingerprint = model_fingerprint(cfg.llm, model)
    categories = [c for c in resolved.categories if c is not None]
    short = {str(c): name for c, name in zip(resolved.categories, resolved.class_names, strict=True) if c}
    class_names = ["benign", *[short[c] for c in categories]]
    kw: dict[str, Any] = dict(chat_template=cfg.chat_template, system_prompt=cfg.system_prompt)

    harmful_train = sets.get("train", cfg.sets.harmful_source)
    benign_train = sets.get("train", cfg.sets.benign_source)
    if study.max_benign_train is not None and len(benign_train) > study.max_benign_train:
        generator = torch.Generator().manual_seed(cfg.sets.seed)
        keep = torch.randperm(len(benign_train), generator=generator)[: study.max_benign_train]
        benign_train = [benign_train[i] for i in sorted(keep.tolist())]
    with Stage(
        "steer",
        f"train residuals at layers {study.layers} ({len(harmful_train) + len(benign_train)} prompts)",
    ):
        acts_h = last_token_acts(model, tokenizer, _texts(harmful_train), study.layers, **kw)
        acts_b = last_token_acts(model, tokenizer, _texts(benign_train), study.layers, **kw)
    vectors: dict[int, tuple[Tensor, Tensor]] = {
        layer: caa_by_category(
            acts_h[layer], [str(p.category) for p in harmful_train], acts_b[layer], categories
        )
        for layer in acts_h
    }
    counts_C = torch.tensor([sum(str(p.category) == c for p in harmful_train) for c in categories])

    select_texts = _texts(sets.get("val", cfg.sets.benign_source)[: study.select_n])
    selection: dict[int, dict[float, Tensor]] = {}
    if study.layer is None:
        with Stage("steer", f"choose the layer ({len(select_texts)} validation benign prompts)"):
            for layer in vectors:
                selection[layer] = {}
                for alpha in study.specificity_alphas:
                    selection[layer][alpha] = _judged(
                        specificity_table(
                            model,
                            tokenizer,
                            resolved,
                            select_texts,
                            vectors[layer][0],
                            layer,
                            alpha,
                            batch_size=study.batch_size,
                        ),
                        study.judge,
                    )
                spec = {
                    a: [round(x, 3) for x in _specificities(t, len(select_texts))]
                    for a, t in selection[layer].items()
                }
                print(f"  layer {layer}: specificity per alpha {spec}", flush=True)
        layer, alpha, val_spec = _choose_layer(selection, len(select_texts), study.specificity_goal)
    else:
        layer = study.layer
        if layer not in vectors:
            raise ValueError(f"study.layer: {layer} is not among study.layers {study.layers}")
        alpha, val_spec = study.specificity_alphas[0], float("nan")
    vectors_CD, pooled_D = vectors[layer]
    global_D = global_vector(vectors_CD, counts_C)
    print(f"[steer] layer {layer}, specificity alpha {alpha} (validation min specificity {val_spec:.3f})")

    test_benign = _texts(sets.get("test", cfg.sets.benign_source))
    with Stage("steer", f"specificity on {len(test_benign)} test benign prompts"):
        both = specificity_table(
            model,
            tokenizer,
            resolved,
            test_benign,
            vectors_CD,
            layer,
            alpha,
            batch_size=study.batch_size,
            progress=RatePrinter("specificity", len(test_benign)),
        )
    confusion = _judged(both, study.judge)
    specificity = dict(zip(class_names[1:], _specificities(confusion, len(test_benign)), strict=True))

    held_out = sets.get("test", cfg.sets.harmful_source)
    by_category = {c: [p.text for p in held_out if p.category == c] for c in categories}
    with Stage("steer", f"direction ablation on {len(held_out)} test harmful prompts"):
        ablation = direction_ablation_rates(
            model,
            tokenizer,
            resolved,
            by_category,
            vectors_CD,
            categories,
            layer,
            batch_size=study.batch_size,
            judge=study.judge,
        )

    val_prompts, val_groups = sets.with_set_names("val")
    test_prompts, test_groups = sets.with_set_names("test")
    with Stage("steer", "outcome tables (validation and test)"):
        tables = {
            "val": _table(model, tokenizer, resolved, val_prompts, val_groups, cfg, layer, global_D, "val"),
            "test": _table(
                model, tokenizer, resolved, test_prompts, test_groups, cfg, layer, global_D, "test"
            ),
        }

    gates_out: dict[str, Any] = {}
    fitted: dict[str, GatedSteering] = {}
    needs_residuals = any(g in ("probe", "distance") for g in study.gates)
    residuals: dict[str, Tensor] = {}
    if needs_residuals:
        train_prompts = harmful_train + benign_train
        for name in sets.splits["train"]:
            if name not in (cfg.sets.harmful_source, cfg.sets.benign_source):
                train_prompts = train_prompts + sets.get("train", name)
        with Stage("steer", f"gate residuals at layer {layer}"):
            residuals["train"] = last_token_acts(model, tokenizer, _texts(train_prompts), [layer], **kw)[
                layer
            ]
            residuals["val"] = last_token_acts(model, tokenizer, _texts(val_prompts), [layer], **kw)[layer]
            residuals["test"] = last_token_acts(model, tokenizer, _texts(test_prompts), [layer], **kw)[layer]
        y_train = _class_codes(train_prompts, class_names, short)
    val_unsteered = tables["val"].refused_NA[:, tables["val"].alpha_index(0.0)]
    floor = min(1.0, float(val_unsteered[tables["val"].harmful_N].float().mean()) + study.floor_gain)
    for kind in study.gates:
        with Stage("steer", f"gate {kind}"):
            scores: dict[str, Tensor] = {}
            gate: Any
            if kind == "refusal_token":
                gate = RefusalTokenGate(class_names)
                for split, table in tables.items():  # the unsteered column is the gate's own reading
                    scores[split] = table.refused_NA[:, table.alpha_index(0.0)].float()
            else:
                fit = ProbeGate.fit if kind == "probe" else DistanceGate.fit
                gate = fit(residuals["train"], y_train, class_names, layer=layer)
                for split in tables:
                    scores[split] = gate.score(residuals[split]).score_N
            try:
                result = tune_policy(tables["val"], scores["val"], floor=floor, vector="global")
            except ValueError as err:
                gates_out[kind] = {"error": str(err)}
                print(f"  {kind}: no policy reaches the floor {floor:.3f} on validation ({err})")
                continue
            test_point = evaluate_policy(tables["test"], scores["test"], result.policy)
            test_front = [evaluate_policy(tables["test"], scores["test"], p.policy) for p in result.front]
            harmful_test = tables["test"].harmful_N
            gates_out[kind] = {
                "policy": asdict(result.policy),
                "val": _flat(result.chosen),
                "test": _flat(test_point),
                "test_per_set": _per_set_rates(
                    tables["test"], policy_columns(tables["test"], scores["test"], result.policy)
                ),
                "front_test": [_flat(p) for p in test_front],
                "harmful_call_test": asdict(gate_metrics(scores["test"], harmful_test)),
            }
            fitted[kind] = GatedSteering(
                gate,
                result.policy,
                layer,
                vectors_CD,
                global_D,
                class_names,
                provenance=result.provenance(sets=sets.manifest(), model_fingerprint=fingerprint),
            )

    unconditional = {
        split: [{"alpha": p.alpha, **asdict(p.rates)} for p in unconditional_curve(tables[split])]
        for split in tables
    }
    zero = {split: tables[split].alpha_index(0.0) for split in tables}
    unsteered = {
        split: _per_set_rates(tables[split], torch.full((len(tables[split].groups),), zero[split]))
        for split in tables
    }
    metrics: dict[str, Any] = {
        "model": fingerprint,
        "layer": layer,
        "specificity_alpha": alpha,
        "specificity_val_min": val_spec,
        "specificity_test": specificity,
        "judge": study.judge,
        "confusion_test": {
            "rows": class_names[1:],
            "columns": list(resolved.class_names) + (["other"] if study.judge == "emitted" else []),
            "counts": confusion.tolist(),
            "n": len(test_benign),
        },
        "specificity_test_by_judge": {
            judge: dict(
                zip(class_names[1:], _specificities(_judged(both, judge), len(test_benign)), strict=True)
            )
            for judge in JUDGES
        },
        "ablation_test": {short[c]: r for c, r in ablation.items()},
        "layer_selection": {
            str(lay): {str(a): t.tolist() for a, t in by_alpha.items()} for lay, by_alpha in selection.items()
        },
        "floor": floor,
        "unsteered": unsteered,
        "unconditional": unconditional,
        "gates": gates_out,
        "sets": sets.manifest(),
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
        "wall_s": None,
    }
    metrics["wall_s"] = round(time.perf_counter() - job_start, 1)
    with AtomicFolder(out_dir, replace=False) as out:
        SteeringVectors(
            class_names=class_names,
            caa_CD=vectors_CD,
            metadata={
                "layer": layer,
                "d_model": int(vectors_CD.shape[-1]),
                "model": fingerprint.get("model"),
                "model_fingerprint": fingerprint,
                "global_D": "tables.safetensors",
            },
        ).save(out.tmp / "vectors")
        for kind, steering in fitted.items():
            steering.save(out.tmp / "gates" / kind)
        tensors = {"global_D": global_D.contiguous(), "pooled_D": pooled_D.contiguous()}
        for split, table in tables.items():
            tensors[f"{split}_refused_NA"] = table.refused_NA.to(torch.uint8).contiguous()
            tensors[f"{split}_alphas_A"] = table.alphas_A.contiguous()
        save_file(tensors, str(out.tmp / "tables.safetensors"))
        (out.tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (out.tmp / "report.md").write_text(render_report(metrics))
        _plot(metrics, out.tmp / "pareto.png")
        _tensorboard(metrics, out.tmp / "tensorboard")
        out.commit()
    print(f"[steer] wrote {out_dir}/ (metrics.json, report.md, pareto.png, vectors/, gates/, tensorboard/)")
    print(render_headline(metrics))
    return metrics


def _flat(point: PolicyPoint) -> dict[str, Any]:
    return {**asdict(point.rates), "n_steered": point.n_steered, "policy": point.policy.to_dict()}


def render_headline(metrics: dict[str, Any]) -> str:
    """The few numbers the job ends with."""
    lines = [
        f"layer {metrics['layer']}, alpha {metrics['specificity_alpha']}: test specificity "
        + ", ".join(f"{k} {v:.2f}" for k, v in metrics["specificity_test"].items()),
    ]
    zero = next(p for p in metrics["unconditional"]["test"] if p["alpha"] == 0.0)
    over, harmful = zero["over_refusal"], zero["harmful_refusal"]
    lines.append(f"unsteered test: over-refusal {over:.3f}, harmful refusal {harmful:.3f}")
    for kind, out in metrics["gates"].items():
        if "test" in out:
            t = out["test"]
            lines.append(
                f"gate {kind}: test over-refusal {t['over_refusal']:.3f}, harmful refusal "
                f"{t['harmful_refusal']:.3f} (policy {out['policy']})"
            )
        else:
            lines.append(f"gate {kind}: {out['error']}")
    return "\n".join(lines)


def render_report(metrics: dict[str, Any]) -> str:
    """``report.md``: specificity, unsteered rates, unconditional curve and each gate on test."""
    confusion = metrics["confusion_test"]
    lines = [
        "# Steering study",
        "",
        f"Model: `{metrics['model'].get('model')}` (adapter {metrics['model'].get('adapter', '-')}), "
        f"layer {metrics['layer']}, wall time {metrics['wall_s']} s; first-token judge: {metrics['judge']}.",
        "",
        f"## Specificity (test benign, n = {confusion['n']}, alpha {metrics['specificity_alpha']})",
        "",
        "| steered with | " + " | ".join(metrics["confusion_test"]["columns"]) + " | specificity |",
        "|---" * (len(metrics["confusion_test"]["columns"]) + 2) + "|",
    ]
    for row, counts in zip(
        metrics["confusion_test"]["rows"], metrics["confusion_test"]["counts"], strict=True
    ):
        spec = metrics["specificity_test"][row]
        lines.append(f"| {row} | " + " | ".join(str(c) for c in counts) + f" | {spec:.2f} |")
    lines += [
        "",
        f"## Direction ablation (each category's CAA direction removed from layers >= {metrics['layer']})",
        "",
        "| category | n | refused before | after | own token before | after |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in metrics["ablation_test"].items():
        lines.append(
            f"| {name} | {r['n']} | {r['refused_before']:.3f} | {r['refused_after']:.3f} | "
            f"{r['own_token_before']:.3f} | {r['own_token_after']:.3f} |"
        )
    lines += ["", "## Unsteered refusal rates (test)", "", "| set | refused | n |", "|---|---|---|"]
    for name, r in metrics["unsteered"]["test"].items():
        lines.append(f"| {name} | {r['refused']:.3f} | {r['n']} |")
    lines += [
        "",
        "## Unconditional steering along the global vector (test; pooled sets)",
        "",
        "| alpha | over-refusal | harmful refusal |",
        "|---|---|---|",
    ]
    for p in metrics["unconditional"]["test"]:
        lines.append(f"| {p['alpha']} | {p['over_refusal']:.3f} | {p['harmful_refusal']:.3f} |")
    lines += [
        "",
        f"## Conditional steering (tuned on validation, floor {metrics['floor']:.3f}; test)",
        "",
        "| gate | policy | over-refusal | harmful refusal | harmful-call precision / recall |",
        "|---|---|---|---|---|",
    ]
    for kind, out in metrics["gates"].items():
        if "test" not in out:
            lines.append(f"| {kind} | {out['error']} | | | |")
            continue
        t, p, call = out["test"], out["policy"], out["harmful_call_test"]
        policy = f"t {p['t_low']:.3f}/{p['t_high']:.3f}, +{p['alpha_pos']} / -{p['alpha_neg']}"
        lines.append(
            f"| {kind} | {policy} | {t['over_refusal']:.3f} | {t['harmful_refusal']:.3f} | "
            f"{call['precision']:.2f} / {call['recall']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _plot(metrics: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    curve = metrics["unconditional"]["test"]
    ax.plot(
        [p["over_refusal"] for p in curve],
        [p["harmful_refusal"] for p in curve],
        "k-o",
        label="unconditional",
    )
    for p in curve:
        ax.annotate(f"{p['alpha']:+g}", (p["over_refusal"], p["harmful_refusal"]), fontsize=7)
    for kind, out in metrics["gates"].items():
        if "front_test" in out:
            front = sorted(out["front_test"], key=lambda q: q["over_refusal"])
            ax.plot(
                [q["over_refusal"] for q in front], [q["harmful_refusal"] for q in front], ".-", label=kind
            )
    ax.set_xlabel("over-refusal (test, pooled)")
    ax.set_ylabel("harmful refusal (test, pooled)")
    ax.set_title(f"layer {metrics['layer']}: conditional vs unconditional steering")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _tensorboard(metrics: dict[str, Any], folder: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    for name, value in metrics["specificity_test"].items():
        writer.add_scalar(f"specificity/{name}", value)
    for step, p in enumerate(metrics["unconditional"]["test"]):
        writer.add_scalar("unconditional/over_refusal", p["over_refusal"], step)
        writer.add_scalar("unconditional/harmful_refusal", p["harmful_refusal"], step)
    for kind, out in metrics["gates"].items():
        if "test" in out:
            writer.add_scalar(f"gate/{kind}/over_refusal", out["test"]["over_refusal"])
            writer.add_scalar(f"gate/{kind}/harmful_refusal", out["test"]["harmful_refusal"])
    writer.close()
