"""How well a gate's harmful/benign call matches the truth on held-out prompts: :func:`gate_metrics`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class GateMetrics:
    """How well a gate's harmful/benign call (``score >= threshold``) matches the truth.

    Attributes:
        precision: ``tp / (tp + fp)`` (NaN when nothing is called harmful).
        recall: ``tp / (tp + fn)`` (NaN without harmful prompts).
        f1: Harmonic mean of the two (NaN where either is NaN; 0 where both are 0).
        accuracy: Share of correct calls.
        tp: Harmful prompts called harmful.
        fp: Benign prompts called harmful.
        fn: Harmful prompts called benign.
        tn: Benign prompts called benign.
        threshold: The threshold used.
    """

    precision: float
    recall: float
    f1: float
    accuracy: float
    tp: int
    fp: int
    fn: int
    tn: int
    threshold: float

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)


def gate_metrics(score_N: Tensor, harmful_N: Tensor, threshold: float = 0.5) -> GateMetrics:
    """Precision / recall of the call ``score >= threshold`` against ``harmful_N`` on held-out prompts."""
    score_N = torch.as_tensor(score_N, dtype=torch.float32)
    truth_N = torch.as_tensor(harmful_N, dtype=torch.bool)
    if score_N.ndim != 1 or truth_N.shape != score_N.shape or score_N.numel() == 0:
        raise ValueError(
            "score_N, harmful_N: expected equal non-empty (N,) shapes, got "
            f"{tuple(score_N.shape)}, {tuple(truth_N.shape)}"
        )
    called_N = score_N >= threshold
    tp = int((called_N & truth_N).sum())
    fp = int((called_N & ~truth_N).sum())
    fn = int((~called_N & truth_N).sum())
    tn = int((~called_N & ~truth_N).sum())
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    if math.isnan(precision) or math.isnan(recall):
        f1 = float("nan")
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return GateMetrics(precision, recall, f1, (tp + tn) / score_N.numel(), tp, fp, fn, tn, float(threshold))
