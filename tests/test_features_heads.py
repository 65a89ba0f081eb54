"""L1 classification heads on SAE-like codes: planted class features are found, scores and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_refusal.features.heads import fit_sklearn_head, fit_torch_head

NAMES = ["benign", "a", "b", "c"]


def planted(
    n_per_class: int, seed: int, classes: tuple[int, ...] = (0, 1, 2, 3)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse non-negative codes of 20 features: class i adds 2-3 to feature 10 + i; every feature
    (the other class features too) also fires at random, uniform in [0, 1) in about half the rows, so no
    column is all zero and the noise features are not constant."""
    gen = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    for c in classes:
        Z = torch.rand(n_per_class, 20, generator=gen) * (torch.rand(n_per_class, 20, generator=gen) < 0.5)
        Z[:, 10 + c] += 2.0 + torch.rand(n_per_class, generator=gen)
        rows.append(Z)
        labels += [c] * n_per_class
    return torch.cat(rows), torch.tensor(labels)


#: Both heads minimise the same objective: mean cross-entropy + l1 / K * |W|_1 = the scikit-learn head's
#: (C * sum of cross-entropies + |W|_1) / (C * N) with l1 = K / (C * N); here K = 4, N = 120, C = 1.
SAME_PENALTY = {fit_sklearn_head: {"C": 1.0}, fit_torch_head: {"l1": 4 / 120}}


@pytest.mark.parametrize("fit", [fit_sklearn_head, fit_torch_head], ids=["sklearn", "torch"])
def test_head_finds_the_planted_features_and_zeroes_the_noise(fit) -> None:  # type: ignore[no-untyped-def]
    X_train, y_train = planted(30, 0)
    X_test, y_test = planted(10, 1)
    assert bool((X_train != 0).any(0).all())  # no all-zero column: a zero weight is the penalty's doing
    report, coef = fit(X_train, y_train, X_test, y_test, NAMES, top_k=3, **SAME_PENALTY[fit])
    assert report.accuracy == 1.0 and report.macro_f1 == 1.0 and report.converged
    assert coef.shape == (4, 20)
    for i, name in enumerate(NAMES):
        assert report.top_features[name][0][0] == 10 + i  # each class's strongest positive feature
        assert report.per_class_f1[name] == 1.0
    assert np.trace(np.array(report.confusion)) == 40 and report.n_train == 120 and report.n_test == 40
    assert report.feature_sets()[2] == [12]
    # L1 gives exactly-zero weights on the 16 random (non-zero) noise features; an L2 penalty would only
    # shrink them: exactly the 4 planted weights are left
    expected = np.zeros((4, 20), dtype=bool)
    expected[np.arange(4), 10 + np.arange(4)] = True
    assert np.array_equal(coef != 0, expected) and report.n_nonzero == 4


def overlapping(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of 4 overlapping classes: class i shifts features 10 + i and 2 i a little, on top of noise."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(4).repeat_interleave(n_per_class)
    Z = torch.rand(4 * n_per_class, 20, generator=gen) * (
        torch.rand(4 * n_per_class, 20, generator=gen) < 0.5
    )
    shift = torch.zeros(4, 20)
    shift[torch.arange(4), 10 + torch.arange(4)] = 0.6
    shift[torch.arange(4), 2 * torch.arange(4)] = 0.3
    return Z + shift[y] * torch.rand(4 * n_per_class, 20, generator=gen), y


def test_torch_head_reaches_the_sklearn_optimum() -> None:
    """Same objective, independent solvers (saga vs FISTA): the same weights.

    Softmax weights are defined up to a constant per feature across the classes, and L1 does not always pin
    that constant down (any median of the column is optimal), so columns are compared centred.
    """
    X_train, y_train = overlapping(30, 0)
    X_test, y_test = overlapping(10, 1)
    sk, coef_sk = fit_sklearn_head(X_train, y_train, X_test, y_test, NAMES, C=1.0, tol=1e-6, max_iter=20000)
    tr, coef_t = fit_torch_head(X_train, y_train, X_test, y_test, NAMES, l1=4 / 120, steps=5000, tol=1e-7)
    assert sk.converged and tr.converged
    assert 20 < np.count_nonzero(coef_sk) < 60  # a real trade-off, neither all zero nor dense
    np.testing.assert_allclose(coef_t - coef_t.mean(0), coef_sk - coef_sk.mean(0), atol=0.01)
    assert tr.confusion == sk.confusion


@pytest.mark.parametrize("fit", [fit_sklearn_head, fit_torch_head], ids=["sklearn", "torch"])
def test_head_with_absent_classes_never_predicts_them(fit) -> None:  # type: ignore[no-untyped-def]
    X_train, y_train = planted(20, 2, classes=(0, 2))
    X_test, y_test = planted(5, 3, classes=(0, 2))
    report, coef = fit(X_train, y_train, X_test, y_test, NAMES)
    assert report.accuracy == 1.0
    assert not coef[1].any() and not coef[3].any()
    assert report.top_features["a"] == [] and report.top_features["b"][0][0] == 12
    assert report.confusion[1] == [0, 0, 0, 0]


def test_head_input_errors() -> None:
    X, y = planted(5, 4)
    with pytest.raises(ValueError, match="at least two classes"):
        fit_sklearn_head(X[:5], y[:5], X, y, NAMES)
    with pytest.raises(ValueError, match="outside"):
        fit_sklearn_head(X, y + 1, X, y, NAMES)
    with pytest.raises(ValueError, match="equal widths"):
        fit_torch_head(X, y, X[:, :5], y, NAMES)
    with pytest.raises(ValueError, match="no held-out rows"):
        fit_sklearn_head(X, y, X[:0], y[:0], NAMES)
    with pytest.raises(ValueError, match="C must be"):
        fit_sklearn_head(X, y, X, y, NAMES, C=0.0)
