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
5. **Gates** (``study.gates``; :mod:`sae_refusal.steer.gate_study`), fitted on TRAIN splits (the model's
   sources and the external sets' own train splits), calibrated and tuned on VALIDATION tables (least
   over-refusal subject to the harmful-refusal floor, the unsteered validation rate + ``floor_gain``, and
   to do no harm per harmful set), evaluated on TEST: chosen policy, Pareto front on test, per-set paired
   differences against unsteered with bootstrap CIs, the jailbreak-framed slice, precision / recall of the
   harmful call, and the best gate's misrouted harmful prompts.
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
from sae_refusal.steer.framing import framings, is_jailbreak_framed
from sae_refusal.steer.gate_sae import train_gate_sae
from sae_refusal.steer.gate_study import (
    GateInputs,
    compose_category_table,
    do_no_harm_report,
    fit_gates,
    harm_group_masks,
    misrouted,
)
from sae_refusal.steer.gates import GatedSteering, GateScores, gate_metrics, global_vector
from sae_refusal.steer.scoring import JUDGES, first_token_decisions, residual_rows
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
    table_decisions,
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


def _decisions(model: Any, tokenizer: Any, resolved: Any, prompts: list[Prompt], cfg: SteerJobConfig) -> Any:
    return first_token_decisions(
        model,
        tokenizer,
        _texts(prompts),
        resolved,
        batch_size=cfg.study.batch_size,
        chat_template=cfg.chat_template,
        system_prompt=cfg.system_prompt,
        judge=cfg.study.judge,
    )


