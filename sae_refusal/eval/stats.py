"""Small statistics for evaluation tables: bootstrap confidence intervals and Cohen's kappa.

Design notes:

* Every aggregate the evaluation reports is an :class:`Estimate`: the point value, a confidence interval and
  the number of items behind it, so a table cell never shows a rate without its uncertainty and its count.
  A rate is the mean of 0/1 values (1 = refused), so :func:`bootstrap_mean` covers rates and real-valued
  scores (accuracies, log-likelihoods) alike.
* Intervals are percentile bootstraps. Resampling is vectorised: index matrices of shape
  ``(chunk, n)`` are drawn at once, chunked so that no more than about :data:`_MAX_DRAWS` indices are held in
  memory, instead of a Python loop over resamples.
* Randomness comes only from ``np.random.default_rng(seed)`` (and, per group, its spawned children), never
  from the global NumPy state: the same seed gives the same interval, bit for bit, wherever it is called
  from and however the resamples are chunked.
* :func:`bootstrap_group_mean` is the macro average over groups (e.g. CoCoNot categories): each group weighs
  the same whatever its size, and the bootstrap resamples within each group (a stratified bootstrap), so
  every resample keeps every group and its size.
* No items is not an error: the estimate is NaN with ``n == 0`` (an empty cell in a table); malformed
  arguments raise ``ValueError`` naming the argument.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Estimate", "bootstrap_group_mean", "bootstrap_mean", "bootstrap_ratio", "cohen_kappa"]

#: Most resampled indices held at once (a chunk of resamples is ``(chunk, n)``).
_MAX_DRAWS = 1 << 22


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its confidence interval and item count.

    Args:
        value: The point estimate (e.g. the share refused); NaN when ``n == 0``.
        low: Lower end of the confidence interval; NaN when ``n == 0``.
        high: Upper end of the confidence interval; NaN when ``n == 0``.
        n: Number of items behind the estimate.
    """

    value: float
    low: float
    high: float
    n: int

    def to_json(self) -> dict[str, Any]:
        """``{"value", "low", "high", "n"}`` (floats stay NaN when there are no items)."""
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n}

    def format(self, digits: int = 3) -> str:
        """``"0.412 [0.351, 0.470] (n=120)"``, with ``digits`` decimals."""
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}] (n={self.n})"


def _check_options(n_boot: int, level: float) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, int | np.integer) or n_boot < 1:
        raise ValueError(f"n_boot: must be a positive integer, got {n_boot!r}")
    if isinstance(level, bool) or not isinstance(level, int | float) or not 0.0 < float(level) < 1.0:
        raise ValueError(f"level: must be strictly between 0 and 1, got {level!r}")


def _as_values(values: np.ndarray | Sequence[float], name: str) -> np.ndarray:
    try:
        values_N = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: expected a 1-D sequence of numbers ({err})") from err
    if values_N.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of numbers, got shape {values_N.shape}")
    if not np.isfinite(values_N).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return values_N


