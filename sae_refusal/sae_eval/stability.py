"""Cross-seed stability: how many latents, and how many head features, recur in an SAE of another seed.

Latents of two seeds ``a`` and ``b`` are paired one to one by decoder cosine with an optimal assignment
(Hungarian, :func:`sae_refusal.features.consensus.match_latents`, maximising the summed cosine over all
latents; the narrower SAE is matched into the wider one, so with unequal widths some latents of the wider
stay unpaired). For each ordered pair ``(a, b)`` and cosine threshold ``t``:

* ``matched_share`` = share of ``a``'s latents whose partner in ``b`` has decoder cosine ``>= t``
  (an unpaired latent is not matched). Symmetric for equal widths.
* For the L1 heads' top features (:mod:`sae_refusal.features.heads`: per class, the ``top_k`` latents with
  the largest positive weights), per class ``c`` with a non-empty top list in ``a``:
  ``head_matched`` = share of ``a``'s top-``c`` latents whose partner has cosine ``>= t``, and
  ``head_shared`` = share of them whose partner has cosine ``>= t`` *and* is among ``b``'s top-``c``
  latents; both averaged over those classes.

``mean`` averages each number over the ordered pairs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from sae_refusal.features.consensus import match_latents

__all__ = ["full_matching", "head_overlap", "stability_report"]


def full_matching(W_a_FD: torch.Tensor, W_b_GD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each latent of ``a``'s partner in ``b`` and their decoder cosine (optimal one-to-one matching).

    Returns:
        ``partner_F`` (long, -1 where unpaired) and ``cosine_F`` (float32, NaN where unpaired).
    """
    n_a, n_b = W_a_FD.shape[0], W_b_GD.shape[0]
    partner = torch.full((n_a,), -1, dtype=torch.long)
    cosine = torch.full((n_a,), math.nan, dtype=torch.float32)
    if n_a <= n_b:
        match = match_latents(W_a_FD, W_b_GD)
        partner[match.rows], cosine[match.rows] = match.cols, match.cosine
    else:
        match = match_latents(W_b_GD, W_a_FD)
        partner[match.cols], cosine[match.cols] = match.rows, match.cosine
    return partner, cosine


def _matched(cosine_F: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.nan_to_num(cosine_F, nan=-math.inf) >= threshold


def head_overlap(
    top_a: Mapping[int, Sequence[int]],
    top_b: Mapping[int, Sequence[int]],
    partner_F: torch.Tensor,
    cosine_F: torch.Tensor,
    threshold: float,
) -> dict[str, Any]:
    """``head_matched`` and ``head_shared`` of ``a``'s top features in ``b`` (module docstring).

    Returns:
        ``{"head_matched": mean, "head_shared": mean, "per_class": {c: {"matched", "shared", "n"}}}``
        (means NaN when ``a`` has no top features at all).
    """
    matched_F = _matched(cosine_F, threshold)
    per_class: dict[int, dict[str, float]] = {}
    for c, feats in top_a.items():
        if not len(feats):
            continue
        mine = [int(f) for f in feats]
        theirs = {int(f) for f in top_b.get(c, [])}
        matched = [bool(matched_F[f]) for f in mine]
        shared = [ok and int(partner_F[f]) in theirs for f, ok in zip(mine, matched, strict=True)]
        per_class[c] = {"matched": float(np.mean(matched)), "shared": float(np.mean(shared)), "n": len(mine)}
    values = list(per_class.values())
    return {
        "head_matched": float(np.mean([v["matched"] for v in values])) if values else math.nan,
        "head_shared": float(np.mean([v["shared"] for v in values])) if values else math.nan,
        "per_class": per_class,
    }


def stability_report(
    decoders: Mapping[str, torch.Tensor],
    top_features: Mapping[str, Mapping[int, Sequence[int]]],
    thresholds: Sequence[float] = (0.7, 0.5),
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Cross-seed stability of every ordered pair of seeds (module docstring).

    Args:
        decoders: Decoder rows ``(F, D)`` by seed name.
        top_features: Per seed, class -> its head's top latents.
        thresholds: Decoder cosines at which a partner counts as matched.
        class_names: Names of the classes (keys of ``per_class``); ``str(c)`` when not given.

    Returns:
        ``{"pairs": {"a->b": {str(t): {...}}}, "mean": {str(t): {metric: mean over pairs}},
        "mean_match_cosine": mean over pairs of the mean partner cosine}``, or ``{"skipped": why}`` with
        fewer than two seeds.
    """
    names = sorted(decoders)
    if len(names) < 2:
        return {"skipped": f"needs two seeds or more, got {names}"}
    matchings: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for a, b in itertools.combinations(names, 2):
        partner, cosine = full_matching(decoders[a], decoders[b])
        matchings[a, b] = partner, cosine
        back = torch.full((decoders[b].shape[0],), -1, dtype=torch.long)
        back_cos = torch.full((decoders[b].shape[0],), math.nan, dtype=torch.float32)
        paired = partner >= 0
        back[partner[paired]] = torch.nonzero(paired).flatten()
        back_cos[partner[paired]] = cosine[paired]
        matchings[b, a] = back, back_cos

    def key(c: int) -> str:
        return class_names[c] if class_names is not None else str(c)

    pairs: dict[str, Any] = {}
    for a, b in itertools.permutations(names, 2):
        partner, cosine = matchings[a, b]
        entry: dict[str, Any] = {"mean_match_cosine": float(torch.nanmean(cosine.double()))}
        for t in thresholds:
            heads = head_overlap(top_features.get(a, {}), top_features.get(b, {}), partner, cosine, t)
            entry[str(t)] = {
                "matched_share": float(_matched(cosine, t).double().mean()),
                "head_matched": heads["head_matched"],
                "head_shared": heads["head_shared"],
                "per_class": {key(c): v for c, v in heads["per_class"].items()},
            }
        pairs[f"{a}->{b}"] = entry
    mean: dict[str, Any] = {}
    for t in thresholds:
        mean[str(t)] = {
            metric: _nanmean([p[str(t)][metric] for p in pairs.values()])
            for metric in ("matched_share", "head_matched", "head_shared")
        }
    return {
        "pairs": pairs,
        "mean": mean,
        "mean_match_cosine": _nanmean([p["mean_match_cosine"] for p in pairs.values()]),
    }


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan
