"""k-sparse probing of SAE codes against a dense probe on the residual, SAEBench style.

**Tasks** (binary, over the benign and harmful rows; ambiguous prompts left out): ``harmful_vs_benign``
(positive: any harmful category) and one-vs-rest per refusal category (positive: that category; negative:
benign and every other category).

**Probe**: a logistic regression (scikit-learn ``lbfgs``, L2 with inverse strength ``C``,
``class_weight="balanced"``) on features standardised with the fit rows' mean and standard deviation (a
constant feature is left unscaled), fitted on the fit (train) rows and scored on the held-out (test) rows:

* ``accuracy`` = share of held-out rows predicted right;
* ``balanced_accuracy`` = mean over the classes present in the held-out rows of the share of that class
  predicted right (its recall);
* ``f1`` = F1 of the positive class on the held-out rows (0 when nothing is predicted positive and there
  is nothing to find); ``train_f1`` the same on the fit rows.

**k-sparse probe** on SAE codes: latents are ranked on the *fit* rows by ``|mean code over the positive
rows - mean code over the negative rows|`` (ties: lower index first), the top ``k`` kept, and the probe
fitted on those ``k`` columns (``k`` capped at the dictionary size). **Dense probe**: the same probe on all
``D`` residual dimensions of the same rows. Summaries: ``harmful_vs_benign`` accuracy and ``category_mean``
(mean over the categories' one-vs-rest tasks that could be fitted) per ``k``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "HARMFUL_TASK",
    "LinearProbe",
    "ProbeScore",
    "binary_tasks",
    "dense_probes",
    "fit_probe",
    "k_sparse_probe",
    "rank_latents",
    "sparse_probing",
]

#: Name of the harmful-vs-benign task.
HARMFUL_TASK = "harmful_vs_benign"

Array = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class LinearProbe:
    """A fitted probe in the input's own (unstandardised) space: positive when ``X @ weight + bias > 0``.

    Args:
        weight: ``(D,)`` weights on the raw features.
        bias: Intercept.
    """

    weight: Array
    bias: float

    def decision(self, X_ND: Array) -> Array:
        """``X @ weight + bias`` per row."""
        return np.asarray(X_ND, dtype=np.float64) @ self.weight + self.bias


@dataclass(frozen=True)
class ProbeScore:
    """One probe's held-out scores (definitions in the module docstring).

    Args:
        accuracy: Held-out accuracy.
        balanced_accuracy: Mean held-out recall over the classes present.
        f1: Held-out F1 of the positive class.
        train_f1: F1 of the positive class on the fit rows.
        n_train: Fit rows.
        n_test: Held-out rows.
        n_test_positive: Held-out positive rows.
        latents: The latents used (k-sparse probes), best first; ``None`` for a dense probe.
    """

    accuracy: float
    balanced_accuracy: float
    f1: float
    train_f1: float
    n_train: int
    n_test: int
    n_test_positive: int
    latents: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)


def binary_tasks(classes_N: npt.ArrayLike, class_names: Sequence[str]) -> dict[str, Mask]:
    """Positive-row masks of every task: ``harmful_vs_benign`` (class > 0) and class ``c`` vs the rest.

    Args:
        classes_N: Class codes, 0 benign and ``1..C`` the categories ``class_names[1:]``.
        class_names: Names of classes ``0..C``.
    """
    classes = np.asarray(classes_N)
    tasks = {HARMFUL_TASK: classes > 0}
    for c, name in enumerate(class_names[1:], start=1):
        tasks[name] = classes == c
    return tasks


def _f1(y_true: Mask, y_pred: Mask) -> float:
    tp = int((y_true & y_pred).sum())
    denominator = int(y_true.sum()) + int(y_pred.sum())
    return 2.0 * tp / denominator if denominator else 0.0


def _balanced_accuracy(y_true: Mask, y_pred: Mask) -> float:
    recalls = [float((y_pred[y_true == v] == v).mean()) for v in (False, True) if bool((y_true == v).any())]
    return float(np.mean(recalls)) if recalls else math.nan


def fit_probe(
    X_train: npt.ArrayLike,
    y_train: npt.ArrayLike,
    X_test: npt.ArrayLike,
    y_test: npt.ArrayLike,
    *,
    C: float = 1.0,
    seed: int = 0,
) -> tuple[ProbeScore, LinearProbe]:
    """The module's logistic probe, fitted on ``X_train`` and scored on ``X_test`` (module docstring).

    Raises:
        ValueError: If the fit rows hold one class only, there are no held-out rows, or shapes differ.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    Xtr, Xte = np.asarray(X_train, dtype=np.float64), np.asarray(X_test, dtype=np.float64)
    ytr, yte = np.asarray(y_train, dtype=bool), np.asarray(y_test, dtype=bool)
    if Xtr.ndim != 2 or Xte.ndim != 2 or Xtr.shape[1] != Xte.shape[1]:
        raise ValueError(f"X_train and X_test must be 2-D with equal widths: {Xtr.shape}, {Xte.shape}")
    if len(ytr) != len(Xtr) or len(yte) != len(Xte):
        raise ValueError("labels must have one entry per row")
    if ytr.all() or not ytr.any():
        raise ValueError("the fit rows hold one class only")
    if len(yte) == 0:
        raise ValueError("no held-out rows")
    mean, std = Xtr.mean(0), Xtr.std(0)
    std = np.where(std > 0, std, 1.0)
    probe = LogisticRegression(C=C, class_weight="balanced", max_iter=2000, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit((Xtr - mean) / std, ytr)
    coef = probe.coef_[0] / std
    linear = LinearProbe(weight=coef, bias=float(probe.intercept_[0] - mean @ coef))
    predict_test, predict_train = linear.decision(Xte) > 0, linear.decision(Xtr) > 0
    score = ProbeScore(
        accuracy=float((predict_test == yte).mean()),
        balanced_accuracy=_balanced_accuracy(yte, predict_test),
        f1=_f1(yte, predict_test),
        train_f1=_f1(ytr, predict_train),
        n_train=len(ytr),
        n_test=len(yte),
        n_test_positive=int(yte.sum()),
    )
    return score, linear


def rank_latents(
    Z_train: npt.ArrayLike, y_train: npt.ArrayLike, *, signed: bool = False
) -> npt.NDArray[np.int64]:
    """Latents by mean-code difference between positive and negative fit rows, largest first.

    Args:
        Z_train: Codes ``(N, F)`` of the fit rows.
        y_train: Positive-row mask.
        signed: Rank by ``mean_pos - mean_neg`` (latents that fire *for* the positive class first) instead
            of its absolute value.
    """
    Z, y = np.asarray(Z_train, dtype=np.float64), np.asarray(y_train, dtype=bool)
    if y.all() or not y.any():
        raise ValueError("the fit rows hold one class only")
    diff = Z[y].mean(0) - Z[~y].mean(0)
    score = diff if signed else np.abs(diff)
    return np.argsort(-score, kind="stable").astype(np.int64)


def k_sparse_probe(
    Z_train: npt.ArrayLike,
    y_train: npt.ArrayLike,
    Z_test: npt.ArrayLike,
    y_test: npt.ArrayLike,
    k: int,
    *,
    order: npt.NDArray[np.int64] | None = None,
    C: float = 1.0,
    seed: int = 0,
) -> ProbeScore:
    """The probe on the top ``k`` latents of ``order`` (default: :func:`rank_latents` on the fit rows)."""
    Ztr, Zte = np.asarray(Z_train, dtype=np.float64), np.asarray(Z_test, dtype=np.float64)
    order = rank_latents(Ztr, y_train) if order is None else order
    keep = [int(f) for f in order[: max(1, min(k, Ztr.shape[1]))]]
    score, _ = fit_probe(Ztr[:, keep], y_train, Zte[:, keep], y_test, C=C, seed=seed)
    return ProbeScore(**{**score.to_dict(), "latents": keep})


def _task_rows(
    classes_train: npt.ArrayLike, classes_test: npt.ArrayLike, class_names: Sequence[str]
) -> dict[str, tuple[Mask, Mask]]:
    train, test = binary_tasks(classes_train, class_names), binary_tasks(classes_test, class_names)
    return {name: (train[name], test[name]) for name in train}


def _skip_reason(y_train: Mask, y_test: Mask) -> str | None:
    if y_train.all() or not y_train.any():
        return f"the fit rows hold one class only ({int(y_train.sum())} of {len(y_train)} positive)"
    if len(y_test) == 0:
        return "no held-out rows"
    return None


def _summary(tasks: dict[str, Any], pick: Any) -> dict[str, float]:
    """``harmful_vs_benign`` and the mean over the category tasks that ran, of ``pick(task_entry)``."""
    out: dict[str, float] = {}
    harmful = tasks.get(HARMFUL_TASK)
    out[HARMFUL_TASK] = math.nan if harmful is None or "skipped" in harmful else pick(harmful)
    categories = [pick(v) for name, v in tasks.items() if name != HARMFUL_TASK and "skipped" not in v]
    out["category_mean"] = float(np.mean(categories)) if categories else math.nan
    return out


def dense_probes(
    X_train: npt.ArrayLike,
    classes_train: npt.ArrayLike,
    X_test: npt.ArrayLike,
    classes_test: npt.ArrayLike,
    class_names: Sequence[str],
    *,
    C: float = 1.0,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, LinearProbe]]:
    """The dense baseline of every task on the residual rows; the report and the fitted probes by task."""
    tasks: dict[str, Any] = {}
    probes: dict[str, LinearProbe] = {}
    for name, (y_train, y_test) in _task_rows(classes_train, classes_test, class_names).items():
        reason = _skip_reason(y_train, y_test)
        if reason:
            tasks[name] = {"skipped": reason}
            continue
        score, probes[name] = fit_probe(X_train, y_train, X_test, y_test, C=C, seed=seed)
        tasks[name] = score.to_dict()
    summary = {
        "accuracy": _summary(tasks, lambda t: t["accuracy"]),
        "balanced_accuracy": _summary(tasks, lambda t: t["balanced_accuracy"]),
    }
    return {"tasks": tasks, "summary": summary}, probes


