"""Cluster-quality metrics with a permutation baseline (sae_refusal.features.clusters)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score

from sae_refusal.features.clusters import ClusterReport, ClusterScores, cluster_metrics, cluster_scores

METRICS = ("silhouette", "davies_bouldin", "calinski_harabasz")


def blobs(
    n_per_class: int = 30, n_classes: int = 3, dim: int = 8, spread: float = 50.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated Gaussian blobs: class k centred at spread * k on every axis."""
    rng = np.random.default_rng(seed)
    X = np.concatenate([rng.normal(size=(n_per_class, dim)) + spread * k for k in range(n_classes)])
    y = np.repeat(np.arange(n_classes), n_per_class)
    return X, y


def test_cluster_scores_match_sklearn() -> None:
    X, y = blobs(spread=2.0)
    scores = cluster_scores(X, y)
    assert isinstance(scores, ClusterScores)
    assert scores.silhouette == pytest.approx(silhouette_score(X, y, metric="euclidean"))
    assert scores.davies_bouldin == pytest.approx(davies_bouldin_score(X, y))
    assert scores.calinski_harabasz == pytest.approx(calinski_harabasz_score(X, y))


def test_separated_blobs_score_well_and_beat_every_permutation() -> None:
    X, y = blobs()
    report = cluster_metrics(X, y, n_permutations=15, seed=1)
    assert isinstance(report, ClusterReport)
    assert report.observed.silhouette > 0.95
    assert report.observed.davies_bouldin < 0.1
    assert report.observed.calinski_harabasz > 1000.0
    # no shuffle does as well as the true labels, in each metric's own direction
    for name in METRICS:
        assert report.p_values[name] == pytest.approx(1 / 16)
    # shuffled labels carry no structure
    assert abs(report.permuted_mean.silhouette) < 0.1
    assert report.permuted_mean.davies_bouldin > 10 * report.observed.davies_bouldin
    assert report.permuted_mean.calinski_harabasz < report.observed.calinski_harabasz / 100
    assert report.permuted_std.silhouette >= 0.0
    assert (report.n_permutations, report.n_rows, report.n_classes) == (15, 90, 3)
    # observed scores use a precomputed distance matrix for the silhouette: same numbers as cluster_scores
    direct = cluster_scores(X, y)
    for name in METRICS:
        assert getattr(report.observed, name) == pytest.approx(getattr(direct, name), rel=1e-9)


def test_shuffles_that_score_exactly_as_well_count_as_at_least_as_good() -> None:
    """Exact ties: the corners of a simplex (one-hot rows) are all equidistant, so every labelling with the
    same class sizes scores the same, bit for bit; every shuffle ties, and p = (1 + n) / (1 + n) = 1.

    Kills: ``>`` for ``>=`` in the count (p would be 1 / (1 + n)).
    """
    for X, y in ((np.eye(4), [0, 0, 1, 1]), (np.eye(5), [0, 0, 1, 1, 1])):
        report = cluster_metrics(X, np.array(y), n_permutations=12, seed=0)
        assert report.permuted_std == ClusterScores(0.0, 0.0, 0.0)  # exact ties
        assert report.p_values == dict.fromkeys(METRICS, 1.0)


def test_shuffles_that_tie_up_to_rounding_count_as_at_least_as_good() -> None:
    """The simplex rotated and shifted: still every labelling ties, but only up to the rounding of
    scikit-learn's distances (up to ~1e-8 relative on a distance near 0: a singleton's distance to its own
    centroid). Rounding must not decide which ties count: p = 1 for every metric.

    Kills: an exact comparison (it counts about half of these ties: p 0.4-0.9 here), a tolerance below the
    distances' error (seed 2: Davies-Bouldin ties 1.5e-8 apart).
    """
    for seed, y in ((2, [0, 1, 2, 2]), (3, [0, 0, 1, 1, 2]), (4, [0, 0, 0, 1, 1, 1])):
        rng = np.random.default_rng(seed)
        n = len(y)
        rotation, _ = np.linalg.qr(rng.normal(size=(n, n)))
        X = 3.7 * rotation + rng.normal(size=n)
        report = cluster_metrics(X, np.array(y), n_permutations=40, seed=0)
        assert report.p_values == dict.fromkeys(METRICS, 1.0), (y, report.permuted_std)


