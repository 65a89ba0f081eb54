"""k-sparse probing and the dense baseline (sae_eval/probing.py) on data whose answers are known by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sae_refusal.sae_eval.probing import (
    HARMFUL_TASK,
    binary_tasks,
    dense_probes,
    fit_probe,
    k_sparse_probe,
    rank_latents,
    sparse_probing,
)


def test_tasks_are_harmful_vs_benign_and_each_category_vs_the_rest() -> None:
    tasks = binary_tasks([0, 1, 2, 1], ["benign", "a", "b"])
    assert list(tasks) == [HARMFUL_TASK, "a", "b"]
    assert tasks[HARMFUL_TASK].tolist() == [False, True, True, True]
    assert tasks["a"].tolist() == [False, True, False, True]
    assert tasks["b"].tolist() == [False, False, True, False]


def test_latents_are_ranked_by_the_mean_code_difference_on_the_fit_rows() -> None:
    y = np.array([True, True, False, False])
    # mean differences (positive - negative): latent 0 +1, latent 1 -2, latent 2 +0.5, latent 3 0
    Z = np.array([[1.0, 0.0, 0.5, 1.0], [1.0, 0.0, 0.5, 1.0], [0.0, 2.0, 0.0, 1.0], [0.0, 2.0, 0.0, 1.0]])
    assert rank_latents(Z, y).tolist() == [1, 0, 2, 3]  # |difference|
    assert rank_latents(Z, y, signed=True).tolist() == [0, 2, 3, 1]  # firing *for* the positives first
    with pytest.raises(ValueError, match="one class only"):
        rank_latents(Z, np.ones(4, dtype=bool))


def test_probe_scores_by_hand() -> None:
    # one binary feature, balanced fit rows: the probe predicts positive exactly where the feature is 1
    X_train, y_train = np.array([[1.0], [1.0], [0.0], [0.0]]), np.array([1, 1, 0, 0])
    X_test, y_test = np.array([[1.0], [0.0], [0.0], [0.0], [1.0]]), np.array([1, 1, 0, 0, 0])
    score, probe = fit_probe(X_train, y_train, X_test, y_test)
    # predictions 1 0 0 0 1: 3 of 5 right; recalls 1/2 (positives) and 2/3 (negatives); F1 2*1 / (2 + 2)
    assert score.accuracy == pytest.approx(3 / 5)
    assert score.balanced_accuracy == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert score.f1 == pytest.approx(0.5)
    assert score.train_f1 == 1.0
    assert (score.n_train, score.n_test, score.n_test_positive) == (4, 5, 2)
    assert (probe.decision(X_test) > 0).tolist() == [True, False, False, False, True]
    with pytest.raises(ValueError, match="one class only"):
        fit_probe(X_train, np.zeros(4), X_test, y_test)


def test_the_probe_is_expressed_on_the_raw_unstandardised_features() -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 3)) * [1.0, 10.0, 0.1] + [5.0, -2.0, 0.0]
    y = X[:, 0] + 0.1 * X[:, 1] + rng.normal(size=60) > 4.8
    _, probe = fit_probe(X, y, X, y, C=0.5)
    mean, std = X.mean(0), X.std(0)
    reference = LogisticRegression(C=0.5, class_weight="balanced", max_iter=2000).fit((X - mean) / std, y)
    np.testing.assert_allclose(probe.decision(X), reference.decision_function((X - mean) / std), atol=1e-6)


def test_k_sparse_probe_keeps_the_top_k_latents() -> None:
    y = np.array([True, True, False, False])
    Z = np.array([[0.0, 0.0, 0.1], [0.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 2.0, 0.0]])
    score = k_sparse_probe(Z, y, Z, y, k=1)
    assert score.latents == [1] and score.accuracy == 1.0  # latent 1 (difference -2) separates alone
    assert k_sparse_probe(Z, y, Z, y, k=10).latents == [1, 2, 0]  # k is capped at the dictionary size


def test_sparse_probing_reports_every_task_and_k_and_skips_a_task_without_positives() -> None:
    names = ["benign", "a", "b", "c"]  # no row of c: its task is skipped
    classes = np.array([0, 0, 1, 1, 2, 2] * 3)
    Z = np.zeros((len(classes), 4))
    Z[classes == 1, 1] = 1.0  # latent 1 fires for a, latent 2 for b, latent 3 for every harmful row
    Z[classes == 2, 2] = 1.0
    Z[classes > 0, 3] = 1.0
    report = sparse_probing(Z, classes, Z, classes, names, [1, 2])
    assert report["tasks"]["c"] == {"skipped": "the fit rows hold one class only (0 of 18 positive)"}
    assert report["tasks"]["a"]["1"]["latents"] == [1]
    assert report["tasks"][HARMFUL_TASK]["1"]["latents"] == [3]
    for k in ("1", "2"):
        assert report["summary"]["accuracy"][k] == {HARMFUL_TASK: 1.0, "category_mean": 1.0}
    dense, probes = dense_probes(Z, classes, Z, classes, names)
    assert sorted(probes) == ["a", "b", HARMFUL_TASK] and "skipped" in dense["tasks"]["c"]
    assert dense["summary"]["accuracy"] == {HARMFUL_TASK: 1.0, "category_mean": 1.0}


def test_the_category_mean_averages_the_tasks_that_ran() -> None:
    names = ["benign", "a", "b", "c"]
    classes_train = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    Z_train = np.repeat(np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=float), 2, axis=0)
    classes_test = np.array([0, 1, 2, 3])
    Z_test = np.array([[0, 0, 0], [1, 0, 0], [1, 0, 0], [0, 0, 1]], dtype=float)  # the b row looks like a
    report = sparse_probing(Z_train, classes_train, Z_test, classes_test, names, [1])
    acc = {task: report["tasks"][task]["1"]["accuracy"] for task in names[1:]}
    # a calls the b row a, b misses it, c is right: 3/4, 3/4, 1
    assert acc == {"a": pytest.approx(3 / 4), "b": pytest.approx(3 / 4), "c": 1.0}
    assert report["summary"]["accuracy"]["1"]["category_mean"] == pytest.approx(2.5 / 3)
    assert not math.isnan(report["summary"]["balanced_accuracy"]["1"]["category_mean"])
