"""Conditional steering: per prompt, once at prefill, a gate decides whether and how to steer.

A *gate* gives every prompt a harmfulness score in ``[0, 1]`` and a category code (``1..C``, the class codes
of :class:`~sae_refusal.features.vectors.SteeringVectors`; ``0`` where the gate names no harmful category).
A :class:`GatePolicy` maps the score to a signed alpha (harmful-looking prompts get ``+alpha_pos`` along
their vector, more refusal; benign-looking ones ``-alpha_neg``, less over-refusal; the unsure middle band
``alpha_mid``, default 0 = untouched) and :class:`GatedSteering` bundles gate, policy, vectors and the
steering layer into per-row edits for :func:`~sae_refusal.steer.scoring.first_token_decisions` or an
:class:`~sae_refusal.steer.interventions.Intervention` around ``generate``.

Gates (all follow the :class:`Gate` protocol; the residual ones are fitted on TRAIN-split activations):

* :class:`RefusalTokenGate`: the refusal-token model's own unsteered first token. A category token gives
  score 1 and that category, ``[respond]`` score 0 (``graded=True``: the score is ``1 - P(respond)``).
* :class:`ProbeGate`: logistic regression (scikit-learn) on standardised last-token residuals at one layer,
  harmful vs benign; score ``P(harmful)``; category from a multinomial head on the harmful rows
  (``category="head"``) or the nearest category mean (``category="mean"``).
* :class:`HeadGate`: the project's L1 multinomial head (:mod:`sae_refusal.features.heads`) on SAE codes,
  score ``1 - P(benign)``, category the most likely harmful class.
* :class:`DistanceGate`: ``s_c = d_B / (d_B + d_c)`` with ``d_B``, ``d_c`` the distances to the benign and
  category-``c`` means (residual space, or SAE latent space when an SAE is given); score ``max_c s_c``,
  category its argmax.
* :class:`GuardGate`: an external guard model: a local sequence classifier (``mode="classifier"``, the label
  index meaning harmful set by ``harmful_label``) or a chat model whose next-token logits of two answers
  (``"unsafe"`` / ``"safe"``) after ``prompt_format`` give the score (``mode="chat"``). It names no category.

Design notes:

* **Category codes are the vectors' codes.** Residual gates are fitted with the same ``class_names`` as the
  steering vectors (benign first); the refusal-token gate maps each refusal token to the index of its
  category in ``class_names``. With ``vector="category"`` a row steers along its category's CAA vector; rows
  whose category is 0 (or whose category vector is all zero) fall back to the global vector.
* **The global vector** (``vector="global"``, and the fallback above) is either the CAA of all harmful rows
  pooled vs benign or the plain mean of the category rows: :func:`global_vector` gives both (the pooled CAA
  is the count-weighted mean of the category rows, so ``weights_C = counts`` reproduces it exactly).
* **Two passes.** The gate reads the unsteered prompt (an early-exit residual pass, a first-token pass or
  the guard model), then the steered pass runs with per-row edits; nothing is decided during generation.
* **Artifact.** :meth:`GatedSteering.save` writes ``gate.json`` (gate config, policy, steering layer and
  width, class names, tuning provenance) and ``gate.safetensors`` (the gate's fitted tensors under
  ``gate.*``, the vectors under ``steer.*``) atomically; :func:`load_gate` reads it back and, given the
  model, refuses a folder whose recorded layer or width does not fit it. SAEs and guard models are
  referenced by path, not copied.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from sae_refusal.atomic import AtomicFolder
from sae_refusal.categories import resolve_category
from sae_refusal.data.chat import format_prompts
from sae_refusal.features.heads import feature_scale, fit_sklearn_head, fit_torch_head
from sae_refusal.features.vectors import class_means
from sae_refusal.llm.batched import check_positive, next_token_logits, resolve_pad_id
from sae_refusal.llm.layers import d_model as model_width
from sae_refusal.llm.layers import num_layers, validate_layers
from sae_refusal.llm.refusal_tokens import RefusalVocabulary
from sae_refusal.llm.tokenize import encode_prompts
from sae_refusal.sae.base import SparseAutoencoder, load_sae
from sae_refusal.steer.interventions import Positions, check_positions
from sae_refusal.steer.scoring import RowEdits, first_token_decisions, residual_rows
from sae_refusal.steer.study import last_token_acts

__all__ = [
    "GATE_FILE",
    "GATE_TENSORS_FILE",
    "DistanceGate",
    "Gate",
    "GateMetrics",
    "GatePolicy",
    "GateScores",
    "GatedSteering",
    "GuardGate",
    "HeadGate",
    "ProbeGate",
    "RefusalTokenGate",
    "gate_metrics",
    "global_vector",
    "load_gate",
    "prompt_residuals",
    "row_vectors",
]

GATE_FILE = "gate.json"
GATE_TENSORS_FILE = "gate.safetensors"
_FORMAT = "sae_refusal.gate/1"

#: How a row's steering vector is chosen: its gate category's CAA vector, or one global vector for all.
VectorMode = Literal["category", "global"]


class GateScores(NamedTuple):
    """What a gate says about each prompt, in input order (CPU tensors).

    Attributes:
        score_N: Harmfulness score in ``[0, 1]`` (float32); the policy thresholds it.
        category_N: The harmful category the gate sees, ``1..C`` (int64, codes of the gate's
            ``class_names``), or 0 where it names none (a ``[respond]`` decision of the refusal-token gate,
            a guard model). Residual gates always name their most likely category, also for prompts they
            score benign, so a benign row can be steered away from the category it resembles.
    """

    score_N: Tensor
    category_N: Tensor


def _scores(score_N: Tensor, category_N: Tensor) -> GateScores:
    return GateScores(
        score_N.detach().float().cpu().clamp(0.0, 1.0), category_N.detach().to(torch.long).cpu()
    )


@runtime_checkable
class Gate(Protocol):
    """The common face of all gates: score prompts, and describe themselves for saving.

    Residual gates (:class:`ProbeGate`, :class:`HeadGate`, :class:`DistanceGate`) also offer
    ``score(acts_ND)`` on activations already extracted at their ``layer``.
    """

    kind: ClassVar[str]

    @property
    def layer(self) -> int | None:
        """Residual layer the gate reads (``None``: it reads no residuals)."""
        ...

    @property
    def d_model(self) -> int | None:
        """Residual width the gate expects (``None``: any)."""
        ...

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """Names of the class codes ``0..C`` its categories refer to (``None``: it names no category)."""
        ...

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
        """Score user messages with the (unsteered) ``model``; a guard gate uses its own model instead."""
        ...

    def config(self) -> dict[str, Any]:
        """JSON facts that rebuild the gate together with :meth:`tensors`."""
        ...

    def tensors(self) -> dict[str, Tensor]:
        """The gate's fitted parameters (saved as safetensors)."""
        ...


