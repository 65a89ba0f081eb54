"""L1 classification heads on SAE-like codes: planted class features are found, scores and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from sae_refusal.features.heads import feature_scale, fit_sklearn_head, fit_torch_head

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


def test_binary_head_has_opposite_rows_pointing_at_each_class() -> None:
    """scikit-learn keeps one row for two classes: it is the second class's, its negative the first's."""
    X_train, y_train = planted(20, 5, classes=(1, 3))
    X_test, y_test = planted(5, 6, classes=(1, 3))
    report, coef = fit_sklearn_head(X_train, y_train, X_test, y_test, NAMES)
    assert report.accuracy == 1.0 and report.macro_f1 == 1.0
    assert not coef[0].any() and not coef[2].any()  # classes absent from training
    np.testing.assert_array_equal(coef[1], -coef[3])
    assert coef[3, 13] > 0 and coef[1, 11] > 0  # each class's planted feature votes for it
    assert coef[3, 11] < 0 and coef[1, 13] < 0
    assert report.feature_sets()[1][0] == 11 and report.feature_sets()[3][0] == 13
    assert report.confusion[1][1] == 5 and report.confusion[3][3] == 5


#: Per-feature units spanning six orders of magnitude (class features 10..13 included).
UNITS = torch.cat([torch.logspace(-2, 2, 10), torch.tensor([1e-3, 1e3, 1.0, 30.0]), torch.logspace(2, -2, 6)])


@pytest.mark.parametrize("fit", [fit_sklearn_head, fit_torch_head], ids=["sklearn", "torch"])
def test_training_and_held_out_codes_get_the_same_scaling(fit) -> None:  # type: ignore[no-untyped-def]
    """A head fitted on codes in odd units equals one fitted on codes pre-divided by the training maxima."""
    X_train, y_train = planted(30, 0)
    X_test, y_test = planted(10, 1)
    X_train, X_test = X_train * UNITS, X_test * UNITS
    report, coef = fit(X_train, y_train, X_test, y_test, NAMES, **SAME_PENALTY[fit])
    assert report.accuracy == 1.0
    scale = X_train.abs().amax(0)
    pre, pre_coef = fit(X_train / scale, y_train, X_test / scale, y_test, NAMES, **SAME_PENALTY[fit])
    np.testing.assert_allclose(coef, pre_coef, rtol=1e-5, atol=1e-6)
    assert report.confusion == pre.confusion
    on_train, _ = fit(X_train, y_train, X_train, y_train, NAMES, **SAME_PENALTY[fit])
    assert on_train.accuracy == 1.0 and on_train.n_test == on_train.n_train == 120


def test_too_few_iterations_are_reported_as_not_converged() -> None:
    X_train, y_train = planted(30, 0)
    X_test, y_test = planted(10, 1)
    sk, _ = fit_sklearn_head(X_train, y_train, X_test, y_test, NAMES, max_iter=1)
    tr, _ = fit_torch_head(X_train, y_train, X_test, y_test, NAMES, steps=1)
    assert sk.converged is False and tr.converged is False
    sk, _ = fit_sklearn_head(X_train, y_train, X_test, y_test, NAMES)
    tr, _ = fit_torch_head(X_train, y_train, X_test, y_test, NAMES)
    assert sk.converged is True and tr.converged is True


def silent_benign(n_benign: int, n_harmful: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Benign rows fire nothing; category-2 rows fire feature 0 (1 to 2) only."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.zeros(n_benign + n_harmful, 5)
    X[n_benign:, 0] = 1.0 + torch.rand(n_harmful, generator=gen)
    return X, torch.tensor([0] * n_benign + [2] * n_harmful)


@pytest.mark.parametrize("fit", [fit_sklearn_head, fit_torch_head], ids=["sklearn", "torch"])
def test_rows_without_features_are_classified_by_the_bias(fit) -> None:  # type: ignore[no-untyped-def]
    X_train, y_train = silent_benign(20, 20, 0)
    X_test, y_test = silent_benign(6, 6, 1)
    report, _ = fit(X_train, y_train, X_test, y_test, NAMES[:3])
    assert report.confusion == [[6, 0, 0], [0, 0, 0], [0, 0, 6]]


@pytest.mark.parametrize(
    ("fit", "penalty"),
    [(fit_sklearn_head, {"C": 1e-4}), (fit_torch_head, {"l1": 100.0})],
    ids=["sklearn", "torch"],
)
def test_the_bias_is_not_penalised(fit, penalty: dict[str, float]) -> None:  # type: ignore[no-untyped-def]
    """A penalty that zeroes every weight leaves the bias free: every row goes to the majority class."""
    X_train, y_train = silent_benign(10, 30, 2)
    X_test, y_test = silent_benign(4, 4, 3)
    report, coef = fit(X_train, y_train, X_test, y_test, NAMES[:3], **penalty)
    assert not coef.any() and report.n_nonzero == 0
    assert report.confusion == [[0, 0, 4], [0, 0, 0], [0, 0, 4]]


@pytest.mark.parametrize("fit", [fit_sklearn_head, fit_torch_head], ids=["sklearn", "torch"])
def test_macro_f1_averages_the_classes_in_the_labels_or_the_predictions(fit) -> None:  # type: ignore[no-untyped-def]
    """Held-out rows labelled ``a`` (never trained) that look like ``b``: ``a`` is only in the labels, ``b``
    only in the predictions, ``c`` in neither."""
    X_train, y_train = planted(20, 7, classes=(0, 2, 3))
    benign, _ = planted(6, 8, classes=(0,))
    like_b, _ = planted(6, 9, classes=(2,))
    X_test, y_test = torch.cat([benign, like_b]), torch.tensor([0] * 6 + [1] * 6)
    report, coef = fit(X_train, y_train, X_test, y_test, NAMES)
    assert not coef[1].any()
    assert report.confusion == [[6, 0, 0, 0], [0, 0, 6, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert report.per_class_f1 == {"benign": 1.0, "a": 0.0, "b": 0.0, "c": 0.0}
    assert report.accuracy == 0.5 and report.macro_f1 == pytest.approx(1.0 / 3.0)
    y_true = [t for t, row in enumerate(report.confusion) for p, n in enumerate(row) for _ in range(n)]
    y_pred = [p for t, row in enumerate(report.confusion) for p, n in enumerate(row) for _ in range(n)]
    # scikit-learn's own macro average runs over the union of labels and predictions
    assert report.macro_f1 == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0.0))


def odd_one_out(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Classes 0, 2 and 3 (``a`` never occurs), each told by the one of features 0..2 it lacks (0, 1, 2),
    plus weak noise on features 3..5: L1 gives each class one negative weight and nothing else."""
    gen = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    for c, missing in ((0, 0), (2, 1), (3, 2)):
        Z = (
            0.2
            * torch.rand(n_per_class, 6, generator=gen)
            * (torch.rand(n_per_class, 6, generator=gen) < 0.5)
        )
        Z[:, :3] += 1.0 + torch.rand(n_per_class, 3, generator=gen)
        Z[:, missing] = 0.0
        rows.append(Z)
        labels += [c] * n_per_class
    return torch.cat(rows), torch.tensor(labels)


def test_torch_head_never_predicts_a_class_absent_from_training() -> None:
    """Rows with all three features get a negative logit from every trained class; the untrained class's
    logit is 0 (no weights, no bias), so only masking keeps it from winning."""
    X_train, y_train = odd_one_out(20, 0)
    X_test, y_test = odd_one_out(5, 1)
    every = torch.zeros(3, 6)
    every[:, :3] = 2.0
    X_test, y_test = torch.cat([X_test, every]), torch.cat([y_test, torch.tensor([0, 2, 3])])
    report, coef = fit_torch_head(X_train, y_train, X_test, y_test, NAMES, l1=0.03)
    assert not coef[1].any()
    assert (coef[[0, 2, 3], [0, 1, 2]] < 0).all()  # each class: a negative weight on the feature it lacks
    assert [row[1] for row in report.confusion] == [0, 0, 0, 0]
    assert np.array(report.confusion).sum() == 18


def test_feature_scale_is_the_largest_absolute_training_value() -> None:
    X = np.array([[0.0, -3.0, 2.0, 0.5], [0.0, 1.0, -4.0, 0.25]], dtype=np.float32)
    scale = feature_scale(X)
    assert scale.dtype == np.float32 and scale.tolist() == [1.0, 3.0, 4.0, 0.5]  # never fires: 1
