"""The head gate: the project's L1 multinomial head (:mod:`sae_refusal.features.heads`) on SAE codes.

:class:`HeadGate` scores ``1 - P(benign)`` and names the most likely harmful class. The heads return only
their weights, so :func:`_fit_bias` fits the unpenalised per-class bias afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from sae_refusal.features.heads import feature_scale, fit_sklearn_head, fit_torch_head
from sae_refusal.sae.base import SparseAutoencoder
from sae_refusal.steer.gates.base import GateScores, _check_class_names, _scores
from sae_refusal.steer.gates.residual import _check_labelled, _encode, _ResidualGate


def _fit_bias(logits_NK: Tensor, y_N: Tensor, present_K: Tensor, steps: int = 100) -> Tensor:
    """The unpenalised per-class bias that minimises the mean cross-entropy with the weights held fixed.

    The heads of :mod:`sae_refusal.features.heads` return only their weights; their bias is unpenalised,
    so at the joint optimum it is also the optimum of this convex problem in the bias alone (softmax shifts
    aside). Absent classes keep ``-inf``.
    """
    logits = logits_NK.double().masked_fill(~present_K, float("-inf"))
    bias = torch.zeros(logits.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [bias],
        lr=1.0,
        max_iter=steps,
        tolerance_grad=1e-12,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits + bias, y_N)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    out = bias.detach().float()
    return out.masked_fill(~present_K, float("-inf"))


class HeadGate(_ResidualGate):
    """The project's L1 multinomial head on SAE codes: score ``1 - P(benign)``, category the top category.

    Build it with :meth:`fit` (scikit-learn ``saga`` or the torch FISTA head of
    :mod:`sae_refusal.features.heads`). Codes are divided by each feature's largest training value, as the
    heads do. :attr:`report` keeps the head's report (on the held-out rows given to :meth:`fit`, else on
    its training rows).
    """

    kind: ClassVar[str] = "head"

    def __init__(
        self,
        *,
        layer: int,
        class_names: Sequence[str],
        sae: SparseAutoencoder,
        scale_F: Tensor,
        coef_KF: Tensor,
        bias_K: Tensor,
        sae_path: str | os.PathLike[str] | None = None,
        report: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            layer=layer, d_model=sae.d_model, class_names=class_names, sae=sae, sae_path=sae_path
        )
        n_classes, n_latents = len(self.class_names), sae.n_latents
        if tuple(coef_KF.shape) != (n_classes, n_latents):
            raise ValueError(f"coef_KF: expected shape {(n_classes, n_latents)}, got {tuple(coef_KF.shape)}")
        if tuple(scale_F.shape) != (n_latents,) or tuple(bias_K.shape) != (n_classes,):
            raise ValueError(f"scale_F / bias_K: expected shapes ({n_latents},) and ({n_classes},)")
        self.scale_F, self.coef_KF, self.bias_K = scale_F.float(), coef_KF.float(), bias_K.float()
        self.report = report

    @classmethod
    def fit(
        cls,
        acts_ND: Tensor,
        y_N: Tensor,
        class_names: Sequence[str],
        *,
        layer: int,
        sae: SparseAutoencoder,
        sae_path: str | os.PathLike[str] | None = None,
        method: Literal["sklearn", "torch"] = "sklearn",
        held_out: tuple[Tensor, Tensor] | None = None,
        C: float = 1.0,
        l1: float = 1e-3,
        steps: int = 500,
        max_iter: int = 2000,
        seed: int = 0,
    ) -> HeadGate:
        """Fit on TRAIN-split residuals (encoded by ``sae`` here).

        Args:
            acts_ND: Raw last-token residuals at ``layer``.
            y_N: Class codes (0 benign, ``1..C``; negative rows are ignored).
            class_names: Names of classes ``0..C``.
            layer: Layer the residuals were taken at (the SAE's layer).
            sae: The SAE whose codes the head reads.
            sae_path: Where ``sae`` was exported (recorded for :func:`load_gate`).
            method: ``"sklearn"`` (:func:`~sae_refusal.features.heads.fit_sklearn_head`) or ``"torch"``
                (:func:`~sae_refusal.features.heads.fit_torch_head`).
            held_out: Optional ``(acts_ND, y_N)`` for the head's report (never used to fit).
            C: Inverse L1 strength (sklearn).
            l1: L1 weight (torch).
            steps: Proximal-gradient steps (torch).
            max_iter: Solver iterations (sklearn).
            seed: The sklearn solver's random state.
        """
        names = _check_class_names(class_names)
        if method not in ("sklearn", "torch"):
            raise ValueError(f"method: expected 'sklearn' or 'torch', got {method!r}")
        x, y = _check_labelled(acts_ND, y_N, len(names))
        z = _encode(sae, x)
        if held_out is None:
            z_test, y_test = z, y
        else:
            x_test, y_test = _check_labelled(held_out[0], held_out[1], len(names))
            z_test = _encode(sae, x_test)
        if method == "sklearn":
            report, coef = fit_sklearn_head(z, y, z_test, y_test, names, C=C, max_iter=max_iter, seed=seed)
        else:
            report, coef = fit_torch_head(z, y, z_test, y_test, names, l1=l1, steps=steps)
        present_K = torch.bincount(y, minlength=len(names)) > 0
        coef_KF = torch.from_numpy(coef).float()
        if method == "sklearn" and int(present_K.sum()) == 2:
            # a binary scikit-learn head keeps one row w; the heads store it as (+w, -w): a logit gap of 2 w
            coef_KF = coef_KF / 2
        scale_F = torch.from_numpy(feature_scale(z.numpy())).float()
        bias_K = _fit_bias((z / scale_F) @ coef_KF.T, y, present_K)
        return cls(
            layer=layer,
            class_names=names,
            sae=sae,
            scale_F=scale_F,
            coef_KF=coef_KF,
            bias_K=bias_K,
            sae_path=sae_path,
            report=report.to_dict(),
        )

    def logits(self, x_NF: Tensor) -> Tensor:
        """Class logits ``(N, C + 1)`` of SAE codes."""
        return (x_NF / self.scale_F) @ self.coef_KF.T + self.bias_K

    def _score_features(self, x_NF: Tensor) -> GateScores:
        probs_NK = torch.softmax(self.logits(x_NF), dim=1)
        return _scores(1.0 - probs_NK[:, 0], probs_NK[:, 1:].argmax(dim=1) + 1)

    def config(self) -> dict[str, Any]:
        """JSON facts plus the head's report."""
        return {**super().config(), "report": self.report}

    def tensors(self) -> dict[str, Tensor]:
        """Code scale, head weights and biases."""
        return {"scale_F": self.scale_F, "coef_KF": self.coef_KF, "bias_K": self.bias_K}

    @classmethod
    def from_saved(
        cls, config: Mapping[str, Any], tensors: Mapping[str, Tensor], sae: SparseAutoencoder | None = None
    ) -> HeadGate:
        """Rebuild from :meth:`config` and :meth:`tensors` (``sae`` or its recorded path is needed)."""
        loaded = cls._sae_from_saved(config, sae)
        if loaded is None:
            raise ValueError("sae: a head gate's config must record its SAE")
        return cls(
            layer=int(config["layer"]),
            class_names=config["class_names"],
            sae=loaded,
            scale_F=tensors["scale_F"],
            coef_KF=tensors["coef_KF"],
            bias_K=tensors["bias_K"],
            sae_path=config["sae"].get("path"),
            report=config.get("report"),
        )
