"""Input checks shared by the feature metrics and plots: rows as a float64 matrix, labels as int64."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch

__all__ = ["as_labels", "as_matrix"]


def as_matrix(X_ND: Any) -> npt.NDArray[np.float64]:
    """A 2-D numeric, finite array or tensor as float64 numpy (tensors detached to the CPU)."""
    X = X_ND.detach().cpu().float().numpy() if isinstance(X_ND, torch.Tensor) else np.asarray(X_ND)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (rows, features), got shape {tuple(X.shape)}")
    if not (np.issubdtype(X.dtype, np.number) or X.dtype == np.bool_):
        raise ValueError(f"X must be numeric, got dtype {X.dtype}")
    X = X.astype(np.float64, copy=False)
    if not np.isfinite(X).all():
        raise ValueError("X contains NaN or infinite values")
    return X


def as_labels(y_N: Any, n_classes: int | None = None) -> npt.NDArray[np.int64]:
    """1-D integer labels (whole-number floats accepted) as int64; in ``0..n_classes - 1`` when given."""
    y = y_N.detach().cpu().numpy() if isinstance(y_N, torch.Tensor) else np.asarray(y_N)
    if y.ndim != 1:
        raise ValueError(f"y must be 1-D (one label per row), got shape {tuple(y.shape)}")
    integral_floats = y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all()
    if y.dtype.kind not in "iub" and not integral_floats:
        raise ValueError(f"y must hold integer labels, got dtype {y.dtype}")
    y = y.astype(np.int64, copy=False)
    if n_classes is not None and y.size and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise ValueError(
            f"label {bad} is out of range for {n_classes} class names (labels must be 0..{n_classes - 1})"
        )
    return y
