"""Training JumpReLU SAEs (Rajamanoharan et al., 2024, "Jumping Ahead", arXiv:2407.14435; SAELens' trainer).

    x' = input_scale * x
    pre = (x' - b_dec) @ W_enc_DF + b_enc
    theta = exp(log_threshold_F)                   per-latent threshold, positive by construction
    z  = JumpReLU_theta(pre) = pre * H(pre - theta)
    x_hat = (z @ W_dec_FD + b_dec) / input_scale
    L  = mean_B ||x' - x_hat'||^2 + l0_coef * mean_B sum_F H(pre - theta)          (sparsity_loss "step")
    L  = mean_B ||x' - x_hat'||^2 + l0_coef * mean_B sum_F tanh(c * z * ||W_dec_f||) (sparsity_loss "tanh")

``H`` is piecewise constant, so the gradient w.r.t. ``theta`` comes from straight-through estimators with a
kernel ``K`` of bandwidth ``epsilon`` (the paper's eqs. 11-12, rectangle kernel ``K(u) = 1[|u| < 1/2]``)::

    d/dtheta JumpReLU_theta(pre) := -(theta / epsilon) * K((pre - theta) / epsilon)
    d/dtheta H(pre - theta)      := -(1 / epsilon)     * K((pre - theta) / epsilon)

and the ordinary gradients w.r.t. ``pre`` (``H(pre - theta)`` for the activation, 0 for the step). The
reconstruction term thus moves the threshold through the activation's estimator, the L0 term through the
step's; the L0 term sends no gradient to the encoder.

The ``"tanh"`` penalty (Anthropic's circuits update of January 2025; SAELens' ``jumprelu_sparsity_loss_mode
= "tanh"``, ``c = tanh_scale``) is a smooth, saturating L0 surrogate of the codes themselves: its gradient
reaches the encoder, the decoder norms and (through the activation's estimator) the thresholds. With the step
penalty only the thresholds carry the sparsity pressure, and Adam moves a log-threshold about ``lr`` a step:
in a short fit the encoder biases, pushed by the reconstruction, outrun them and L0 does not follow
``l0_coef`` (docs/RESULTS.md, issue 26).

Design notes:

* **A subclass with its own registry name.** :class:`TrainableJumpReLUSAE` extends the inference-only
  :class:`~sae_refusal.sae.jumprelu.JumpReLUSAE` and is saved as ``"jumprelu_trained"`` (its tensor is
  ``log_threshold_F``, its config carries the loss settings), so SAELens imports and exports already saved
  as ``"jumprelu"`` (tensor ``threshold_F``) load exactly as before. ``threshold_F`` stays readable (and
  settable: it writes ``log(theta)``), so the SAELens exporter handles a trained SAE like an imported one,
  and :meth:`TrainableJumpReLUSAE.to_inference` gives the plain :class:`JumpReLUSAE`.
* **Same codes as the inference SAE.** ``theta > 0``, so ``pre * H(pre - theta)`` equals the inference
  ``ReLU(pre) * (pre > theta)``: for equal weights the codes, reconstruction, ``mse``, ``fvu``, ``l0`` and
  ``fired_F`` are equal; only ``loss`` adds the L0 term (``parts["l0_penalty"]``).
* **Free decoder rows** (``unit_norm_decoder = False``), started at norm ``init_decoder_norm`` with the
  encoder as their transpose, zero biases and every threshold at ``init_threshold`` (SAELens: 0.001). The L0
  penalty does not depend on the decoder norms, so there is nothing to trade against them.
* **A start from the data** (``init_l0``). A fit starts ``b_dec`` at the data mean, so pre-activations are
  centred and small; a constant threshold above all of them leaves every latent silent, and no gradient
  reaches the encoder or the thresholds (the estimators only see pre-activations within ``bandwidth / 2`` of
  ``theta``). With ``init_l0`` set, :meth:`TrainableJumpReLUSAE.init_from_data` starts each latent's encoder
  bias so that it fires on ``init_l0 / F`` of the training rows (an expected L0 of ``init_l0``, no latent dead
  at the start; Anthropic's circuits update of January 2025 starts its JumpReLU encoder biases the same way).
  Without it, a start where no pre-activation comes within reach of its threshold is an error naming
  ``init_threshold``, not a silent 30-epoch collapse.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from sae_refusal.sae.architectures import SAEArchitecture
from sae_refusal.sae.base import SAE_REGISTRY, SAEOutput, SparseAutoencoder, fvu_of
from sae_refusal.sae.jumprelu import JumpReLUSAE
from sae_refusal.sae.settings import check_jumprelu_settings

__all__ = [
    "JumpReLU",
    "TrainableJumpReLUSAE",
    "jumprelu_ste",
    "rectangle",
    "step_ste",
]


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """The rectangle kernel ``K(u) = 1[-1/2 < u < 1/2]`` (as ``u``'s dtype)."""
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """``pre * H(pre - theta)``; gradient ``H(pre - theta)`` w.r.t. ``pre``, paper's eq. 11 w.r.t. theta."""

    @staticmethod
    def forward(pre_BF: torch.Tensor, theta_F: torch.Tensor, bandwidth: float) -> torch.Tensor:
        return pre_BF * (pre_BF > theta_F).to(pre_BF.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pre_BF, theta_F, bandwidth = inputs
        ctx.save_for_backward(pre_BF, theta_F)
        ctx.bandwidth = bandwidth

    @staticmethod
    def backward(ctx: Any, grad_BF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        pre_BF, theta_F = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre_BF = (pre_BF > theta_F).to(grad_BF.dtype) * grad_BF
        kernel_BF = rectangle((pre_BF - theta_F) / eps)
        grad_theta_F = (-(theta_F / eps) * kernel_BF * grad_BF).sum(0)
        return grad_pre_BF, grad_theta_F, None


class _Step(torch.autograd.Function):
    """``H(pre - theta)``; gradient 0 w.r.t. ``pre`` and the paper's eq. 12 w.r.t. ``theta``."""

    @staticmethod
    def forward(pre_BF: torch.Tensor, theta_F: torch.Tensor, bandwidth: float) -> torch.Tensor:
        return (pre_BF > theta_F).to(pre_BF.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pre_BF, theta_F, bandwidth = inputs
        ctx.save_for_backward(pre_BF, theta_F)
        ctx.bandwidth = bandwidth

    @staticmethod
    def backward(ctx: Any, grad_BF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        pre_BF, theta_F = ctx.saved_tensors
        eps = ctx.bandwidth
        kernel_BF = rectangle((pre_BF - theta_F) / eps)
        grad_theta_F = (-(1.0 / eps) * kernel_BF * grad_BF).sum(0)
        return torch.zeros_like(pre_BF), grad_theta_F, None


def jumprelu_ste(pre_BF: torch.Tensor, theta_F: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """``JumpReLU_theta(pre) = pre * H(pre - theta)`` with the straight-through gradient w.r.t. ``theta``.

    ``d/dtheta = -(theta / epsilon) * K((pre - theta) / epsilon)`` (rectangle ``K``, ``epsilon = bandwidth``;
    Rajamanoharan et al. 2024, eq. 11), ``d/dpre = H(pre - theta)``.
    """
    out: torch.Tensor = _JumpReLU.apply(pre_BF, theta_F, bandwidth)
    return out


def step_ste(pre_BF: torch.Tensor, theta_F: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """``H(pre - theta)`` with the straight-through gradient w.r.t. ``theta``.

    ``d/dtheta = -(1 / epsilon) * K((pre - theta) / epsilon)`` (rectangle ``K``, ``epsilon = bandwidth``;
    Rajamanoharan et al. 2024, eq. 12), ``d/dpre = 0``.
    """
    out: torch.Tensor = _Step.apply(pre_BF, theta_F, bandwidth)
    return out


class TrainableJumpReLUSAE(JumpReLUSAE):
    """JumpReLU SAE trained with the L0 penalty and straight-through threshold gradients (module notes).

    Args:
        d_model: Input width ``D``.
        n_latents: Dictionary size ``F``.
        l0_coef: Weight ``lambda`` of the L0 term ``mean_B sum_F H(pre - theta)``.
        bandwidth: Width ``epsilon`` of the rectangle kernel of the straight-through estimators.
        init_threshold: Every latent's threshold ``theta`` at initialisation.
        init_decoder_norm: Norm of each decoder row at initialisation (the encoder starts as its transpose).
        init_l0: Expected L0 at the start of a fit: :meth:`init_from_data` sets each latent's encoder bias so
            that it fires on ``init_l0 / n_latents`` of the training rows (``None``: encoder bias 0).
        sparsity_loss: ``"step"`` (the paper's L0 through the step's estimator) or ``"tanh"`` (module notes).
        tanh_scale: ``c`` of the tanh penalty.
        generator: RNG of the initial weights (the global RNG is never touched).

    Raises:
        ValueError: If a setting is out of range (naming its ``model.architecture.*`` key).
    """

    architecture = "jumprelu_trained"
    unit_norm_decoder = False

    def __init__(
        self,
        d_model: int,
        n_latents: int,
        l0_coef: float = 1.0,
        bandwidth: float = 0.001,
        init_threshold: float = 0.001,
        init_decoder_norm: float = 0.1,
        init_l0: float | None = None,
        sparsity_loss: str = "step",
        tanh_scale: float = 4.0,
        generator: torch.Generator | None = None,
    ) -> None:
        check_jumprelu_settings(
            l0_coef, bandwidth, init_threshold, init_decoder_norm, init_l0, sparsity_loss, tanh_scale
        )
        if init_l0 is not None and init_l0 >= n_latents:
            raise ValueError(
                f"model.architecture.init_l0: must be below the number of latents ({n_latents}), "
                f"got {init_l0}"
            )
        SparseAutoencoder.__init__(self, d_model, n_latents)  # own parameters: log thresholds, not thresholds
        self.l0_coef, self.bandwidth = float(l0_coef), float(bandwidth)
        self.init_threshold, self.init_decoder_norm = float(init_threshold), float(init_decoder_norm)
        self.init_l0 = None if init_l0 is None else float(init_l0)
        self.sparsity_loss, self.tanh_scale = str(sparsity_loss), float(tanh_scale)
        W_dec_FD = torch.randn(n_latents, d_model, generator=generator)
        W_dec_FD *= init_decoder_norm / W_dec_FD.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec_FD = nn.Parameter(W_dec_FD)
        self.W_enc_DF = nn.Parameter(W_dec_FD.T.clone())
        self.b_enc_F = nn.Parameter(torch.zeros(n_latents))
        self.b_dec_D = nn.Parameter(torch.zeros(d_model))
        self.log_threshold_F = nn.Parameter(torch.full((n_latents,), math.log(init_threshold)))

    @property  # type: ignore[override]
    def threshold_F(self) -> torch.Tensor:
        """``theta = exp(log_threshold_F)`` (differentiable); setting it writes ``log(theta)`` (needs > 0)."""
        return self.log_threshold_F.exp()

    @threshold_F.setter
    def threshold_F(self, theta_F: torch.Tensor) -> None:
        if not bool((theta_F > 0).all()):
            raise ValueError("threshold_F: a trainable JumpReLU SAE needs thresholds > 0")
        with torch.no_grad():
            self.log_threshold_F.copy_(theta_F.log())

    def config(self) -> dict[str, Any]:
        return {
            "d_model": self.d_model,
            "n_latents": self.n_latents,
            "l0_coef": self.l0_coef,
            "bandwidth": self.bandwidth,
            "init_threshold": self.init_threshold,
            "init_decoder_norm": self.init_decoder_norm,
            "init_l0": self.init_l0,
            "sparsity_loss": self.sparsity_loss,
            "tanh_scale": self.tanh_scale,
        }

    @torch.no_grad()
    def init_from_data(self, x_ND: torch.Tensor) -> None:
        """Start the encoder bias from training rows (raw space; input scale and ``b_dec_D`` already set).

        With ``init_l0`` set, latent ``f``'s bias becomes ``theta_f - q_f``, ``q_f`` a value of
        ``(x - b_dec) @ W_enc[:, f]`` that exactly ``round(N * init_l0 / F)`` of the ``N`` rows exceed (at
        least 1, at most ``N - 1``; mid-way to the next row's): each latent fires on that many rows.
        Without it, only checks that some pre-activation comes within ``bandwidth / 2`` of its threshold,
        where training can move it.

        Raises:
            ValueError: If ``init_l0`` is set and fewer than 2 rows are given, or if it is unset and no
                pre-activation reaches ``theta - bandwidth / 2`` (naming
                ``model.architecture.init_threshold``).
        """
        n = x_ND.shape[0]
        x_ND = x_ND.float().to(self.W_enc_DF.device) * self.input_scale
        theta_F = self.threshold_F.detach()
        chunk = max(1, (1 << 24) // max(n, 1))  # at most 16M pre-activations at a time
        if self.init_l0 is None:
            reach = theta_F - self.bandwidth / 2
            for lo in range(0, self.n_latents, chunk):
                cols = slice(lo, lo + chunk)
                pre_NC = (x_ND - self.b_dec_D) @ self.W_enc_DF[:, cols] + self.b_enc_F[cols]
                if bool((pre_NC > reach[cols]).any()):
                    return
            raise ValueError(
                f"model.architecture.init_threshold: {self.init_threshold:g} is above every pre-activation "
                f"of {n} training rows (by more than bandwidth / 2): no latent fires and no gradient reaches "
                "the encoder or the thresholds, so the fit would train nothing. Set "
                "model.architecture.init_l0 (e.g. 32) to start the encoder bias from the data, or lower "
                "init_threshold"
            )
        if n < 2:
            raise ValueError(f"model.architecture.init_l0: needs at least 2 training rows, got {n}")
        n_fire = min(max(round(n * self.init_l0 / self.n_latents), 1), n - 1)
        for lo in range(0, self.n_latents, chunk):
            pre_NC = (x_ND - self.b_dec_D) @ self.W_enc_DF[:, lo : lo + chunk]
            top_KC = pre_NC.topk(n_fire + 1, dim=0).values  # descending: n_fire firing rows, then the next
            cut_C = (top_KC[n_fire - 1] + top_KC[n_fire]) / 2  # mid-gap: rounding cannot move a row across
            self.b_enc_F[lo : lo + chunk] = theta_F[lo : lo + chunk] - cut_C

    def _pre_scaled(self, x_BD: torch.Tensor) -> torch.Tensor:
        return (x_BD - self.b_dec_D) @ self.W_enc_DF + self.b_enc_F

    def _encode_scaled(self, x_BD: torch.Tensor) -> torch.Tensor:
        return jumprelu_ste(self._pre_scaled(x_BD), self.threshold_F, self.bandwidth)

    def forward(self, x_BD: torch.Tensor, return_latents: bool = False) -> SAEOutput:
        """Encode and decode ``x_BD`` (raw space); ``loss = mse + l0_coef * penalty`` (module notes)."""
        x_BD = x_BD.float() * self.input_scale
        pre_BF, theta_F = self._pre_scaled(x_BD), self.threshold_F
        latents_BF = jumprelu_ste(pre_BF, theta_F, self.bandwidth)
        recon_BD = latents_BF @ self.W_dec_FD + self.b_dec_D
        mse = (recon_BD - x_BD).pow(2).sum(-1).mean()
        if self.sparsity_loss == "tanh":
            scaled_BF = latents_BF * (self.tanh_scale * self.W_dec_FD.norm(dim=1))
            l0_penalty = torch.tanh(scaled_BF).sum(-1).mean()
        else:
            l0_penalty = step_ste(pre_BF, theta_F, self.bandwidth).sum(-1).mean()
        active_BF = latents_BF > 0
        return SAEOutput(
            recon_BD=recon_BD / self.input_scale,
            latents_BF=latents_BF if return_latents else None,
            loss=mse + self.l0_coef * l0_penalty,
            mse=mse,
            fvu=fvu_of(x_BD, recon_BD),
            l0=active_BF.sum(-1).float().mean(),
            fired_F=active_BF.any(0),
            parts={"l0_penalty": l0_penalty},
        )

    @torch.no_grad()
    def to_inference(self) -> JumpReLUSAE:
        """The plain :class:`JumpReLUSAE` with these weights, thresholds and input scale (same codes)."""
        plain = JumpReLUSAE(self.d_model, self.n_latents).to(self.W_dec_FD.device)
        for name in ("W_enc_DF", "W_dec_FD", "b_enc_F", "b_dec_D"):
            getattr(plain, name).copy_(getattr(self, name))
        plain.threshold_F.copy_(self.threshold_F)
        plain.input_scale.copy_(self.input_scale)
        return plain


SAE_REGISTRY[TrainableJumpReLUSAE.architecture] = TrainableJumpReLUSAE


class JumpReLU(SAEArchitecture):
    """JumpReLU SAE trained with an L0 penalty (see :class:`TrainableJumpReLUSAE`).

    ``L = mean_B ||x - x_hat||^2 + l0_coef * mean_B sum_F H(pre - theta)``, thresholds trained through
    straight-through estimators with a rectangle kernel of width ``bandwidth``.

    Args:
        l0_coef: Weight ``lambda`` of the L0 term.
        bandwidth: Kernel width ``epsilon`` of the threshold's straight-through estimators.
        init_threshold: Every latent's threshold at initialisation.
        init_decoder_norm: Norm of each decoder row at initialisation.
        init_l0: Expected L0 at the start of a fit: each latent's encoder bias starts so that it fires on
            ``init_l0 / n_latents`` of the training rows. ``None`` starts the biases at 0 and every threshold
            at ``init_threshold``, which on centred activations can leave every latent silent (then an error).
        sparsity_loss: ``"step"``: the L0 through the step's straight-through estimator (the paper);
            ``"tanh"``: ``sum_F tanh(tanh_scale * z_f * ||W_dec_f||)``, whose gradient also reaches the
            encoder.
        tanh_scale: Scale ``c`` inside the tanh penalty.

    Raises:
        ValueError: If a setting is out of range (naming its ``model.architecture.*`` key).
    """

    def __init__(
        self,
        l0_coef: float = 1.0,
        bandwidth: float = 0.001,
        init_threshold: float = 0.001,
        init_decoder_norm: float = 0.1,
        init_l0: float | None = None,
        sparsity_loss: str = "step",
        tanh_scale: float = 4.0,
    ):
        check_jumprelu_settings(
            l0_coef, bandwidth, init_threshold, init_decoder_norm, init_l0, sparsity_loss, tanh_scale
        )
        self.l0_coef, self.bandwidth = l0_coef, bandwidth
        self.init_threshold, self.init_decoder_norm = init_threshold, init_decoder_norm
        self.init_l0, self.sparsity_loss, self.tanh_scale = init_l0, sparsity_loss, tanh_scale

    def build(self, d_model: int, n_latents: int, generator: torch.Generator) -> SparseAutoencoder:
        return TrainableJumpReLUSAE(
            d_model,
            n_latents,
            self.l0_coef,
            self.bandwidth,
            self.init_threshold,
            self.init_decoder_norm,
            self.init_l0,
            self.sparsity_loss,
            self.tanh_scale,
            generator,
        )
