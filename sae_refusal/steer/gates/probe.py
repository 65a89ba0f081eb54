"""The probe gate: logistic regression on standardised last-token residuals (or SAE codes).

:class:`ProbeGate` (scikit-learn, harmful vs benign) scores ``P(harmful)``; its category comes from a
multinomial head on the harmful rows (``category="head"``) or the nearest category mean (``category="mean"``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from sae_refusal.features.vectors import class_means
from sae_refusal.sae.base import SparseAutoencoder
from sae_refusal.steer.gates.base import GateScores, _check_class_names, _scores
from sae_refusal.steer.gates.residual import _check_labelled, _encode, _ResidualGate


def _standardise(x_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x_ND.mean(axis=0)
    scale = x_ND.std(axis=0)
    return mean, np.where(scale > 0, scale, 1.0)


class ProbeGate(_ResidualGate):
    """Logistic-regression probe on standardised last-token residuals (or SAE codes): score ``P(harmful)``.

    Build it with :meth:`fit`. Category: ``"head"`` = a multinomial logistic regression fitted on the
    harmful training rows only (argmax over the categories); ``"mean"`` = the nearest category mean
    (Euclidean, in the gate's feature space). Categories without training rows are never named.
    """

    kind: ClassVar[str] = "probe"

    def __init__(
        self,
        *,
        layer: int,
        class_names: Sequence[str],
        mean_F: Tensor,
        scale_F: Tensor,
        weight_F: Tensor,
        bias: float,
        category: Literal["head", "mean"] = "head",
        category_weight_CF: Tensor | None = None,
        category_bias_C: Tensor | None = None,
        category_means_CF: Tensor | None = None,
        sae: SparseAutoencoder | None = None,
        sae_path: str | os.PathLike[str] | None = None,
        d_model: int | None = None,
    ) -> None:
        width = int(mean_F.shape[0]) if sae is None else sae.d_model
        super().__init__(
            layer=layer,
            d_model=width if d_model is None else d_model,
            class_names=class_names,
            sae=sae,
            sae_path=sae_path,
        )
        if category not in ("head", "mean"):
            raise ValueError(f"category: expected 'head' or 'mean', got {category!r}")
        n_features = int(mean_F.shape[0])
        for name, tensor in (("scale_F", scale_F), ("weight_F", weight_F)):
            if tuple(tensor.shape) != (n_features,):
                raise ValueError(f"{name}: expected shape ({n_features},), got {tuple(tensor.shape)}")
        shape_CF = (self.n_categories, n_features)
        if category == "head" and (
            category_weight_CF is None
            or category_bias_C is None
            or tuple(category_weight_CF.shape) != shape_CF
            or tuple(category_bias_C.shape) != (self.n_categories,)
        ):
            raise ValueError(f"category_weight_CF / category_bias_C: expected shapes {shape_CF} and (C,)")
        if category == "mean" and (category_means_CF is None or tuple(category_means_CF.shape) != shape_CF):
            raise ValueError(f"category_means_CF: expected shape {shape_CF}")
        self.mean_F, self.scale_F, self.weight_F = mean_F.float(), scale_F.float(), weight_F.float()
        self.bias = float(bias)
        self.category = category
        self.category_weight_CF = None if category_weight_CF is None else category_weight_CF.float()
        self.category_bias_C = None if category_bias_C is None else category_bias_C.float()
        self.category_means_CF = None if category_means_CF is None else category_means_CF.float()

    @classmethod
    def fit(
        cls,
        acts_ND: Tensor,
        y_N: Tensor,
        class_names: Sequence[str],
        *,
        layer: int,
        category: Literal["head", "mean"] = "head",
        C: float = 1.0,
        max_iter: int = 1000,
        sae: SparseAutoencoder | None = None,
        sae_path: str | os.PathLike[str] | None = None,
    ) -> ProbeGate:
        """Fit on TRAIN-split residuals.

        Args:
            acts_ND: Raw last-token residuals at ``layer`` (any dtype).
            y_N: Class codes (0 benign, ``1..C`` categories; negative rows are ignored).
            class_names: Names of classes ``0..C`` (those of the steering vectors).
            layer: Layer the residuals were taken at.
            category: ``"head"`` or ``"mean"`` (see the class docstring).
            C: Inverse L2 strength of both logistic regressions (scikit-learn ``C``).
            max_iter: Solver iterations (lbfgs).
            sae: Fit on this SAE's codes instead of the residuals.
            sae_path: Where ``sae`` was exported (recorded, so :func:`load_gate` can reload it).
        """
        from sklearn.linear_model import LogisticRegression

        names = _check_class_names(class_names)
        if C <= 0:
            raise ValueError(f"C: must be > 0, got {C}")
        if category not in ("head", "mean"):
            raise ValueError(f"category: expected 'head' or 'mean', got {category!r}")
        x, y = _check_labelled(acts_ND, y_N, len(names))
        if sae is not None:
            x = _encode(sae, x)
        X = x.double().numpy()
        mean, scale = _standardise(X)
        Xs = (X - mean) / scale
        y_np = y.numpy()
        probe = LogisticRegression(C=C, max_iter=max_iter).fit(Xs, (y_np > 0).astype(int))
        n_categories = len(names) - 1
        n_features = X.shape[1]
        weight_CF = bias_C = means_CF = None
        if category == "head":
            weight = np.zeros((n_categories, n_features))
            bias_np = np.full(n_categories, -np.inf)
            harmful = y_np > 0
            present = np.unique(y_np[harmful])
            if len(present) == 1:
                bias_np[present[0] - 1] = 0.0
            else:
                head = LogisticRegression(C=C, max_iter=max_iter).fit(Xs[harmful], y_np[harmful])
                if len(head.classes_) == 2:  # binary: one row, for the second class
                    weight[head.classes_[1] - 1] = head.coef_[0]
                    bias_np[head.classes_[1] - 1] = head.intercept_[0]
                    bias_np[head.classes_[0] - 1] = 0.0
                else:
                    weight[head.classes_ - 1] = head.coef_
                    bias_np[head.classes_ - 1] = head.intercept_
            weight_CF, bias_C = torch.from_numpy(weight).float(), torch.from_numpy(bias_np).float()
        else:
            means_KF, counts_K = class_means(x, y, len(names))
            means_CF = means_KF[1:].clone()
            means_CF[counts_K[1:] == 0] = float("inf")  # never nearest
        return cls(
            layer=layer,
            class_names=names,
            mean_F=torch.from_numpy(mean).float(),
            scale_F=torch.from_numpy(scale).float(),
            weight_F=torch.from_numpy(probe.coef_[0]).float(),
            bias=float(probe.intercept_[0]),
            category=category,
            category_weight_CF=weight_CF,
            category_bias_C=bias_C,
            category_means_CF=means_CF,
            sae=sae,
            sae_path=sae_path,
            d_model=acts_ND.shape[1],
        )

    def _score_features(self, x_NF: Tensor) -> GateScores:
        xs_NF = (x_NF - self.mean_F) / self.scale_F
        score_N = torch.sigmoid(xs_NF @ self.weight_F + self.bias)
        if self.category == "head":
            assert self.category_weight_CF is not None and self.category_bias_C is not None  # by __init__
            logits_NC = xs_NF @ self.category_weight_CF.T + self.category_bias_C
            category_N = logits_NC.argmax(dim=1) + 1
        else:
            assert self.category_means_CF is not None  # by __init__
            finite_C = torch.isfinite(self.category_means_CF).all(dim=1)
            means_CF = torch.where(finite_C[:, None], self.category_means_CF, 0.0)
            dist_NC = torch.cdist(x_NF, means_CF).masked_fill(~finite_C, float("inf"))
            category_N = dist_NC.argmin(dim=1) + 1
        return _scores(score_N, category_N)

    def config(self) -> dict[str, Any]:
        """JSON facts (see :meth:`_ResidualGate.config`) plus the bias and the category rule."""
        return {**super().config(), "bias": self.bias, "category": self.category}

    def tensors(self) -> dict[str, Tensor]:
        """Standardisation, probe weights and the category head or means."""
        out = {"mean_F": self.mean_F, "scale_F": self.scale_F, "weight_F": self.weight_F}
        for name in ("category_weight_CF", "category_bias_C", "category_means_CF"):
            tensor = getattr(self, name)
            if tensor is not None:
                out[name] = tensor
        return out

    @classmethod
    def from_saved(
        cls, config: Mapping[str, Any], tensors: Mapping[str, Tensor], sae: SparseAutoencoder | None = None
    ) -> ProbeGate:
        """Rebuild from :meth:`config` and :meth:`tensors` (``sae`` for a latent-space probe)."""
        return cls(
            layer=int(config["layer"]),
            class_names=config["class_names"],
            mean_F=tensors["mean_F"],
            scale_F=tensors["scale_F"],
            weight_F=tensors["weight_F"],
            bias=float(config["bias"]),
            category=config["category"],
            category_weight_CF=tensors.get("category_weight_CF"),
            category_bias_C=tensors.get("category_bias_C"),
            category_means_CF=tensors.get("category_means_CF"),
            sae=cls._sae_from_saved(config, sae),
            sae_path=(config.get("sae") or {}).get("path"),
            d_model=int(config["d_model"]),
        )
