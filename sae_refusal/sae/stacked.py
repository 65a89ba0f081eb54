"""The TopK SAEs of several seeds as one batched module: a few kernels per step for all seeds, not per seed.

A fit trains one :class:`~sae_refusal.sae.topk.TopKSAE` per seed on the same batches. Nothing couples the
seeds, so :class:`StackedTopKSAE` holds their tensors stacked along a leading seed axis ``S`` and runs them as
one computation with the same per-seed results:

* **Encoder**: one batched product ``(S, B, D) @ (S, D, F)`` (``baddbmm``) of each seed's centred input
  ``x * input_scale_s - b_dec_s`` (its pre-encoder bias), then a top-k over each seed's ``F`` latents. Each
  seed's product is the one :class:`TopKSAE` computes, in the same order (bit for bit on the CPU tested).
  The ``(S, B, F)`` pre-activations of all seeds are alive at once (separate seeds hold one seed's at a
  time): ``(S - 1) * B * F * 4`` bytes more at the peak (2 GiB for 3 seeds at B 4096, F 65,536).

  Not the single ``(B, D) @ (D, S*F)`` GEMM with the pre-encoder bias folded into the encoder bias
  (``(x - b_s) @ W_s.T = x @ W_s.T - W_s b_s``): the folded form subtracts two large numbers where the data
  mean is large against the spread (residual streams), so it loses precision in proportion. Measured in
  float32 against float64 (B 512, D 256, F 2048): the unfolded product's error is 4e-7 of the largest
  pre-activation whatever the offset; the folded one's grows with ``|mean| / |x - mean|``: 6e-7 at 1, 1.3e-6
  at 3, 4.3e-6 at 10, and it scales the same way under TF32 or bfloat16 (rounding errors of ``|x|``, not of
  ``|x - b|``), where it would move top-k selections. The batched product costs the same FLOPs as one GEMM
  and is one kernel; the ``(S, B, D)`` centred input is what each :class:`TopKSAE` keeps for its backward
  anyway.
* **Decoder**: one sparse product for all seeds. The rows of the sparse matrix are ``(seed, batch row)``
  pairs and each seed's latent ``f`` is row ``s * F + f`` of the stacked ``(S * F, D)`` decoder, so
  :func:`~sae_refusal.sae.topk.sparse_decode` / :func:`~sae_refusal.sae.topk.sparse_decode_pair` (AuxK) and
  :func:`~sae_refusal.sae.topk.rows_grad` run unchanged: one CSR SpMM forward, one per-sample-weight kernel
  and one SpMM backward on CUDA (``embedding_bag`` on the CPU).
* **Encoder backward** (:class:`_StackedTopKEncode`): the stacked ``W_enc``'s gradient is one
  :func:`~sae_refusal.sae.topk.rows_grad` over the ``(S * B)`` rows, the encoder biases' one ``index_add``,
  each seed's ``b_dec`` gradient one batched ``-(dL/db_enc_s) @ W_enc_s``.
* **AuxK** per seed exactly as :class:`TopKSAE`: each seed's own dead latents, ``aux_k`` of them per row
  (fewer when fewer are dead: the AuxK rows of a seed are padded with zero-weight entries, which add
  nothing and get no gradient), its own residual-energy normaliser; ``rank_mean`` (DDP) maps the
  ``(S,)`` vector of normalisers at once (one all-reduce for all seeds).
* **Decoder-norm duties** on the stacked ``(S * F, D)`` decoder: one (compiled, on CUDA) kernel each.
* **Bookkeeping**: ``steps_since_fired_SF`` per seed, ``input_scale_S`` per seed (a fit gives the seeds the
  same scale; different ones work as well).

:meth:`StackedTopKSAE.forward` returns one :class:`~sae_refusal.sae.base.SAEOutput` per seed, as each seed's
:class:`TopKSAE` would. :meth:`StackedTopKSAE.seed_saes` gives every seed as a plain :class:`TopKSAE` whose
parameters and buffers are *views* of the stacked tensors: reading one sees the current weights, writing one
(``set_input_scale``, ``b_dec_D.copy_``, ``update_firing``) writes the stacked tensors; they are not trained
through (``requires_grad`` off) and ``save`` writes an ordinary export. Moving a view to another device makes
a detached copy, as ``.to`` does.

Adam is elementwise, so one optimiser over the stacked parameters makes the per-seed updates of one Adam over
the seeds' separate parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sae_refusal.sae.base import SAEOutput
from sae_refusal.sae.topk import (
    ENCODER_DTYPES,
    TopKSAE,
    _fused,
    _normalize_rows_,
    _remove_parallel_,
    rows_grad,
    sparse_decode,
    sparse_decode_pair,
    topk_config,
)

__all__ = ["StackedTopKSAE"]


def _seed_offsets(n_seeds: int, n_latents: int, device: torch.device) -> torch.Tensor:
    """``(S, 1, 1)`` offsets ``s * F``: a seed's latent ``f`` is row ``s * F + f`` of the stacked weights."""
    return (torch.arange(n_seeds, device=device) * n_latents).view(n_seeds, 1, 1)


