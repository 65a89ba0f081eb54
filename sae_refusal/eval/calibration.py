"""Respond-bias calibration: trade harmful recall against false / over-refusal without retraining.

A constant ``b`` added to the ``[respond]`` logit of the first response token (what generation's
``sequence_bias={(respond_id,): b}`` does) moves the respond/refuse boundary. These functions read a set of
first-token logits once (:func:`refusal_logits` keeps only what the decision needs), then report any bias
(:func:`biased_report`) and choose one on a calibration split (:func:`choose_respond_bias`), never on the
prompts the result is reported on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sae_refusal.data.prompt_set import PromptSet
from sae_refusal.data.splits import SplitConfig, make_split_manifest
from sae_refusal.eval.refusal_tokens import (
    OTHER_CLASS_NAME,
    RefusalReport,
    expected_class,
    prediction_record,
    report_from_records,
)
from sae_refusal.llm.refusal_tokens import ResolvedRefusalTokens

__all__ = ["BiasChoice", "biased_report", "choose_respond_bias", "refusal_logits", "split_for_calibration"]


def refusal_logits(logits_NV: Tensor, resolved: ResolvedRefusalTokens) -> Tensor:
    """Compact first-token logits ``(N, C + 2)``: the C refusal-token logits (class order), the best logit of
    any other token, and the logsumexp over the whole vocabulary (for probabilities).

    Args:
        logits_NV: First-response-token logits.
        resolved: The refusal tokens bound to the tokenizer the logits came from.

    Raises:
        ValueError: If ``logits_NV`` is not 2-D or a token id is outside the vocabulary.
    """
    if logits_NV.ndim != 2:
        raise ValueError(f"logits_NV: expected (N, vocab), got shape {tuple(logits_NV.shape)}")
    ids = list(resolved.token_ids)
    if max(ids) >= logits_NV.shape[1]:
        raise ValueError(f"refusal token id {max(ids)} outside the vocabulary of size {logits_NV.shape[1]}")
    logits_NV = logits_NV.float()
    rest_NV = logits_NV.clone()
    rest_NV[:, ids] = float("-inf")
    return torch.cat(
        [
            logits_NV[:, ids],
            rest_NV.max(dim=1, keepdim=True).values,
            logits_NV.logsumexp(dim=1, keepdim=True),
        ],
        dim=1,
    )


def biased_report(
    prompts: PromptSet, compact_NK: Tensor, resolved: ResolvedRefusalTokens, respond_bias: float = 0.0
) -> RefusalReport:
    """The greedy refusal report with ``respond_bias`` added to the respond logit.

    With ``respond_bias = 0`` it equals :func:`~sae_refusal.eval.refusal_tokens.evaluate_refusal_tokens` in
    greedy mode (a first token that is no refusal token is ``"other"``). Probabilities in the records are the
    unbiased model's.

    Args:
        prompts: The labelled prompts, row ``i`` of ``compact_NK`` for ``prompts[i]``.
        compact_NK: :func:`refusal_logits` of their first-token logits.
        resolved: The refusal tokens (class order: respond first).
        respond_bias: Added to the respond logit before the argmax.

    Raises:
        ValueError: If the rows do not match the prompts or the vocabulary has no respond token.
    """
    n_classes = len(resolved.token_ids)
    if compact_NK.shape != (len(prompts), n_classes + 2):
        raise ValueError(
            f"compact_NK: expected shape ({len(prompts)}, {n_classes + 2}), got {tuple(compact_NK.shape)}"
        )
    if None not in resolved.categories:
        raise ValueError(f"refusal vocabulary has no respond token (tokens {list(resolved.tokens)})")
    respond = resolved.categories.index(None)
    names = list(resolved.class_names)
    decision_NK = compact_NK[:, : n_classes + 1].clone()
    decision_NK[:, respond] += respond_bias
    top = decision_NK.argmax(dim=1).tolist()
    log_p_NC = compact_NK[:, :n_classes] - compact_NK[:, n_classes + 1 :]
    restricted_NC = compact_NK[:, :n_classes].softmax(dim=1)
    records = []
    for i, (prompt, pred) in enumerate(zip(prompts, top, strict=True)):
        truth = expected_class(prompt, resolved)
        records.append(
            prediction_record(
                prompt,
                names[truth],
                OTHER_CLASS_NAME if pred == n_classes else names[pred],
                top_is_refusal_token=pred != n_classes,
                top_token=None,
                p_expected_restricted=float(restricted_NC[i, truth]),
                refusal_mass=float(log_p_NC[i].exp().sum()),
            )
        )
    return report_from_records(
        records, names, list(resolved.tokens), names[respond], respond_bias=respond_bias
    )


@dataclass
class BiasChoice:
    """The respond bias chosen on a calibration split.

    Args:
        bias: The chosen bias.
        feasible: Whether it met both limits on the calibration split (else it is the bias with the lowest
            sum of false- and over-refusal rates).
        table: One row per candidate: ``bias``, ``macro_f1`` (all six tokens), ``false_refusal_rate``,
            ``over_refusal_rate`` (``None`` where the split has no such prompts).
    """

    bias: float
    feasible: bool
    table: list[dict[str, float | None]]


def choose_respond_bias(
    prompts: PromptSet,
    compact_NK: Tensor,
    resolved: ResolvedRefusalTokens,
    biases: Sequence[float],
    *,
    max_false_refusal: float | None = None,
    max_over_refusal: float | None = None,
) -> BiasChoice:
    """Choose the bias with the best macro-F1 among those within the refusal limits on a calibration split.

    Ties go to the bias closest to 0. Without limits this is the best-macro-F1 bias.

    Args:
        prompts: Calibration prompts (never the ones the result is reported on).
        compact_NK: :func:`refusal_logits` of their first-token logits.
        resolved: The refusal tokens.
        biases: Candidate biases.
        max_false_refusal: Most benign prompts refused (rate) allowed, or ``None``.
        max_over_refusal: Most ambiguous prompts refused (rate) allowed, or ``None``.

    Raises:
        ValueError: If ``biases`` is empty.
    """
    if not biases:
        raise ValueError("biases: give at least one candidate")
    table: list[dict[str, float | None]] = []
    for b in biases:
        report = biased_report(prompts, compact_NK, resolved, b)
        table.append(
            {
                "bias": float(b),
                "macro_f1": report.macro_f1_all6,
                "false_refusal_rate": report.false_refusal_rate,
                "over_refusal_rate": report.over_refusal_rate,
            }
        )

    def within(row: dict[str, float | None]) -> bool:
        for key, limit in (
            ("false_refusal_rate", max_false_refusal),
            ("over_refusal_rate", max_over_refusal),
        ):
            value = row[key]
            if limit is not None and value is not None and value > limit:
                return False
        return True

    feasible = [row for row in table if within(row)]
    if feasible:
        best = max(feasible, key=lambda r: (r["macro_f1"] or 0.0, -abs(r["bias"] or 0.0)))
        return BiasChoice(bias=float(best["bias"] or 0.0), feasible=True, table=table)
    best = min(
        table,
        key=lambda r: (
            (r["false_refusal_rate"] or 0.0) + (r["over_refusal_rate"] or 0.0),
            abs(r["bias"] or 0.0),
        ),
    )
    return BiasChoice(bias=float(best["bias"] or 0.0), feasible=False, table=table)


def split_for_calibration(
    prompts: PromptSet, source: str, share: float, *, seed: int = 0
) -> tuple[PromptSet, PromptSet]:
    """Set a stratified share of one source's prompts aside for calibration; the rest is reported on.

    For a held-out set whose distribution no training or validation prompt shares (e.g. the CoCoNot contrast
    set), a bias chosen on validation alone need not transfer. Calibrating on part of it and reporting on the
    other part keeps the two disjoint. The draw is the project's split (stratified by label and category,
    deterministic in ``seed``, independent of prompt order).

    Args:
        prompts: The held-out prompts.
        source: ``Prompt.source`` whose prompts are shared out.
        share: Fraction of that source moved to calibration, in ``(0, 1)``.
        seed: Seed of the draw.

    Returns:
        ``(calibration, rest)``: the drawn prompts, and every other prompt of ``prompts`` in its order.

    Raises:
        ValueError: If ``share`` is outside ``(0, 1)`` or no prompt comes from ``source``.
    """
    if not 0.0 < share < 1.0:
        raise ValueError(f"calibration share must be in (0, 1), got {share}")
    from_source = prompts.filter(lambda p: p.source == source)
    if len(from_source) == 0:
        sources = sorted({str(p.source) for p in prompts})
        raise ValueError(f"calibration source {source!r}: no such prompts (sources: {sources})")
    manifest = make_split_manifest(from_source, SplitConfig(test_fraction=share, seed=seed))
    drawn = set(manifest.splits["test"])
    return prompts.filter(lambda p: p.id in drawn), prompts.filter(lambda p: p.id not in drawn)
