"""What ``sae-refusal sae-eval`` computes (:class:`SAEEvalConfig`).

Plain settings, importable without torch, so a bad value is named before the heavy libraries load. Each
field is the command-line option of the same name (``--k``, ``--dense_threshold``, ...), and a bad value
raises a ``ValueError`` naming that option.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["SAEEvalConfig"]


@dataclass(frozen=True)
class SAEEvalConfig:
    """Settings of the SAE evaluation (see :mod:`sae_refusal.sae_eval` for every metric's definition).

    Args:
        fit_split: Rows the probes, latent rankings and heads are fitted on.
        eval_split: Held-out rows every metric is scored on (core metrics use all of its rows, probing,
            absorption and heads its benign and harmful rows).
        k: Latent counts of the k-sparse probes.
        dense_threshold: A latent is *dense* when it fires on more than this share of the eval rows.
        probe_c: Inverse L2 strength of every logistic probe (dense and k-sparse; features standardised).
        tau_fs: Feature-splitting threshold of the absorption's main latents: ``k`` grows from 1 while the
            k-sparse probe's train F1 gains more than ``tau_fs`` over the best smaller ``k`` (SAEBench's
            ``f1_jump_threshold``).
        max_k_main: Most main latents per category.
        full_absorption_cos: Least decoder-probe cosine of the top projecting latent for full absorption.
        fraction_cos: Least decoder-probe cosine of a latent that may absorb (absorption fraction).
        proportion: Least share of the row's probe projection the absorbing latent(s) must carry.
        max_absorbers: Most latents that together absorb a row (absorption fraction).
        top_k: Head features per class compared across seeds.
        match_cosines: Decoder cosines at which a latent counts as matched in another seed (the first is
            the headline).
        seed: Random state of the probes' and heads' solvers.
    """

    fit_split: str = "train"
    eval_split: str = "test"
    k: tuple[int, ...] = (1, 2, 5, 10, 20)
    dense_threshold: float = 0.1
    probe_c: float = 1.0
    tau_fs: float = 0.03
    max_k_main: int = 10
    full_absorption_cos: float = 0.025
    fraction_cos: float = 0.1
    proportion: float = 0.4
    max_absorbers: int = 3
    top_k: int = 10
    match_cosines: tuple[float, ...] = field(default=(0.7, 0.5))
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", tuple(int(k) for k in self.k))
        object.__setattr__(self, "match_cosines", tuple(float(c) for c in self.match_cosines))
        if not self.k or min(self.k) < 1 or len(set(self.k)) != len(self.k):
            raise ValueError(f"--k must be distinct integers >= 1, got {list(self.k)}")
        if not 0.0 <= self.dense_threshold < 1.0:
            raise ValueError(f"--dense_threshold must be in [0, 1), got {self.dense_threshold}")
        if self.probe_c <= 0:
            raise ValueError(f"--probe_c must be > 0, got {self.probe_c}")
        if self.tau_fs < 0:
            raise ValueError(f"--tau_fs must be >= 0, got {self.tau_fs}")
        if self.max_k_main < 1 or self.max_absorbers < 1 or self.top_k < 1:
            raise ValueError(
                "--max_k_main, --max_absorbers and --top_k must be >= 1, got "
                f"{self.max_k_main}, {self.max_absorbers}, {self.top_k}"
            )
        for name in ("full_absorption_cos", "fraction_cos"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name} must be in [-1, 1], got {getattr(self, name)}")
        if not 0.0 < self.proportion <= 1.0:
            raise ValueError(f"--proportion must be in (0, 1], got {self.proportion}")
        if not self.match_cosines or any(not -1.0 <= c <= 1.0 for c in self.match_cosines):
            raise ValueError(f"--match_cosines must be cosines in [-1, 1], got {list(self.match_cosines)}")
        if self.fit_split == self.eval_split:
            raise ValueError(f"--fit_split and --eval_split must differ, both are {self.fit_split!r}")
