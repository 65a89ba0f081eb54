"""Pure comparisons of model A's artifacts with B's: SAE quality, vector cosines, feature overlap, deltas.

Everything here takes tensors or per-item records and returns JSON-ready numbers; the transfer job
(:mod:`sae_refusal.transfer.job`) composes them.

* :func:`sae_quality`: FVU (about the rows' own mean), mean L0 and the share of latents that never fire on the
  rows (dead on that data, not in training).
* :func:`row_cosines`: per-category cosine of two ``(C, D)`` vector sets.
* :func:`jaccard`: overlap of two feature sets (both index the same SAE's latents).
* :func:`paired_deltas`: a column's per-item refusal verdicts (or capability scores) minus the unsteered
  column's on the *same items*, with a paired bootstrap CI per set, per role block and per capability task.
  Items whose verdict failed in either column are left out of the delta and counted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from sae_refusal.eval.stats import bootstrap_mean
from sae_refusal.sae.base import SparseAutoencoder

__all__ = ["capability_deltas", "jaccard", "refusal_deltas", "row_cosines", "sae_quality"]


@torch.no_grad()
def sae_quality(sae: SparseAutoencoder, acts_ND: torch.Tensor, *, batch_size: int = 1024) -> dict[str, float]:
    """FVU, mean L0 and dead-latent share of ``sae`` on the rows ``acts_ND`` (raw space, any width it reads).

    Raises:
        ValueError: On no rows or rows of another width than the SAE reads.
    """
    if acts_ND.ndim != 2 or acts_ND.shape[0] == 0:
        raise ValueError(f"acts_ND: expected a non-empty (N, D) tensor, got {tuple(acts_ND.shape)}")
    if acts_ND.shape[1] != sae.d_model:
        raise ValueError(f"acts_ND: width {acts_ND.shape[1]} != the SAE's width {sae.d_model}")
    was_training = sae.training
    sae.eval()
    device = sae.W_dec_FD.device
    x_ND = acts_ND.float()
    mean_D = x_ND.mean(0)
    sse = total = l0 = 0.0
    fired_F = torch.zeros(sae.n_latents, dtype=torch.bool)
    try:
        for start in range(0, len(x_ND), batch_size):
            x_BD = x_ND[start : start + batch_size]
            z_BF = sae.encode(x_BD.to(device)).float()
            recon_BD = sae.decode(z_BF).float().cpu()
            active_BF = (z_BF != 0).cpu()
            sse += float((recon_BD - x_BD).pow(2).sum())
            total += float((x_BD - mean_D).pow(2).sum())
            l0 += float(active_BF.sum())
            fired_F |= active_BF.any(0)
    finally:
        sae.train(was_training)
    return {
        "fvu": sse / max(total, 1e-12),
        "l0": l0 / len(x_ND),
        "dead_fraction": 1.0 - float(fired_F.float().mean()),
        "n": float(len(x_ND)),
    }


def row_cosines(A_KD: torch.Tensor, B_KD: torch.Tensor) -> list[float]:
    """Cosine of each row of ``A_KD`` with the same row of ``B_KD`` (NaN for a zero row).

    Raises:
        ValueError: If the shapes differ.
    """
    if A_KD.shape != B_KD.shape:
        raise ValueError(f"vector sets of different shapes: {tuple(A_KD.shape)} vs {tuple(B_KD.shape)}")
    a, b = A_KD.double(), B_KD.double()
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    cos = (a * b).sum(-1) / norms
    return [float(c) if n > 0 else math.nan for c, n in zip(cos.tolist(), norms.tolist(), strict=True)]


def jaccard(a: Iterable[int], b: Iterable[int]) -> float:
    """``|a & b| / |a | b|`` (NaN when both are empty)."""
    sa, sb = set(a), set(b)
    union = sa | sb
    return len(sa & sb) / len(union) if union else math.nan


def _row(values: Sequence[float], n_failed: int, n_boot: int, seed: int) -> dict[str, Any]:
    est = bootstrap_mean(np.asarray(values, dtype=np.float64), n_boot=n_boot, seed=seed)
    return {**est.to_json(), "n_failed": n_failed}


def refusal_deltas(
    column: Sequence[Mapping[str, Any]],
    baseline: Sequence[Mapping[str, Any]],
    judge: str,
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Per set and per role block: mean of (refused under the column - refused unsteered), paired by item.

    Args:
        column: The column's per-item records (``generations.jsonl`` lines: ``id``, ``set``, ``role``,
            ``judges``).
        baseline: The unsteered column's records of the same items.
        judge: The judge whose verdicts are compared.
        n_boot: Bootstrap resamples.
        seed: Bootstrap seed.

    Returns:
        ``{"sets": {set: row}, "blocks": {role: row}}``, each row ``value, low, high, n, n_failed`` (the
        value is a difference of refusal shares, in [-1, 1]).
    """
    base = {(r["set"], r["id"]): r for r in baseline}
    by_set: dict[str, list[float]] = {}
    failed_set: dict[str, int] = {}
    role_of: dict[str, str] = {}
    for record in column:
        key = (record["set"], record["id"])
        role_of[record["set"]] = record["role"]
        by_set.setdefault(record["set"], [])
        failed_set.setdefault(record["set"], 0)
        other = base.get(key)
        verdicts = [
            r.get("judges", {}).get(judge, {}).get("verdict") for r in (record, other) if r is not None
        ]
        if other is None or len(verdicts) < 2 or "failed" in verdicts or None in verdicts:
            failed_set[record["set"]] += 1
            continue
        by_set[record["set"]].append(float(verdicts[0] == "refused") - float(verdicts[1] == "refused"))
    out: dict[str, Any] = {"judge": judge, "sets": {}, "blocks": {}}
    blocks: dict[str, list[float]] = {}
    block_failed: dict[str, int] = {}
    for name, values in by_set.items():
        role = role_of[name]
        out["sets"][name] = {**_row(values, failed_set[name], n_boot, seed), "role": role}
        block = role  # the eval job's blocks: harmful, over_refusal, benign (held-out model prompts)
        blocks.setdefault(block, []).extend(values)
        block_failed[block] = block_failed.get(block, 0) + failed_set[name]
    for block, values in blocks.items():
        out["blocks"][block] = _row(values, block_failed[block], n_boot, seed)
    return out


def capability_deltas(
    column: Sequence[Mapping[str, Any]],
    baseline: Sequence[Mapping[str, Any]],
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Per capability task: mean of (column score - unsteered score) over the items both scored.

    Args:
        column: The column's ``capability.jsonl`` lines (``task``, ``id``, ``value``).
        baseline: The unsteered column's lines.
        n_boot: Bootstrap resamples.
        seed: Bootstrap seed.
    """
    base = {(r["task"], r["id"]): r for r in baseline}
    by_task: dict[str, list[float]] = {}
    missing: dict[str, int] = {}
    for record in column:
        task = str(record["task"])
        other = base.get((task, record["id"]))
        value = record.get("value")
        by_task.setdefault(task, [])
        missing.setdefault(task, 0)
        if other is None or value is None or other.get("value") is None:
            missing[task] += 1
            continue
        a, b = float(value), float(other["value"])
        if not (math.isfinite(a) and math.isfinite(b)):
            missing[task] += 1
            continue
        by_task[task].append(a - b)
    return {task: _row(values, missing[task], n_boot, seed) for task, values in by_task.items()}
