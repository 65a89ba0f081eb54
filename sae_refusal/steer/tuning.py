"""Tuning a gate's policy on validation prompts from a precomputed outcome table.

Design notes:

* **One model pass per alpha, then lookups.** Whether prompt ``i`` is refused under signed alpha ``a``
  (along that prompt's vector: its gate category's CAA vector or the global one) does not depend on the
  thresholds. :func:`build_outcome_table` measures it once per grid value with
  :func:`~sae_refusal.steer.scoring.first_token_decisions` (per-row vectors, one pass per alpha; alpha 0 runs
  unsteered) into ``refused_NA``. Any policy ``(t_low, t_high, alpha_pos, alpha_neg, alpha_mid)`` then picks
  one table column per row, so its rates are sums over the table: no model run.
* **Vectorised search.** Rows are sorted by gate score; a threshold ``t`` splits them at ``k(t)`` = the
  number of rows scoring below ``t``. With per-alpha prefix sums of refusals, every (threshold pair,
  alpha triple) costs a few gathers, so the whole grid is searched at once (in chunks).
* **Objective.** Minimise over-refusal (share of benign / over-refusal-set rows refused) subject to a
  floor on harmful refusal (share of harmful rows refused ``>= floor``). Ties, in order: more harmful rows
  refused; fewer validation rows steered (rows with a non-zero alpha); smaller total strength
  ``alpha_pos + alpha_neg + |alpha_mid|``; then the first in grid order (``t_low`` ascending, then
  ``t_high``, ``alpha_neg``, ``alpha_mid``, ``alpha_pos`` in grid order). Rates are exact ratios of counts,
  so ties are exact.
* **What comes back** (:class:`TuningResult`): the chosen policy and its rates, the Pareto front of all
  searched policies (over-refusal vs harmful refusal, one representative per point chosen by the same
  tie-break), the unconditional curve (the same alpha for every row, from the same table) and the
  provenance recorded beside the saved gate.
* **Validation only.** The table must be built on VALIDATION prompts; gates are fitted on TRAIN; report
  on TEST. Nothing here looks at which split a prompt came from: the caller keeps them apart.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sae_refusal.llm.refusal_tokens import ResolvedRefusalTokens
from sae_refusal.steer.gates.policy import ActOn, GatePolicy, VectorMode
from sae_refusal.steer.interventions import Positions
from sae_refusal.steer.scoring import first_token_decisions, residual_rows

__all__ = [
    "TIE_BREAK",
    "CurvePoint",
    "OutcomeTable",
    "PolicyPoint",
    "Rates",
    "TuningResult",
    "build_outcome_table",
    "effective_table",
    "evaluate_policy",
    "harm_group_rates",
    "table_decisions",
    "threshold_candidates",
    "tune_policy",
    "unconditional_curve",
]

#: The documented tie-break of :func:`tune_policy`, recorded in the provenance.
TIE_BREAK = (
    "min over_refusal s.t. harmful_refusal >= floor; then max harmful_refusal; then fewest steered "
    "validation rows; then smallest alpha_pos + alpha_neg + |alpha_mid|; then first in grid order"
)

#: Entries of the (threshold pair x alpha triple) grid evaluated per chunk.
_CHUNK = 1 << 20


@dataclass(frozen=True)
class OutcomeTable:
    """Refusal of each validation prompt under each signed alpha of a grid.

    Args:
        alphas_A: Signed alphas, strictly increasing, 0 included (float64 CPU).
        refused_NA: ``refused_NA[i, a]``: prompt ``i`` refused under ``alphas_A[a]`` (bool).
        harmful_N: True for harmful prompts (harmful refusal), False for benign / over-refusal-set prompts
            (over-refusal).
        groups: Set name of each prompt (for sizes in the provenance); defaults to ``harmful`` / ``benign``.
        meta: JSON facts on how the table was built (layer, positions, vector mode, batch settings).
    """

    alphas_A: Tensor
    refused_NA: Tensor
    harmful_N: Tensor
    groups: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        alphas = torch.as_tensor(self.alphas_A, dtype=torch.float64).cpu()
        refused = torch.as_tensor(self.refused_NA).cpu().bool()
        harmful = torch.as_tensor(self.harmful_N).cpu().bool()
        if alphas.ndim != 1 or alphas.numel() == 0 or not bool(torch.isfinite(alphas).all()):
            raise ValueError(f"alphas_A: expected finite (A,) alphas, got shape {tuple(alphas.shape)}")
        if alphas.numel() > 1 and not bool((alphas[1:] > alphas[:-1]).all()):
            raise ValueError("alphas_A: must be strictly increasing")
        if not bool((alphas == 0).any()):
            raise ValueError("alphas_A: must include 0 (unsteered rows)")
        if refused.ndim != 2 or refused.shape[1] != alphas.numel():
            raise ValueError(f"refused_NA: expected (N, {alphas.numel()}), got shape {tuple(refused.shape)}")
        if harmful.shape != (refused.shape[0],):
            raise ValueError(f"harmful_N: expected ({refused.shape[0]},), got {tuple(harmful.shape)}")
        if not bool(harmful.any()) or bool(harmful.all()):
            raise ValueError("harmful_N: the table needs harmful and benign / over-refusal rows")
        groups = tuple(self.groups) or tuple("harmful" if h else "benign" for h in harmful.tolist())
        if len(groups) != refused.shape[0]:
            raise ValueError(f"groups: expected {refused.shape[0]} set names, got {len(groups)}")
        object.__setattr__(self, "alphas_A", alphas)
        object.__setattr__(self, "refused_NA", refused)
        object.__setattr__(self, "harmful_N", harmful)
        object.__setattr__(self, "groups", groups)

    @property
    def n_harmful(self) -> int:
        """Harmful rows."""
        return int(self.harmful_N.sum())

    @property
    def n_benign(self) -> int:
        """Benign / over-refusal rows."""
        return int((~self.harmful_N).sum())

    def alpha_index(self, alpha: float, key: str = "alpha") -> int:
        """Column of ``alpha`` in the grid.

        Raises:
            ValueError: Naming ``key`` if ``alpha`` is not a grid value.
        """
        hits = torch.isclose(
            self.alphas_A, torch.tensor(float(alpha), dtype=torch.float64), rtol=1e-9, atol=1e-12
        )
        if not bool(hits.any()):
            raise ValueError(f"{key}: {alpha} is not in the table's alpha grid {self.alphas_A.tolist()}")
        return int(hits.nonzero()[0])

    def group_sizes(self) -> dict[str, int]:
        """Rows per set name."""
        sizes: dict[str, int] = {}
        for name in self.groups:
            sizes[name] = sizes.get(name, 0) + 1
        return sizes


def build_outcome_table(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    resolved: ResolvedRefusalTokens,
    *,
    layer: int,
    vectors_ND: Tensor,
    alphas: Sequence[float],
    harmful_N: Tensor | Sequence[bool],
    groups: Sequence[str] | None = None,
    positions: Positions = "all",
    batch_size: int = 32,
    max_length: int = 1024,
    chat_template: str | None = None,
    system_prompt: str | None = None,
    respond_bias: float | None = None,
    progress: Callable[[int, int], object] | None = None,
    judge: str = "emitted",
) -> OutcomeTable:
    """Measure ``refused[i, a]`` on VALIDATION prompts: one first-token pass per alpha of the grid.

    Args:
        model: The refusal-token model.
        tokenizer: Its tokenizer.
        texts: Validation user messages (harmful and benign / over-refusal sets together).
        resolved: The refusal tokens bound to ``tokenizer``.
        layer: Steering layer.
        vectors_ND: Each prompt's vector (:func:`~sae_refusal.steer.gates.row_vectors` of the gate's
            categories), or one ``(D,)`` vector for all.
        alphas: Signed alpha grid; sorted here, 0 added if missing.
        harmful_N: True for harmful prompts.
        groups: Set name of each prompt (e.g. ``"harmful"``, ``"benign"``, ``"xstest"``).
        positions: Where the steering acts (as in the policy's application).
        batch_size: Prompts per forward.
        max_length: Most tokens per prompt.
        chat_template: Template overriding the tokenizer's.
        system_prompt: Optional system message.
        respond_bias: Respond-logit bias; ``None`` takes the model's calibrated one.
        progress: Called with ``(alphas done, alphas)`` after each pass.
        judge: First-token reading (:class:`~sae_refusal.steer.scoring.FirstTokenDecisions`): ``emitted``
            (what ``generate`` emits) or ``restricted`` (argmax over the refusal tokens).
    """
    grid = sorted({float(a) for a in alphas} | {0.0})
    if not all(math.isfinite(a) for a in grid):
        raise ValueError(f"alphas: must be finite, got {list(alphas)}")
    refused = torch.zeros(len(texts), len(grid), dtype=torch.bool)
    for column, alpha in enumerate(grid):
        decisions = first_token_decisions(
            model,
            tokenizer,
            texts,
            resolved,
            edits=None if alpha == 0.0 else residual_rows(layer, vectors_ND, alpha, positions=positions),
            batch_size=batch_size,
            max_length=max_length,
            chat_template=chat_template,
            system_prompt=system_prompt,
            respond_bias=respond_bias,
            judge=judge,
        )
        refused[:, column] = decisions.refused_N
        if progress is not None:
            progress(column + 1, len(grid))
    return OutcomeTable(
        alphas_A=torch.tensor(grid, dtype=torch.float64),
        refused_NA=refused,
        harmful_N=torch.as_tensor(harmful_N, dtype=torch.bool),
        groups=tuple(groups) if groups is not None else (),
        meta={
            "layer": layer,
            "positions": positions,
            "max_length": max_length,
            "system_prompt": system_prompt,
            "judge": judge,
        },
    )


@dataclass(frozen=True)
class Rates:
    """Refusal counts and shares of one policy on the table's rows.

    Attributes:
        over_refusal: Share of benign / over-refusal rows refused.
        harmful_refusal: Share of harmful rows refused.
        benign_refused: Benign rows refused.
        harmful_refused: Harmful rows refused.
        n_benign: Benign rows.
        n_harmful: Harmful rows.
    """

    over_refusal: float
    harmful_refusal: float
    benign_refused: int
    harmful_refused: int
    n_benign: int
    n_harmful: int

    @classmethod
    def of(cls, benign_refused: int, harmful_refused: int, n_benign: int, n_harmful: int) -> Rates:
        """Shares from counts."""
        return cls(
            benign_refused / n_benign,
            harmful_refused / n_harmful,
            benign_refused,
            harmful_refused,
            n_benign,
            n_harmful,
        )


@dataclass(frozen=True)
class PolicyPoint:
    """A policy and its rates on the table (``n_steered``: rows with a non-zero alpha)."""

    policy: GatePolicy
    rates: Rates
    n_steered: int

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"policy": self.policy.to_dict(), "rates": asdict(self.rates), "n_steered": self.n_steered}


@dataclass(frozen=True)
class CurvePoint:
    """Unconditional steering: every row gets the same signed ``alpha``."""

    alpha: float
    rates: Rates

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"alpha": self.alpha, "rates": asdict(self.rates)}


def _check_scores(table: OutcomeTable, score_N: Tensor) -> Tensor:
    score = torch.as_tensor(score_N).detach().cpu().float()  # compared in float32, as GatePolicy does
    if score.shape != (table.refused_NA.shape[0],) or not bool(torch.isfinite(score).all()):
        raise ValueError(
            f"score_N: expected {table.refused_NA.shape[0]} finite scores, got shape {tuple(score.shape)}"
        )
    return score


def table_decisions(table: OutcomeTable) -> Tensor:
    """The model's own unsteered decision per row (the table's alpha-0 column)."""
    return table.refused_NA[:, table.alpha_index(0.0)]


def effective_table(table: OutcomeTable, act_on: ActOn) -> OutcomeTable:
    """The table as a policy acting on ``act_on`` rows sees it.

    ``"disagreement"``: a refused row under a positive alpha and an answered row under a negative alpha are
    not steered (see :class:`GatePolicy`), so those cells read the unsteered column.
    """
    if act_on == "all":
        return table
    if act_on != "disagreement":
        raise ValueError(f"act_on: expected 'all' or 'disagreement', got {act_on!r}")
    r0_N = table_decisions(table)
    sign_A = torch.sign(table.alphas_A)
    skipped_NA = (r0_N[:, None] & (sign_A > 0)[None]) | (~r0_N[:, None] & (sign_A < 0)[None])
    refused = torch.where(skipped_NA, r0_N[:, None].expand_as(table.refused_NA), table.refused_NA)
    return OutcomeTable(table.alphas_A, refused, table.harmful_N, table.groups, dict(table.meta))


HarmGroups = Sequence[str | None] | Mapping[str, Tensor]


def _harm_groups(table: OutcomeTable, harm_groups: HarmGroups | None) -> dict[str, Tensor]:
    """Name -> row mask of each harm group, checked against the table.

    ``harm_groups`` is one group name (or ``None``) per row, or a mapping name -> bool row mask (a row may
    then sit in several groups, e.g. its set and a jailbreak-framing slice).
    """
    if harm_groups is None:
        return {}
    n_rows = table.refused_NA.shape[0]
    if isinstance(harm_groups, Mapping):
        masks = {str(k): torch.as_tensor(v).bool().cpu() for k, v in harm_groups.items()}
        for name, mask in masks.items():
            if mask.shape != (n_rows,):
                raise ValueError(
                    f"harm_groups[{name!r}]: expected a ({n_rows},) row mask, got {tuple(mask.shape)}"
                )
    else:
        if isinstance(harm_groups, str) or len(harm_groups) != n_rows:
            raise ValueError(f"harm_groups: expected one group name (or None) per table row ({n_rows})")
        masks = {
            name: torch.tensor([g == name for g in harm_groups])
            for name in dict.fromkeys(harm_groups)
            if name is not None
        }
    for name, mask in masks.items():
        if bool((mask & ~table.harmful_N).any()):
            raise ValueError(f"harm_groups: group {name!r} holds rows that are not harmful")
    return {name: mask for name, mask in masks.items() if bool(mask.any())}


def harm_group_rates(
    table: OutcomeTable, column_N: Tensor, harm_groups: HarmGroups
) -> dict[str, dict[str, float | int]]:
    """Per harm group: unsteered and policy refusal shares (``column_N``: each row's table column)."""
    rows = torch.arange(column_N.shape[0])
    refused_N = table.refused_NA[rows, column_N]
    r0_N = table_decisions(table)
    return {
        name: {
            "n": int(mask.sum()),
            "unsteered": float(r0_N[mask].float().mean()),
            "policy": float(refused_N[mask].float().mean()),
        }
        for name, mask in _harm_groups(table, harm_groups).items()
    }


def policy_columns(table: OutcomeTable, score_N: Tensor, policy: GatePolicy) -> Tensor:
    """The table column (alpha) ``policy`` gives each row scored ``score_N``.

    With ``policy.act_on="disagreement"`` the model's decisions are the table's alpha-0 column.

    Raises:
        ValueError: Naming ``alpha_pos`` / ``alpha_neg`` / ``alpha_mid`` if one is not in the grid.
    """
    score = _check_scores(table, score_N)
    columns = {
        "pos": table.alpha_index(policy.alpha_pos, "alpha_pos"),
        "neg": table.alpha_index(-policy.alpha_neg, "alpha_neg"),
        "mid": table.alpha_index(policy.alpha_mid, "alpha_mid"),
    }
    column_N = torch.full(score.shape, columns["mid"], dtype=torch.long)
    column_N[score >= policy.t_high] = columns["pos"]
    column_N[score < policy.t_low] = columns["neg"]
    if policy.act_on == "disagreement":
        alpha_N = policy.alphas(score, table_decisions(table))
        column_N[alpha_N == 0] = table.alpha_index(0.0)
    return column_N


def evaluate_policy(table: OutcomeTable, score_N: Tensor, policy: GatePolicy) -> PolicyPoint:
    """Rates of ``policy`` on the table rows scored ``score_N`` (its alphas must be grid values).

    Raises:
        ValueError: Naming ``alpha_pos`` / ``alpha_neg`` / ``alpha_mid`` if one is not in the grid.
    """
    column_N = policy_columns(table, score_N, policy)
    refused0 = table_decisions(table) if policy.act_on == "disagreement" else None
    alpha_N = policy.alphas(_check_scores(table, score_N), refused0)
    refused_N = table.refused_NA[torch.arange(column_N.shape[0]), column_N]
    harmful = table.harmful_N
    rates = Rates.of(
        int(refused_N[~harmful].sum()), int(refused_N[harmful].sum()), table.n_benign, table.n_harmful
    )
    return PolicyPoint(policy, rates, int((alpha_N != 0).sum()))


def unconditional_curve(table: OutcomeTable) -> list[CurvePoint]:
    """Rates when every row gets the same alpha (each row along its own vector), one point per grid value."""
    harmful = table.harmful_N
    benign_A = table.refused_NA[~harmful].sum(0)
    harmful_A = table.refused_NA[harmful].sum(0)
    return [
        CurvePoint(float(alpha), Rates.of(int(b), int(h), table.n_benign, table.n_harmful))
        for alpha, b, h in zip(table.alphas_A.tolist(), benign_A.tolist(), harmful_A.tolist(), strict=True)
    ]


def threshold_candidates(score_N: Tensor, max_thresholds: int = 64) -> list[float]:
    """Thresholds that split the scores in all distinct ways: 0, midpoints between distinct scores, 1.

    Midpoints are float32 values strictly above the lower score and at most the upper one, so each splits
    its gap exactly as intended under the float32 comparison of :meth:`GatePolicy.alphas`. With more than
    ``max_thresholds`` of them, an evenly spaced subset (0 and 1 kept).
    """
    if max_thresholds < 2:
        raise ValueError(f"max_thresholds: must be >= 2, got {max_thresholds}")
    values = torch.unique(torch.as_tensor(score_N).detach().cpu().float().clamp(0.0, 1.0))
    lower, upper = values[:-1], values[1:]
    middles = ((lower.double() + upper.double()) / 2).float()
    middles = torch.where(middles > lower, middles, torch.nextafter(lower, upper))
    candidates = sorted({0.0, *middles.tolist(), 1.0})
    if len(candidates) > max_thresholds:
        picks = torch.linspace(0, len(candidates) - 1, max_thresholds).round().long().unique().tolist()
        candidates = [candidates[i] for i in picks]
    return candidates


@dataclass(frozen=True)
class TuningResult:
    """The chosen policy, the Pareto front, the unconditional curve and the search settings.

    Attributes:
        policy: The chosen policy.
        chosen: Its rates on the validation table.
        front: Pareto-optimal policies (lower over-refusal, higher harmful refusal), by over-refusal.
        unconditional: The unconditional-steering curve from the same table.
        floor: Harmful-refusal floor.
        thresholds: Threshold candidates searched.
        alphas: The table's alpha grid.
        tune_alpha_mid: Whether ``alpha_mid`` was searched (else 0).
        n_policies: Policies searched.
        table_sizes: Rows per set name in the table.
        table_meta: The table's build facts.
        act_on: Which rows the policies steer (``all`` / ``disagreement``).
        tolerance: Do-no-harm tolerance per harm group (``None``: no groups were held to it).
        harm_groups: Rows per harm group (empty: none).
    """

    policy: GatePolicy
    chosen: PolicyPoint
    front: list[PolicyPoint]
    unconditional: list[CurvePoint]
    floor: float
    thresholds: list[float]
    alphas: list[float]
    tune_alpha_mid: bool
    n_policies: int
    table_sizes: dict[str, int]
    table_meta: dict[str, Any]
    act_on: str = "all"
    tolerance: float | None = None
    harm_groups: dict[str, int] = field(default_factory=dict)

    def provenance(
        self, *, sets: Mapping[str, Any] | None = None, model_fingerprint: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """JSON facts for :class:`~sae_refusal.steer.gates.GatedSteering` ``provenance``.

        Args:
            sets: What the validation sets were (names, sources, split manifest hash...); sizes are added.
            model_fingerprint: The steered model's fingerprint
                (:func:`~sae_refusal.llm.loading.model_fingerprint`), if known.
        """
        objective = "min over_refusal s.t. harmful_refusal >= floor (validation)"
        if self.harm_groups:
            objective += (
                f" and, per harm group, refusal >= its unsteered rate - {self.tolerance} (do no harm)"
            )
        return {
            "objective": objective,
            "tie_break": TIE_BREAK,
            "floor": self.floor,
            "act_on": self.act_on,
            "do_no_harm": {"tolerance": self.tolerance, "groups": dict(self.harm_groups)},
            "value": asdict(self.chosen.rates),
            "n_steered": self.chosen.n_steered,
            "grid": {
                "thresholds": self.thresholds,
                "alphas": self.alphas,
                "tune_alpha_mid": self.tune_alpha_mid,
                "n_policies": self.n_policies,
            },
            "sets": {"sizes": self.table_sizes, **(dict(sets) if sets else {})},
            "table": self.table_meta,
            "model_fingerprint": None if model_fingerprint is None else dict(model_fingerprint),
        }


def tune_policy(
    table: OutcomeTable,
    score_N: Tensor,
    *,
    floor: float,
    vector: VectorMode = "category",
    thresholds: Sequence[float] | None = None,
    max_thresholds: int = 64,
    tune_alpha_mid: bool = False,
    act_on: ActOn = "all",
    harm_groups: HarmGroups | None = None,
    tolerance: float = 0.02,
) -> TuningResult:
    """Grid-search thresholds and alphas on a VALIDATION outcome table (see the module notes).

    ``alpha_pos`` ranges over the grid's alphas >= 0, ``alpha_neg`` over the magnitudes of those <= 0,
    ``alpha_mid`` over the whole grid (``tune_alpha_mid``) or just 0; thresholds over ``thresholds`` or
    :func:`threshold_candidates` of the scores, all pairs ``t_low <= t_high``.

    Args:
        table: Outcomes on validation prompts, built with the vectors ``vector`` implies.
        score_N: The gate's scores of the table's rows.
        floor: Least share of harmful rows refused, in ``[0, 1]``.
        vector: The vector mode the table was built with (recorded in the policy).
        thresholds: Threshold grid in ``[0, 1]``; ``None``: from the scores.
        max_thresholds: Cap on the candidates taken from the scores.
        tune_alpha_mid: Also search the middle band's alpha.
        act_on: ``"all"`` rows or only those where the gate disagrees with the model's unsteered decision
            (the table's alpha-0 column; see :class:`GatePolicy`).
        harm_groups: Do no harm: the harmful set of each row (``None`` for rows not held to it, e.g.
            benign ones), or a mapping name -> row mask (overlapping groups allowed). A policy is feasible
            only if no group loses more than ``tolerance`` of its unsteered refusal rate on the table
            (non-inferiority per set, on top of the pooled floor).
        tolerance: Largest loss of refusal share per harm group, in ``[0, 1]``.

    Raises:
        ValueError: On a ``floor`` outside ``[0, 1]`` or one that no policy reaches (naming ``floor``), bad
            thresholds, ``harm_groups`` or ``tolerance``, or scores that do not fit the table.
    """
    if isinstance(floor, bool) or not 0.0 <= float(floor) <= 1.0:
        raise ValueError(f"floor: expected a share in [0, 1], got {floor!r}")
    if isinstance(tolerance, bool) or not 0.0 <= float(tolerance) <= 1.0:
        raise ValueError(f"tolerance: expected a share in [0, 1], got {tolerance!r}")
    if act_on not in ("all", "disagreement"):
        raise ValueError(f"act_on: expected 'all' or 'disagreement', got {act_on!r}")
    score = _check_scores(table, score_N)
    table = effective_table(table, act_on)
    groups_by_name = _harm_groups(table, harm_groups)
    group_masks_GN = list(groups_by_name.values())
    if thresholds is None:
        grid_t = threshold_candidates(score, max_thresholds)
    else:
        grid_t = sorted({float(torch.tensor(float(t), dtype=torch.float32)) for t in thresholds})
        if not grid_t or grid_t[0] < 0.0 or grid_t[-1] > 1.0:
            raise ValueError(f"thresholds: expected values in [0, 1], got {list(thresholds)}")
    alphas = table.alphas_A
    pos_P = (alphas >= 0).nonzero().flatten()  # columns for +alpha_pos
    neg_Q = (alphas <= 0).nonzero().flatten().flip(0)  # columns for -alpha_neg, magnitude ascending
    mid_M = torch.arange(alphas.numel()) if tune_alpha_mid else (alphas == 0).nonzero().flatten()
    n_rows = score.numel()
    order = torch.argsort(score, stable=True)
    sorted_score = score[order]
    refused = table.refused_NA[order].long()
    harmful = table.harmful_N[order]
    zeros = torch.zeros(1, alphas.numel(), dtype=torch.long)
    cum_h_KA = torch.cat([zeros, (refused * harmful[:, None]).cumsum(0)])  # (N + 1, A)
    cum_b_KA = torch.cat([zeros, (refused * ~harmful[:, None]).cumsum(0)])
    zero_column = table.alpha_index(0.0)
    # rows the model refuses unsteered, as a prefix count (a disagreement policy steers only some rows)
    cum_r0_K = torch.cat([torch.zeros(1, dtype=torch.long), refused[:, zero_column].cumsum(0)])
    cum_g_GKA = (
        torch.stack(
            [torch.cat([zeros, (refused * mask[order][:, None]).cumsum(0)]) for mask in group_masks_GN]
        )
        if group_masks_GN
        else torch.zeros(0, n_rows + 1, alphas.numel(), dtype=torch.long)
    )
    need_g_G = torch.tensor(
        [
            math.ceil(
                (float(table.refused_NA[mask, zero_column].float().mean()) - float(tolerance))
                * int(mask.sum())
                - 1e-9
            )
            for mask in group_masks_GN
        ],
        dtype=torch.long,
    )
    k_T = torch.searchsorted(sorted_score, torch.tensor(grid_t, dtype=torch.float32), side="left")
    low_idx, high_idx = torch.triu_indices(len(grid_t), len(grid_t))  # pairs t_low <= t_high, t_low order
    kl_S, kh_S = k_T[low_idx], k_T[high_idx]

    # alpha triples (neg, mid, pos) in grid order; strength and a rank for the tie-break
    tri_neg, tri_mid, tri_pos = torch.meshgrid(neg_Q, mid_M, pos_P, indexing="ij")
    tri_neg, tri_mid, tri_pos = tri_neg.flatten(), tri_mid.flatten(), tri_pos.flatten()
    strength_R = alphas[tri_pos] - alphas[tri_neg] + alphas[tri_mid].abs()
    strength_rank_R = torch.empty_like(tri_pos)
    strength_rank_R[torch.argsort(strength_R, stable=True)] = torch.arange(strength_R.numel())
    n_triples = strength_R.numel()
    n_b, n_h = table.n_benign, table.n_harmful
    need_h = math.ceil(float(floor) * n_h - 1e-9)

    # a single integer key orders policies of one over-refusal count: more harmful refused, fewer steered,
    # weaker, earlier in grid order (the key's last part is the negated enumeration index)
    n_policies = kl_S.numel() * n_triples
    span_steer, span_rank, span_index = n_rows + 1, n_triples, n_policies
    if (n_h + 1) * span_steer * span_rank * span_index >= 1 << 62:
        raise ValueError(
            f"thresholds: {len(grid_t)} thresholds x {n_triples} alpha triples on {n_rows} rows overflow the "
            "search key; use fewer thresholds (max_thresholds) or alphas"
        )
    best_key_B = torch.full((n_b + 1,), -1, dtype=torch.long)  # per over-refusal count: best key
    chosen_key, chosen_over = -1, n_b + 1
    pairs_per_chunk = max(1, _CHUNK // n_triples)
    for start in range(0, kl_S.numel(), pairs_per_chunk):
        kl = kl_S[start : start + pairs_per_chunk, None]
        kh = kh_S[start : start + pairs_per_chunk, None]

        def refusals(cum_KA: Tensor, kl: Tensor = kl, kh: Tensor = kh) -> Tensor:
            return (
                cum_KA[kl, tri_neg]
                + cum_KA[kh, tri_mid]
                - cum_KA[kl, tri_mid]
                + cum_KA[n_rows, tri_pos]
                - cum_KA[kh, tri_pos]
            )

        harm_CR, over_CR = refusals(cum_h_KA), refusals(cum_b_KA)
        if act_on == "all":
            steered_CR = (
                kl * (alphas[tri_neg] != 0)
                + (kh - kl) * (alphas[tri_mid] != 0)
                + (n_rows - kh) * (alphas[tri_pos] != 0)
            )
        else:  # only refused rows move down, only answered rows move up
            r_low, r_mid = cum_r0_K[kl], cum_r0_K[kh] - cum_r0_K[kl]
            a_high = (n_rows - kh) - (cum_r0_K[n_rows] - cum_r0_K[kh])
            mid = alphas[tri_mid]
            steered_CR = (
                r_low * (alphas[tri_neg] != 0)
                + r_mid * (mid < 0)
                + ((kh - kl) - r_mid) * (mid > 0)
                + a_high * (alphas[tri_pos] != 0)
            )
        index_CR = (start + torch.arange(kl.shape[0]))[:, None] * n_triples + torch.arange(n_triples)
        key_CR = (
            (harm_CR * span_steer + (n_rows - steered_CR)) * span_rank + (n_triples - 1 - strength_rank_R)
        ) * span_index + (n_policies - 1 - index_CR)
        no_harm_CR = torch.ones_like(harm_CR, dtype=torch.bool)
        for g in range(need_g_G.numel()):
            no_harm_CR &= refusals(cum_g_GKA[g]) >= need_g_G[g]
        best_key_B.scatter_reduce_(
            0, over_CR.flatten(), torch.where(no_harm_CR, key_CR, -1).flatten(), reduce="amax"
        )
        feasible = (harm_CR >= need_h) & no_harm_CR
        if bool(feasible.any()):
            over_min = int(over_CR[feasible].min())
            if over_min <= chosen_over:
                key = int(key_CR[feasible & (over_CR == over_min)].max())
                if over_min < chosen_over or key > chosen_key:
                    chosen_over, chosen_key = over_min, key
    if chosen_key < 0:
        best_harm = int(best_key_B.max() // (span_index * span_rank * span_steer))
        held = " without losing more than the tolerance on any harm group" if need_g_G.numel() else ""
        raise ValueError(
            f"floor: no policy in the grid refuses >= {floor} of the {n_h} harmful validation prompts{held}; "
            f"the best refuses {best_harm / n_h:.4f}"
        )

    def decode(key: int) -> GatePolicy:
        index = n_policies - 1 - key % span_index
        pair, triple = divmod(index, n_triples)
        return GatePolicy(
            t_low=grid_t[int(low_idx[pair])],
            t_high=grid_t[int(high_idx[pair])],
            alpha_pos=float(alphas[tri_pos[triple]]),
            alpha_neg=float(-alphas[tri_neg[triple]]) + 0.0,
            alpha_mid=float(alphas[tri_mid[triple]]),
            vector=vector,
            act_on=act_on,
        )

    chosen = evaluate_policy(table, score, decode(chosen_key))
    front: list[PolicyPoint] = []
    best_harm = -1
    for over in range(n_b + 1):
        key = int(best_key_B[over])
        if key < 0:
            continue
        harm = key // (span_index * span_rank * span_steer)
        if harm > best_harm:
            front.append(evaluate_policy(table, score, decode(key)))
            best_harm = harm
    return TuningResult(
        policy=chosen.policy,
        chosen=chosen,
        front=front,
        unconditional=unconditional_curve(table),
        floor=float(floor),
        thresholds=grid_t,
        alphas=alphas.tolist(),
        tune_alpha_mid=tune_alpha_mid,
        n_policies=n_policies,
        table_sizes=table.group_sizes(),
        table_meta=dict(table.meta),
        act_on=act_on,
        tolerance=float(tolerance) if group_masks_GN else None,
        harm_groups={name: int(mask.sum()) for name, mask in groups_by_name.items()},
    )