# --------------------------------------------------------------------------------------------- helpers


def _check_class_names(class_names: Sequence[str], key: str = "class_names") -> tuple[str, ...]:
    if isinstance(class_names, str) or len(class_names) < 2:
        raise ValueError(f"{key}: expected benign + at least one category name, got {class_names!r}")
    return tuple(str(name) for name in class_names)


def _check_layer(layer: int) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"layer: expected a layer index >= 0, got {layer!r}")
    return layer


def _check_labelled(acts_ND: Tensor, y_N: Tensor, n_classes: int) -> tuple[Tensor, Tensor]:
    """Rows with a label >= 0 as float32 / int64 CPU tensors, checked."""
    if acts_ND.ndim != 2:
        raise ValueError(f"acts_ND: expected (N, D), got shape {tuple(acts_ND.shape)}")
    y_N = torch.as_tensor(y_N)
    if y_N.ndim != 1 or y_N.shape[0] != acts_ND.shape[0]:
        raise ValueError(
            f"y_N: expected one label per row of acts_ND ({acts_ND.shape[0]}), got {tuple(y_N.shape)}"
        )
    keep = y_N >= 0
    x, y = acts_ND[keep].detach().float().cpu(), y_N[keep].long().cpu()
    if y.numel() and int(y.max()) >= n_classes:
        raise ValueError(f"y_N: label {int(y.max())} is out of range for {n_classes} class_names")
    if not bool((y == 0).any()) or not bool((y > 0).any()):
        raise ValueError("y_N: the gate needs benign (0) and harmful (1..C) training rows")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("acts_ND: non-finite values")
    return x, y


def _encode(sae: SparseAutoencoder, acts_ND: Tensor, chunk: int = 4096) -> Tensor:
    """SAE codes ``(N, F)`` float32 on CPU, ``chunk`` rows at a time on the SAE's device."""
    device = sae.W_dec_FD.device
    parts = []
    with torch.no_grad():
        for start in range(0, acts_ND.shape[0], chunk):
            parts.append(sae.encode(acts_ND[start : start + chunk].to(device)).float().cpu())
    return torch.cat(parts) if parts else torch.empty(0, sae.n_latents)


def prompt_residuals(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    layer: int,
    *,
    batch_size: int = 32,
    max_length: int | None = None,
    chat_template: str | None = None,
    system_prompt: str | None = None,
) -> Tensor:
    """Last-token residuals ``(N, D)`` (float32, CPU) of chat-formatted user messages after block ``layer``.

    The same formatting as the activation cache and :func:`~sae_refusal.steer.scoring.first_token_decisions`
    (generation prompt included), from one early-exit pass per batch.
    """
    (key,) = validate_layers(layer, num_layers(model), key="layer")
    acts = last_token_acts(
        model,
        tokenizer,
        texts,
        [key],
        batch_size=batch_size,
        max_length=max_length,
        chat_template=chat_template,
        system_prompt=system_prompt,
    )
    return acts[key]


# ------------------------------------------------------------------------------------ residual gates


