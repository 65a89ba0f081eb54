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
    """Sparse non-negative codes: class i fires feature 10 + i strongly, plus noise features 0..9."""
    gen = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    for c in classes:
        Z = torch.rand(n_per_class, 20, generator=gen) * (torch.rand(n_per_class, 20, generator=gen) < 0.2)
        Z[:, 10:] = 0.0
        Z[:, 10 + c] = 2.0 + torch.rand(n_per_class, generator=gen)
        rows.append(Z)
        labels += [c] * n_per_class
    return torch.cat(rows), torch.tensor(labels)


@pytest.mark.parametrize("fit", [fit_sklearn_head, fit_torch_head], ids=["sklearn", "torch"])
def test_head_finds_the_planted_features(fit) -> None:  # type: ignore[no-untyped-def]
    X_train, y_train = planted(30, 0)
    X_test, y_test = planted(10, 1)
    report, coef = fit(X_train, y_train, X_test, y_test, NAMES, top_k=3)
    assert report.accuracy == 1.0 and report.macro_f1 == 1.0
    assert coef.shape == (4, 20)
    for i, name in enumerate(NAMES):
        assert report.top_features[name][0][0] == 10 + i  # each class's strongest positive feature
        assert report.per_class_f1[name] == 1.0
    assert np.trace(np.array(report.confusion)) == 40 and report.n_train == 120 and report.n_test == 40
    assert report.feature_sets()[2][0] == 12
    assert 0 < report.n_nonzero < coef.size  # L1 zeroes the noise features


def test_sklearn_head_with_absent_classes_never_predicts_them() -> None:
    X_train, y_train = planted(20, 2, classes=(0, 2))
    X_test, y_test = planted(5, 3, classes=(0, 2))
    report, coef = fit_sklearn_head(X_train, y_train, X_test, y_test, NAMES)
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
