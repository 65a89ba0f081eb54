"""Which selected SAE features are stable across training seeds.

SAEs trained from different seeds learn their latents in an arbitrary order, so latent ``f`` of one seed has
no a-priori partner in another. We pair latents by their decoder directions: the cosine between decoder rows
``W_dec_FD[f]`` of two SAEs, and an optimal one-to-one assignment (Hungarian algorithm,
:func:`scipy.optimize.linear_sum_assignment`) that maximises the total cosine (:func:`match_latents`).

Each seed selects a few latents per class (0 = benign, 1..C = refusal categories), e.g. the top-K features of
a classifier head or the features kept in a steering vector. :func:`reference_consensus` takes one seed as the
reference and asks, for each latent the reference selected for class ``c``, in how many seeds its matched
partner is (a) a close match (cosine ``>= min_cosine``) and (b) selected for the same class ``c`` there. The
*share* of seeds (the reference counts as one) where that holds decides whether the feature is kept.

:func:`consensus_features` is the symmetric form used by the analysis: every seed is the reference in turn and
the per-class stability and matched cosine are averaged over the references, so the result does not depend on
which seed comes first (seeds are sorted by name; means use ``math.fsum``, which is exactly rounded).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

__all__ = [
    "ConsensusReport",
    "LatentMatch",
    "ReferenceConsensus",
    "consensus_features",
    "decoder_cosine",
    "match_latents",
    "mean_and_spread",
    "reference_consensus",
]

_SHARE_EPS = 1e-9

#: Seed name -> class -> that seed's selected latent indices (a sequence, tensor or array of integers).
Selection = Mapping[str, Mapping[int, Sequence[int] | torch.Tensor | np.ndarray]]


@dataclass(frozen=True)
class LatentMatch:
    """A one-to-one pairing of some latents of a reference SAE with latents of another SAE.

    Attributes:
        rows: ``(R,)`` long, the reference SAE's latents that were matched (in the order asked for).
        cols: ``(R,)`` long, their partners in the other SAE (pairwise distinct).
        cosine: ``(R,)`` float32, decoder cosine of each pair.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    cosine: torch.Tensor


def _check_decoder(W_FD: torch.Tensor, what: str) -> None:
    if not isinstance(W_FD, torch.Tensor) or W_FD.ndim != 2:
        shape = tuple(W_FD.shape) if isinstance(W_FD, torch.Tensor) else type(W_FD).__name__
        raise ValueError(f"decoder of {what} must be a 2-D (F, D) tensor, got {shape}")


def _as_rows(rows: torch.Tensor | Sequence[int] | None, n_latents: int, what: str) -> torch.Tensor:
    """Validate latent indices into a CPU long tensor of shape ``(R,)``."""
    if rows is None:
        return torch.arange(n_latents, dtype=torch.long)
    if isinstance(rows, torch.Tensor):
        if rows.ndim != 1:
            raise ValueError(f"rows for {what} must be 1-D, got shape {tuple(rows.shape)}")
        if rows.is_floating_point() or rows.is_complex() or rows.dtype == torch.bool:
            raise ValueError(f"rows for {what} must be integer indices, got dtype {rows.dtype}")
        rows_R = rows.detach().to("cpu", torch.long)
    else:
        try:
            rows_R = torch.tensor([operator.index(r) for r in rows], dtype=torch.long)
        except TypeError as err:
            raise ValueError(f"rows for {what} must be integer indices: {err}") from err
    if rows_R.numel():
        bad = rows_R[(rows_R < 0) | (rows_R >= n_latents)]
        if bad.numel():
            raise ValueError(f"latent index {int(bad[0])} out of range for {what} with {n_latents} latents")
        if torch.unique(rows_R).numel() != rows_R.numel():
            raise ValueError(f"rows for {what} contain duplicate latent indices")
    return rows_R


