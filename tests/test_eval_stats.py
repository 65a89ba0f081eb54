"""Bootstrap estimates and Cohen's kappa against hand computations and known values."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from sae_refusal.eval import stats
from sae_refusal.eval.stats import Estimate, bootstrap_group_mean, bootstrap_mean, cohen_kappa


def test_estimate_json_and_format() -> None:
    est = Estimate(value=0.4123, low=0.3511, high=0.47, n=120)
    assert est.to_json() == {"value": 0.4123, "low": 0.3511, "high": 0.47, "n": 120}
    assert est.format() == "0.412 [0.351, 0.470] (n=120)"
    assert est.format(digits=1) == "0.4 [0.4, 0.5] (n=120)"


def test_no_values_is_nan_not_an_error() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice" on the way
        estimates = (bootstrap_mean([]), bootstrap_group_mean({}))
        assert math.isnan(cohen_kappa([], []))
    for est in estimates:
        assert est.n == 0
        assert math.isnan(est.value) and math.isnan(est.low) and math.isnan(est.high)
        assert est.format() == "nan [nan, nan] (n=0)"


def test_bootstrap_mean_hand_computed_quantiles() -> None:
    # resampled means of [0, 1] are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4
    wide = bootstrap_mean([0.0, 1.0], n_boot=4000, seed=3)
    assert (wide.value, wide.low, wide.high, wide.n) == (0.5, 0.0, 1.0, 2)
    narrow = bootstrap_mean([0.0, 1.0], n_boot=4000, seed=3, level=0.4)  # quantiles 0.3 and 0.7
    assert (narrow.low, narrow.high) == (0.5, 0.5)
    constant = bootstrap_mean(np.full(7, 0.25), n_boot=50)
    assert (constant.value, constant.low, constant.high, constant.n) == (0.25, 0.25, 0.25, 7)


def test_bootstrap_mean_matches_a_direct_resampling() -> None:
    values = np.random.default_rng(1).random(31)
    direct_rng = np.random.default_rng(5)
    means = values[direct_rng.integers(0, 31, size=(500, 31))].mean(axis=1)
    low, high = np.quantile(means, [0.05, 0.95])
    est = bootstrap_mean(values, n_boot=500, seed=5, level=0.9)
    assert est.value == pytest.approx(values.mean())
    assert (est.low, est.high) == (pytest.approx(low), pytest.approx(high))


def test_bootstrap_chunking_does_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    values = np.random.default_rng(2).integers(0, 2, 40).astype(float)
    groups = {"a": values[:25], "b": values[25:]}
    whole = bootstrap_mean(values, n_boot=300, seed=9)
    whole_groups = bootstrap_group_mean(groups, n_boot=300, seed=9)
    monkeypatch.setattr(stats, "_MAX_DRAWS", 7 * 40)  # 7 resamples per chunk, last chunk shorter
    assert bootstrap_mean(values, n_boot=300, seed=9) == whole
    assert bootstrap_group_mean(groups, n_boot=300, seed=9) == whole_groups


def test_bootstrap_interval_contains_mean_and_shrinks_with_n() -> None:
    rng = np.random.default_rng(0)
    widths = []
    for n in (40, 400, 4000):
        values = (rng.random(n) < 0.3).astype(float)
        est = bootstrap_mean(values, n_boot=1000, seed=1)
        assert est.low <= est.value <= est.high
        assert est.n == n
        widths.append(est.high - est.low)
    assert widths[0] > widths[1] > widths[2] > 0


def test_bootstrap_seeding_is_local_and_reproducible() -> None:
    values = (np.random.default_rng(4).random(60) < 0.5).astype(float)
    np.random.seed(123)
    first = bootstrap_mean(values, seed=11)
    np.random.seed(999)  # the global state is not used
    assert bootstrap_mean(values, seed=11) == first
    other = bootstrap_mean(values, seed=12)
    assert (other.low, other.high) != (first.low, first.high)
    assert other.value == first.value


def test_group_mean_is_mean_of_means_with_stratified_interval() -> None:
    groups = {"a": [1.0, 1.0, 1.0], "b": [0.0, 1.0]}
    est = bootstrap_group_mean(groups, n_boot=4000, seed=0)
    assert est.value == pytest.approx((1.0 + 0.5) / 2)  # the pooled mean would be 0.8
    assert est.n == 5
    # "a" always resamples to 1, "b" to 0, 0.5 or 1: the macro means are 0.5, 0.75, 1
    assert (est.low, est.high) == (0.5, 1.0)
    assert bootstrap_group_mean(groups, n_boot=4000, seed=0, level=0.4).low == 0.75
    rich = {"a": np.random.default_rng(0).random(30), "b": np.random.default_rng(1).random(12)}
    assert bootstrap_group_mean(rich, seed=1) == bootstrap_group_mean(rich, seed=1)
    assert bootstrap_group_mean(rich, seed=2).low != bootstrap_group_mean(rich, seed=1).low


def test_group_mean_rejects_an_empty_group() -> None:
    with pytest.raises(ValueError, match=r"groups\['fake'\].*empty"):
        bootstrap_group_mean({"real": [1.0], "fake": []})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_boot": 0}, "n_boot"),
        ({"n_boot": True}, "n_boot"),
        ({"n_boot": 2.5}, "n_boot"),
        ({"level": 0.0}, "level"),
        ({"level": 1.0}, "level"),
        ({"level": 95}, "level"),
    ],
)
def test_bad_options_name_the_argument(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        bootstrap_mean([1.0, 0.0], **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match):
        bootstrap_group_mean({"a": [1.0]}, **kwargs)  # type: ignore[arg-type]


def test_bad_values_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r"values_N.*1-D"):
        bootstrap_mean(np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"values_N.*NaN"):
        bootstrap_mean([0.0, math.nan])
    with pytest.raises(ValueError, match=r"groups\['a'\].*NaN"):
        bootstrap_group_mean({"a": [math.inf]})


def test_cohen_kappa_textbook_example() -> None:
    # 50 items: both yes 20, a yes / b no 5, a no / b yes 10, both no 15 -> p_o 0.7, p_e 0.5, kappa 0.4
    a = [True] * 25 + [False] * 25
    b = [True] * 20 + [False] * 5 + [True] * 10 + [False] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(a, a) == 1.0
    assert cohen_kappa(a, [not x for x in a]) == pytest.approx(-1.0)


def test_cohen_kappa_matches_sklearn() -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(7)
    for p_a, p_b in ((0.5, 0.5), (0.2, 0.7), (0.9, 0.85)):
        a = (rng.random(80) < p_a).tolist()
        b = [x if rng.random() < 0.7 else (rng.random() < p_b) for x in a]
        assert cohen_kappa(a, b) == pytest.approx(sklearn_metrics.cohen_kappa_score(a, b))


def test_cohen_kappa_degenerate_cases() -> None:
    # chance agreement 1 (both raters give one label to everything): 0/0, defined as 1.0 when they agree
    assert cohen_kappa([True] * 4, [True] * 4) == 1.0
    assert cohen_kappa([False] * 3, [False] * 3) == 1.0
    assert cohen_kappa([True, True], [False, False]) == 0.0  # chance agreement 0, observed 0
    with pytest.raises(ValueError, match=r"length"):
        cohen_kappa([True], [True, False])


def test_bootstrap_ratio_is_the_token_weighted_mean_and_brackets_it() -> None:
    from sae_refusal.eval.stats import bootstrap_ratio

    nll_sum = np.array([10.0, 2.0, 30.0, 4.0])
    tokens = np.array([5.0, 1.0, 10.0, 4.0])
    est = bootstrap_ratio(nll_sum, tokens, n_boot=500, seed=1)
    assert est.value == pytest.approx(46.0 / 20.0) and est.n == 4
    assert est.low <= est.value <= est.high
    # not the unweighted mean of per-item ratios (2, 2, 3, 1 -> 2.0)
    assert est.value != pytest.approx(2.0)
    # one item resampled n times: the interval collapses to its ratio
    same = bootstrap_ratio([6.0, 6.0], [3.0, 3.0], n_boot=50)
    assert (same.low, same.high) == (2.0, 2.0)
    with pytest.raises(ValueError, match="shapes"):
        bootstrap_ratio([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="denominator_N"):
        bootstrap_ratio([1.0], [0.0])
