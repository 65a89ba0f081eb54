"""Classification heads on SAE latents: which features tell benign prompts and each refusal category apart.

``X`` = SAE codes of benign prompts and of every harmful category, ``y = 0`` for benign and ``1..C`` for the
categories. Two heads, both multinomial (softmax) logistic regressions with an L1 penalty:

* :func:`fit_sklearn_head`: scikit-learn ``LogisticRegression`` (``saga``, pure L1), the reference;
* :func:`fit_torch_head`: a small torch softmax layer fitted full-batch by proximal gradient (FISTA: a
  gradient step, then soft-thresholding, so ruled-out features get weights of exactly zero), for when
  scikit-learn is too slow on very wide dictionaries.

Codes are divided by each feature's largest training value first (zero stays zero, so the sparsity pattern
and the sign of every weight are kept; weights are comparable across features). Each class's *top
features* are those with the largest positive weights: benign features from class 0, refusal features of
category ``c`` from class ``c``. :class:`HeadReport` holds held-out accuracy, macro F1, per-class F1, the
confusion matrix and those features.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy.sparse import csr_matrix
from sklearn.metrics import confusion_matrix, f1_score

__all__ = ["HeadReport", "fit_sklearn_head", "fit_torch_head", "top_features"]


@dataclass(frozen=True)
class HeadReport:
    """Held-out scores and top features of one head.

    Args:
        method: ``sklearn`` or ``torch``.
        class_names: Names of the classes ``0..C``.
        accuracy: Held-out accuracy.
        macro_f1: Held-out macro F1 over the classes present in the held-out labels or predictions.
        per_class_f1: Held-out F1 per class name.
        confusion: Held-out confusion matrix (rows true class, columns predicted), all classes.
        top_features: Per class name, ``[feature, weight]`` pairs with the largest positive weights.
        n_train: Training rows.
        n_test: Held-out rows.
        n_nonzero: Non-zero weights of the head (all classes).
        converged: Whether the solver reported convergence.
    """

    method: str
    class_names: list[str]
    accuracy: float
    macro_f1: float
    per_class_f1: dict[str, float]
    confusion: list[list[int]]
    top_features: dict[str, list[list[float]]]
    n_train: int
    n_test: int
    n_nonzero: int
    converged: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)

    def feature_sets(self) -> dict[int, list[int]]:
        """Class code -> its top feature indices."""
        return {i: [int(f) for f, _ in self.top_features[name]] for i, name in enumerate(self.class_names)}


def _as_numpy(X: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(X, torch.Tensor):
        return X.detach().cpu().float().numpy()
    return np.asarray(X, dtype=np.float32)


def _check(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    class_names: Sequence[str],
) -> None:
    if X_train.ndim != 2 or X_test.ndim != 2 or X_train.shape[1] != X_test.shape[1]:
        raise ValueError(f"X_train and X_test must be 2-D with equal widths: {X_train.shape}, {X_test.shape}")
    if len(y_train) != len(X_train) or len(y_test) != len(X_test):
        raise ValueError("labels must have one entry per row of X_train / X_test")
    n = len(class_names)
    for name, y in (("y_train", y_train), ("y_test", y_test)):
        if len(y) and (y.min() < 0 or y.max() >= n):
            raise ValueError(f"{name} has labels outside 0..{n - 1} (class_names has {n} entries)")
    present = np.unique(y_train)
    if len(present) < 2:
        raise ValueError(f"the head needs at least two classes in the training rows, got {present.tolist()}")
    if len(X_test) == 0:
        raise ValueError("no held-out rows to score the head on")


def feature_scale(X_train: np.ndarray) -> np.ndarray:
    """Per-feature divisor: the largest absolute training value (1 for features that never fire)."""
    scale = np.abs(X_train).max(axis=0)
    return np.where(scale > 0, scale, 1.0).astype(np.float32)


def top_features(coef_KF: np.ndarray, class_names: Sequence[str], k: int) -> dict[str, list[list[float]]]:
    """Per class, the ``k`` features with the largest positive weights as ``[feature, weight]``."""
    out: dict[str, list[list[float]]] = {}
    for i, name in enumerate(class_names):
        row = coef_KF[i]
        order = np.argsort(-row, kind="stable")[:k]
        out[name] = [[int(f), float(row[f])] for f in order if row[f] > 0]
    return out


def _report(
    method: str,
    coef_KF: np.ndarray,
    predict_test: np.ndarray,
    y_test: np.ndarray,
    class_names: Sequence[str],
    n_train: int,
    top_k: int,
    converged: bool,
) -> HeadReport:
    labels = list(range(len(class_names)))
    f1 = f1_score(y_test, predict_test, labels=labels, average=None, zero_division=0.0)
    seen = sorted(set(y_test.tolist()) | set(predict_test.tolist()))
    return HeadReport(
        method=method,
        class_names=list(class_names),
        accuracy=float((predict_test == y_test).mean()),
        macro_f1=float(np.mean([f1[i] for i in seen])),
        per_class_f1={name: float(f1[i]) for i, name in enumerate(class_names)},
        confusion=confusion_matrix(y_test, predict_test, labels=labels).astype(int).tolist(),
        top_features=top_features(coef_KF, class_names, top_k),
        n_train=n_train,
        n_test=len(y_test),
        n_nonzero=int(np.count_nonzero(coef_KF)),
        converged=converged,
    )


def _full_coef(coef: np.ndarray, classes: np.ndarray, n_classes: int) -> np.ndarray:
    """Coefficients ``(n_classes, F)`` with zero rows for classes absent from training."""
    full = np.zeros((n_classes, coef.shape[1]), dtype=np.float64)
    if len(classes) == 2 and coef.shape[0] == 1:  # binary: scikit-learn keeps one row for the second class
        full[classes[1]], full[classes[0]] = coef[0], -coef[0]
    else:
        full[classes] = coef
    return full


def fit_sklearn_head(
    X_train: torch.Tensor | np.ndarray,
    y_train: torch.Tensor | np.ndarray,
    X_test: torch.Tensor | np.ndarray,
    y_test: torch.Tensor | np.ndarray,
    class_names: Sequence[str],
    *,
    C: float = 1.0,
    top_k: int = 10,
    max_iter: int = 2000,
    tol: float = 1e-3,
    seed: int = 0,
) -> tuple[HeadReport, np.ndarray]:
    """Multinomial L1 logistic regression (scikit-learn ``saga``); returns the report and ``coef_KF``.

    Args:
        X_train: Training codes ``(N, F)``.
        y_train: Training class codes (0 benign, 1..C).
        X_test: Held-out codes.
        y_test: Held-out class codes.
        class_names: Names of classes ``0..C``.
        C: Inverse L1 strength (smaller = sparser).
        top_k: Features listed per class.
        max_iter: Solver iterations.
        tol: Solver tolerance.
        seed: The solver's random state.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    if C <= 0 or top_k < 1:
        raise ValueError(f"C must be > 0 and top_k >= 1, got C={C}, top_k={top_k}")
    Xtr, Xte = _as_numpy(X_train), _as_numpy(X_test)
    ytr, yte = np.asarray(y_train).astype(int), np.asarray(y_test).astype(int)
    _check(Xtr, ytr, Xte, yte, class_names)
    scale = feature_scale(Xtr)
    penalty: dict[str, Any] = {"l1_ratio": 1.0}
    if inspect.signature(LogisticRegression).parameters["penalty"].default != "deprecated":
        penalty = {"penalty": "l1"}  # scikit-learn < 1.8
    head = LogisticRegression(solver="saga", C=C, max_iter=max_iter, tol=tol, random_state=seed, **penalty)
    # CSR input: saga then touches only the non-zero codes (an SAE code row has k of F entries)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        head.fit(csr_matrix(Xtr / scale), ytr)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    coef_KF = _full_coef(head.coef_, head.classes_, len(class_names))
    predict = head.predict(csr_matrix(Xte / scale))
    report = _report("sklearn", coef_KF, predict, yte, class_names, len(ytr), top_k, converged)
    return report, coef_KF