def test_random_labels_give_large_p_values() -> None:
    rng = np.random.default_rng(3)
    X = rng.normal(size=(120, 6))
    y = rng.integers(0, 3, size=120)
    report = cluster_metrics(X, y, n_permutations=30, seed=4)
    for name in METRICS:
        assert report.p_values[name] > 0.1, (name, report.p_values)
    assert (
        abs(report.observed.silhouette - report.permuted_mean.silhouette) < 4 * report.permuted_std.silhouette
    )


def test_to_dict_is_flat_with_all_keys() -> None:
    X, y = blobs(n_per_class=10)
    report = cluster_metrics(X, y, n_permutations=3)
    d = report.to_dict()
    expected = {"n_permutations", "n_rows", "n_classes"}
    for name in METRICS:
        expected |= {name, f"{name}_perm_mean", f"{name}_perm_std", f"{name}_p"}
    assert set(d) == expected
    assert d["silhouette"] == report.observed.silhouette
    assert d["davies_bouldin_perm_mean"] == report.permuted_mean.davies_bouldin
    assert d["calinski_harabasz_perm_std"] == report.permuted_std.calinski_harabasz
    assert d["silhouette_p"] == report.p_values["silhouette"]
    assert (d["n_permutations"], d["n_rows"], d["n_classes"]) == (3, 30, 3)
    assert all(isinstance(v, float | int) for v in d.values())


def test_zero_permutations_give_nan_baseline() -> None:
    X, y = blobs(n_per_class=10)
    report = cluster_metrics(X, y, n_permutations=0)
    assert report.observed.silhouette > 0.9
    for name in METRICS:
        assert math.isnan(getattr(report.permuted_mean, name))
        assert math.isnan(getattr(report.permuted_std, name))
        assert math.isnan(report.p_values[name])
    assert report.n_permutations == 0


def test_torch_and_numpy_inputs_agree() -> None:
    gen = torch.Generator().manual_seed(0)
    X_t = torch.randn(60, 5, generator=gen) + torch.arange(3).repeat_interleave(20)[:, None] * 3.0
    y_t = torch.arange(3).repeat_interleave(20)
    from_torch = cluster_metrics(X_t, y_t, n_permutations=5, seed=2)
    from_numpy = cluster_metrics(X_t.numpy(), y_t.numpy(), n_permutations=5, seed=2)
    for name in METRICS:
        for field in ("observed", "permuted_mean", "permuted_std"):
            assert getattr(getattr(from_torch, field), name) == pytest.approx(
                getattr(getattr(from_numpy, field), name), rel=1e-9
            )
    assert from_torch.p_values == from_numpy.p_values
    # half precision and tensors that require grad are converted with .detach().cpu().float()
    assert cluster_scores(X_t.half(), y_t).silhouette == pytest.approx(
        from_torch.observed.silhouette, abs=1e-2
    )
    assert cluster_scores(X_t.clone().requires_grad_(True), y_t).silhouette == pytest.approx(
        from_torch.observed.silhouette
    )


def test_seed_reproducibility_and_global_rng_untouched() -> None:
    X, y = blobs(n_per_class=15, spread=1.0)
    np.random.seed(1234)
    expected = np.random.random(4)
    np.random.seed(1234)
    a = cluster_metrics(X, y, n_permutations=8, seed=7)
    b = cluster_metrics(X, y, n_permutations=8, seed=7)
    c = cluster_metrics(X, y, n_permutations=8, seed=8)
    assert a == b
    assert a.permuted_mean != c.permuted_mean
    assert a.observed == c.observed
    assert np.array_equal(np.random.random(4), expected)  # the global RNG was not drawn from


def test_max_rows_subsamples_reproducibly() -> None:
    X, y = blobs(n_per_class=40, spread=5.0)
    small = cluster_metrics(X, y, n_permutations=4, seed=5, max_rows=50)
    assert small.n_rows == 50 and small.n_classes == 3
    assert small == cluster_metrics(X, y, n_permutations=4, seed=5, max_rows=50)
    assert cluster_metrics(X, y, n_permutations=4, seed=6, max_rows=50).observed != small.observed
    # max_rows at or above N changes nothing
    full = cluster_metrics(X, y, n_permutations=4, seed=5)
    assert cluster_metrics(X, y, n_permutations=4, seed=5, max_rows=120) == full
    assert full.n_rows == 120