class _StackedTopKEncode(torch.autograd.Function):
    """The TopK encoder of every seed (:class:`~sae_refusal.sae.topk._TopKEncode` with a seed axis).

    Returns each seed's ReLU'd top-k values and their (per-seed) indices ``(S, B, K)``, and its AuxK values
    and indices ``(S, B, A)`` (``A`` the most AuxK latents of any seed; a seed with fewer dead latents is
    padded with value 0 at index 0, so the padding adds nothing to a decode and gets no gradient).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x_SBD: torch.Tensor,
        b_dec_SD: torch.Tensor,
        W_enc_SFD: torch.Tensor,
        b_enc_SF: torch.Tensor,
        k: int,
        aux_k: int,
        dead_SF: torch.Tensor | None,
        n_dead: list[int],
        encoder_dtype: torch.dtype = torch.float32,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        xc_SBD = x_SBD - b_dec_SD.unsqueeze(1)  # each seed's pre-encoder bias
        if encoder_dtype == torch.float32:
            pre_SBF = torch.baddbmm(b_enc_SF.unsqueeze(1), xc_SBD, W_enc_SFD.transpose(1, 2))
        else:  # low-precision copies for the one batched product; masters and gradients stay float32
            pre_SBF = torch.baddbmm(
                b_enc_SF.unsqueeze(1).to(encoder_dtype),
                xc_SBD.to(encoder_dtype),
                W_enc_SFD.to(encoder_dtype).transpose(1, 2),
            )
        values_SBK, indices_SBK = pre_SBF.topk(k, dim=-1, sorted=False)
        values_SBK = values_SBK.float().relu()
        n_seeds, n_rows, _ = x_SBD.shape
        counts = [min(aux_k, n) for n in n_dead]
        width = max(counts, default=0)
        aux_values_SBA = xc_SBD.new_zeros(n_seeds, n_rows, width)
        aux_indices_SBA = indices_SBK.new_zeros(n_seeds, n_rows, width)
        if width > 0 and dead_SF is not None:
            dead_latents = dead_SF.nonzero()[:, 1].split(n_dead)  # each seed's dead latents, ascending
            for s, (dead_idx, count) in enumerate(zip(dead_latents, counts, strict=True)):
                if count == 0:
                    continue
                # the dead columns of the seed's pre-activations: a (B, n_dead) gather, top-k over it only
                values_BA, pos_BA = pre_SBF[s].index_select(1, dead_idx).topk(count, dim=-1, sorted=False)
                aux_values_SBA[s, :, :count] = values_BA.float().relu()
                aux_indices_SBA[s, :, :count] = dead_idx[pos_BA]
        ctx.save_for_backward(xc_SBD, W_enc_SFD, values_SBK, indices_SBK, aux_values_SBA, aux_indices_SBA)
        ctx.mark_non_differentiable(indices_SBK, aux_indices_SBA)
        return values_SBK, indices_SBK, aux_values_SBA, aux_indices_SBA

    @staticmethod
    def backward(
        ctx: Any,
        grad_values_SBK: torch.Tensor,
        _grad_indices: torch.Tensor | None,
        grad_aux_SBA: torch.Tensor | None,
        _grad_aux_indices: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        xc_SBD, W_enc_SFD, values_SBK, indices_SBK, aux_values_SBA, aux_indices_SBA = ctx.saved_tensors
        n_seeds, n_latents, d_model = W_enc_SFD.shape
        grad_SBK = grad_values_SBK * (values_SBK > 0)  # through the ReLU
        indices = indices_SBK
        if aux_indices_SBA.shape[2] > 0 and grad_aux_SBA is not None:
            # the padding has value 0: no gradient through the ReLU
            grad_SBK = torch.cat([grad_SBK, grad_aux_SBA * (aux_values_SBA > 0)], dim=2)
            indices = torch.cat([indices_SBK, aux_indices_SBA], dim=2)
        # rows (seed, batch row) of the stacked (S * F, D) weight
        n_rows = n_seeds * xc_SBD.shape[1]
        flat_RW = (indices + _seed_offsets(n_seeds, n_latents, indices.device)).reshape(n_rows, -1)
        grad_RW = grad_SBK.reshape(n_rows, -1)
        grad_x = grad_b_dec = grad_W = grad_b = None
        grad_SF = None  # sum of the gradient per latent: dL/db_enc, and (times -W_enc) dL/db_dec
        if any(ctx.needs_input_grad[1:4:2]):
            grad_SF = (
                grad_RW.new_zeros(n_seeds * n_latents)
                .index_add_(0, flat_RW.reshape(-1), grad_RW.reshape(-1))
                .view(n_seeds, n_latents)
            )
        if ctx.needs_input_grad[0]:  # only when the input itself needs a gradient
            grad_x = F.embedding_bag(
                flat_RW, W_enc_SFD.reshape(-1, d_model), per_sample_weights=grad_RW, mode="sum"
            ).view_as(xc_SBD)
        if ctx.needs_input_grad[1] and grad_SF is not None:
            grad_b_dec = -torch.bmm(grad_SF.unsqueeze(1), W_enc_SFD).squeeze(1)
        if ctx.needs_input_grad[2]:
            grad_W = rows_grad(
                flat_RW, grad_RW, xc_SBD.reshape(n_rows, d_model), n_seeds * n_latents
            ).reshape(n_seeds, n_latents, d_model)
        if ctx.needs_input_grad[3]:
            grad_b = grad_SF
        return grad_x, grad_b_dec, grad_W, grad_b, None, None, None, None, None


class StackedTopKSAE(nn.Module):
    """The :class:`~sae_refusal.sae.topk.TopKSAE` of ``S`` seeds trained as one module (see the module notes).

    Build it from the seeds' SAEs (:meth:`from_saes`), which copies their tensors; the SAEs must share their
    configuration.

    Args:
        n_seeds: Number of seeds ``S``.
        d_model: Input width.
        n_latents: Dictionary size of each seed.
        k: Active latents per input.
        aux_k: Dead latents used by the AuxK loss (0 disables it).
        aux_coef: Weight of the AuxK loss.
        dead_after_steps: Training steps without firing after which a latent counts as dead.
        encoder_dtype: ``"float32"`` or ``"bfloat16"``, as :class:`TopKSAE`.

    Attributes:
        rank_mean: ``None``, or a function mapping this process's AuxK normalisers (the ``(S,)``
            residual energies, detached) to their means over the data-parallel ranks (as
            :attr:`TopKSAE.rank_mean`, for all seeds in one call).

    Raises:
        ValueError: On a setting out of range (as :class:`TopKSAE`) or ``n_seeds < 1``.
    """

    W_enc_SFD: nn.Parameter
    W_dec_SFD: nn.Parameter
    b_enc_SF: nn.Parameter
    b_dec_SD: nn.Parameter
    input_scale_S: torch.Tensor
    steps_since_fired_SF: torch.Tensor

    def __init__(
        self,
        n_seeds: int,
        d_model: int,
        n_latents: int,
        k: int,
        aux_k: int = 256,
        aux_coef: float = 1.0 / 32.0,
        dead_after_steps: int = 1000,
        encoder_dtype: str = "float32",
    ) -> None:
        super().__init__()
        if n_seeds < 1:
            raise ValueError(f"n_seeds must be >= 1, got {n_seeds}")
        # the settings' own checks, on a weightless instance
        with torch.device("meta"):
            TopKSAE(d_model, n_latents, k, aux_k, aux_coef, dead_after_steps, encoder_dtype=encoder_dtype)
        self.k, self.aux_k, self.aux_coef, self.dead_after_steps = k, aux_k, aux_coef, dead_after_steps
        self.encoder_dtype = encoder_dtype
        self.rank_mean: Callable[[torch.Tensor], torch.Tensor] | None = None
        S, F_, D = n_seeds, n_latents, d_model
        self.W_enc_SFD = nn.Parameter(torch.zeros(S, F_, D))
        self.W_dec_SFD = nn.Parameter(torch.zeros(S, F_, D))
        self.b_enc_SF = nn.Parameter(torch.zeros(S, F_))
        self.b_dec_SD = nn.Parameter(torch.zeros(S, D))
        self.register_buffer("input_scale_S", torch.ones(S))
        self.register_buffer("steps_since_fired_SF", torch.zeros(S, F_, dtype=torch.long))

    @classmethod
    def from_saes(cls, saes: Iterable[TopKSAE], n_seeds: int | None = None) -> StackedTopKSAE:
        """Stack the seeds' SAEs (in order), copying their parameters and buffers.

        Args:
            saes: The seeds' SAEs, sharing one configuration.
            n_seeds: How many ``saes`` yields; with it, ``saes`` is read one at a time (a generator then
                keeps one seed's weights alive besides the stack), without it it is listed first.

        Raises:
            ValueError: If ``saes`` is empty, holds something other than a :class:`TopKSAE`, the SAEs'
                configurations differ, or their number is not ``n_seeds``.
        """
        if n_seeds is None:
            saes = list(saes)
            n_seeds = len(saes)
        stacked: StackedTopKSAE | None = None
        config: dict[str, Any] = {}
        count = 0
        for s, sae in enumerate(saes):
            if type(sae) is not TopKSAE:
                raise ValueError(f"stacked seeds must be TopKSAE, got {type(sae).__name__}")
            if stacked is None:
                config = sae.config()
                stacked = cls(n_seeds, **config)
            elif sae.config() != config:
                raise ValueError(f"stacked seeds must share one configuration: {sae.config()} != {config}")
            if s >= n_seeds:
                raise ValueError(f"from_saes: more SAEs than n_seeds={n_seeds}")
            stacked.load_seed(s, sae)
            count += 1
        if stacked is None or count != n_seeds:
            raise ValueError(f"from_saes: expected {n_seeds} TopKSAEs, got {count}")
        return stacked

    @property
    def n_seeds(self) -> int:
        """Number of seeds ``S``."""
        return int(self.W_dec_SFD.shape[0])

    @property
    def n_latents(self) -> int:
        """Dictionary size ``F`` of each seed."""
        return int(self.W_dec_SFD.shape[1])

    @property
    def d_model(self) -> int:
        """Input width ``D``."""
        return int(self.W_dec_SFD.shape[2])

    def config(self) -> dict[str, Any]:
        """Each seed's :meth:`TopKSAE.config`."""
        return topk_config(self)

    def _seed_tensors(self) -> dict[str, tuple[torch.Tensor, bool]]:
        """:class:`TopKSAE` tensor name -> (stacked tensor, whether it is a parameter there)."""
        return {
            "input_scale": (self.input_scale_S, False),
            "W_dec_FD": (self.W_dec_SFD, True),
            "W_enc_FD": (self.W_enc_SFD, True),
            "b_enc_F": (self.b_enc_SF, True),
            "b_dec_D": (self.b_dec_SD, True),
            "steps_since_fired_F": (self.steps_since_fired_SF, False),
        }

    @torch.no_grad()
    def load_seed(self, seed_index: int, sae: TopKSAE) -> None:
        """Copy ``sae``'s parameters and buffers into slot ``seed_index``."""
        state = sae.state_dict()
        for name, (stacked, _) in self._seed_tensors().items():
            stacked[seed_index].copy_(state[name])

    def seed_saes(self) -> list[TopKSAE]:
        """Every seed as a :class:`TopKSAE` over views of the stacked tensors (see the module notes).

        No weight is copied. The views are kept and handed out again while they still view this module's
        tensors (a move of this module to another device, or of a view, builds new ones). Each gets this
        module's training mode and ``rank_mean`` on every call.
        """
        saes: list[TopKSAE] = self.__dict__.get("_views") or []
        if not self._views_current(saes):
            saes = [self._seed_view(s) for s in range(self.n_seeds)]
            self.__dict__["_views"] = saes
        for sae in saes:
            sae.rank_mean = self.rank_mean
            sae.train(self.training)
        return saes

    def _views_current(self, saes: list[TopKSAE]) -> bool:
        """Whether ``saes`` are views of this module's tensors (one per seed, each where it should be)."""
        if len(saes) != self.n_seeds:
            return False
        for s, sae in enumerate(saes):
            own = {**sae._parameters, **sae._buffers}
            for name, (stacked, _) in self._seed_tensors().items():
                view = own.get(name)
                expected = stacked.data_ptr() + s * stacked.stride(0) * stacked.element_size()
                if view is None or view.device != stacked.device or view.data_ptr() != expected:
                    return False
        return True

    def _seed_view(self, s: int) -> TopKSAE:
        """Seed ``s`` as a :class:`TopKSAE` whose tensors view this module's (no weight of its own)."""
        with torch.device("meta"):  # no weights: they are replaced by views below
            sae = TopKSAE(
                self.d_model,
                self.n_latents,
                self.k,
                self.aux_k,
                self.aux_coef,
                self.dead_after_steps,
                encoder_dtype=self.encoder_dtype,
            )
        for name, (stacked, is_parameter) in self._seed_tensors().items():
            view = stacked.detach()[s]
            if is_parameter:
                sae._parameters[name] = nn.Parameter(view, requires_grad=False)
            else:
                sae._buffers[name] = view
        return sae

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state.pop("_views", None)  # views of this module's tensors: rebuilt on demand, never saved
        return state

    # ------------------------------------------------------------------ dead latents
    @property
    def dead_SF(self) -> torch.Tensor:
        """Each seed's latents that have not fired for ``dead_after_steps`` training steps."""
        return self.steps_since_fired_SF >= self.dead_after_steps

    @torch.no_grad()
    def update_firing(self, fired_SF: torch.Tensor) -> None:
        """Count one training step for every seed: reset the latents that fired, age the others."""
        self.steps_since_fired_SF += 1
        self.steps_since_fired_SF[fired_SF] = 0

    # ------------------------------------------------------------------ decoder norm
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder row of every seed to unit norm (one compiled kernel on CUDA)."""
        _fused("normalize_rows", _normalize_rows_, self.W_dec_SFD.detach().view(-1, self.d_model))

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Drop each decoder row's gradient component along the row, every seed (one kernel on CUDA)."""
        grad = self.W_dec_SFD.grad
        if grad is not None:
            W_RD = self.W_dec_SFD.detach().view(-1, self.d_model)
            _fused("remove_parallel", _remove_parallel_, W_RD, grad.view(-1, self.d_model))

    # ------------------------------------------------------------------ forward
    def forward(self, x_BD: torch.Tensor, return_latents: bool = False) -> list[SAEOutput]:
        """Every seed's :meth:`TopKSAE.forward` on ``x_BD`` (raw space), as one computation.

        Args:
            x_BD: Raw-space inputs, shared by the seeds.
            return_latents: Also build each seed's dense ``(B, F)`` codes.

        Returns:
            One :class:`~sae_refusal.sae.base.SAEOutput` per seed, in order.
        """
        S, F_, D = self.n_seeds, self.n_latents, self.d_model
        scale_S11 = self.input_scale_S.view(S, 1, 1)
        x_SBD = x_BD.float().unsqueeze(0) * scale_S11  # each seed's normalised input
        n_rows = S * x_BD.shape[0]
        dead_SF = self.dead_SF if self.training and self.aux_k > 0 else None
        n_dead = dead_SF.sum(1).tolist() if dead_SF is not None else [0] * S
        values_SBK, indices_SBK, aux_values_SBA, aux_indices_SBA = _StackedTopKEncode.apply(
            x_SBD,
            self.b_dec_SD,
            self.W_enc_SFD,
            self.b_enc_SF,
            self.k,
            self.aux_k,
            dead_SF,
            n_dead,
            ENCODER_DTYPES[self.encoder_dtype],
        )
        offsets_S11 = _seed_offsets(S, F_, x_BD.device)
        flat_SBK = indices_SBK + offsets_S11  # rows of the stacked (S * F, D) decoder
        flat_RK = flat_SBK.reshape(n_rows, -1)
        W_dec_RD = self.W_dec_SFD.view(S * F_, D)
        has_aux = [min(self.aux_k, n) > 0 for n in n_dead]
        if not any(has_aux):
            decoded_RD = sparse_decode(values_SBK.reshape(n_rows, -1), flat_RK, W_dec_RD)
            aux_recon_SBD = None
        else:
            flat_RA = (aux_indices_SBA + offsets_S11).reshape(n_rows, -1)
            decoded_RD, aux_recon_RD = sparse_decode_pair(
                values_SBK.reshape(n_rows, -1),
                flat_RK,
                aux_values_SBA.reshape(n_rows, -1),
                flat_RA,
                W_dec_RD,
            )
            aux_recon_SBD = aux_recon_RD.view(x_SBD.shape)
        recon_SBD = decoded_RD.view(x_SBD.shape) + self.b_dec_SD.unsqueeze(1)
        err_SB = (recon_SBD - x_SBD).pow(2).sum(-1)
        mse_S = err_SB.mean(-1)
        aux_S = None
        if aux_recon_SBD is not None:
            residual_SBD = (x_SBD - recon_SBD).detach()
            # each seed's share of its residual's energy left unexplained (as TopKSAE)
            energy_S = residual_SBD.pow(2).sum((1, 2))
            if self.rank_mean is not None:  # the means over ranks: DDP's average is then global
                energy_S = self.rank_mean(energy_S)
            aux_S = (aux_recon_SBD - residual_SBD).pow(2).sum((1, 2)) / energy_S.clamp_min(1e-12)
        active_SBK = values_SBK > 0
        # active entries per latent, > 0 where it fired (an index_add: no host sync, unlike a masked index)
        hits_R = torch.zeros(S * F_, dtype=torch.int32, device=x_BD.device)
        hits_R.index_add_(0, flat_SBK.reshape(-1), active_SBK.reshape(-1).to(torch.int32))
        fired_SF = (hits_R > 0).view(S, F_)
        l0_S = active_SBK.sum(-1).float().mean(-1)
        with torch.no_grad():
            total_S = (x_SBD - x_SBD.mean(1, keepdim=True)).pow(2).sum((1, 2)).clamp_min(1e-12)
        fvu_S = err_SB.sum(1) / total_S
        recon_raw_SBD = recon_SBD / scale_S11
        outputs = []
        for s in range(S):
            parts: dict[str, torch.Tensor] = {}
            loss = mse_S[s]
            if aux_S is not None and has_aux[s]:
                parts["aux"] = aux_S[s]
                loss = loss + self.aux_coef * parts["aux"]
            latents_BF = None
            if return_latents:
                latents_BF = values_SBK.new_zeros(x_BD.shape[0], F_).scatter(1, indices_SBK[s], values_SBK[s])
            outputs.append(
                SAEOutput(
                    recon_BD=recon_raw_SBD[s],
                    latents_BF=latents_BF,
                    loss=loss,
                    mse=mse_S[s],
                    fvu=fvu_S[s],
                    l0=l0_S[s],
                    fired_F=fired_SF[s],
                    parts=parts,
                )
            )
        return outputs