@dataclass(frozen=True)
class _SAERef:
    """Which SAE a latent-space gate reads and where it came from."""

    sae: SparseAutoencoder
    path: str | None

    def config(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "architecture": self.sae.architecture,
            "d_model": self.sae.d_model,
            "n_latents": self.sae.n_latents,
        }


class _ResidualGate:
    """Shared part of the gates that read last-token residuals at one layer (optionally through an SAE)."""

    kind: ClassVar[str] = ""

    def __init__(
        self,
        *,
        layer: int,
        d_model: int,
        class_names: Sequence[str],
        sae: SparseAutoencoder | None = None,
        sae_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self._layer = _check_layer(layer)
        if d_model < 1:
            raise ValueError(f"d_model: must be >= 1, got {d_model}")
        if sae is not None and sae.d_model != d_model:
            raise ValueError(f"sae: the SAE's width {sae.d_model} != the gate's d_model {d_model}")
        self._d_model = int(d_model)
        self._class_names = _check_class_names(class_names)
        self.sae = None if sae is None else _SAERef(sae, None if sae_path is None else str(sae_path))

    @property
    def layer(self) -> int:
        """Residual layer the gate reads."""
        return self._layer

    @property
    def d_model(self) -> int:
        """Residual width the gate expects."""
        return self._d_model

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names of class codes ``0..C`` (benign first)."""
        return self._class_names

    @property
    def n_categories(self) -> int:
        """``C``, the number of harmful categories."""
        return len(self._class_names) - 1

    def features(self, acts_ND: Tensor) -> Tensor:
        """What the gate sees of raw residuals: float32 residuals, or their SAE codes."""
        if acts_ND.ndim != 2 or acts_ND.shape[1] != self._d_model:
            raise ValueError(f"acts_ND: expected (N, {self._d_model}), got shape {tuple(acts_ND.shape)}")
        x = acts_ND.detach().float().cpu()
        return x if self.sae is None else _encode(self.sae.sae, x)

    def score(self, acts_ND: Tensor) -> GateScores:
        """Score raw last-token residuals ``(N, D)`` taken at :attr:`layer`."""
        return self._score_features(self.features(acts_ND))

    def _score_features(self, x_NF: Tensor) -> GateScores:
        raise NotImplementedError

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
        """Extract the residuals at :attr:`layer` (:func:`prompt_residuals`) and :meth:`score` them."""
        acts_ND = prompt_residuals(
            model,
            tokenizer,
            texts,
            self._layer,
            batch_size=batch_size,
            max_length=max_length,
            chat_template=chat_template,
            system_prompt=system_prompt,
        )
        return self.score(acts_ND)

    def config(self) -> dict[str, Any]:
        """JSON facts: layer, width, class names, the SAE reference."""
        return {
            "layer": self._layer,
            "d_model": self._d_model,
            "class_names": list(self._class_names),
            "sae": None if self.sae is None else self.sae.config(),
        }

    @staticmethod
    def _sae_from_saved(config: Mapping[str, Any], sae: SparseAutoencoder | None) -> SparseAutoencoder | None:
        """The SAE a saved gate needs: ``sae``, else the one at the recorded path; shapes checked."""
        recorded = config.get("sae")
        if recorded is None:
            return None
        if sae is None:
            path = recorded.get("path")
            if not path or not Path(path).is_dir():
                raise ValueError(
                    f"sae: this gate reads SAE codes; pass sae= (recorded path {path!r} is not a folder here)"
                )
            sae = load_sae(path)
        for key in ("d_model", "n_latents"):
            if int(getattr(sae, key)) != int(recorded[key]):
                raise ValueError(
                    f"sae.{key}: the gate was fitted on an SAE with {key}={recorded[key]}, "
                    f"the given SAE has {getattr(sae, key)}"
                )
        return sae


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


# ----------------------------------------------------------------------------- model-output gates


def _category_code(category: str | None, class_names: Sequence[str]) -> int:
    """Index of a CoCoNot category among ``class_names[1:]`` (any spelling resolve_category knows), else 0."""
    if category is None:
        return 0
    for index, name in enumerate(class_names[1:], start=1):
        try:
            if resolve_category(name) == category:
                return index
        except ValueError:
            continue
    return 0


class RefusalTokenGate:
    """The refusal-token model's own unsteered first token: a category token means harmful.

    Args:
        class_names: Class names ``0..C`` of the steering vectors; each refusal token's category is mapped to
            its index here (a category missing from them gives category 0, i.e. the global vector).
        vocabulary: The refusal tokens; ``None`` detects them in the tokenizer's added tokens.
        graded: Score ``1 - P(respond)`` (softmax over the refusal tokens, respond bias applied) instead of
            the 0/1 decision.
        respond_bias: Bias added to the respond logit; ``None`` takes the model's calibrated bias.
    """

    kind: ClassVar[str] = "refusal_token"

    def __init__(
        self,
        class_names: Sequence[str],
        vocabulary: RefusalVocabulary | None = None,
        *,
        graded: bool = False,
        respond_bias: float | None = None,
    ) -> None:
        self._class_names = _check_class_names(class_names)
        self.vocabulary = vocabulary
        self.graded = bool(graded)
        if respond_bias is not None and not math.isfinite(respond_bias):
            raise ValueError(f"respond_bias: must be finite, got {respond_bias}")
        self.respond_bias = respond_bias

    @property
    def layer(self) -> None:
        """Reads no residuals."""
        return None

    @property
    def d_model(self) -> None:
        """Any width."""
        return None

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names of class codes ``0..C``."""
        return self._class_names

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
        """One unsteered first-token pass (:func:`~sae_refusal.steer.scoring.first_token_decisions`)."""
        vocabulary = self.vocabulary if self.vocabulary is not None else RefusalVocabulary.detect(tokenizer)
        resolved = vocabulary.resolve(tokenizer)
        decisions = first_token_decisions(
            model,
            tokenizer,
            texts,
            resolved,
            batch_size=batch_size,
            max_length=1024 if max_length is None else max_length,
            chat_template=chat_template,
            system_prompt=system_prompt,
            respond_bias=self.respond_bias,
        )
        code_K = torch.tensor([_category_code(c, self._class_names) for c in resolved.categories])
        respond = resolved.categories.index(None)
        if self.graded:
            score_N = 1.0 - decisions.probs_NC[:, respond]
        else:
            score_N = (decisions.pred_class_N != respond).float()
        return _scores(score_N, code_K[decisions.pred_class_N])

    def config(self) -> dict[str, Any]:
        """Class names, the token spellings (``None``: detected), grading and the respond bias."""
        return {
            "class_names": list(self._class_names),
            "tokens": None if self.vocabulary is None else dict(self.vocabulary.tokens),
            "graded": self.graded,
            "respond_bias": self.respond_bias,
        }

    def tensors(self) -> dict[str, Tensor]:
        """None: nothing is fitted."""
        return {}

    @classmethod
    def from_saved(
        cls, config: Mapping[str, Any], tensors: Mapping[str, Tensor], sae: SparseAutoencoder | None = None
    ) -> RefusalTokenGate:
        """Rebuild from :meth:`config`."""
        tokens = config.get("tokens")
        return cls(
            config["class_names"],
            None if tokens is None else RefusalVocabulary(tokens=dict(tokens)),
            graded=bool(config.get("graded", False)),
            respond_bias=config.get("respond_bias"),
        )


_DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class GuardGate:
    """An external guard model: score = its probability that the user message is harmful; no category.

    Args:
        path: Local Hugging Face folder (or hub id, if reachable) of the guard model and its tokenizer.
        mode: ``"classifier"``: an ``AutoModelForSequenceClassification``; ``"chat"``: a causal LM asked in
            ``prompt_format``, whose next-token logits of ``answers`` give the score.
        harmful_label: (classifier) The label meaning harmful: an index, or a name of ``config.label2id``.
        prompt_format: (chat) ``str.format`` pattern with a ``{prompt}`` field for the user message.
        answers: (chat) ``(harmful, harmless)`` answer strings; the first token of each is compared:
            score = ``softmax(logit_harmful, logit_harmless)[0]``.
        use_chat_template: (chat) Wrap the formatted question in the guard tokenizer's chat template as a
            user message (generation prompt added); false: feed it as plain text.
        device: Where the guard model runs.
        dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16``.
        max_length: Most tokens per prompt (longer ones lose their beginning in chat mode, their end in
            classifier mode, as the classifier's tokenizer truncates).

    The model loads on first use. It ignores the ``model`` / ``tokenizer`` passed to :meth:`score_prompts`
    (those of the steered model).
    """

    kind: ClassVar[str] = "guard"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        mode: Literal["classifier", "chat"] = "classifier",
        harmful_label: int | str = 1,
        prompt_format: str = "{prompt}",
        answers: tuple[str, str] = ("unsafe", "safe"),
        use_chat_template: bool = True,
        device: str = "cpu",
        dtype: str = "auto",
        max_length: int = 1024,
    ) -> None:
        if mode not in ("classifier", "chat"):
            raise ValueError(f"mode: expected 'classifier' or 'chat', got {mode!r}")
        if "{prompt}" not in prompt_format:
            raise ValueError(f"prompt_format: needs a {{prompt}} field, got {prompt_format!r}")
        try:
            prompt_format.format(prompt="x")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"prompt_format: {err!r}; escape literal braces as {{{{ }}}}") from err
        if len(answers) != 2 or not all(answers) or answers[0] == answers[1]:
            raise ValueError(f"answers: expected two distinct non-empty strings, got {answers!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: expected one of {tuple(_DTYPES)}, got {dtype!r}")
        check_positive("max_length", max_length)
        self.path = str(path)
        self.mode = mode
        self.harmful_label = harmful_label
        self.prompt_format = prompt_format
        self.answers = (str(answers[0]), str(answers[1]))
        self.use_chat_template = bool(use_chat_template)
        self.device = device
        self.dtype = dtype
        self.max_length = max_length
        self._loaded: tuple[nn.Module, Any] | None = None

    @property
    def layer(self) -> None:
        """Reads no residuals."""
        return None

    @property
    def d_model(self) -> None:
        """Any width."""
        return None

    @property
    def class_names(self) -> None:
        """Names no category."""
        return None

    def _load(self) -> tuple[nn.Module, Any]:
        if self._loaded is None:
            from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.path)
            auto = AutoModelForSequenceClassification if self.mode == "classifier" else AutoModelForCausalLM
            model: Any = auto.from_pretrained(self.path, dtype=_DTYPES[self.dtype])
            model = model.to(self.device).eval()
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            self._loaded = (model, tokenizer)
        return self._loaded

    def harmful_index(self, model: nn.Module) -> int:
        """The classifier's label index meaning harmful (``harmful_label`` resolved against its config)."""
        config: Any = model.config
        n_labels = int(getattr(config, "num_labels", 0))
        label = self.harmful_label
        if isinstance(label, str):
            label2id = {
                str(k).casefold(): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()
            }
            if label.casefold() not in label2id:
                raise ValueError(
                    f"harmful_label: {label!r} is not a label of {self.path} ({sorted(label2id)})"
                )
            return label2id[label.casefold()]
        if isinstance(label, bool) or not 0 <= int(label) < n_labels:
            raise ValueError(
                f"harmful_label: {label!r} is not a label index of a {n_labels}-label classifier"
            )
        return int(label)

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
        """Score with the guard model (the steered ``model`` / ``tokenizer`` and the template are unused)."""
        check_positive("batch_size", batch_size)
        if isinstance(texts, str):
            raise TypeError("texts: expected a sequence of strings, got a single string")
        guard, guard_tokenizer = self._load()
        limit = self.max_length if max_length is None else max_length
        if self.mode == "classifier":
            score_N = self._classify(guard, guard_tokenizer, list(texts), batch_size, limit)
        else:
            score_N = self._ask(guard, guard_tokenizer, list(texts), batch_size, limit)
        return _scores(score_N, torch.zeros(len(texts), dtype=torch.long))

    def _classify(
        self, guard: nn.Module, tokenizer: Any, texts: list[str], batch_size: int, max_length: int
    ) -> Tensor:
        harmful = self.harmful_index(guard)
        config: Any = guard.config
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id
        tokenizer.padding_side = "right"  # decoder classifiers read the last non-pad token; positions from 0
        device = next(guard.parameters()).device
        parts = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = tokenizer(
                    texts[start : start + batch_size],
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                ).to(device)
                logits_BL = guard(**batch).logits.float()
                parts.append(torch.softmax(logits_BL, dim=-1)[:, harmful].cpu())
        return torch.cat(parts) if parts else torch.empty(0)

    def _ask(
        self, guard: nn.Module, tokenizer: Any, texts: list[str], batch_size: int, max_length: int
    ) -> Tensor:
        ids = []
        for answer in self.answers:
            encoded = tokenizer.encode(answer, add_special_tokens=False)
            if not encoded:
                raise ValueError(f"answers: {answer!r} encodes to no token")
            ids.append(int(encoded[0]))
        if ids[0] == ids[1]:
            raise ValueError(
                f"answers: {self.answers} start with the same token; pick distinguishable answers"
            )
        questions = [self.prompt_format.format(prompt=text) for text in texts]
        if self.use_chat_template:
            questions = format_prompts(tokenizer, questions, key="guard.use_chat_template")
        encoded_prompts = encode_prompts(
            tokenizer, questions, max_length=max_length, overflow="truncate_left"
        )
        logits_NV = next_token_logits(
            guard, encoded_prompts.input_ids, batch_size=batch_size, pad_id=resolve_pad_id(tokenizer)
        )
        return torch.softmax(logits_NV[:, ids], dim=1)[:, 0]

    def config(self) -> dict[str, Any]:
        """Everything that rebuilds the gate (the guard model is referenced by ``path``)."""
        return {
            "path": self.path,
            "mode": self.mode,
            "harmful_label": self.harmful_label,
            "prompt_format": self.prompt_format,
            "answers": list(self.answers),
            "use_chat_template": self.use_chat_template,
            "device": self.device,
            "dtype": self.dtype,
            "max_length": self.max_length,
        }

    def tensors(self) -> dict[str, Tensor]:
        """None: nothing is fitted."""
        return {}

    @classmethod
    def from_saved(
        cls, config: Mapping[str, Any], tensors: Mapping[str, Tensor], sae: SparseAutoencoder | None = None
    ) -> GuardGate:
        """Rebuild from :meth:`config`."""
        answers = config.get("answers", ("unsafe", "safe"))
        return cls(
            config["path"],
            mode=config.get("mode", "classifier"),
            harmful_label=config.get("harmful_label", 1),
            prompt_format=config.get("prompt_format", "{prompt}"),
            answers=(str(answers[0]), str(answers[1])),
            use_chat_template=bool(config.get("use_chat_template", True)),
            device=config.get("device", "cpu"),
            dtype=config.get("dtype", "auto"),
            max_length=int(config.get("max_length", 1024)),
        )


