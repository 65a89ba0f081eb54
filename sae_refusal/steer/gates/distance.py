"""The distance gate: relative distance to the benign and category means.

:class:`DistanceGate` computes ``s_c = d_B / (d_B + d_c)`` with ``d_B``, ``d_c`` the distances to the benign
and category-``c`` means (residual space, or SAE latent space when an SAE is given); the score is
``max_c s_c``, the category its argmax.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from sae_refusal.features.vectors import class_means
from sae_refusal.sae.base import SparseAutoencoder
from sae_refusal.steer.gates.base import GateScores, _check_class_names, _scores
from sae_refusal.steer.gates.residual import _check_labelled, _encode, _ResidualGate


class DistanceGate(_ResidualGate):
    """Relative distance to the benign and category means: ``s_c = d_B / (d_B + d_c)``, score ``max_c s_c``.

    ``s_c`` is 0.5 on the bisector between the benign and category-``c`` means, tends to 1 at the category
    mean and to 0 at the benign mean (0.5 where both distances are 0). Means live in residual space, or in
    SAE latent space when an SAE is given. Categories without training rows are never named.
    """

    kind: ClassVar[str] = "distance"

    def __init__(
        self,
        *,
        layer: int,
        class_names: Sequence[str],
        means_KF: Tensor,
        present_K: Tensor,
        sae: SparseAutoencoder | None = None,
        sae_path: str | os.PathLike[str] | None = None,
        d_model: int | None = None,
    ) -> None:
        width = int(means_KF.shape[1]) if sae is None else sae.d_model
        super().__init__(
            layer=layer,
            d_model=width if d_model is None else d_model,
            class_names=class_names,
            sae=sae,
            sae_path=sae_path,
        )
        n_classes = len(self.class_names)
        if means_KF.ndim != 2 or means_KF.shape[0] != n_classes or tuple(present_K.shape) != (n_classes,):
            raise ValueError(f"means_KF / present_K: expected {n_classes} rows (benign + categories)")
        if not bool(present_K[0]) or not bool(present_K[1:].any()):
            raise ValueError("present_K: the benign mean and at least one category mean are needed")
        self.means_KF, self.present_K = means_KF.float(), present_K.bool()

    @classmethod
    def fit(
        cls,
        acts_ND: Tensor,
        y_N: Tensor,
        class_names: Sequence[str],
        *,
        layer: int,
        sae: SparseAutoencoder | None = None,
        sae_path: str | os.PathLike[str] | None = None,
    ) -> DistanceGate:
        """Class means of TRAIN-split residuals (or their SAE codes); ``y_N`` as for :class:`ProbeGate`."""
        names = _check_class_names(class_names)
        x, y = _check_labelled(acts_ND, y_N, len(names))
        if sae is not None:
            x = _encode(sae, x)
        means_KF, counts_K = class_means(x, y, len(names))
        return cls(
            layer=layer,
            class_names=names,
            means_KF=means_KF,
            present_K=counts_K > 0,
            sae=sae,
            sae_path=sae_path,
            d_model=acts_ND.shape[1],
        )

    def relative_distances(self, x_NF: Tensor) -> Tensor:
        """``s_NC``: ``d_B / (d_B + d_c)`` per category (-1 for categories without a mean)."""
        dist_NK = torch.cdist(x_NF.double(), self.means_KF.double())
        d_B, d_NC = dist_NK[:, :1], dist_NK[:, 1:]
        total_NC = d_B + d_NC
        s_NC = torch.where(total_NC > 0, d_B / total_NC.clamp_min(1e-300), 0.5)
        return s_NC.masked_fill(~self.present_K[1:], -1.0).float()

    def _score_features(self, x_NF: Tensor) -> GateScores:
        best_N, index_N = self.relative_distances(x_NF).max(dim=1)
        return _scores(best_N, index_N + 1)

    def tensors(self) -> dict[str, Tensor]:
        """Class means (row 0 benign) and which classes had rows."""
        return {"means_KF": self.means_KF, "present_K": self.present_K}

    @classmethod
    def from_saved(
        cls, config: Mapping[str, Any], tensors: Mapping[str, Tensor], sae: SparseAutoencoder | None = None
    ) -> DistanceGate:
        """Rebuild from :meth:`config` and :meth:`tensors`."""
        return cls(
            layer=int(config["layer"]),
            class_names=config["class_names"],
            means_KF=tensors["means_KF"],
            present_K=tensors["present_K"],
            sae=cls._sae_from_saved(config, sae),
            sae_path=(config.get("sae") or {}).get("path"),
            d_model=int(config["d_model"]),
        )