def _gate_stage(
    cfg: SteerJobConfig,
    model: Any,
    tokenizer: Any,
    resolved: Any,
    sets: Any,
    tables: dict[str, OutcomeTable],
    layer: int,
    vectors_CD: Tensor,
    global_D: Tensor,
    class_names: list[str],
    short: dict[str, str],
    fingerprint: dict[str, Any],
    harmful_train: list[Prompt],
    benign_train: list[Prompt],
    val_prompts: list[Prompt],
    test_prompts: list[Prompt],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Fit, calibrate, tune (do no harm) and report every gate (:mod:`sae_refusal.steer.gate_study`)."""
    study = cfg.study
    kw: dict[str, Any] = dict(chat_template=cfg.chat_template, system_prompt=cfg.system_prompt)
    prompts = {"val": val_prompts, "test": test_prompts}
    gate_layers = sorted({*(study.gate_layers or study.layers), layer})
    train_prompts = harmful_train + benign_train
    model_only = [True] * len(train_prompts)
    for name in sets.splits["train"]:
        if name not in (cfg.sets.harmful_source, cfg.sets.benign_source):
            extra = sets.get("train", name)
            train_prompts, model_only = train_prompts + extra, model_only + [False] * len(extra)
    facts: dict[str, Any] = {
        "gate_train_sets": sorted({p.source for p in train_prompts}),
        "gate_layers": gate_layers,
    }
    acts: dict[str, dict[int, Tensor]] = {}
    with Stage("steer", f"gate residuals at layers {gate_layers}"):
        acts["train"] = last_token_acts(model, tokenizer, _texts(train_prompts), gate_layers, **kw)
        for split in ("val", "test"):
            acts[split] = last_token_acts(model, tokenizer, _texts(prompts[split]), gate_layers, **kw)
    with Stage("steer", "unsteered first tokens (refusal-token gate)"):
        decisions = {split: _decisions(model, tokenizer, resolved, prompts[split], cfg) for split in prompts}
    y_train = _class_codes(train_prompts, class_names, short)
    harmful = {split: tables[split].harmful_N for split in prompts}
    sae = sae_path = None
    if any(kind in ("probe_sae", "head") for kind in study.gates):
        with Stage("steer", f"SAE at layer {layer} on {len(train_prompts)} train residuals"):
            device = next(model.parameters()).device
            sae, sae_report = train_gate_sae(
                acts["train"][layer],
                n_latents=study.gate_sae_latents,
                k=study.gate_sae_k,
                steps=study.gate_sae_steps,
                seed=cfg.sets.seed,
                device=device,
            )
            sae_path = str(Path(cfg.out_dir) / "gate_sae")
            facts["gate_sae"] = {**sae_report, "layer": layer, "path": sae_path}
            print(
                f"  SAE: FVU {sae_report['fvu']:.3f}, L0 {sae_report['l0']:.1f}, "
                f"dead {sae_report['dead_share']:.2f}"
            )
    with Stage("steer", f"fit gates {study.gates}"):
        inputs = GateInputs(
            acts=acts,
            y_train=y_train,
            model_only_train=torch.tensor(model_only),
            harmful=harmful,
            decisions=decisions,
            categories=list(resolved.categories),
            class_names=class_names,
            layer=layer,
            gate_layers=gate_layers,
            probe_C=study.probe_C,
            sae=sae,
            sae_path=sae_path,
        )
        gates = fit_gates(
            study.gates,
            inputs,
            calibration=study.calibration,
            ensemble_members=study.ensemble_members,
            ensemble_rule=study.ensemble_rule,
        )
    category_refused: dict[str, dict[tuple[int, float], Tensor]] = {}
    positive = [a for a in tables["val"].alphas_A.tolist() if a > 0]
    if study.category_vectors:
        with Stage("steer", f"category passes ({len(class_names) - 1} vectors x alphas {positive})"):
            for split in prompts:
                category_refused[split] = {}
                for code in range(1, len(class_names)):
                    for alpha in positive:
                        category_refused[split][(code, alpha)] = first_token_decisions(
                            model,
                            tokenizer,
                            _texts(prompts[split]),
                            resolved,
                            edits=residual_rows(layer, vectors_CD[code - 1], alpha),
                            batch_size=study.batch_size,
                            judge=study.judge,
                            **kw,
                        ).refused_N
    framed = {split: torch.tensor([is_jailbreak_framed(p.text) for p in prompts[split]]) for split in prompts}
    masks = {
        split: harm_group_masks(
            tables[split].groups,
            harmful[split],
            [
                None if p.category is None else short.get(str(p.category), str(p.category))
                for p in prompts[split]
            ],
            framed[split],
            cfg.sets.harmful_source,
        )
        for split in prompts
    }
    facts["harm_groups"] = {split: {k: int(v.sum()) for k, v in m.items()} for split, m in masks.items()}
    facts["framed"] = {split: int(f.sum()) for split, f in framed.items()}
    val_unsteered = table_decisions(tables["val"])
    floor = min(1.0, float(val_unsteered[harmful["val"]].float().mean()) + study.floor_gain)
    facts["floor"] = floor
    gates_out: dict[str, Any] = {}
    bundles: dict[str, GatedSteering] = {}
    test_tables: dict[str, OutcomeTable] = {}
    modes = ["global", *(["category_pos"] if study.category_vectors else [])]
    for kind, one in gates.items():
        for mode in modes:
            name = kind if mode == "global" else f"{kind}+category"
            if mode == "category_pos" and one.gate.class_names is None:
                continue
            split_tables = {
                split: tables[split]
                if mode == "global"
                else compose_category_table(
                    tables[split], category_refused[split], one.scores[split].category_N
                )
                for split in prompts
            }
            try:
                result = tune_policy(
                    split_tables["val"],
                    one.scores["val"].score_N,
                    floor=floor,
                    vector=mode,  # type: ignore[arg-type]
                    act_on=study.act_on,  # type: ignore[arg-type]
                    harm_groups=masks["val"] if study.do_no_harm else None,
                    tolerance=study.tolerance,
                )
            except ValueError as err:
                gates_out[name] = {"error": str(err), "facts": one.facts}
                print(f"  {name}: no policy reaches the floor {floor:.3f} on validation ({err})")
                continue
            test_table, test_scores = split_tables["test"], one.scores["test"].score_N
            test_point = evaluate_policy(test_table, test_scores, result.policy)
            column_N = policy_columns(test_table, test_scores, result.policy)
            test_front = [evaluate_policy(test_table, test_scores, p.policy) for p in result.front]
            gates_out[name] = {
                "policy": asdict(result.policy),
                "val": _flat(result.chosen),
                "test": _flat(test_point),
                "test_per_set": _per_set_rates(test_table, column_N),
                "do_no_harm_test": do_no_harm_report(
                    test_table,
                    column_N,
                    masks["test"],
                    tolerance=study.tolerance,
                    n_boot=study.n_boot,
                    seed=0,
                ),
                "front_test": [_flat(p) for p in test_front],
                "harmful_call_test": asdict(gate_metrics(test_scores, harmful["test"])),
                "facts": one.facts,
            }
            gates_out[name]["do_no_harm_holds"] = all(
                r["passes"] for r in gates_out[name]["do_no_harm_test"].values()
            )
            test_tables[name] = test_table
            bundles[name] = GatedSteering(
                one.gate,
                result.policy,
                layer,
                vectors_CD,
                global_D,
                class_names,
                provenance=result.provenance(sets=sets.manifest(), model_fingerprint=fingerprint),
                judge=study.judge,
            )
    tuned = {k: v for k, v in gates_out.items() if "val" in v}
    if tuned:
        best = min(
            tuned, key=lambda k: (tuned[k]["val"]["over_refusal"], -tuned[k]["val"]["harmful_refusal"])
        )
        facts["best_gate"] = best
        facts["misrouted"] = _misrouted_examples(
            cfg,
            model,
            tokenizer,
            resolved,
            sets,
            test_tables[best],
            test_prompts,
            gates,
            best,
            bundles[best],
            framed["test"],
        )
    facts["sae"] = sae
    return gates_out, bundles, facts


def _misrouted_examples(
    cfg: SteerJobConfig,
    model: Any,
    tokenizer: Any,
    resolved: Any,
    sets: Any,
    table: OutcomeTable,
    prompts: list[Prompt],
    gates: dict[str, Any],
    best: str,
    bundle: GatedSteering,
    framed_N: Tensor,
) -> dict[str, Any]:
    """The best gate's misrouted harmful test prompts per set, grouped by framing, with their first tokens."""
    one = gates[best.split("+")[0]]
    scores = one.scores["test"]
    column_N = policy_columns(table, scores.score_N, bundle.policy)
    lost = misrouted(
        table, column_N, scores.score_N, bundle.policy.t_high, table.groups, sets.names("harmful")
    )
    out: dict[str, Any] = {}
    names = list(resolved.class_names)
    for set_name, rows in lost.items():
        keep = rows[: cfg.study.misrouted_examples * 4]
        examples: list[dict[str, Any]] = []
        if keep:
            texts = [prompts[i].text for i in keep]
            sub = GateScores(
                scores.score_N[keep],
                scores.category_N[keep],
                None if scores.refused_N is None else scores.refused_N[keep],
            )
            if bundle.policy.act_on == "disagreement":
                sub = sub._replace(refused_N=table_decisions(table)[keep])
            base = _decisions(model, tokenizer, resolved, [prompts[i] for i in keep], cfg)
            steered = first_token_decisions(
                model,
                tokenizer,
                texts,
                resolved,
                edits=bundle.edits(sub),
                batch_size=cfg.study.batch_size,
                chat_template=cfg.chat_template,
                system_prompt=cfg.system_prompt,
                judge=cfg.study.judge,
            )
            for j, i in enumerate(keep):
                found = framings(prompts[i].text)
                examples.append(
                    {
                        "framing": "+".join(found) if found else "plain",
                        "score": round(float(scores.score_N[i]), 3),
                        "unsteered": _token_name(int(base.top_class_N[j]), names),
                        "gated": _token_name(int(steered.top_class_N[j]), names),
                        "excerpt": " ".join(prompts[i].text.split())[:110],
                    }
                )
        by_framing: dict[str, int] = {}
        for i in rows:
            found = framings(prompts[i].text)
            key = "+".join(found) if found else "plain"
            by_framing[key] = by_framing.get(key, 0) + 1
        n_set = sum(1 for g in table.groups if g == set_name)
        n_framed = sum(1 for i, g in enumerate(table.groups) if g == set_name and bool(framed_N[i]))
        out[set_name] = {
            "n": n_set,
            "n_framed": n_framed,
            "misrouted": len(rows),
            "by_framing": dict(sorted(by_framing.items(), key=lambda kv: -kv[1])),
            "examples": sorted(examples, key=lambda e: e["framing"])[: cfg.study.misrouted_examples],
        }
    return out


def _token_name(code: int, names: list[str]) -> str:
    return "other" if code < 0 else names[code]


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
    with Stage("steer", "load prompt sets and model"):
        sets = build_steer_sets(cfg.sets)  # first: a bad set spec fails before the model loads
        model, tokenizer = load_model_and_tokenizer(cfg.llm)
        model.eval()
        resolved = RefusalVocabulary().resolve(tokenizer)
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

    gates_out, fitted, gate_facts = _gate_stage(
        cfg,
        model,
        tokenizer,
        resolved,
        sets,
        tables,
        layer,
        vectors_CD,
        global_D,
        class_names,
        short,
        fingerprint,
        harmful_train,
        benign_train,
        val_prompts,
        test_prompts,
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
        "floor": gate_facts["floor"],
        "gate_study": {k: v for k, v in gate_facts.items() if k not in ("sae", "floor")},
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
        if gate_facts.get("sae") is not None:
            gate_facts["sae"].save(out.tmp / "gate_sae", metadata={"layer": layer, **gate_facts["gate_sae"]})
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
    lines += _gate_report(metrics)
    return "\n".join(lines) + "\n"


def _gate_report(metrics: dict[str, Any]) -> list[str]:
    """The gates' part of ``report.md``: pooled rates, do no harm per set, framed slice, misrouted prompts."""
    study = metrics.get("gate_study", {})
    settings = metrics["config"]["study"]
    unsteered = next(p for p in metrics["unconditional"]["test"] if p["alpha"] == 0.0)
    lines = [
        "",
        f"## Conditional steering (tuned on validation, floor {metrics['floor']:.3f}; test)",
        "",
        "Objective: least validation over-refusal with harmful refusal >= the floor"
        + (
            f" and do no harm (no harm group loses more than {settings['tolerance']} of its unsteered "
            "refusal)"
            if settings.get("do_no_harm")
            else ""
        )
        + f"; rows steered: {settings.get('act_on', 'all')}; calibration: {settings.get('calibration')}. "
        f"Gates fitted on the train splits of {', '.join(study.get('gate_train_sets', []))}.",
        "",
        "| gate | policy | over-refusal | harmful refusal | val AUC / test AUC | do no harm (test) "
        "| rows steered |",
        "|---|---|---|---|---|---|---|",
        f"| unsteered | | {unsteered['over_refusal']:.3f} | {unsteered['harmful_refusal']:.3f} | | | 0 |",
    ]
    for kind, out in metrics["gates"].items():
        facts = out.get("facts", {})
        aucs = f"{facts.get('auc_val', float('nan')):.3f} / {facts.get('auc_test', float('nan')):.3f}"
        if "test" not in out:
            lines.append(f"| {kind} | {out['error']} | | | {aucs} | | |")
            continue
        t, p = out["test"], out["policy"]
        policy = f"t {p['t_low']:.3f}/{p['t_high']:.3f}, +{p['alpha_pos']} / -{p['alpha_neg']}"
        failed = [g for g, r in out["do_no_harm_test"].items() if not r["passes"]]
        harm = "holds" if not failed else "fails: " + ", ".join(failed)
        lines.append(
            f"| {kind} | {policy} | {t['over_refusal']:.3f} | {t['harmful_refusal']:.3f} | {aucs} | {harm} | "
            f"{t['n_steered']} |"
        )
    tuned = {k: v for k, v in metrics["gates"].items() if "do_no_harm_test" in v}
    if tuned:
        groups = list(next(iter(tuned.values()))["do_no_harm_test"])
        lines += [
            "",
            "### Do no harm per harmful set (test): refusal, gated - unsteered [paired 95% bootstrap CI]",
            "",
            "| gate | " + " | ".join(groups) + " |",
            "|---" * (len(groups) + 1) + "|",
        ]
        first = next(iter(tuned.values()))["do_no_harm_test"]
        lines.append(
            "| unsteered | "
            + " | ".join(f"{first[g]['unsteered']:.3f} (n {first[g]['n']})" for g in groups)
            + " |"
        )
        for kind, out in tuned.items():
            cells = []
            for g in groups:
                r = out["do_no_harm_test"].get(g)
                if r is None:
                    cells.append("")
                    continue
                mark = "" if r["passes"] else " **x**"
                cells.append(
                    f"{r['gated']:.3f}, {r['diff']:+.3f} [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}]{mark}"
                )
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "`jailbreak_framed`: harmful prompts whose text has jailbreak framing (role play, hypothetical, "
            "instruction override, long preamble; `sae_refusal.steer.framing`), across sets. **x**: do no "
            "harm fails (gated < unsteered - tolerance, or the CI lies wholly below 0).",
        ]
    best = study.get("best_gate")
    if best:
        lines += [
            "",
            f"### Why it fails: the best gate on validation (`{best}`), its misrouted harmful test prompts",
            "",
            "Harmful prompts the gate scored below `t_high` that the gated model does not refuse, per set, "
            "grouped by framing, with examples (score, first token unsteered -> gated, excerpt).",
        ]
        for name, r in study.get("misrouted", {}).items():
            framing = ", ".join(f"{k} {v}" for k, v in r["by_framing"].items()) or "-"
            lines += [
                "",
                f"**{name}**: {r['misrouted']} of {r['n']} misrouted ({r['n_framed']} framed in the set); "
                f"by framing: {framing}",
                "",
            ]
            for e in r["examples"]:
                excerpt = e["excerpt"].replace("|", "/")
                lines.append(
                    f"- [{e['framing']}] {e['score']:.3f}, {e['unsteered']} -> {e['gated']}: {excerpt}"
                )
    sae = study.get("gate_sae")
    if sae:
        lines += [
            "",
            f"Study SAE (layer {sae['layer']}, TopK k {sae['k']}, {sae['n_latents']} latents, "
            f"{sae['steps']} steps on {sae['n_rows']} train residuals): FVU {sae['fvu']:.3f}, "
            f"dead share {sae['dead_share']:.2f}.",
        ]
    return lines


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