def sparse_probing(
    Z_train: npt.ArrayLike,
    classes_train: npt.ArrayLike,
    Z_test: npt.ArrayLike,
    classes_test: npt.ArrayLike,
    class_names: Sequence[str],
    ks: Sequence[int],
    *,
    C: float = 1.0,
    seed: int = 0,
) -> dict[str, Any]:
    """k-sparse probes of every task at every ``k`` on SAE codes (module docstring).

    Returns:
        ``{"tasks": {task: {str(k): ProbeScore dict} | {"skipped": why}}, "summary": {"accuracy" |
        "balanced_accuracy": {str(k): {"harmful_vs_benign": ..., "category_mean": ...}}}}``.
    """
    Ztr, Zte = np.asarray(Z_train, dtype=np.float64), np.asarray(Z_test, dtype=np.float64)
    tasks: dict[str, Any] = {}
    for name, (y_train, y_test) in _task_rows(classes_train, classes_test, class_names).items():
        reason = _skip_reason(y_train, y_test)
        if reason:
            tasks[name] = {"skipped": reason}
            continue
        order = rank_latents(Ztr, y_train)
        tasks[name] = {
            str(k): k_sparse_probe(Ztr, y_train, Zte, y_test, k, order=order, C=C, seed=seed).to_dict()
            for k in ks
        }
    summary: dict[str, Any] = {"accuracy": {}, "balanced_accuracy": {}}
    for k in ks:
        at_k = {name: v if "skipped" in v else v[str(k)] for name, v in tasks.items()}
        for metric in summary:
            summary[metric][str(k)] = _summary(at_k, lambda t, m=metric: t[m])
    return {"tasks": tasks, "summary": summary}