_GateLoader = Callable[[Mapping[str, Any], Mapping[str, Tensor], SparseAutoencoder | None], Gate]

#: ``gate.json`` ``gate.kind`` -> the function that rebuilds that gate.
GATE_LOADERS: dict[str, _GateLoader] = {
    ProbeGate.kind: ProbeGate.from_saved,
    HeadGate.kind: HeadGate.from_saved,
    DistanceGate.kind: DistanceGate.from_saved,
    RefusalTokenGate.kind: RefusalTokenGate.from_saved,
    GuardGate.kind: GuardGate.from_saved,
}


# ------------------------------------------------------------------------------------------ policy


@dataclass(frozen=True)
class GatePolicy:
    """Score -> signed alpha per prompt, and how each prompt's vector is chosen.

    ``score >= t_high`` -> ``+alpha_pos`` (``t_high`` inclusive); ``score < t_low`` -> ``-alpha_neg``
    (``t_low`` exclusive); otherwise ``alpha_mid``. ``t_low == t_high`` leaves no middle band. Scores and
    thresholds are compared in float32 (the gates' score dtype), here and in the tuning.

    Args:
        t_low: Lower threshold in ``[0, 1]`` (0: no prompt counts as benign).
        t_high: Upper threshold in ``[t_low, 1]``.
        alpha_pos: Strength (>= 0) added along the vector for harmful-looking prompts.
        alpha_neg: Strength (>= 0) subtracted for benign-looking prompts.
        alpha_mid: Signed strength for the unsure band (0: leave them alone).
        vector: ``"category"``: the row's gate category CAA vector (category 0 or an all-zero row: the
            global vector); ``"global"``: the global vector for every row (see :func:`global_vector`).
    """

    t_low: float
    t_high: float
    alpha_pos: float
    alpha_neg: float
    alpha_mid: float = 0.0
    vector: VectorMode = "category"

    def __post_init__(self) -> None:
        for key in ("t_low", "t_high", "alpha_pos", "alpha_neg", "alpha_mid"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{key}: expected a finite number, got {value!r}")
        if not 0.0 <= self.t_low <= self.t_high <= 1.0:
            raise ValueError(
                f"t_low, t_high: need 0 <= t_low <= t_high <= 1, got {self.t_low}, {self.t_high}"
            )
        for key in ("alpha_pos", "alpha_neg"):
            if getattr(self, key) < 0:
                raise ValueError(
                    f"{key}: a magnitude >= 0 (the sign is the policy's), got {getattr(self, key)}"
                )
        if self.vector not in ("category", "global"):
            raise ValueError(f"vector: expected 'category' or 'global', got {self.vector!r}")

    def alphas(self, score_N: Tensor) -> Tensor:
        """Signed alpha per prompt (float32)."""
        score_N = torch.as_tensor(score_N).detach().cpu().float()
        if score_N.ndim != 1 or not bool(torch.isfinite(score_N).all()):
            raise ValueError(f"score_N: expected finite (N,) scores, got shape {tuple(score_N.shape)}")
        alpha_N = torch.full(score_N.shape, float(self.alpha_mid), dtype=torch.float32)
        alpha_N[score_N >= torch.tensor(self.t_high, dtype=torch.float32)] = float(self.alpha_pos)
        alpha_N[score_N < torch.tensor(self.t_low, dtype=torch.float32)] = -float(self.alpha_neg)
        return alpha_N

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)