def decoder_cosine(
    W_ref_FD: torch.Tensor,
    W_other_GD: torch.Tensor,
    rows: torch.Tensor | None = None,
    chunk: int = 4096,
) -> torch.Tensor:
    """Cosine similarity between decoder rows of two SAEs.

    Rows are unit-normalised in float32 (a zero row has cosine 0 with everything) and the product is computed
    ``chunk`` reference rows at a time, so only ``chunk x D`` of the reference is upcast at once.

    Args:
        W_ref_FD: ``(F, D)`` reference decoder.
        W_other_GD: ``(G, D)`` other decoder (same ``D``).
        rows: ``(R,)`` integer indices of the reference latents to compare; ``None`` = all ``F``.
        chunk: Reference rows per block.

    Returns:
        ``(R, G)`` float32 cosines on ``W_other_GD``'s device; entry ``[i, g]`` compares ``W_ref_FD[rows[i]]``
        with ``W_other_GD[g]``.

    Raises:
        ValueError: If a decoder is not 2-D, the widths differ, ``chunk < 1`` or an index is out of range.
    """
    _check_decoder(W_ref_FD, "the reference SAE")
    _check_decoder(W_other_GD, "the other SAE")
    if W_ref_FD.shape[1] != W_other_GD.shape[1]:
        raise ValueError(
            f"decoder widths differ: reference has D={W_ref_FD.shape[1]}, other has D={W_other_GD.shape[1]}"
        )
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    rows_R = _as_rows(rows, W_ref_FD.shape[0], "the reference SAE")
    device = W_other_GD.device
    with torch.no_grad():
        other_GD = F.normalize(W_other_GD.detach().to(torch.float32), dim=1)
        out_RG = torch.empty(rows_R.numel(), other_GD.shape[0], dtype=torch.float32, device=device)
        for start in range(0, rows_R.numel(), chunk):
            idx = rows_R[start : start + chunk].to(W_ref_FD.device)
            ref_cD = F.normalize(W_ref_FD.detach()[idx].to(device, torch.float32), dim=1)
            out_RG[start : start + chunk] = ref_cD @ other_GD.T
    return out_RG


def match_latents(
    W_ref_FD: torch.Tensor,
    W_other_GD: torch.Tensor,
    rows: torch.Tensor | Sequence[int] | None = None,
) -> LatentMatch:
    """Optimal one-to-one matching of reference latents to another SAE's latents by decoder cosine.

    Solves the (possibly rectangular) assignment problem maximising the summed cosine: each of the ``R``
    reference rows gets a distinct partner among the ``G`` latents of the other SAE. The full ``(R, G)``
    cosine matrix is held in memory, so pass the latents of interest as ``rows`` for very wide SAEs.

    Args:
        W_ref_FD: ``(F, D)`` reference decoder.
        W_other_GD: ``(G, D)`` other decoder.
        rows: Reference latents to match (distinct); ``None`` = all ``F`` (then ``F <= G`` is required).

    Returns:
        A :class:`LatentMatch` (on the CPU) ordered like ``rows``.

    Raises:
        ValueError: If a decoder is not 2-D, the widths differ, an index is out of range or repeated,
            ``R > G``, or a decoder holds non-finite values.
    """
    _check_decoder(W_ref_FD, "the reference SAE")
    _check_decoder(W_other_GD, "the other SAE")
    rows_R = _as_rows(rows, W_ref_FD.shape[0], "the reference SAE")
    n_other = W_other_GD.shape[0]
    if rows_R.numel() > n_other:
        raise ValueError(
            f"cannot match {rows_R.numel()} reference latents one-to-one to only {n_other} latents"
        )
    cos_RG = decoder_cosine(W_ref_FD, W_other_GD, rows_R).cpu()
    if rows_R.numel() == 0:
        empty = torch.empty(0, dtype=torch.long)
        return LatentMatch(rows=rows_R, cols=empty, cosine=torch.empty(0, dtype=torch.float32))
    if not bool(torch.isfinite(cos_RG).all()):
        raise ValueError("decoder cosines are not finite (NaN or inf in a decoder)")
    row_idx, col_idx = linear_sum_assignment(-cos_RG.numpy().astype(np.float64))
    # Rectangular with R <= G: every row is assigned and row_idx == arange(R), in order.
    cols_R = torch.as_tensor(col_idx, dtype=torch.long)
    return LatentMatch(rows=rows_R[torch.as_tensor(row_idx)], cols=cols_R, cosine=cos_RG[row_idx, col_idx])