def _chunks(n_boot: int, n_items: int) -> list[int]:
    """Resamples per chunk, so that one chunk draws at most about ``_MAX_DRAWS`` indices."""
    size = max(1, _MAX_DRAWS // max(1, n_items))
    return [min(size, n_boot - start) for start in range(0, n_boot, size)]


def _interval(value: float, means_B: np.ndarray, n: int, level: float) -> Estimate:
    tail = (1.0 - float(level)) / 2.0
    low, high = np.quantile(means_B, [tail, 1.0 - tail])
    return Estimate(value=value, low=float(low), high=float(high), n=n)


def _nan(n: int = 0) -> Estimate:
    return Estimate(value=math.nan, low=math.nan, high=math.nan, n=n)


def bootstrap_mean(
    values_N: np.ndarray | Sequence[float], *, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> Estimate:
    """The mean of ``values_N`` with a percentile-bootstrap confidence interval.

    Args:
        values_N: One value per item (0/1 for a rate).
        n_boot: Number of bootstrap resamples.
        seed: Seed of ``np.random.default_rng`` (the global NumPy state is not used).
        level: Confidence level of the interval, e.g. ``0.95``.

    Returns:
        The mean, the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the resampled means, and
        ``n = len(values_N)``; all NaN with ``n == 0`` when there are no values.

    Raises:
        ValueError: If ``values_N`` is not 1-D or not finite, ``n_boot < 1`` or ``level`` is not in (0, 1).
    """
    _check_options(n_boot, level)
    values = _as_values(values_N, "values_N")
    n = int(values.size)
    if n == 0:
        return _nan()
    rng = np.random.default_rng(seed)
    parts = [values[rng.integers(0, n, size=(chunk, n))].mean(axis=1) for chunk in _chunks(n_boot, n)]
    return _interval(float(values.mean()), np.concatenate(parts), n, level)


def bootstrap_ratio(
    numerator_N: np.ndarray | Sequence[float],
    denominator_N: np.ndarray | Sequence[float],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> Estimate:
    """``sum(numerator) / sum(denominator)`` with a percentile-bootstrap interval over items.

    The token-weighted mean of per-item values (e.g. NLL summed over an answer's tokens over the token
    counts): items are resampled whole, so the interval brackets the same weighted estimate it reports.

    Raises:
        ValueError: On arrays of different shapes, non-finite values, a non-positive denominator sum, or bad
            ``n_boot`` / ``level``.
    """
    _check_options(n_boot, level)
    num = _as_values(numerator_N, "numerator_N")
    den = _as_values(denominator_N, "denominator_N")
    if num.shape != den.shape:
        raise ValueError(f"numerator_N and denominator_N: shapes {num.shape} and {den.shape} differ")
    n = int(num.size)
    if n == 0:
        return _nan()
    if float(den.sum()) <= 0:
        raise ValueError("denominator_N: must sum to a positive number")
    rng = np.random.default_rng(seed)
    parts = []
    for chunk in _chunks(n_boot, n):
        index = rng.integers(0, n, size=(chunk, n))
        parts.append(num[index].sum(axis=1) / np.maximum(den[index].sum(axis=1), 1e-300))
    return _interval(float(num.sum() / den.sum()), np.concatenate(parts), n, level)


def bootstrap_group_mean(
    groups: Mapping[str, np.ndarray | Sequence[float]],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> Estimate:
    """The unweighted mean of group means (macro average), with a stratified-bootstrap interval.

    Each resample draws every group's items with replacement within that group (keeping its size), takes
    each group's mean and averages them with equal weight.

    Args:
        groups: Group name (e.g. a category) -> that group's values.
        n_boot: Number of bootstrap resamples.
        seed: Seed of ``np.random.default_rng`` (the global NumPy state is not used).
        level: Confidence level of the interval.

    Returns:
        The macro average with its interval; ``n`` is the total number of items over all groups. All NaN
        with ``n == 0`` when ``groups`` is empty.

    Raises:
        ValueError: If a group is empty (named) or malformed, ``n_boot < 1`` or ``level`` is not in (0, 1).
    """
    _check_options(n_boot, level)
    arrays: dict[str, np.ndarray] = {}
    for name, values in groups.items():
        arrays[name] = _as_values(values, f"groups[{name!r}]")
        if arrays[name].size == 0:
            raise ValueError(f"groups[{name!r}]: empty group; drop it or give it at least one value")
    if not arrays:
        return _nan()
    n_total = sum(int(a.size) for a in arrays.values())
    value = float(np.mean([a.mean() for a in arrays.values()]))
    # one child generator per group: a group's draws do not depend on the chunking or on the other groups
    rngs = np.random.default_rng(seed).spawn(len(arrays))
    parts = []
    for chunk in _chunks(n_boot, max(a.size for a in arrays.values())):
        sum_B = np.zeros(chunk)
        for rng, values in zip(rngs, arrays.values(), strict=True):
            sum_B += values[rng.integers(0, values.size, size=(chunk, values.size))].mean(axis=1)
        parts.append(sum_B / len(arrays))
    return _interval(value, np.concatenate(parts), n_total, level)


def cohen_kappa(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Cohen's kappa of two binary labellings of the same items.

    ``kappa = (p_o - p_e) / (1 - p_e)`` with observed agreement ``p_o`` and chance agreement ``p_e`` from the
    two raters' marginal rates. When ``p_e == 1`` (both raters gave one and the same label to every item)
    the formula is 0/0; this returns ``1.0`` when the observed agreement is perfect and ``0.0`` otherwise,
    instead of NaN. No items gives NaN.

    Args:
        a: First rater's labels.
        b: Second rater's labels, item for item.

    Raises:
        ValueError: If the lengths differ.
    """
    if len(a) != len(b):
        raise ValueError(f"a, b: label sequences differ in length ({len(a)} vs {len(b)})")
    if len(a) == 0:
        return math.nan
    a_N = np.asarray(a, dtype=bool)
    b_N = np.asarray(b, dtype=bool)
    p_observed = float(np.mean(a_N == b_N))
    rate_a, rate_b = float(a_N.mean()), float(b_N.mean())
    p_expected = rate_a * rate_b + (1.0 - rate_a) * (1.0 - rate_b)
    if p_expected >= 1.0:
        return 1.0 if p_observed >= 1.0 else 0.0
    return (p_observed - p_expected) / (1.0 - p_expected)
