"""Cluster-quality metrics of labelled activations, with a label-permutation baseline.

Three scikit-learn scores on the original dimensions (no projection):

* **silhouette** (euclidean, in ``[-1, 1]``): higher = better separated;
* **Davies-Bouldin** (``>= 0``): lower = better;
* **Calinski-Harabasz** (``>= 0``): higher = better.

:func:`cluster_metrics` also scores ``n_permutations`` random shuffles of the labels (same class sizes, no
structure) and reports their mean and standard deviation and a permutation p-value per metric:
``(1 + #shuffles scoring at least as well as the observed labels) / (1 + n_permutations)``, "as well" in each
metric's own direction, a tie (equal up to rounding, :data:`TIE_RTOL`) included. Every label value is a class
(filter out rows you do not want scored, e.g. negative "ambiguous" codes, before calling). All randomness
comes from ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.metrics import (
    calinski_harabasz_score,
    davies_bouldin_score,
    pairwise_distances,
    silhouette_score,
)

from sae_refusal.features.arrays import as_labels, as_matrix

__all__ = ["METRIC_NAMES", "ClusterReport", "ClusterScores", "cluster_metrics", "cluster_scores"]

#: Metric names, in :class:`ClusterScores` field order.
METRIC_NAMES: tuple[str, ...] = ("silhouette", "davies_bouldin", "calinski_harabasz")
#: +1 where higher is better, -1 where lower is better.
_DIRECTION: dict[str, int] = {"silhouette": 1, "davies_bouldin": -1, "calinski_harabasz": 1}
#: A shuffle's score this close to the observed one is a tie, so it counts as at least as good. Scikit-learn's
#: Euclidean distances (the ``|x|^2 + |y|^2 - 2 x.y`` expansion) err by about ``sqrt(eps)`` ~ 1e-8 relative
#: on a distance near 0 (a singleton's distance to its own centroid), so one partition relabelled, or
#: duplicate rows with their labels swapped, can score 1e-8 apart: rounding must not decide which ties count.
TIE_RTOL, TIE_ATOL = 1e-6, 1e-9
#: Up to this many rows the silhouette of every permutation reuses one precomputed distance matrix
#: (N^2 float64: 200 MB at 5000 rows); above it each silhouette recomputes distances in chunks.
_PRECOMPUTE_MAX_ROWS = 5000


@dataclass(frozen=True)
class ClusterScores:
    """The three cluster-quality scores of one labelling.

    Attributes:
        silhouette: Mean silhouette coefficient (euclidean); higher = better separated.
        davies_bouldin: Davies-Bouldin index; lower = better.
        calinski_harabasz: Calinski-Harabasz index (variance ratio); higher = better. ``inf`` when every class
            is a single point (zero within-class dispersion) and the classes differ.
    """

    silhouette: float
    davies_bouldin: float
    calinski_harabasz: float


@dataclass(frozen=True)
class ClusterReport:
    """Observed scores, the permutation baseline and per-metric permutation p-values.

    Attributes:
        observed: Scores of the given labels.
        permuted_mean: Mean scores over the label permutations (NaN when ``n_permutations == 0``).
        permuted_std: Population standard deviation (``ddof=0``) over the permutations (NaN when none).
        p_values: Per metric name: ``(1 + #permutations at least as good as observed) /
            (1 + n_permutations)``, "good" in each metric's own direction, ties up to rounding included
            (NaN when ``n_permutations == 0``).
        n_permutations: Number of label permutations scored.
        n_rows: Rows scored (after any ``max_rows`` subsampling).
        n_classes: Distinct labels among the scored rows.
    """

    observed: ClusterScores
    permuted_mean: ClusterScores
    permuted_std: ClusterScores
    p_values: dict[str, float]
    n_permutations: int
    n_rows: int
    n_classes: int

    def to_dict(self) -> dict[str, float | int]:
        """Flat dictionary, e.g. for logging.

        Returns:
            For each metric ``m``: ``m``, ``m_perm_mean``, ``m_perm_std``, ``m_p``; plus ``n_permutations``,
            ``n_rows`` and ``n_classes``.
        """
        out: dict[str, float | int] = {}
        for name in METRIC_NAMES:
            out[name] = getattr(self.observed, name)
            out[f"{name}_perm_mean"] = getattr(self.permuted_mean, name)
            out[f"{name}_perm_std"] = getattr(self.permuted_std, name)
            out[f"{name}_p"] = self.p_values[name]
        out["n_permutations"] = self.n_permutations
        out["n_rows"] = self.n_rows
        out["n_classes"] = self.n_classes
        return out


def _validate(X: npt.NDArray[np.float64], y: npt.NDArray[np.int64], what: str = "") -> int:
    """Check the rows can be scored; return the number of distinct labels."""
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but y has {y.shape[0]} labels{what}")
    n_classes = int(np.unique(y).size)
    if n_classes < 2:
        raise ValueError(f"need at least 2 distinct labels, got {n_classes}{what}")
    if X.shape[0] <= n_classes:
        raise ValueError(
            f"need more rows than distinct labels (silhouette needs 2 <= n_labels <= N - 1): "
            f"{X.shape[0]} rows, {n_classes} labels{what}"
        )
    if X.shape[1] == 0 or not np.ptp(X, axis=0).any():
        raise ValueError(f"X is constant (every row identical): cluster metrics are undefined{what}")
    return n_classes


def _within_dispersion_is_zero(X: npt.NDArray[np.float64], y: npt.NDArray[np.int64]) -> bool:
    return all(not np.ptp(X[y == label], axis=0).any() for label in np.unique(y))


def _scores(
    X: npt.NDArray[np.float64], y: npt.NDArray[np.int64], dist_NN: npt.NDArray[np.float64] | None
) -> ClusterScores:
    try:
        if dist_NN is None:
            sil = silhouette_score(X, y, metric="euclidean")
        else:
            sil = silhouette_score(dist_NN, y, metric="precomputed")
        db = davies_bouldin_score(X, y)
        # scikit-learn returns 1.0 for zero within-class dispersion; the limit is +inf (X is not constant).
        ch = math.inf if _within_dispersion_is_zero(X, y) else calinski_harabasz_score(X, y)
    except ValueError as err:
        raise ValueError(
            f"scikit-learn could not score {X.shape[0]} rows x {X.shape[1]} features: {err}"
        ) from err
    return ClusterScores(silhouette=float(sil), davies_bouldin=float(db), calinski_harabasz=float(ch))


def cluster_scores(X_ND: Any, y_N: Any) -> ClusterScores:
    """Silhouette (euclidean), Davies-Bouldin and Calinski-Harabasz scores of a labelling.

    Args:
        X_ND: ``(N, D)`` numpy array or torch tensor, scored in its original dimensions (as float64).
        y_N: ``(N,)`` integer labels (numpy or torch); every distinct value is a class.

    Returns:
        The three scores.

    Raises:
        ValueError: ``X_ND`` not 2-D, non-finite or constant; ``y_N`` not 1-D integer labels; a length
            mismatch; fewer than 2 distinct labels or no more rows than labels; or scikit-learn failing.
    """
    X, y = as_matrix(X_ND), as_labels(y_N)
    _validate(X, y)
    return _scores(X, y, None)


def _at_least_as_good(score: float, observed: float, sign: int) -> bool:
    """``score`` as good as ``observed`` (up to rounding) or better; ``sign`` +1: higher is better."""
    return sign * score >= sign * observed or math.isclose(
        score, observed, rel_tol=TIE_RTOL, abs_tol=TIE_ATOL
    )


def _stack(scores: list[ClusterScores], reduce: str) -> ClusterScores:
    if not scores:
        return ClusterScores(math.nan, math.nan, math.nan)
    values = {}
    for name in METRIC_NAMES:
        col = np.array([getattr(s, name) for s in scores], dtype=np.float64)
        values[name] = float(np.mean(col) if reduce == "mean" else np.std(col))
    return ClusterScores(**values)


def cluster_metrics(
    X_ND: Any, y_N: Any, *, n_permutations: int = 20, seed: int = 0, max_rows: int | None = None
) -> ClusterReport:
    """Cluster-quality scores of a labelling against a label-permutation baseline.

    Args:
        X_ND: ``(N, D)`` numpy array or torch tensor, scored in its original dimensions (as float64).
        y_N: ``(N,)`` integer labels (numpy or torch); every distinct value is a class.
        n_permutations: Random label shuffles to score (0 = no baseline: permuted stats and p-values NaN).
        seed: Seed of the ``numpy.random.default_rng`` that draws the subsample and the shuffles.
        max_rows: When set and ``N > max_rows``, score a random subset of ``max_rows`` rows (drawn without
            replacement, in original order) so large sets stay fast; silhouette is quadratic in rows.

    Returns:
        The report (observed scores, permutation mean / std, p-values, sizes).

    Raises:
        ValueError: As :func:`cluster_scores` (checked on the subsample too), or ``n_permutations < 0``, or
            ``max_rows < 1``.
    """
    if n_permutations < 0:
        raise ValueError(f"n_permutations must be >= 0, got {n_permutations}")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
    X, y = as_matrix(X_ND), as_labels(y_N)
    _validate(X, y)
    rng = np.random.default_rng(seed)
    if max_rows is not None and X.shape[0] > max_rows:
        keep = np.sort(rng.choice(X.shape[0], size=max_rows, replace=False))
        X, y = X[keep], y[keep]
        n_classes = _validate(X, y, f" (after subsampling to max_rows={max_rows})")
    else:
        n_classes = _validate(X, y)

    dist_NN: npt.NDArray[np.float64] | None = None
    if n_permutations > 0 and X.shape[0] <= _PRECOMPUTE_MAX_ROWS:
        dist_NN = pairwise_distances(X, metric="euclidean")
        np.fill_diagonal(dist_NN, 0.0)
    observed = _scores(X, y, dist_NN)

    permuted = [_scores(X, rng.permutation(y), dist_NN) for _ in range(n_permutations)]
    p_values: dict[str, float] = {}
    for name in METRIC_NAMES:
        if not permuted:
            p_values[name] = math.nan
            continue
        obs = getattr(observed, name)
        sign = _DIRECTION[name]
        as_good = sum(_at_least_as_good(getattr(s, name), obs, sign) for s in permuted)
        p_values[name] = (1 + as_good) / (1 + n_permutations)

    return ClusterReport(
        observed=observed,
        permuted_mean=_stack(permuted, "mean"),
        permuted_std=_stack(permuted, "std"),
        p_values=p_values,
        n_permutations=n_permutations,
        n_rows=int(X.shape[0]),
        n_classes=n_classes,
    )