def global_vector(vectors_CD: Tensor, weights_C: Tensor | None = None) -> Tensor:
    """One vector for every prompt, from the category CAA rows.

    ``weights_C=None``: the plain mean of the non-zero category rows. ``weights_C = counts`` (harmful train
    rows per category, ``counts_K[1:]`` of :func:`~sae_refusal.features.vectors.caa_vectors`): the
    count-weighted mean, which equals the CAA of all harmful rows pooled vs benign.
    """
    if vectors_CD.ndim != 2 or vectors_CD.shape[0] == 0:
        raise ValueError(f"vectors_CD: expected (C, D), got shape {tuple(vectors_CD.shape)}")
    if weights_C is None:
        weights = (vectors_CD != 0).any(dim=1).double()
    else:
        weights = torch.as_tensor(weights_C, dtype=torch.float64)
        if weights.shape != (vectors_CD.shape[0],) or bool((weights < 0).any()):
            raise ValueError(f"weights_C: expected {vectors_CD.shape[0]} non-negative weights")
    if float(weights.sum()) <= 0:
        raise ValueError("vectors_CD: all category rows are zero (or weigh nothing)")
    return ((weights[:, None] * vectors_CD.double()).sum(0) / weights.sum()).float()


def row_vectors(category_N: Tensor, vectors_CD: Tensor, global_D: Tensor, mode: VectorMode) -> Tensor:
    """Each prompt's steering vector ``(N, D)``: its category's row, or the global vector (see GatePolicy)."""
    category_N = torch.as_tensor(category_N, dtype=torch.long)
    n_categories = vectors_CD.shape[0]
    if category_N.ndim != 1 or (
        category_N.numel() and (category_N.min() < 0 or category_N.max() > n_categories)
    ):
        raise ValueError(f"category_N: expected (N,) codes in 0..{n_categories}")
    if global_D.shape != vectors_CD.shape[1:]:
        raise ValueError(f"global_D: width {tuple(global_D.shape)} != vectors_CD width {vectors_CD.shape[1]}")
    out_ND = global_D.float().expand(category_N.shape[0], -1).clone()
    if mode == "global":
        return out_ND
    if mode != "category":
        raise ValueError(f"vector: expected 'category' or 'global', got {mode!r}")
    usable_C = (vectors_CD != 0).any(dim=1)
    padded_KD = torch.cat([global_D[None].float(), vectors_CD.float()])
    use_N = (category_N > 0) & usable_C[(category_N - 1).clamp_min(0)]
    out_ND[use_N] = padded_KD[category_N[use_N]]
    return out_ND


