"""The policy: a gate's score -> a signed alpha per prompt, and which vector each prompt steers along.

:class:`GatePolicy` gives harmful-looking prompts ``+alpha_pos`` along their vector (more refusal),
benign-looking ones ``-alpha_neg`` (less over-refusal) and the unsure middle band ``alpha_mid`` (default 0 =
untouched). With ``vector="category"`` a row steers along its category's CAA vector; rows whose category is 0
(or whose category vector is all zero) fall back to the global vector (:func:`row_vectors`).

**Which rows a policy touches** (``act_on``). ``"all"``: every row gets its band's alpha. ``"disagreement"``:
only rows where the gate and the model's own unsteered decision disagree are steered: a row the model already
refuses is never pushed further toward refusal, a row it already answers is never pushed further away. Those
pushes cannot change the refusal decision (the model already made it); they only cost edits (first-token KL,
perplexity of the answers). The rates of a policy are (almost) the same either way; the edits are far fewer.

**Vector modes.** ``"global"``: one vector for every row. ``"category"``: each row along its gate category's
vector (either sign). ``"category_pos"`` (the published refusal-token method): rows steered toward refusal
(alpha > 0) go along their predicted category's vector, rows steered away (alpha < 0, toward ``[respond]``)
along the global vector.

**The global vector** (``vector="global"``, and the fallback above) is either the CAA of all harmful rows
pooled vs benign or the plain mean of the category rows: :func:`global_vector` gives both (the pooled CAA is
the count-weighted mean of the category rows, so ``weights_C = counts`` reproduces it exactly).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor

#: How a row's steering vector is chosen: its gate category's CAA vector, or one global vector for all.
VectorMode = Literal["category", "global", "category_pos"]
#: Which rows a policy steers: all, or only where the gate disagrees with the model's own decision.
ActOn = Literal["all", "disagreement"]
VECTOR_MODES: tuple[str, ...] = ("category", "global", "category_pos")
ACT_ON: tuple[str, ...] = ("all", "disagreement")


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
            global vector); ``"global"``: the global vector for every row (see :func:`global_vector`);
            ``"category_pos"``: the category vector for rows steered toward refusal, the global one otherwise.
        act_on: ``"all"`` rows, or only rows where the gate's call and the model's unsteered decision
            disagree (``"disagreement"``; see the module notes).
    """

    t_low: float
    t_high: float
    alpha_pos: float
    alpha_neg: float
    alpha_mid: float = 0.0
    vector: VectorMode = "category"
    act_on: ActOn = "all"

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
        if self.vector not in VECTOR_MODES:
            raise ValueError(f"vector: expected one of {list(VECTOR_MODES)}, got {self.vector!r}")
        if self.act_on not in ACT_ON:
            raise ValueError(f"act_on: expected one of {list(ACT_ON)}, got {self.act_on!r}")

    def alphas(self, score_N: Tensor, refused_N: Tensor | None = None) -> Tensor:
        """Signed alpha per prompt (float32).

        Args:
            score_N: The gate's scores.
            refused_N: The model's own unsteered decisions; required with ``act_on="disagreement"``.

        Raises:
            ValueError: On bad scores, or ``act_on="disagreement"`` without ``refused_N`` of the same length.
        """
        score_N = torch.as_tensor(score_N).detach().cpu().float()
        if score_N.ndim != 1 or not bool(torch.isfinite(score_N).all()):
            raise ValueError(f"score_N: expected finite (N,) scores, got shape {tuple(score_N.shape)}")
        alpha_N = torch.full(score_N.shape, float(self.alpha_mid), dtype=torch.float32)
        alpha_N[score_N >= torch.tensor(self.t_high, dtype=torch.float32)] = float(self.alpha_pos)
        alpha_N[score_N < torch.tensor(self.t_low, dtype=torch.float32)] = -float(self.alpha_neg)
        if self.act_on == "disagreement":
            if refused_N is None:
                raise ValueError("refused_N: act_on='disagreement' needs the model's own decision per row")
            refused = torch.as_tensor(refused_N).detach().cpu().bool()
            if refused.shape != score_N.shape:
                raise ValueError(
                    f"refused_N: expected shape {tuple(score_N.shape)}, got {tuple(refused.shape)}"
                )
            alpha_N[(refused & (alpha_N > 0)) | (~refused & (alpha_N < 0))] = 0.0
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


def row_vectors(
    category_N: Tensor,
    vectors_CD: Tensor,
    global_D: Tensor,
    mode: VectorMode,
    alpha_N: Tensor | None = None,
) -> Tensor:
    """Each prompt's steering vector ``(N, D)``: its category's row, or the global vector (see GatePolicy).

    ``mode="category_pos"`` needs ``alpha_N`` (the rows' signed alphas): only rows with a positive alpha take
    their category's vector.
    """
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
    if mode not in ("category", "category_pos"):
        raise ValueError(f"vector: expected one of {list(VECTOR_MODES)}, got {mode!r}")
    usable_C = (vectors_CD != 0).any(dim=1)
    padded_KD = torch.cat([global_D[None].float(), vectors_CD.float()])
    use_N = (category_N > 0) & usable_C[(category_N - 1).clamp_min(0)]
    if mode == "category_pos":
        if alpha_N is None or torch.as_tensor(alpha_N).shape != category_N.shape:
            raise ValueError("alpha_N: vector='category_pos' needs one signed alpha per row")
        use_N = use_N & (torch.as_tensor(alpha_N) > 0)
    out_ND[use_N] = padded_KD[category_N[use_N]]
    return out_ND
