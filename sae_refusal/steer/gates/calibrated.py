"""The calibrated gate: any gate's score mapped to a probability of harm fitted on validation rows.

:class:`CalibratedGate` wraps an inner gate and passes its score through a monotone non-decreasing map
fitted on VALIDATION scores and labels: the calibrated score estimates ``P(harmful | inner score)`` on
validation-like prompts, so a policy threshold reads as a probability, and the members of an
:class:`~sae_refusal.steer.gates.ensemble.EnsembleGate` share one scale. The map never reverses the order
of two prompts (isotonic calibration may tie them).

* ``"platt"``: ``sigmoid(a * logit(s) + b)`` with ``s`` clamped to ``[1e-6, 1 - 1e-6]``, ``a``, ``b`` a 1-D
  logistic regression (scikit-learn, L2 strength ``1 / C`` on ``a``). A negative ``a`` (the inner gate ranks
  validation rows backwards) is refused.
* ``"isotonic"``: scikit-learn's ``IsotonicRegression`` (non-decreasing, clipped to ``[0, 1]`` and to the
  fitted score range); its breakpoints are stored as tensors and evaluated by linear interpolation, as
  scikit-learn does, so nothing but tensors is saved.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor, nn

from sae_refusal.sae.base import SparseAutoencoder
from sae_refusal.steer.gates.base import Gate, GateScores
from sae_refusal.steer.gates.nested import GateLoader, check_gate, load_nested, nested_config, nested_tensors

CalibrationMethod = Literal["platt", "isotonic"]

#: Platt reads ``logit(clamp(s, EPS, 1 - EPS))``: scores of exactly 0 or 1 stay finite.
EPS = 1e-6


def _logit(score_N: np.ndarray) -> np.ndarray:
    s = np.clip(score_N, EPS, 1.0 - EPS)
    return np.log(s) - np.log1p(-s)


def _as_scores(score_N: Any, key: str = "score_N") -> np.ndarray:
    """Gate scores as a float64 numpy vector (finite, in ``[0, 1]``)."""
    s = torch.as_tensor(score_N).detach().cpu().double()
    if s.ndim != 1:
        raise ValueError(f"{key}: expected a vector (N,), got shape {tuple(s.shape)}")
    if not bool(torch.isfinite(s).all()) or (s.numel() and not bool(((s >= 0) & (s <= 1)).all())):
        raise ValueError(f"{key}: expected gate scores in [0, 1] (finite)")
    return s.numpy()


def _finite(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{key}: Platt calibration needs a finite number, got {value!r}")
    return float(value)


class CalibratedGate:
    """An inner gate whose score passes through a monotone non-decreasing calibration map.

    Build it with :meth:`fit` on validation scores of the inner gate. Category (and any further
    :class:`GateScores` field) is the inner gate's, unchanged; :attr:`layer`, :attr:`d_model` and
    :attr:`class_names` are the inner gate's.

    Args:
        inner: The gate whose score is calibrated.
        method: ``"platt"`` or ``"isotonic"`` (see the module docstring).
        slope: Platt ``a`` (>= 0).
        intercept: Platt ``b``.
        x_K: Isotonic breakpoints: inner scores, non-decreasing.
        y_K: Isotonic breakpoints: probabilities in ``[0, 1]``, non-decreasing.
    """

    kind: ClassVar[str] = "calibrated"

    def __init__(
        self,
        inner: Gate,
        *,
        method: CalibrationMethod,
        slope: float | None = None,
        intercept: float | None = None,
        x_K: Tensor | None = None,
        y_K: Tensor | None = None,
    ) -> None:
        self.inner = check_gate(inner, "inner")
        if method not in ("platt", "isotonic"):
            raise ValueError(f"method: expected 'platt' or 'isotonic', got {method!r}")
        self.method: CalibrationMethod = method
        self.slope: float | None = None
        self.intercept: float | None = None
        self.x_K: Tensor | None = None
        self.y_K: Tensor | None = None
        if method == "platt":
            self.slope, self.intercept = _finite(slope, "slope"), _finite(intercept, "intercept")
            if self.slope < 0:
                raise ValueError(f"slope: must be >= 0 (a non-decreasing map), got {slope}")
        else:
            if x_K is None or y_K is None:
                raise ValueError("x_K / y_K: isotonic calibration needs its breakpoints")
            x, y = x_K.detach().cpu().double(), y_K.detach().cpu().double()
            if x.ndim != 1 or x.shape != y.shape or x.numel() == 0:
                raise ValueError(
                    "x_K / y_K: expected two vectors of one length >= 1, "
                    f"got {tuple(x.shape)}, {tuple(y.shape)}"
                )
            if not bool(torch.isfinite(x).all()) or not bool((x[1:] >= x[:-1]).all()):
                raise ValueError("x_K: breakpoints must be finite and non-decreasing")
            if not bool(((y >= 0) & (y <= 1)).all()) or not bool((y[1:] >= y[:-1]).all()):
                raise ValueError("y_K: breakpoints must lie in [0, 1] and be non-decreasing")
            self.x_K, self.y_K = x, y

    @classmethod
    def fit(
        cls,
        inner: Gate,
        score_N: Tensor,
        harmful_N: Tensor,
        *,
        method: CalibrationMethod = "platt",
        C: float = 1.0,
    ) -> CalibratedGate:
        """Fit the calibration on VALIDATION scores of ``inner`` and their labels.

        Args:
            inner: The gate to calibrate.
            score_N: ``inner``'s scores of the validation prompts (in ``[0, 1]``).
            harmful_N: Whether each prompt is harmful (bool or 0/1); both kinds are needed.
            method: ``"platt"`` or ``"isotonic"``.
            C: Platt only: inverse L2 strength on the slope (scikit-learn ``C``; the intercept is free).

        Raises:
            ValueError: Naming ``score_N`` / ``harmful_N`` (shapes, values, one class only), ``method``,
                ``C``; for Platt, also when the fitted slope is negative: the inner gate ranks validation
                rows backwards (harmful ones lower), which a non-decreasing map cannot use.
        """
        from sklearn.isotonic import IsotonicRegression
        from sklearn.linear_model import LogisticRegression

        check_gate(inner, "inner")
        s = _as_scores(score_N)
        labels = torch.as_tensor(harmful_N).detach().cpu()
        if labels.ndim != 1 or labels.shape[0] != s.shape[0]:
            raise ValueError(
                f"harmful_N: expected one label per score ({s.shape[0]}), got {tuple(labels.shape)}"
            )
        if not bool(((labels == 0) | (labels == 1)).all()):
            raise ValueError("harmful_N: expected bool or 0/1 labels")
        y = labels.to(torch.long).numpy()
        if not (y == 0).any() or not (y == 1).any():
            raise ValueError("harmful_N: calibration needs harmful and benign validation rows")
        if method == "platt":
            if not C > 0:
                raise ValueError(f"C: must be > 0, got {C}")
            regression = LogisticRegression(C=C, max_iter=1000).fit(_logit(s)[:, None], y)
            slope, intercept = float(regression.coef_[0, 0]), float(regression.intercept_[0])
            if slope < 0:
                raise ValueError(
                    f"score_N, harmful_N: the fitted Platt slope is negative ({slope:.4g}): the inner gate "
                    "ranks these validation rows backwards (harmful ones score lower than benign ones); "
                    "a non-decreasing calibration cannot fix that - check the labels, the split, or the gate"
                )
            return cls(inner, method="platt", slope=slope, intercept=intercept)
        if method == "isotonic":
            iso = IsotonicRegression(increasing=True, out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(s, y)
            return cls(
                inner,
                method="isotonic",
                x_K=torch.from_numpy(np.asarray(iso.X_thresholds_, dtype=np.float64)),
                y_K=torch.from_numpy(np.asarray(iso.y_thresholds_, dtype=np.float64)),
            )
        raise ValueError(f"method: expected 'platt' or 'isotonic', got {method!r}")

    @property
    def layer(self) -> int | None:
        """The inner gate's layer."""
        return self.inner.layer

    @property
    def d_model(self) -> int | None:
        """The inner gate's width."""
        return self.inner.d_model

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """The inner gate's class names."""
        return self.inner.class_names

    def transform(self, score_N: Tensor) -> Tensor:
        """Calibrated scores (float32, CPU, in ``[0, 1]``) of inner scores ``score_N`` (in ``[0, 1]``)."""
        s = _as_scores(score_N)
        if self.method == "platt":
            assert self.slope is not None and self.intercept is not None  # by __init__
            z = self.slope * _logit(s) + self.intercept
            out = 0.5 * (1.0 + np.tanh(0.5 * z))  # sigmoid without overflow
        else:
            assert self.x_K is not None and self.y_K is not None  # by __init__
            out = np.interp(s, self.x_K.numpy(), self.y_K.numpy())
        return torch.from_numpy(np.clip(out, 0.0, 1.0)).float()

    def score(self, acts: Any) -> GateScores:
        """The inner gate's :meth:`score` of activations, calibrated (residual inner gates only).

        Raises:
            TypeError: If the inner gate only scores prompts.
        """
        inner_score = getattr(self.inner, "score", None)
        if not callable(inner_score):
            raise TypeError(
                f"inner: a {self.inner.kind!r} gate has no score(acts); use score_prompts instead"
            )
        scores = inner_score(acts)
        return scores._replace(score_N=self.transform(scores.score_N))

    def score_prompts(
        self,
        model: nn.Module,
        tokenizer: Any,
        texts: Sequence[str],
        *,
        batch_size: int = 32,
        max_length: int | None = None,
        chat_template: str | None = None,
        system_prompt: str | None = None,
    ) -> GateScores:
        """The inner gate's scores of ``texts``, the score calibrated (the other fields unchanged)."""
        scores = self.inner.score_prompts(
            model,
            tokenizer,
            texts,
            batch_size=batch_size,
            max_length=max_length,
            chat_template=chat_template,
            system_prompt=system_prompt,
        )
        return scores._replace(score_N=self.transform(scores.score_N))

    def config(self) -> dict[str, Any]:
        """JSON facts: the method, Platt's slope and intercept, and the inner gate (``kind`` included)."""
        out: dict[str, Any] = {"method": self.method, "inner": nested_config(self.inner)}
        if self.method == "platt":
            out.update(slope=self.slope, intercept=self.intercept)
        return out

    def tensors(self) -> dict[str, Tensor]:
        """The inner gate's tensors under ``inner.``, and the isotonic breakpoints (float64)."""
        out = nested_tensors(self.inner, "inner.")
        if self.x_K is not None and self.y_K is not None:
            out.update(calibration_x_K=self.x_K, calibration_y_K=self.y_K)
        return out

    @classmethod
    def from_saved(
        cls,
        config: Mapping[str, Any],
        tensors: Mapping[str, Tensor],
        sae: SparseAutoencoder | None = None,
        *,
        loaders: Mapping[str, GateLoader] | None = None,
    ) -> CalibratedGate:
        """Rebuild from :meth:`config` and :meth:`tensors`; the inner gate through ``loaders``.

        ``loaders`` is the gate registry (``GATE_LOADERS``: :func:`load_gate` binds it); ``sae`` goes to
        the inner gate.
        """
        inner = load_nested(config["inner"], tensors, "inner.", sae, loaders, "inner")
        return cls(
            inner,
            method=config["method"],
            slope=config.get("slope"),
            intercept=config.get("intercept"),
            x_K=tensors.get("calibration_x_K"),
            y_K=tensors.get("calibration_y_K"),
        )