# ------------------------------------------------------------------------------------------ bundle


@dataclass
class GatedSteering:
    """A gate, its policy and the vectors it steers along: everything conditional steering needs.

    Args:
        gate: Any :class:`Gate`.
        policy: Thresholds, alphas and the vector mode.
        layer: Layer whose residual stream is steered (after block ``layer``).
        vectors_CD: Category CAA vectors (``SteeringVectors.caa_CD``; row ``c - 1`` for category ``c``).
        global_D: The global vector (:func:`global_vector`).
        class_names: Class names ``0..C`` of the vectors (must match the gate's when it has some).
        positions: Where the steering acts (see :func:`~sae_refusal.steer.interventions.position_mask`).
        provenance: JSON facts on how the policy was chosen (:meth:`TuningResult.provenance`).
    """

    gate: Gate
    policy: GatePolicy
    layer: int
    vectors_CD: Tensor
    global_D: Tensor
    class_names: Sequence[str]
    positions: Positions = "all"
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_layer(self.layer)
        check_positions(self.positions)
        self.class_names = _check_class_names(self.class_names)
        if self.vectors_CD.ndim != 2 or self.vectors_CD.shape[0] != len(self.class_names) - 1:
            raise ValueError(
                f"vectors_CD: expected one row per category ({len(self.class_names) - 1}), "
                f"got shape {tuple(self.vectors_CD.shape)}"
            )
        if tuple(self.global_D.shape) != (self.vectors_CD.shape[1],):
            raise ValueError(
                f"global_D: expected shape ({self.vectors_CD.shape[1]},), got {tuple(self.global_D.shape)}"
            )
        gate_names = self.gate.class_names
        if gate_names is not None and tuple(gate_names) != tuple(self.class_names):
            raise ValueError(
                f"class_names: the gate's {list(gate_names)} != the vectors' {list(self.class_names)}"
            )
        self.vectors_CD = self.vectors_CD.detach().float().cpu()
        self.global_D = self.global_D.detach().float().cpu()

    @property
    def d_model(self) -> int:
        """Width of the steering vectors."""
        return int(self.vectors_CD.shape[1])

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model whose depth or width does not fit the recorded layer(s) and width.

        Raises:
            ValueError: Naming the key (``layer``, ``d_model``, ``gate.layer``, ``gate.d_model``).
        """
        depth, width = num_layers(model), model_width(model)
        checks: list[tuple[str, int | None, int]] = [
            ("layer", self.layer, depth),
            ("gate.layer", self.gate.layer, depth),
        ]
        for key, layer, n_layers in checks:
            if layer is not None and layer >= n_layers:
                raise ValueError(
                    f"{key}: recorded layer {layer} does not exist in a model with {n_layers} layers"
                )
        for key, recorded in (("d_model", self.d_model), ("gate.d_model", self.gate.d_model)):
            if recorded is not None and recorded != width:
                raise ValueError(f"{key}: recorded width {recorded} != the model's width {width}")

    def score_prompts(
        self, model: nn.Module, tokenizer: Any, texts: Sequence[str], **kwargs: Any
    ) -> GateScores:
        """The gate's scores of ``texts`` (keyword arguments go to :meth:`Gate.score_prompts`)."""
        return self.gate.score_prompts(model, tokenizer, texts, **kwargs)

    def plan(self, scores: GateScores) -> tuple[Tensor, Tensor]:
        """``(vectors_ND, alpha_N)``: each prompt's vector and signed alpha."""
        alpha_N = self.policy.alphas(scores.score_N)
        return row_vectors(scores.category_N, self.vectors_CD, self.global_D, self.policy.vector), alpha_N

    def edits(self, scores: GateScores) -> RowEdits:
        """Per-row edits for :func:`~sae_refusal.steer.scoring.first_token_decisions` (``edits=``)."""
        vectors_ND, alpha_N = self.plan(scores)
        return residual_rows(self.layer, vectors_ND, alpha_N, positions=self.positions)

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``gate.json`` + ``gate.safetensors`` into ``folder`` atomically; returns the folder."""
        tensors = {f"gate.{k}": v.detach().cpu().contiguous() for k, v in self.gate.tensors().items()}
        tensors["steer.vectors_CD"] = self.vectors_CD.contiguous()
        tensors["steer.global_D"] = self.global_D.contiguous()
        record = {
            "format": _FORMAT,
            "gate": {"kind": self.gate.kind, **self.gate.config()},
            "policy": self.policy.to_dict(),
            "steering": {
                "layer": self.layer,
                "d_model": self.d_model,
                "positions": self.positions,
                "class_names": list(self.class_names),
            },
            "provenance": self.provenance,
        }
        text = json.dumps(record, indent=2)  # fails before anything is written if something is not JSON
        with AtomicFolder(folder) as out:
            save_file(tensors, str(out.tmp / GATE_TENSORS_FILE), metadata={"format": _FORMAT})
            (out.tmp / GATE_FILE).write_text(text)
            return out.commit()


def load_gate(
    folder: str | os.PathLike[str], *, model: nn.Module | None = None, sae: SparseAutoencoder | None = None
) -> GatedSteering:
    """Read a folder written by :meth:`GatedSteering.save`.

    Args:
        folder: The gate folder.
        model: If given, the folder must fit it (recorded layers exist, widths equal).
        sae: The SAE of a latent-space gate (else loaded from its recorded path).

    Raises:
        FileNotFoundError: If a file is missing.
        ValueError: On an unknown format or gate kind, or a layer / width that does not fit ``model``
            (naming the key).
    """
    folder = Path(folder)
    meta_path, tensor_path = folder / GATE_FILE, folder / GATE_TENSORS_FILE
    for path in (meta_path, tensor_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: not a gate folder")
    record = json.loads(meta_path.read_text())
    if record.get("format") != _FORMAT:
        raise ValueError(f"format: {meta_path} has format {record.get('format')!r}, expected {_FORMAT!r}")
    tensors = load_file(str(tensor_path))
    gate_config = dict(record["gate"])
    kind = gate_config.pop("kind", None)
    if kind not in GATE_LOADERS:
        raise ValueError(f"gate.kind: unknown gate {kind!r} in {meta_path} (known: {sorted(GATE_LOADERS)})")
    gate_tensors = {k.removeprefix("gate."): v for k, v in tensors.items() if k.startswith("gate.")}
    steering = record["steering"]
    bundle = GatedSteering(
        gate=GATE_LOADERS[kind](gate_config, gate_tensors, sae),
        policy=GatePolicy(**record["policy"]),
        layer=int(steering["layer"]),
        vectors_CD=tensors["steer.vectors_CD"],
        global_D=tensors["steer.global_D"],
        class_names=steering["class_names"],
        positions=steering.get("positions", "all"),
        provenance=dict(record.get("provenance", {})),
    )
    if int(steering["d_model"]) != bundle.d_model:
        raise ValueError(
            f"d_model: {meta_path} records {steering['d_model']}, its vectors are {bundle.d_model} wide"
        )
    if model is not None:
        bundle.check_model(model)
    return bundle


# ----------------------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class GateMetrics:
    """How well a gate's harmful/benign call (``score >= threshold``) matches the truth.

    Attributes:
        precision: ``tp / (tp + fp)`` (NaN when nothing is called harmful).
        recall: ``tp / (tp + fn)`` (NaN without harmful prompts).
        f1: Harmonic mean of the two (NaN where either is NaN; 0 where both are 0).
        accuracy: Share of correct calls.
        tp: Harmful prompts called harmful.
        fp: Benign prompts called harmful.
        fn: Harmful prompts called benign.
        tn: Benign prompts called benign.
        threshold: The threshold used.
    """

    precision: float
    recall: float
    f1: float
    accuracy: float
    tp: int
    fp: int
    fn: int
    tn: int
    threshold: float

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)


def gate_metrics(score_N: Tensor, harmful_N: Tensor, threshold: float = 0.5) -> GateMetrics:
    """Precision / recall of the call ``score >= threshold`` against ``harmful_N`` on held-out prompts."""
    score_N = torch.as_tensor(score_N, dtype=torch.float32)
    truth_N = torch.as_tensor(harmful_N, dtype=torch.bool)
    if score_N.ndim != 1 or truth_N.shape != score_N.shape or score_N.numel() == 0:
        raise ValueError(
            "score_N, harmful_N: expected equal non-empty (N,) shapes, got "
            f"{tuple(score_N.shape)}, {tuple(truth_N.shape)}"
        )
    called_N = score_N >= threshold
    tp = int((called_N & truth_N).sum())
    fp = int((called_N & ~truth_N).sum())
    fn = int((~called_N & truth_N).sum())
    tn = int((~called_N & ~truth_N).sum())
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    if math.isnan(precision) or math.isnan(recall):
        f1 = float("nan")
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return GateMetrics(precision, recall, f1, (tp + tn) / score_N.numel(), tp, fp, fn, tn, float(threshold))