def test_max_rows_that_loses_classes_is_an_error() -> None:
    X, y = blobs(n_per_class=30, n_classes=2)
    y = y.copy()
    y[:] = 0
    y[0] = 1  # one row of class 1: a 3-row subsample almost surely misses it
    with pytest.raises(ValueError, match="max_rows=3"):
        cluster_metrics(X, y, max_rows=3, seed=0)


def test_collapsed_classes_have_infinite_calinski_harabasz() -> None:
    X = np.repeat(np.array([[0.0, 0.0], [5.0, 1.0], [-3.0, 4.0]]), 4, axis=0)
    y = np.repeat(np.arange(3), 4)
    scores = cluster_scores(X, y)
    assert scores.silhouette == pytest.approx(1.0)
    assert scores.davies_bouldin == pytest.approx(0.0)
    assert scores.calinski_harabasz == math.inf
    report = cluster_metrics(X, y, n_permutations=5)
    assert report.p_values["calinski_harabasz"] == pytest.approx(1 / 6)


@pytest.mark.parametrize(
    ("X", "y", "kwargs", "match"),
    [
        (np.zeros((4, 3, 2)), np.array([0, 1, 0, 1]), {}, r"2-D.*\(4, 3, 2\)"),
        (np.zeros(6), np.array([0, 1, 0, 1, 0, 1]), {}, r"2-D.*\(6,\)"),
        (np.arange(12.0).reshape(6, 2), np.array([0, 1, 0, 1, 0]), {}, "6 rows but y has 5 labels"),
        (np.arange(12.0).reshape(6, 2), np.zeros((6, 1), dtype=int), {}, r"1-D.*\(6, 1\)"),
        (np.arange(12.0).reshape(6, 2), np.zeros(6, dtype=int), {}, "at least 2 distinct labels, got 1"),
        (np.arange(6.0).reshape(3, 2), np.array([0, 1, 2]), {}, "3 rows, 3 labels"),
        (np.arange(12.0).reshape(6, 2), np.array([0, 1] * 3), {"n_permutations": -1}, "n_permutations.*-1"),
        (np.arange(12.0).reshape(6, 2), np.array([0, 1] * 3), {"max_rows": 0}, "max_rows.*0"),
        (np.ones((6, 2)), np.array([0, 1] * 3), {}, "constant"),
        (np.array([[0.0, 1.0], [np.nan, 2.0], [1.0, 1.0], [2.0, 0.0]]), np.array([0, 1, 0, 1]), {}, "NaN"),
        (np.arange(12.0).reshape(6, 2), np.array([0.0, 0.5, 1.0, 0.0, 0.5, 1.0]), {}, "integer labels"),
    ],
)
def test_bad_inputs_raise(X: np.ndarray, y: np.ndarray, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cluster_metrics(X, y, **{"n_permutations": 2, **kwargs})
    if not kwargs:
        with pytest.raises(ValueError, match=match):
            cluster_scores(X, y)


def test_sklearn_errors_are_reraised_as_value_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from sae_refusal.features import clusters

    def broken(*args: object, **kwargs: object) -> float:
        raise ValueError("boom")

    monkeypatch.setattr(clusters, "davies_bouldin_score", broken)
    X, y = blobs(n_per_class=5)
    with pytest.raises(ValueError, match=r"scikit-learn could not score 15 rows x 8 features: boom"):
        cluster_scores(X, y)


def test_float_integral_and_bool_labels_are_accepted() -> None:
    X, y = blobs(n_per_class=10, n_classes=2)
    ref = cluster_scores(X, y)
    assert cluster_scores(X, y.astype(np.float32)) == ref
    assert cluster_scores(X, y.astype(bool)) == ref
    assert cluster_scores(X.astype(np.float32), y).silhouette == pytest.approx(ref.silhouette, rel=1e-6)
