"""Feature absorption on the refusal categories: SAEBench's first-letter metric with categories for letters.

SAEBench (Chanin et al.'s absorption, with Till's absorption fraction) asks, for inputs where a ground-truth
linear probe says a feature is present, whether the SAE's *main latents* for that feature stay silent while
another latent aligned with the probe carries the feature instead. Here the feature is "this prompt is of
refusal category ``c``" and the inputs are the held-out prompts of category ``c``:

* **probe** ``p_c``: the dense probe of :mod:`.probing` (category ``c`` vs the rest, fitted on the fit rows,
  standardised residual), as a direction in raw residual space, unit norm: ``p = w / ||w||``.
* **main latents**: latents ranked on the fit rows by *signed* mean-code difference (``c`` minus the rest:
  latents that fire *for* ``c``); ``k`` grows from 1 while the k-sparse probe's F1 gains more than
  ``tau_fs`` over the best smaller ``k`` (at most ``max_k_main``); the main latents are the top ``k``.
  SAEBench does the same with its k-sparse probes (``f1_jump_threshold`` 0.03); we rank by mean
  difference and read the F1 on the fit rows, so the held-out rows only score.
* **rows**: held-out rows of category ``c`` that the probe classifies positive (``x @ w + b > 0``; SAEBench's
  "probe true positives").
* **projections**: latent ``f``'s share of the row's probe projection is ``proj_f = z_f * (d_f . p)`` with
  ``d_f = W_dec[f] / input_scale`` its raw-space decoder direction (``sae.decode`` is
  ``z @ d + offset``), so ``sum_f proj_f = (x_hat - offset) . p`` exactly; the row's own projection is
  ``a = (x - offset) . p`` with ``offset = sae.decode(0)`` (the decoder bias: what no latent has to carry).
  SAEBench projects ``x`` itself and uses unit-norm decoders; subtracting the offset keeps the mean
  activation, which no latent encodes, out of ``a``. ``cos_f = cos(d_f, p)``.
* **full absorption** of a row: no main latent fires, the latent with the largest ``proj_f`` has
  ``cos_f >= full_absorption_cos`` (0.025), ``a > 0`` and that latent's ``proj_f / a >= proportion`` (0.4).
  ``full_absorption_rate`` = share of the rows fully absorbed.
* **absorption fraction** of a row: ``m = sum of proj_f over the main latents``; the absorbers are the
  other latents with ``cos_f >= fraction_cos`` (0.1) and ``proj_f > 0``, the ``max_absorbers`` (3) largest
  kept, ``A`` their summed projection. 0 when ``a <= 0``, ``m >= a`` or ``A / a < proportion``; else 1 when
  ``m <= 0``; else ``min(A, a - m) / (min(A, a - m) + m)``. ``absorption_fraction`` = its mean over the rows.
* ``main_miss_rate`` = share of the rows on which no main latent fires (an upper bound of full absorption).

Reported per category (with its row count) and as the mean over the categories that have rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from sae_refusal.sae_eval.probing import LinearProbe, fit_probe, rank_latents

__all__ = ["AbsorptionScore", "absorption_report", "absorption_scores", "main_latents"]


@dataclass(frozen=True)
class AbsorptionScore:
    """Absorption of one feature on its probe-positive rows (definitions in the module docstring).

    Args:
        n_rows: Rows scored (probe true positives).
        main_latents: The feature's main latents.
        main_miss_rate: Share of the rows on which no main latent fires.
        full_absorption_rate: Share of the rows fully absorbed.
        absorption_fraction: Mean absorption fraction over the rows.
    """

    n_rows: int
    main_latents: list[int]
    main_miss_rate: float
    full_absorption_rate: float
    absorption_fraction: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)


def main_latents(
    Z_train: npt.ArrayLike,
    y_train: npt.ArrayLike,
    *,
    tau_fs: float = 0.03,
    max_k: int = 10,
    C: float = 1.0,
    seed: int = 0,
) -> tuple[list[int], list[float]]:
    """The main latents of the positive class and the fit-row F1 of each ``k`` tried (module docstring)."""
    Z = np.asarray(Z_train, dtype=np.float64)
    y = np.asarray(y_train, dtype=bool)
    order = rank_latents(Z, y, signed=True)
    best, chosen, f1s = -math.inf, [int(order[0])], []
    for k in range(1, min(max_k, Z.shape[1]) + 1):
        keep = order[:k]
        score, _ = fit_probe(Z[:, keep], y, Z[:, keep], y, C=C, seed=seed)
        f1s.append(score.train_f1)
        if score.train_f1 > best + tau_fs:
            best, chosen = score.train_f1, [int(f) for f in keep]
        else:
            break
    return chosen, f1s


def absorption_scores(
    acts_ND: torch.Tensor,
    codes_NF: torch.Tensor,
    directions_FD: torch.Tensor,
    offset_D: torch.Tensor,
    probe_D: torch.Tensor,
    main: Sequence[int],
    *,
    full_absorption_cos: float = 0.025,
    fraction_cos: float = 0.1,
    proportion: float = 0.4,
    max_absorbers: int = 3,
) -> AbsorptionScore:
    """Full absorption and absorption fraction of one feature on its probe-positive rows.

    Args:
        acts_ND: The rows (raw activations) the probe classifies positive.
        codes_NF: Their codes.
        directions_FD: Each latent's raw-space decoder direction (``W_dec / input_scale``).
        offset_D: The reconstruction of all-zero codes (``sae.decode(0)``).
        probe_D: The probe's raw-space weight (any norm).
        main: The feature's main latents.
        full_absorption_cos: Least ``cos_f`` of the top projecting latent (full absorption).
        fraction_cos: Least ``cos_f`` of an absorbing latent (absorption fraction).
        proportion: Least share of ``a`` the absorbing latent(s) must carry.
        max_absorbers: Most absorbing latents (absorption fraction).
    """
    acts_ND, codes_NF, directions_FD, offset_D, probe_D = (
        t.detach().cpu() for t in (acts_ND, codes_NF, directions_FD, offset_D, probe_D)
    )
    n, n_latents = codes_NF.shape
    main_idx = torch.as_tensor(list(main), dtype=torch.long)
    if n == 0:
        return AbsorptionScore(0, main_idx.tolist(), math.nan, math.nan, math.nan)
    p_D = F.normalize(probe_D.double().flatten(), dim=0)
    d_FD = directions_FD.double()
    cos_F = F.normalize(d_FD, dim=1) @ p_D
    proj_NF = codes_NF.double() * (d_FD @ p_D)
    a_N = (acts_ND.double() - offset_D.double()) @ p_D
    is_main_F = torch.zeros(n_latents, dtype=torch.bool)
    is_main_F[main_idx] = True
    main_fires_N = (codes_NF[:, is_main_F] > 0).any(1)
    positive_N = a_N > 0
    safe_a_N = torch.where(positive_N, a_N, torch.ones_like(a_N))

    top_proj_N, top_N = proj_NF.max(1)
    full_N = ~main_fires_N & (cos_F[top_N] >= full_absorption_cos) & positive_N
    full_N &= top_proj_N / safe_a_N >= proportion

    m_N = proj_NF[:, is_main_F].sum(1)
    allowed_NF = (~is_main_F & (cos_F >= fraction_cos)).expand(n, -1) & (proj_NF > 0)
    candidates_NF = torch.where(allowed_NF, proj_NF, torch.zeros_like(proj_NF))
    absorbed_N = candidates_NF.topk(min(max_absorbers, n_latents), dim=1).values.sum(1)
    fraction_N = torch.zeros(n, dtype=torch.float64)
    eligible_N = positive_N & (m_N < a_N) & (absorbed_N / safe_a_N >= proportion)
    fraction_N[eligible_N & (m_N <= 0)] = 1.0
    partial_N = eligible_N & (m_N > 0)
    carried_N = torch.minimum(absorbed_N, a_N - m_N)
    fraction_N[partial_N] = (carried_N / (carried_N + m_N))[partial_N].clamp(0.0, 1.0)
    return AbsorptionScore(
        n_rows=n,
        main_latents=main_idx.tolist(),
        main_miss_rate=float((~main_fires_N).double().mean()),
        full_absorption_rate=float(full_N.double().mean()),
        absorption_fraction=float(fraction_N.mean()),
    )


def absorption_report(
    Z_train: torch.Tensor,
    classes_train: torch.Tensor,
    X_test: torch.Tensor,
    Z_test: torch.Tensor,
    classes_test: torch.Tensor,
    class_names: Sequence[str],
    probes: dict[str, LinearProbe],
    directions_FD: torch.Tensor,
    offset_D: torch.Tensor,
    *,
    tau_fs: float = 0.03,
    max_k_main: int = 10,
    C: float = 1.0,
    seed: int = 0,
    **thresholds: Any,
) -> dict[str, Any]:
    """Absorption of every category ``class_names[1:]`` (module docstring).

    Args:
        Z_train: Fit-row codes.
        classes_train: Fit-row class codes (0 benign, ``c`` category ``class_names[c]``).
        X_test: Held-out raw rows.
        Z_test: Their codes.
        classes_test: Their class codes.
        class_names: Names of classes ``0..C``.
        probes: The dense probe of each category's one-vs-rest task, by category name (a category without
            one is skipped).
        directions_FD: Raw-space decoder directions.
        offset_D: ``sae.decode(0)``.
        tau_fs: Feature-splitting threshold of the main latents.
        max_k_main: Most main latents.
        C: Inverse strength of the main latents' probes.
        seed: Their solver's random state.
        thresholds: ``full_absorption_cos``, ``fraction_cos``, ``proportion``, ``max_absorbers`` of
            :func:`absorption_scores`.

    Returns:
        ``{"categories": {name: AbsorptionScore dict + k_main, main_train_f1 | {"skipped": why}},
        "mean": {metric: mean over the categories with rows}}``.
    """
    Ztr = Z_train.double().numpy()
    X_np = X_test.double().numpy()
    categories: dict[str, Any] = {}
    for c, name in enumerate(class_names[1:], start=1):
        y_train = (classes_train == c).numpy()
        if name not in probes or y_train.all() or not y_train.any():
            categories[name] = {"skipped": "no dense probe (the fit rows hold one class only)"}
            continue
        main, f1s = main_latents(Ztr, y_train, tau_fs=tau_fs, max_k=max_k_main, C=C, seed=seed)
        rows = torch.from_numpy((classes_test == c).numpy() & (probes[name].decision(X_np) > 0))
        score = absorption_scores(
            X_test[rows],
            Z_test[rows],
            directions_FD,
            offset_D,
            torch.from_numpy(probes[name].weight),
            main,
            **thresholds,
        )
        categories[name] = {**score.to_dict(), "k_main": len(main), "main_train_f1": f1s}
    scored = [v for v in categories.values() if v.get("n_rows")]
    metrics = ("main_miss_rate", "full_absorption_rate", "absorption_fraction")
    mean = {m: float(np.mean([v[m] for v in scored])) if scored else math.nan for m in metrics}
    return {"categories": categories, "mean": {**mean, "n_categories": len(scored)}}