@dataclass(frozen=True)
class ReferenceConsensus:
    """Which of one reference seed's selected features recur in the other seeds.

    Attributes:
        reference: Name of the reference seed.
        seeds: All seed names (reference included), sorted.
        kept: Class -> sorted reference latents identified in at least ``min_share`` of the seeds.
        share: Class -> {reference latent selected for the class: share of seeds (reference counts) where it
            is identified}.
        stability: Class -> ``len(kept[c]) / len(selected[reference][c])``; NaN when the reference selected
            nothing for the class.
        mean_match_cosine: Other seed (sorted) -> mean decoder cosine of the matched reference latents (the
            union of the reference's selections); NaN when there was nothing to match.
        min_share: Share threshold used.
        min_cosine: Cosine threshold used.
    """

    reference: str
    seeds: list[str]
    kept: dict[int, list[int]]
    share: dict[int, dict[int, float]]
    stability: dict[int, float]
    mean_match_cosine: dict[str, float]
    min_share: float
    min_cosine: float

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """Strict-JSON-serialisable form (NaN becomes ``None``).

        Args:
            class_names: Names indexed by class id; when given, class keys become ``class_names[c]``,
                otherwise ``str(c)``. Latent keys in ``share`` become ``str(f)``.

        Returns:
            A dict of plain ``str``/``int``/``float``/``None``/``list``/``dict`` values.

        Raises:
            ValueError: If a class id has no entry in ``class_names``.
        """
        key = _class_key(class_names)
        return {
            "reference": self.reference,
            "seeds": list(self.seeds),
            "min_share": self.min_share,
            "min_cosine": self.min_cosine,
            "kept": {key(c): [int(f) for f in fs] for c, fs in self.kept.items()},
            "share": {
                key(c): {str(f): _json_float(v) for f, v in sh.items()} for c, sh in self.share.items()
            },
            "stability": {key(c): _json_float(v) for c, v in self.stability.items()},
            "mean_match_cosine": {s: _json_float(v) for s, v in self.mean_match_cosine.items()},
        }


@dataclass(frozen=True)
class ConsensusReport:
    """Cross-seed consensus with every seed as the reference in turn (independent of the seeds' order).

    Attributes:
        seeds: All seed names, sorted.
        stability: Class -> mean over the references of their stability (references that selected nothing
            for the class are left out; NaN when none selected anything).
        mean_match_cosine: Mean over every ordered (reference, other) pair of the pair's mean matched decoder
            cosine (NaN when no pair had anything to match).
        by_reference: Reference seed (sorted) -> its :class:`ReferenceConsensus`.
        min_share: Share threshold used.
        min_cosine: Cosine threshold used.
    """

    seeds: list[str]
    stability: dict[int, float]
    mean_match_cosine: float
    by_reference: dict[str, ReferenceConsensus]
    min_share: float
    min_cosine: float

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """Strict-JSON-serialisable form (NaN becomes ``None``); per reference as
        :meth:`ReferenceConsensus.to_dict` without the repeated thresholds and seed list.

        Args:
            class_names: Names indexed by class id (see :meth:`ReferenceConsensus.to_dict`).

        Raises:
            ValueError: If a class id has no entry in ``class_names``.
        """
        key = _class_key(class_names)
        repeated = ("seeds", "min_share", "min_cosine")
        return {
            "seeds": list(self.seeds),
            "min_share": self.min_share,
            "min_cosine": self.min_cosine,
            "stability": {key(c): _json_float(v) for c, v in self.stability.items()},
            "mean_match_cosine": _json_float(self.mean_match_cosine),
            "by_reference": {
                ref: {k: v for k, v in per.to_dict(class_names).items() if k not in repeated}
                for ref, per in self.by_reference.items()
            },
        }


def _class_key(class_names: Sequence[str] | None) -> Callable[[int], str]:
    def key(c: int) -> str:
        if class_names is None:
            return str(c)
        if not 0 <= c < len(class_names):
            raise ValueError(f"class {c} has no name in class_names (length {len(class_names)})")
        return str(class_names[c])

    return key


def _mean(values: Sequence[float]) -> float:
    """Mean of the non-NaN values (``math.fsum``: exactly rounded, so independent of their order)."""
    xs = [v for v in values if not math.isnan(v)]
    return math.fsum(xs) / len(xs) if xs else math.nan


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _check_indices(selected: Selection, n_latents: dict[str, int]) -> dict[str, dict[int, list[int]]]:
    """Validate selections and return them as seed -> class -> sorted distinct latent list."""
    out: dict[str, dict[int, list[int]]] = {}
    for seed in sorted(selected):
        out[seed] = {}
        for c, idx in selected[seed].items():
            try:
                cls = operator.index(c)
            except TypeError as err:
                raise ValueError(f"seed {seed!r}: class key {c!r} is not an integer") from err
            values: list[int] = []
            for f in idx.tolist() if isinstance(idx, torch.Tensor | np.ndarray) else idx:
                try:
                    fi = operator.index(f)
                except TypeError as err:
                    raise ValueError(f"seed {seed!r}, class {cls}: latent {f!r} is not an integer") from err
                if not 0 <= fi < n_latents[seed]:
                    raise ValueError(
                        f"seed {seed!r}, class {cls}: latent index {fi} out of range for a decoder with "
                        f"{n_latents[seed]} latents"
                    )
                values.append(fi)
            out[seed][cls] = sorted(set(values))
    return out


def _validated(
    selected: Selection,
    decoders: Mapping[str, torch.Tensor],
    min_share: float,
    min_cosine: float,
) -> tuple[list[str], dict[str, dict[int, list[int]]]]:
    """Check thresholds, seeds, decoders and selections; return the sorted seeds and clean selections."""
    if not 0.0 < min_share <= 1.0:
        raise ValueError(f"min_share must be in (0, 1], got {min_share}")
    if not -1.0 <= min_cosine <= 1.0:
        raise ValueError(f"min_cosine must be in [-1, 1], got {min_cosine}")
    seeds = sorted(selected)
    if not seeds:
        raise ValueError("selected is empty: need at least one seed")
    if set(seeds) != set(decoders):
        missing = sorted(set(seeds) - set(decoders))
        extra = sorted(set(decoders) - set(seeds))
        raise ValueError(
            f"seeds differ between selected and decoders: no decoder for {missing}, no selection for {extra}"
        )
    for seed in seeds:
        _check_decoder(decoders[seed], f"seed {seed!r}")
    first = seeds[0]
    width = decoders[first].shape[1]
    for seed in seeds:
        if decoders[seed].shape[1] != width:
            raise ValueError(
                f"decoder width of seed {seed!r} is D={decoders[seed].shape[1]}, but seed {first!r} has "
                f"D={width}"
            )
    return seeds, _check_indices(selected, {s: decoders[s].shape[0] for s in seeds})


def _one_reference(
    sel: dict[str, dict[int, list[int]]],
    decoders: Mapping[str, torch.Tensor],
    seeds: list[str],
    ref: str,
    min_share: float,
    min_cosine: float,
) -> ReferenceConsensus:
    classes = sorted({c for per_class in sel.values() for c in per_class})
    ref_sel = {c: sel[ref].get(c, []) for c in classes}
    union_R = sorted({f for fs in ref_sel.values() for f in fs})
    found: dict[int, dict[int, int]] = {c: dict.fromkeys(ref_sel[c], 0) for c in classes}
    mean_match_cosine: dict[str, float] = {}
    for seed in seeds:
        if seed == ref:
            continue
        try:
            match = match_latents(decoders[ref], decoders[seed], union_R)
        except ValueError as err:
            raise ValueError(f"matching reference seed {ref!r} to seed {seed!r}: {err}") from err
        partner = dict(zip(match.rows.tolist(), match.cols.tolist(), strict=True))
        cosine = dict(zip(match.rows.tolist(), match.cosine.tolist(), strict=True))
        mean_match_cosine[seed] = float(match.cosine.mean()) if union_R else math.nan
        for c in classes:
            theirs = set(sel[seed].get(c, []))
            for f in ref_sel[c]:
                if cosine[f] >= min_cosine and partner[f] in theirs:
                    found[c][f] += 1

    n_seeds = len(seeds)
    share = {c: {f: (1 + n) / n_seeds for f, n in found[c].items()} for c in classes}
    kept = {c: sorted(f for f, v in share[c].items() if v >= min_share - _SHARE_EPS) for c in classes}
    stability = {c: len(kept[c]) / len(ref_sel[c]) if ref_sel[c] else math.nan for c in classes}
    return ReferenceConsensus(
        reference=ref,
        seeds=list(seeds),
        kept=kept,
        share=share,
        stability=stability,
        mean_match_cosine=mean_match_cosine,
        min_share=float(min_share),
        min_cosine=float(min_cosine),
    )


