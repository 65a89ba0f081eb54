"""Ground truth for SAEs: activations built from a known sparse dictionary, and how well an SAE recovers it.

:func:`make_synthetic` draws ``N`` activations ``x = c @ D + noise`` from ``G`` true features (unit-norm rows
of ``D``, ``G > d_model`` puts them in superposition) with codes ``c`` that are

* **sparse**: each independent feature fires with probability ``p`` (``mean_active / G``), with a magnitude
  drawn from ``|N(1, magnitude_std)|``;
* **correlated**: features come in pairs; the second of a pair fires with probability ``pair_correlation``
  whenever the first fires (and with probability ``p`` otherwise);
* **hierarchical**: the first ``n_parents`` features are parents, each with ``children_per_parent`` child
  features that can fire only when their parent fires (with probability ``child_given_parent``);
* **noisy**: Gaussian noise of standard deviation ``noise_std`` times the mean norm of ``c @ D``.

:func:`feature_recovery` scores a learned dictionary against the true one, so a benchmark says which
architecture *recovers* features, not only which reconstructs:

* **MMCS** (mean max cosine similarity): the mean over true features of the largest absolute cosine between
  the true direction and any decoder row.
* **MCC** (mean correlation coefficient, as in the ICA / SAE identifiability literature): the Pearson
  correlation between every true code and every learned code over the samples, a one-to-one matching of true
  features to latents that maximises the summed correlation (Hungarian algorithm), and the mean of the matched
  correlations over the ``G`` true features (a feature left without a latent counts 0).
* **Recall / precision at a cosine threshold** (``0.9``): the share of true features with a decoder row above
  it; the share of live latents (those that fire on some sample) whose best true feature is above it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

__all__ = ["Recovery", "SyntheticConfig", "SyntheticData", "feature_recovery", "fit_plain", "make_synthetic"]


@dataclass(frozen=True)
class SyntheticConfig:
    """The planted dictionary and its codes (see the module notes).

    Args:
        d_model: Activation width ``D``.
        n_features: True features ``G``.
        n_samples: Activations drawn ``N``.
        mean_active: Expected active independent features per sample (``p = mean_active / G``).
        pair_correlation: Probability that a pair's second feature fires when its first does (0: independent).
        n_parents: Parent features (the first ones); ``0`` for no hierarchy.
        children_per_parent: Child features per parent (taken after the parents).
        child_given_parent: Probability that a child fires when its parent fires.
        magnitude_std: Standard deviation of the magnitudes around 1.
        noise_std: Noise standard deviation, relative to the mean norm of the clean activations.
    """

    d_model: int = 64
    n_features: int = 256
    n_samples: int = 20000
    mean_active: float = 4.0
    pair_correlation: float = 0.0
    n_parents: int = 0
    children_per_parent: int = 0
    child_given_parent: float = 0.5
    magnitude_std: float = 0.2
    noise_std: float = 0.0

    def __post_init__(self) -> None:
        for key in ("d_model", "n_features", "n_samples"):
            if getattr(self, key) < 1:
                raise ValueError(f"synthetic.{key}: must be >= 1, got {getattr(self, key)}")
        if not 0 < self.mean_active <= self.n_features:
            raise ValueError(f"synthetic.mean_active: must be in (0, n_features], got {self.mean_active}")
        for key in ("pair_correlation", "child_given_parent"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"synthetic.{key}: must be a probability, got {getattr(self, key)}")
        if self.n_parents < 0 or self.children_per_parent < 0:
            raise ValueError("synthetic.n_parents / children_per_parent: must be >= 0")
        if self.n_parents * (1 + self.children_per_parent) > self.n_features:
            raise ValueError(
                f"synthetic.n_parents: {self.n_parents} parents with {self.children_per_parent} children "
                f"each need more than n_features={self.n_features} features"
            )
        if self.magnitude_std < 0 or self.noise_std < 0:
            raise ValueError("synthetic.magnitude_std / noise_std: must be >= 0")


@dataclass
class SyntheticData:
    """Activations with their ground truth.

    Attributes:
        acts_ND: The activations ``c @ D + noise``.
        codes_NG: The true codes ``c`` (non-negative).
        dictionary_GD: The true unit-norm feature directions ``D``.
        parent_of_G: Parent index of each feature (``-1``: none).
    """

    acts_ND: torch.Tensor
    codes_NG: torch.Tensor
    dictionary_GD: torch.Tensor
    parent_of_G: torch.Tensor


def make_synthetic(
    cfg: SyntheticConfig, generator: torch.Generator, dictionary_GD: torch.Tensor | None = None
) -> SyntheticData:
    """Draw activations from a planted sparse dictionary (module notes); only ``generator`` is drawn from.

    Args:
        cfg: The settings.
        generator: The RNG of every draw.
        dictionary_GD: Reuse this dictionary (e.g. held-out rows of the same features); ``None`` draws one.

    Raises:
        ValueError: If ``dictionary_GD`` does not have the configured shape.
    """
    G, D, N = cfg.n_features, cfg.d_model, cfg.n_samples
    if dictionary_GD is None:
        dictionary_GD = torch.randn(G, D, generator=generator)
        dictionary_GD /= dictionary_GD.norm(dim=1, keepdim=True)
    elif tuple(dictionary_GD.shape) != (G, D):
        raise ValueError(f"dictionary_GD: expected shape {(G, D)}, got {tuple(dictionary_GD.shape)}")
    p = cfg.mean_active / G
    fires_NG = torch.rand(N, G, generator=generator) < p
    parent_of_G = torch.full((G,), -1, dtype=torch.long)
    n_children = cfg.n_parents * cfg.children_per_parent
    for parent in range(cfg.n_parents):
        start = cfg.n_parents + parent * cfg.children_per_parent
        parent_of_G[start : start + cfg.children_per_parent] = parent
    child_G = parent_of_G >= 0
    if n_children:
        draw_NC = torch.rand(N, n_children, generator=generator) < cfg.child_given_parent
        parents_C = parent_of_G[child_G]
        fires_NG[:, child_G] = draw_NC & fires_NG[:, parents_C]
    if cfg.pair_correlation > 0:  # pairs among the features outside the hierarchy
        free = torch.nonzero(~child_G & (torch.arange(G) >= cfg.n_parents)).flatten()
        first, second = free[0 : len(free) - 1 : 2], free[1 : len(free) : 2]
        follow_NP = torch.rand(N, len(first), generator=generator) < cfg.pair_correlation
        fires_NG[:, second] |= follow_NP & fires_NG[:, first]
    magnitude_NG = (1.0 + cfg.magnitude_std * torch.randn(N, G, generator=generator)).abs()
    codes_NG = magnitude_NG * fires_NG
    clean_ND = codes_NG @ dictionary_GD
    acts_ND = clean_ND
    if cfg.noise_std > 0:
        scale = float(clean_ND.norm(dim=1).mean()) * cfg.noise_std / D**0.5
        acts_ND = clean_ND + scale * torch.randn(N, D, generator=generator)
    return SyntheticData(acts_ND, codes_NG, dictionary_GD, parent_of_G)


@dataclass(frozen=True)
class Recovery:
    """How well a learned dictionary recovers the planted one (see the module notes)."""

    mmcs: float
    mcc: float
    recall: float
    precision: float
    n_live: int
    threshold: float

    def to_json(self) -> dict[str, float]:
        """Plain dict."""
        return asdict(self)


def _pearson(a_NG: np.ndarray, b_NF: np.ndarray) -> np.ndarray:
    """``(G, F)`` Pearson correlations between columns (a constant column correlates 0)."""
    a = a_NG - a_NG.mean(axis=0)
    b = b_NF - b_NF.mean(axis=0)
    a_norm = np.linalg.norm(a, axis=0)
    b_norm = np.linalg.norm(b, axis=0)
    corr = (a.T @ b) / np.maximum(np.outer(a_norm, b_norm), 1e-12)
    corr[a_norm == 0, :] = 0.0
    corr[:, b_norm == 0] = 0.0
    return corr


def feature_recovery(
    decoder_FD: torch.Tensor,
    codes_NF: torch.Tensor,
    truth: SyntheticData,
    *,
    threshold: float = 0.9,
) -> Recovery:
    """Score a learned dictionary against the planted one.

    Args:
        decoder_FD: The SAE's decoder rows (one direction per latent; norms do not matter).
        codes_NF: The SAE's codes of ``truth.acts_ND``.
        truth: The planted data.
        threshold: Cosine above which a latent counts as recovering a feature.

    Raises:
        ValueError: When shapes disagree with ``truth``.
    """
    from scipy.optimize import linear_sum_assignment

    G, D = truth.dictionary_GD.shape
    if decoder_FD.ndim != 2 or decoder_FD.shape[1] != D:
        raise ValueError(f"decoder_FD: expected (F, {D}), got {tuple(decoder_FD.shape)}")
    if codes_NF.shape != (truth.codes_NG.shape[0], decoder_FD.shape[0]):
        expected = (truth.codes_NG.shape[0], decoder_FD.shape[0])
        raise ValueError(f"codes_NF: expected {expected}, got {tuple(codes_NF.shape)}")
    dec = decoder_FD.detach().double()
    dec = dec / dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos_GF = (truth.dictionary_GD.double() @ dec.T).abs().numpy()
    live_F = (codes_NF.detach() != 0).any(dim=0).numpy()
    best_true = cos_GF.max(axis=1)
    mmcs = float(best_true.mean())
    recall = float((best_true > threshold).mean())
    precision = float((cos_GF[:, live_F].max(axis=0) > threshold).mean()) if live_F.any() else 0.0
    corr_GF = _pearson(truth.codes_NG.double().numpy(), codes_NF.detach().double().numpy())
    rows, cols = linear_sum_assignment(-corr_GF)
    mcc = float(corr_GF[rows, cols].sum() / G)
    return Recovery(mmcs, mcc, recall, precision, int(live_F.sum()), threshold)


def fit_plain(
    sae: torch.nn.Module,
    acts_ND: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 512,
    lr: float = 1e-3,
    generator: torch.Generator,
) -> None:
    """Train ``sae`` (a :class:`~sae_refusal.sae.base.SparseAutoencoder`) on ``acts_ND`` with Adam, as
    :class:`~sae_refusal.sae.module.SAEModule` does one seed (input scale from the data, decoder gradients
    orthogonal to unit-norm rows, rows renormalised after each step, dead-latent counts updated), without
    Lightning: the ground-truth benchmark trains several architectures on the same draws this way. Unlike a
    fit, it leaves the decoder bias and any data-driven start as they are: call
    :func:`~sae_refusal.sae.base.start_from_data` first for a fit's start.

    Raises:
        ValueError: For ``steps`` or ``batch_size`` below 1.
    """
    from sae_refusal.sae.base import mean_norm_scale

    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    sae.set_input_scale(mean_norm_scale(acts_ND))  # type: ignore[operator]
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    sae.train()
    n = acts_ND.shape[0]
    for _ in range(steps):
        rows = torch.randint(0, n, (min(batch_size, n),), generator=generator)
        out = sae(acts_ND[rows])
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.remove_parallel_grads()  # type: ignore[operator]
        optimizer.step()
        sae.normalize_decoder()  # type: ignore[operator]
        sae.update_firing(out.fired_F)  # type: ignore[operator]
    sae.eval()