def _lipschitz(x_NF: torch.Tensor, iters: int = 100) -> float:
    """Upper-bound estimate of the gradient's Lipschitz constant of the mean softmax cross-entropy.

    The logit Hessian of one row is ``diag(p) - p p^T <= I / 2``, so ``L <= lambda_max(X^T X) / (2 N)``;
    ``lambda_max`` by power iteration from the all-ones vector (``X`` is non-negative, so its Perron vector
    overlaps it), then 5 % of margin.
    """
    v = torch.ones(x_NF.shape[1], dtype=x_NF.dtype)
    lam = 0.0
    for _ in range(iters):
        w = x_NF.T @ (x_NF @ v)
        lam = float(w.norm())
        if lam == 0.0:
            break
        v = w / lam
    return max(1.05 * lam / (2 * x_NF.shape[0]), 1e-12)


def fit_torch_head(
    X_train: torch.Tensor | np.ndarray,
    y_train: torch.Tensor | np.ndarray,
    X_test: torch.Tensor | np.ndarray,
    y_test: torch.Tensor | np.ndarray,
    class_names: Sequence[str],
    *,
    l1: float = 1e-3,
    steps: int = 500,
    top_k: int = 10,
    tol: float = 1e-4,
) -> tuple[HeadReport, np.ndarray]:
    """A torch softmax head with an L1 penalty (full batch, FISTA); returns the report and ``coef_KF``.

    Minimises ``mean cross-entropy + l1 * sum_k ||W_k||_1 / K`` (``K`` classes, bias unpenalised) by
    accelerated proximal gradient (FISTA, step ``1 / L``): a gradient step on the cross-entropy, then
    soft-thresholding of the weights, so features the penalty rules out get weights of exactly zero (a
    subgradient step, e.g. Adam on ``|W|``, only makes them small). The problem is convex and the fit starts
    from zero: deterministic, no seed. ``l1 = K / (C * N_train)`` is the objective of the scikit-learn head
    with inverse strength ``C``.

    Args:
        X_train: Training codes ``(N, F)``.
        y_train: Training class codes (0 benign, 1..C).
        X_test: Held-out codes.
        y_test: Held-out class codes.
        class_names: Names of classes ``0..C``.
        l1: Weight of the L1 term (times the mean over classes of each class's summed ``|weight|``).
        steps: Most full-batch proximal-gradient steps.
        top_k: Features listed per class.
        tol: Stop (converged) once no weight or bias moves by more than ``tol`` times the largest one.
    """
    if l1 < 0 or steps < 1 or top_k < 1 or tol <= 0:
        raise ValueError(f"need l1 >= 0, steps >= 1, top_k >= 1, tol > 0; got {l1}, {steps}, {top_k}, {tol}")
    Xtr, Xte = _as_numpy(X_train), _as_numpy(X_test)
    ytr, yte = np.asarray(y_train).astype(int), np.asarray(y_test).astype(int)
    _check(Xtr, ytr, Xte, yte, class_names)
    scale = feature_scale(Xtr)
    x = torch.from_numpy(Xtr / scale).double()
    n_rows, width = x.shape
    n_classes = len(class_names)
    x_aug = torch.cat([x, torch.ones(n_rows, 1, dtype=x.dtype)], dim=1)  # last column: the bias
    onehot = torch.nn.functional.one_hot(torch.from_numpy(ytr).long(), n_classes).to(x.dtype)
    # classes absent from training must never be predicted
    absent = onehot.sum(0) == 0
    step = 1.0 / _lipschitz(x_aug)
    threshold = step * l1 / n_classes
    W = torch.zeros(n_classes, width + 1, dtype=x.dtype)  # weights, then bias
    momentum, t = W.clone(), 1.0
    converged = False
    for _ in range(steps):
        logits = (x_aug @ momentum.T).masked_fill(absent, float("-inf"))
        grad = (torch.softmax(logits, dim=1) - onehot).T @ x_aug / n_rows
        W_next = momentum - step * grad
        w = W_next[:, :width]
        W_next[:, :width] = w.sign() * (w.abs() - threshold).clamp_min(0.0)
        change = float((W_next - W).abs().max())
        if float(((momentum - W_next) * (W_next - W)).sum()) > 0:  # adaptive restart (O'Donoghue, Candes)
            t = 1.0
        t_next = (1.0 + (1.0 + 4.0 * t * t) ** 0.5) / 2.0
        momentum = W_next + ((t - 1.0) / t_next) * (W_next - W)
        W, t = W_next, t_next
        if change <= tol * max(float(W.abs().max()), 1.0):
            converged = True
            break
    coef, bias = W[:, :width], W[:, width]
    x_test = torch.from_numpy(Xte / scale).double()
    predict = (x_test @ coef.T + bias).masked_fill(absent, float("-inf")).argmax(1).numpy()
    coef_KF = coef.numpy() + 0.0  # a copy, without the -0.0 of soft-thresholding
    return _report("torch", coef_KF, predict, yte, class_names, len(ytr), top_k, converged), coef_KF