def reference_consensus(
    selected: Selection,
    decoders: Mapping[str, torch.Tensor],
    reference: str,
    *,
    min_share: float = 0.5,
    min_cosine: float = 0.5,
) -> ReferenceConsensus:
    """Find one reference seed's selected features that recur, for the same class, in other seeds.

    The reference latents to match are the union of its selections over all classes. For every other seed
    ``s`` they are matched one-to-one to all of ``s``'s latents (:func:`match_latents`). A reference latent
    ``f`` selected for class ``c`` is *identified* in ``s`` when its partner ``g`` has cosine
    ``>= min_cosine`` and ``g`` is in ``selected[s][c]``. Its share is ``(1 + #seeds identified) / #seeds``
    and it is kept when the share is at least ``min_share``.

    Classes reported are the union of class keys over all seeds; a class the reference did not select for
    gets an empty ``kept``/``share`` and NaN stability.

    Args:
        selected: Seed name -> class -> selected latent indices of that seed (duplicates are ignored).
        decoders: Seed name -> ``(F_s, D)`` decoder matrix of that seed's SAE.
        reference: The reference seed.
        min_share: Share of seeds needed to keep a feature, in ``(0, 1]``.
        min_cosine: Decoder cosine a partner needs to count, in ``[-1, 1]``.

    Returns:
        A :class:`ReferenceConsensus`.

    Raises:
        ValueError: If the seeds of ``selected`` and ``decoders`` differ, ``reference`` is not among them, a
            decoder is not 2-D, decoder widths differ, a selected index is out of range, or a threshold is
            out of its range.
    """
    seeds, sel = _validated(selected, decoders, min_share, min_cosine)
    if reference not in sel:
        raise ValueError(f"reference seed {reference!r} is not among the seeds {seeds}")
    return _one_reference(sel, decoders, seeds, reference, min_share, min_cosine)


def consensus_features(
    selected: Selection,
    decoders: Mapping[str, torch.Tensor],
    *,
    min_share: float = 0.5,
    min_cosine: float = 0.5,
) -> ConsensusReport:
    """Cross-seed consensus with each seed as the reference in turn (:func:`reference_consensus`).

    Symmetric: no seed is privileged, and the result (values and key order) does not depend on the order of
    the seeds in ``selected`` or ``decoders``: seeds are sorted by name and means are exactly rounded sums.

    Args:
        selected: Seed name -> class -> selected latent indices of that seed (duplicates are ignored).
        decoders: Seed name -> ``(F_s, D)`` decoder matrix of that seed's SAE.
        min_share: Share of seeds needed to keep a feature, in ``(0, 1]``.
        min_cosine: Decoder cosine a partner needs to count, in ``[-1, 1]``.

    Returns:
        A :class:`ConsensusReport`.

    Raises:
        ValueError: As :func:`reference_consensus`.
    """
    seeds, sel = _validated(selected, decoders, min_share, min_cosine)
    by_reference = {ref: _one_reference(sel, decoders, seeds, ref, min_share, min_cosine) for ref in seeds}
    classes = sorted({c for per_class in sel.values() for c in per_class})
    stability = {c: _mean([r.stability[c] for r in by_reference.values()]) for c in classes}
    pair_cosines = [v for r in by_reference.values() for v in r.mean_match_cosine.values()]
    return ConsensusReport(
        seeds=seeds,
        stability=stability,
        mean_match_cosine=_mean(pair_cosines),
        by_reference=by_reference,
        min_share=float(min_share),
        min_cosine=float(min_cosine),
    )


def mean_and_spread(values: Sequence[float]) -> dict[str, float]:
    """Summary statistics of a few numbers (e.g. one stability value per class or per run).

    Args:
        values: Numbers; NaN entries are ignored.

    Returns:
        ``{"mean", "std" (population, ddof=0), "min", "max", "n"}``; all NaN and ``n = 0`` when no value is
        left.
    """
    xs = [float(v) for v in values if not math.isnan(float(v))]
    n = len(xs)
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    mean = math.fsum(xs) / n
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / n)
    return {"mean": mean, "std": std, "min": min(xs), "max": max(xs), "n": n}
