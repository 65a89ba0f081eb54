"""The gate part of the steering study: fit every gate, calibrate, tune with do no harm, report per set.

The job (:mod:`sae_refusal.steer.job`) measures the outcome tables and the residuals; this module is pure
bookkeeping over them (no model pass except the few that list the best gate's misrouted prompts):

1. **Fit** each gate of ``study.gates`` on TRAIN residuals (:func:`fit_gates`): the probe at the steering
   layer (its ``C`` chosen by validation AUC), the same probe fitted on the model's own sources only (to
   show what the external train splits add), the distance gate, a probe on several layers at once, a probe
   and the L1 head on the codes of an SAE trained on the study's own train residuals, the refusal-token
   gate (graded: ``1 - P(respond)``), and an ensemble of calibrated members.
2. **Calibrate** each gate's scores on VALIDATION (Platt or isotonic), so a threshold is a probability.
3. **Tune** each gate on the validation table (:func:`~sae_refusal.steer.tuning.tune_policy`): least
   over-refusal subject to the pooled harmful floor AND **do no harm**: every harm group (each category
   of the model's harmful source, each other harmful set, the jailbreak-framed harmful prompts) keeps its
   unsteered refusal rate within ``study.tolerance``. Policy shapes the tuner may pick: a middle band
   (``t_low < t_high``) left unsteered (``alpha_mid = 0``), asymmetric strengths ``alpha_pos`` /
   ``alpha_neg`` from the sweep grid, and (``study.act_on: disagreement``) steering only where the gate
   disagrees with the model's own first token. Why: a gate is least reliable near its decision boundary, so
   the unsure band is safest left alone; pushing a prompt up costs a different amount of refusal than
   pushing one down; and a push in the direction the model already goes cannot change its decision, only its
   answer's quality.
4. **Report** on TEST: pooled rates, per set and per harm group the paired difference against unsteered with
   a bootstrap CI (:func:`do_no_harm_report`), the jailbreak-framed slice, and with the category vectors
   (``category_pos``: harmful-looking prompts along their predicted category's vector, benign-looking ones
   along the global one toward ``[respond]``) next to the global vector.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sae_refusal.eval.stats import bootstrap_mean
from sae_refusal.steer.gates import (
    CalibratedGate,
    DistanceGate,
    EnsembleGate,
    GateScores,
    HeadGate,
    MultiLayerProbeGate,
    ProbeGate,
    RefusalTokenGate,
)
from sae_refusal.steer.tuning import OutcomeTable, table_decisions

__all__ = [
    "FittedGate",
    "GateInputs",
    "compose_category_table",
    "do_no_harm_report",
    "fit_gates",
    "harm_group_masks",
    "misrouted",
    "roc_auc",
    "summarise_seeds",
]

_SPLITS = ("val", "test")


@dataclass(frozen=True)
class GateInputs:
    """What every gate is fitted and scored from (the study's residuals, labels and decisions).

    Attributes:
        acts: ``{split: {layer: acts_ND}}`` for ``train``, ``val``, ``test`` (the steering layer and
            ``gate_layers``).
        y_train: Class codes of the train rows (0 benign, ``1..C`` harmful categories).
        model_only_train: Train rows from the model's own sources (for ``probe_model_only``).
        harmful: ``{split: harmful_N}`` for val / test.
        decisions: ``{split: FirstTokenDecisions}`` unsteered, for val / test (the refusal-token gate).
        categories: The refusal classes' categories (``None`` for respond).
        class_names: The vectors' class names.
        layer: Steering layer.
        gate_layers: Layers of the multi-layer probe.
        probe_C: Candidate inverse L2 strengths of the probes, chosen by validation AUC.
        sae: The study's SAE at ``layer`` (for ``probe_sae`` and ``head``).
        sae_path: Where it is saved (recorded in the gates).
    """

    acts: Mapping[str, Mapping[int, Tensor]]
    y_train: Tensor
    model_only_train: Tensor
    harmful: Mapping[str, Tensor]
    decisions: Mapping[str, Any]
    categories: Sequence[str | None]
    class_names: Sequence[str]
    layer: int
    gate_layers: Sequence[int]
    probe_C: Sequence[float]
    sae: Any = None
    sae_path: str | None = None


@dataclass
class FittedGate:
    """One fitted (and calibrated) gate and its scores on the validation and test rows."""

    gate: Any
    scores: dict[str, GateScores]
    facts: dict[str, Any]


def roc_auc(score_N: Tensor, harmful_N: Tensor) -> float:
    """ROC AUC of ``score_N`` for the harmful label (scikit-learn, ties count half); NaN with one class."""
    from sklearn.metrics import roc_auc_score

    harmful = torch.as_tensor(harmful_N).bool()
    if bool(harmful.all()) or not bool(harmful.any()):
        return math.nan
    return float(roc_auc_score(harmful.numpy(), torch.as_tensor(score_N).double().numpy()))


def harm_group_masks(
    groups: Sequence[str],
    harmful_N: Tensor,
    categories: Sequence[str | None],
    framed_N: Tensor,
    harmful_source: str,
) -> dict[str, Tensor]:
    """The harm groups of a split's rows: ``<source>/<category>`` for the model's harmful source, each
    other harmful set by name, and ``jailbreak_framed`` (every framed harmful row, across sets)."""
    harmful = torch.as_tensor(harmful_N).bool()
    masks: dict[str, Tensor] = {}
    for index, (name, category) in enumerate(zip(groups, categories, strict=True)):
        if not bool(harmful[index]):
            continue
        key = f"{name}/{category}" if name == harmful_source and category else name
        masks.setdefault(key, torch.zeros(len(groups), dtype=torch.bool))[index] = True
    framed = torch.as_tensor(framed_N).bool() & harmful
    if bool(framed.any()):
        masks["jailbreak_framed"] = framed
    return masks


def compose_category_table(
    table: OutcomeTable, category_refused: Mapping[tuple[int, float], Tensor], category_N: Tensor
) -> OutcomeTable:
    """The outcome table of ``category_pos`` steering: positive-alpha cells of a row whose gate category is
    ``c > 0`` read that category's pass (``category_refused[(c, alpha)]``: every row steered along category
    ``c``'s vector at ``alpha``); other cells keep the global table's.

    Raises:
        ValueError: If a positive alpha of the table has no pass for a category the gate names.
    """
    refused = table.refused_NA.clone()
    codes = torch.as_tensor(category_N, dtype=torch.long)
    for column, alpha in enumerate(table.alphas_A.tolist()):
        if alpha <= 0:
            continue
        for code in torch.unique(codes[codes > 0]).tolist():
            key = (int(code), float(alpha))
            if key not in category_refused:
                raise ValueError(f"category_refused: no pass for category {code} at alpha {alpha}")
            rows = codes == code
            refused[rows, column] = category_refused[key].bool()[rows]
    return OutcomeTable(table.alphas_A, refused, table.harmful_N, table.groups, dict(table.meta))


def do_no_harm_report(
    table: OutcomeTable,
    column_N: Tensor,
    masks: Mapping[str, Tensor],
    *,
    tolerance: float,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Per harm group on a (test) table: unsteered and gated refusal, their paired difference with a 95%
    bootstrap CI (items resampled together), and whether the group passes do no harm: gated >= unsteered -
    ``tolerance`` AND the CI's upper end >= 0."""
    rows = torch.arange(column_N.shape[0])
    gated_N = table.refused_NA[rows, column_N].double().numpy()
    base_N = table_decisions(table).double().numpy()
    out: dict[str, dict[str, Any]] = {}
    for name, mask in masks.items():
        m = torch.as_tensor(mask).bool().numpy()
        if not m.any():
            continue
        diff = bootstrap_mean(gated_N[m] - base_N[m], n_boot=n_boot, seed=seed)
        gated, base = float(gated_N[m].mean()), float(base_N[m].mean())
        out[name] = {
            "n": int(m.sum()),
            "unsteered": base,
            "gated": gated,
            "diff": diff.value,
            "ci": [diff.low, diff.high],
            "passes": bool(gated >= base - tolerance - 1e-12 and diff.high >= -1e-12),
        }
    return out


def _y(codes: Tensor, keep: Tensor) -> Tensor:
    return torch.where(keep, codes, torch.full_like(codes, -1))


def fit_gates(
    kinds: Sequence[str],
    inputs: GateInputs,
    *,
    calibration: str | None,
    ensemble_members: Sequence[str],
    ensemble_rule: str,
) -> dict[str, FittedGate]:
    """Fit, calibrate and score every gate of ``kinds`` (see the module notes).

    Args:
        kinds: Gate kinds, in report order.
        inputs: The residuals, labels and decisions they are fitted and scored from.
        calibration: ``platt``, ``isotonic`` or ``None``.
        ensemble_members: Kinds combined by the ensemble (fitted here if not in ``kinds``).
        ensemble_rule: The ensemble's rule (``mean``, ``all``, ``any``).

    Raises:
        ValueError: On an unknown kind, or an SAE gate without ``inputs.sae``.
    """
    harmful = inputs.harmful
    fitted: dict[str, FittedGate] = {}
    needed = list(dict.fromkeys([*kinds, *(ensemble_members if "ensemble" in kinds else [])]))
    for kind in needed:
        if kind == "ensemble":
            continue
        fitted[kind] = _fit_one(kind, inputs)
        if calibration is not None:
            fitted[kind] = _calibrate(fitted[kind], harmful["val"], calibration)
    if "ensemble" in kinds:
        members = [fitted[k] for k in ensemble_members]
        ensemble = EnsembleGate([m.gate for m in members], rule=ensemble_rule)  # type: ignore[arg-type]
        scores = {split: ensemble.combine([m.scores[split] for m in members]) for split in _SPLITS}
        one = FittedGate(ensemble, scores, {"members": list(ensemble_members), "rule": ensemble_rule})
        fitted["ensemble"] = _calibrate(one, harmful["val"], calibration) if calibration else one
    for one in fitted.values():
        for split in _SPLITS:
            one.facts[f"auc_{split}"] = roc_auc(one.scores[split].score_N, harmful[split])
    return {kind: fitted[kind] for kind in kinds}


def _calibrate(one: FittedGate, harmful_val: Tensor, method: str) -> FittedGate:
    gate = CalibratedGate.fit(one.gate, one.scores["val"].score_N, harmful_val, method=method)  # type: ignore[arg-type]
    scores = {split: s._replace(score_N=gate.transform(s.score_N)) for split, s in one.scores.items()}
    return FittedGate(gate, scores, {**one.facts, "calibration": method})


def _best_C(
    fit: Any, x_val: Any, harmful_val: Tensor, candidates: Sequence[float]
) -> tuple[Any, float, dict[str, float]]:
    """Fit once per ``C`` (``fit(C)`` -> gate), keep the best validation AUC (ties: the smaller C)."""
    best: tuple[float, float, Any] | None = None
    aucs: dict[str, float] = {}
    for C in sorted(candidates):
        gate = fit(C)
        auc = roc_auc(gate.score(x_val).score_N, harmful_val)
        aucs[str(C)] = auc
        if best is None or auc > best[0] + 1e-12:
            best = (auc, C, gate)
    assert best is not None  # candidates is non-empty (StudySettings)
    return best[2], best[1], aucs


def _fit_one(kind: str, inputs: GateInputs) -> FittedGate:
    acts, harmful, layer, class_names = inputs.acts, inputs.harmful, inputs.layer, inputs.class_names
    y_train, sae, sae_path, probe_C = inputs.y_train, inputs.sae, inputs.sae_path, inputs.probe_C
    train = acts["train"]
    facts: dict[str, Any] = {"kind": kind}
    gate: Any
    if kind == "refusal_token":
        gate = RefusalTokenGate(class_names, graded=True)
        scores = {split: gate.scores_from(inputs.decisions[split], inputs.categories) for split in _SPLITS}
        return FittedGate(gate, scores, {**facts, "train_rows": 0})
    if kind in ("probe", "probe_model_only", "probe_sae"):
        only = inputs.model_only_train
        keep = only if kind == "probe_model_only" else torch.ones_like(only)
        y = _y(y_train, keep)
        use_sae = sae if kind == "probe_sae" else None
        if kind == "probe_sae" and sae is None:
            raise ValueError("study.gates: probe_sae needs the study's SAE (study.gate_sae_latents > 0)")
        gate, C, aucs = _best_C(
            lambda C: ProbeGate.fit(
                train[layer], y, class_names, layer=layer, C=C, sae=use_sae, sae_path=sae_path
            ),
            acts["val"][layer],
            harmful["val"],
            probe_C,
        )
        facts.update(C=C, val_auc_by_C=aucs, train_rows=int((y >= 0).sum()))
        scores = {split: gate.score(acts[split][layer]) for split in _SPLITS}
        return FittedGate(gate, scores, facts)
    if kind == "probe_multilayer":
        layers = sorted({*inputs.gate_layers})
        gate, C, aucs = _best_C(
            lambda C: MultiLayerProbeGate.fit(train, y_train, class_names, layers=layers, C=C),
            acts["val"],
            harmful["val"],
            probe_C,
        )
        facts.update(C=C, val_auc_by_C=aucs, layers=layers, train_rows=int((y_train >= 0).sum()))
        scores = {split: gate.score(acts[split]) for split in _SPLITS}
        return FittedGate(gate, scores, facts)
    if kind == "distance":
        gate = DistanceGate.fit(train[layer], y_train, class_names, layer=layer)
    elif kind == "head":
        if sae is None:
            raise ValueError("study.gates: head needs the study's SAE (study.gate_sae_latents > 0)")
        gate = HeadGate.fit(train[layer], y_train, class_names, layer=layer, sae=sae, sae_path=sae_path)
    else:
        raise ValueError(f"study.gates: unknown gate {kind!r}")
    facts["train_rows"] = int((y_train >= 0).sum())
    return FittedGate(gate, {split: gate.score(acts[split][layer]) for split in _SPLITS}, facts)


def misrouted(
    table: OutcomeTable,
    column_N: Tensor,
    score_N: Tensor,
    t_high: float,
    sets: Sequence[str],
    harmful_sets: Sequence[str],
) -> dict[str, list[int]]:
    """Per harmful set, the rows the gate lets through: harmful, not refused under the gated policy, and
    scored below ``t_high`` (the gate did not call them harmful)."""
    rows = torch.arange(column_N.shape[0])
    refused = table.refused_NA[rows, column_N]
    low = torch.as_tensor(score_N).float() < torch.tensor(t_high, dtype=torch.float32)
    out: dict[str, list[int]] = {}
    for name in harmful_sets:
        mask = torch.tensor([s == name for s in sets]) & table.harmful_N & ~refused & low
        out[name] = mask.nonzero().flatten().tolist()
    return out


def summarise_seeds(values: Sequence[float]) -> dict[str, float]:
    """Mean, min and max of per-seed values."""
    array = np.asarray(values, dtype=float)
    return {"mean": float(array.mean()), "min": float(array.min()), "max": float(array.max())}
