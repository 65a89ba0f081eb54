"""TopK sparse autoencoder (Gao et al., 2024) as a plain module, with a sparse decoder and encoder backward.

    x' = input_scale * x
    z  = ReLU(TopK_k((x' - b_dec) @ W_enc_FD.T + b_enc))           keep the k largest pre-activations
    x_hat = (z @ W_dec_FD + b_dec) / input_scale

Only the encoder's forward is a dense matrix product. Everything else touches the ``B * k`` active entries:

* the decoder is a CSR ``(B, F) @ (F, D)`` product over the active rows of ``W_dec_FD`` (on CUDA; an
  ``embedding_bag`` on the CPU); its backward
  gives the k values' gradient (a sampled product, :func:`values_grad_kernel`) and the rows' gradient as a
  CSR ``(F, B) @ (B, D)`` product (:func:`rows_grad`);
* the encoder's backward (:class:`_TopKEncode`) builds ``dL/dW_enc`` with the same CSR product instead of
  multiplying a mostly-zero ``(B, F)`` gradient, and ``dL/db_dec`` as ``-(dL/db_enc) @ W_enc``;
  ``dL/dx`` (another ``embedding_bag``) only when the input itself requires a gradient.

A plain loop does three more dense ``B x F x D`` products per step (decoder forward, decoder backward twice)
plus one for the encoder weight gradient; ``benchmarks/sae_throughput.py`` measures the difference.

AuxK (the paper's dead-latent loss): latents that have not fired for ``dead_after_steps`` training steps are
*dead*; the ``aux_k`` largest pre-activations among them reconstruct the residual ``x - x_hat``, and
``aux_coef`` times that error, normalised by the residual's energy ``sum ||x - x_hat||^2`` (finite for any
batch, one row included), is added to the loss, so dead latents get gradient again. The
encoder starts as the decoder (rows unit norm, ``W_enc_FD = W_dec_FD``), and the decoder rows are kept at
unit norm by the training loop (:meth:`~TopKSAE.remove_parallel_grads` before each step,
:meth:`~TopKSAE.normalize_decoder` after; on CUDA each is one ``torch.compile``d kernel, falling back to the
eager version where compilation is unavailable). Parameters are float32 whatever dtype comes in.

Speed options, all with float32 master weights and float32 gradients:

* ``encoder_dtype="bfloat16"`` casts ``W_enc`` and the input to bfloat16 for the encoder's one dense product
  (and its bias add); top-k runs on the bfloat16 pre-activations (half the memory traffic), the selected
  values come back as float32, and the sparse backward is unchanged (it uses the float32 input).
* With dead latents, AuxK reuses the encoder's pre-activations: one ``(B, n_dead)`` column gather and a top-k
  over the dead columns only (no second full-width top-k, no masked copy), and the two decodes (k and aux_k
  rows per input) are one CSR product on CUDA, so ``W_dec``'s gradient is one SpMM with no second ``(F, D)``
  gradient to add. What AuxK still costs is the sparse work of its ``aux_k`` entries per row, 4x the ``k``
  entries at the defaults: on an H100 at 65,536 latents with half dead, +63% step time (the gathers of the
  decode, of its values gradient and of both weight gradients; ``benchmarks/auxk_overhead.py``).
* ``rank_mean`` (distributed training): maps the AuxK normaliser (this process's residual energy)
  to its mean over the ranks, so that after DDP averages the gradients the AuxK loss is the global batch's.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sae_refusal.sae.base import SAE_REGISTRY, SAEOutput, SparseAutoencoder, fvu_of

__all__ = [
    "ENCODER_DTYPES",
    "VALUES_GRAD_KERNELS",
    "DeadLatentCounter",
    "TopKSAE",
    "rows_grad",
    "sparse_decode",
    "topk_config",
    "values_grad_kernel",
]

#: ``encoder_dtype`` name -> dtype of the encoder's dense product.
ENCODER_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def rows_grad(
    indices_BK: torch.Tensor, weights_BK: torch.Tensor, dense_BD: torch.Tensor, n_rows: int
) -> torch.Tensor:
    """``S.T @ dense_BD`` for the sparse ``S`` (B, n_rows) holding ``weights_BK`` at ``indices_BK``.

    This is the gradient of an ``(n_rows, D)`` matrix whose rows were gathered at ``indices_BK`` and weighted
    by ``weights_BK`` (``dense_BD`` the gradient of the weighted sums), and of the TopK encoder's weight
    (``dense_BD`` the encoder input). Built as one CSR ``(n_rows, B)`` matrix (a stable sort of the ``B * k``
    indices) and one SpMM with a row-major result: on an H100 (B 4096, k 64, 65,536 x 4,096) 1.8 ms, against
    11.7 ms for the COO product (which also copies its column-major result) and 10.2 ms for
    ``embedding_bag``'s own weight backward (``benchmarks/topk_grad_variants.py``).
    """
    n, width = indices_BK.shape
    flat = indices_BK.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=n_rows)
    crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    cols = torch.div(order, width, rounding_mode="floor")  # the batch row of each sorted entry
    return _csr(crow, cols, weights_BK.reshape(-1)[order], (n_rows, n)) @ dense_BD


def _rows_grad_ragged(
    flat_N: torch.Tensor, row_of_N: torch.Tensor, weights_N: torch.Tensor, dense_RD: torch.Tensor, n_rows: int
) -> torch.Tensor:
    """:func:`rows_grad` for entries with any number per dense row (``row_of_N``: each entry's dense row)."""
    order = torch.sort(flat_N, stable=True).indices
    counts = torch.bincount(flat_N, minlength=n_rows)
    crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return _csr(crow, row_of_N[order], weights_N[order], (n_rows, dense_RD.shape[0])) @ dense_RD


def _csr(
    crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """A CSR matrix from arrays valid by construction (invariant checks off, PyTorch's beta notice hidden)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


#: The kernels that can compute a sparse decode's values gradient ``W[flat[n]] . grad[row_of[n]]``.
VALUES_GRAD_KERNELS = ("bag", "sddmm")
_values_grad_kernel = ["sddmm"]


@contextmanager
def values_grad_kernel(name: str) -> Iterator[None]:
    """Sparse decodes built within the block compute their values' gradient with kernel ``name``.

    ``"sddmm"`` (default): a sampled dense-dense product (``grad @ W.T`` sampled at the entries; cuSPARSE's
    SDDMM on CUDA). ``"bag"``: ``embedding_bag``'s per-sample-weight backward, one ``D``-long dot product per
    entry in entry order (the earlier default; the reference of the tests). On an H100 (B 4096, k 64 + aux_k
    256, 65,536 x 4,096, TF32) SDDMM takes 6.2 ms against 8.1 ms for the 1.3 M entries of an AuxK step and
    the whole step 2-4% less; the two agree to 1.2e-6 (``benchmarks/auxk_overhead.py``).

    Raises:
        ValueError: On a name not in :data:`VALUES_GRAD_KERNELS`.
    """
    if name not in VALUES_GRAD_KERNELS:
        raise ValueError(f"values-gradient kernel must be one of {VALUES_GRAD_KERNELS}, got {name!r}")
    previous = _values_grad_kernel[0]
    _values_grad_kernel[0] = name
    try:
        yield
    finally:
        _values_grad_kernel[0] = previous


def _row_of_entries(crow: torch.Tensor, n_entries: int) -> torch.Tensor:
    """The row of each of the ``n_entries`` entries of a CSR matrix (no device sync: the size is given)."""
    rows = torch.arange(crow.numel() - 1, device=crow.device)
    return rows.repeat_interleave(crow.diff(), output_size=n_entries)


def _values_grad(
    grad_RD: torch.Tensor,
    W_FD: torch.Tensor,
    flat_N: torch.Tensor,
    crow: torch.Tensor,
    kernel: str,
) -> torch.Tensor:
    """``W[flat[n]] . grad[r]`` for each entry ``n`` (in row ``r``) of the CSR pattern ``(crow, flat)``."""
    if kernel == "sddmm":
        pattern = _csr(crow, flat_N, grad_RD.new_zeros(flat_N.numel()), (grad_RD.shape[0], W_FD.shape[0]))
        return torch.sparse.sampled_addmm(pattern, grad_RD, W_FD.T, beta=0.0).values()
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        grad_RD,
        W_FD,
        flat_N,
        crow[:-1],
        _row_of_entries(crow, flat_N.numel()),
        0,
        -1,  # mode 0: sum
    )


def _csr_of_rows(values_BK: torch.Tensor, indices_BK: torch.Tensor, n_cols: int) -> torch.Tensor:
    """The ``(B, n_cols)`` CSR matrix with ``values_BK`` at ``indices_BK`` (k per row: no sort needed)."""
    n, width = indices_BK.shape
    crow = torch.arange(0, n * width + 1, width, device=indices_BK.device)
    return _csr(crow, indices_BK.reshape(-1), values_BK.reshape(-1), (n, n_cols))


class _SparseDecode(torch.autograd.Function):
    """``sum_k values[b, k] * W[indices[b, k]]`` as a CSR ``(B, F) @ (F, D)`` SpMM.

    Backward: the values' gradient ``W[indices[b, k]] . grad[b]`` with the kernel of
    :func:`values_grad_kernel` (as built), and ``W``'s with :func:`rows_grad`.
    """

    @staticmethod
    def forward(
        ctx: Any, values_BK: torch.Tensor, indices_BK: torch.Tensor, W_FD: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(values_BK, indices_BK, W_FD)
        ctx.values_kernel = _values_grad_kernel[0]
        return _csr_of_rows(values_BK, indices_BK, W_FD.shape[0]) @ W_FD

    @staticmethod
    def backward(ctx: Any, grad_BD: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        values_BK, indices_BK, W_FD = ctx.saved_tensors
        n, width = indices_BK.shape
        grad_values = grad_W = None
        grad_BD = grad_BD.contiguous()
        if ctx.needs_input_grad[0]:
            crow = torch.arange(0, n * width + 1, width, device=indices_BK.device)
            grad_values = _values_grad(grad_BD, W_FD, indices_BK.reshape(-1), crow, ctx.values_kernel).view(
                n, width
            )
        if ctx.needs_input_grad[2]:
            grad_W = rows_grad(indices_BK, values_BK, grad_BD, W_FD.shape[0])
        return grad_values, None, grad_W


def sparse_decode(values_BK: torch.Tensor, indices_BK: torch.Tensor, W_dec_FD: torch.Tensor) -> torch.Tensor:
    """``sum_k values[b, k] * W_dec[indices[b, k]]`` without a dense ``(B, F)`` matrix.

    On CUDA a CSR product (:class:`_SparseDecode`): on an H100 (B 4096, k 64, 65,536 x 4,096, forward and
    backward) 4.9 ms against 11.7 ms for ``embedding_bag`` (``benchmarks/topk_grad_variants.py``). On the
    CPU, where PyTorch's CSR kernels are the slower ones, ``embedding_bag``.
    """
    if W_dec_FD.is_cuda:
        return _SparseDecode.apply(values_BK.contiguous(), indices_BK.contiguous(), W_dec_FD)
    return F.embedding_bag(indices_BK, W_dec_FD, per_sample_weights=values_BK, mode="sum")


class _SparseDecodePair(torch.autograd.Function):
    """Two sparse decodes with one weight (the k active rows and the AuxK rows) as one CSR product.

    Rows ``[0, B)`` of the ``(2B, F)`` CSR matrix hold the ``k`` entries of each input, rows ``[B, 2B)`` its
    ``a`` auxiliary entries. Backward: one values-gradient kernel for both sets of values, and ``W``'s
    gradient as one SpMM (:func:`_rows_grad_ragged`) instead of two ``(F, D)`` products and their sum.
    """

    @staticmethod
    def forward(
        ctx: Any,
        values_BK: torch.Tensor,
        indices_BK: torch.Tensor,
        aux_values_BA: torch.Tensor,
        aux_indices_BA: torch.Tensor,
        W_FD: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, k = indices_BK.shape
        a = aux_indices_BA.shape[1]
        device = indices_BK.device
        crow = torch.cat(
            [torch.arange(0, n * k, k, device=device), torch.arange(n * k, n * (k + a) + 1, a, device=device)]
        )
        flat = torch.cat([indices_BK.reshape(-1), aux_indices_BA.reshape(-1)])
        weights = torch.cat([values_BK.reshape(-1), aux_values_BA.reshape(-1)])
        out_RD = _csr(crow, flat, weights, (2 * n, W_FD.shape[0])) @ W_FD
        ctx.save_for_backward(weights, flat, crow, W_FD)
        ctx.shape = (n, k, a)
        ctx.values_kernel = _values_grad_kernel[0]
        return out_RD[:n], out_RD[n:]

    @staticmethod
    def backward(
        ctx: Any, grad_BD: torch.Tensor | None, grad_aux_BD: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        weights, flat, crow, W_FD = ctx.saved_tensors
        n, k, a = ctx.shape
        zeros = W_FD.new_zeros(n, W_FD.shape[1])
        grad_RD = torch.cat(
            [zeros if grad_BD is None else grad_BD, zeros if grad_aux_BD is None else grad_aux_BD]
        ).contiguous()
        grad_values = grad_aux = grad_W = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
            grad_w = _values_grad(grad_RD, W_FD, flat, crow, ctx.values_kernel)
            grad_values = grad_w[: n * k].view(n, k)
            grad_aux = grad_w[n * k :].view(n, a)
        if ctx.needs_input_grad[4]:
            row_of = _row_of_entries(crow, flat.numel())
            grad_W = _rows_grad_ragged(flat, row_of, weights, grad_RD, W_FD.shape[0])
        return grad_values, None, grad_aux, None, grad_W


def sparse_decode_pair(
    values_BK: torch.Tensor,
    indices_BK: torch.Tensor,
    aux_values_BA: torch.Tensor,
    aux_indices_BA: torch.Tensor,
    W_dec_FD: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sparse_decode(values, indices, W), sparse_decode(aux_values, aux_indices, W))`` in one product.

    On CUDA one CSR product (:class:`_SparseDecodePair`); on the CPU two ``embedding_bag`` calls.
    """
    if W_dec_FD.is_cuda:
        return _SparseDecodePair.apply(
            values_BK.contiguous(),
            indices_BK.contiguous(),
            aux_values_BA.contiguous(),
            aux_indices_BA.contiguous(),
            W_dec_FD,
        )
    return sparse_decode(values_BK, indices_BK, W_dec_FD), sparse_decode(
        aux_values_BA, aux_indices_BA, W_dec_FD
    )


def _remove_parallel_(W_FD: torch.Tensor, G_FD: torch.Tensor) -> None:
    """``G -= <G_f, W_f> W_f`` for every row ``f`` (eager: a dot pass and an ``addcmul_`` pass)."""
    parallel_F1 = (G_FD * W_FD).sum(-1, keepdim=True)
    G_FD.addcmul_(parallel_F1, W_FD, value=-1.0)


def _normalize_rows_(W_FD: torch.Tensor) -> None:
    """Rescale every row of ``W_FD`` to unit norm, in place."""
    W_FD.div_(W_FD.norm(dim=1, keepdim=True).clamp_min(1e-12))


#: ``torch.compile``d versions of the decoder-norm duties (one kernel each on CUDA), built on first use;
#: ``None`` once compilation failed (then the eager versions run).
_COMPILED: dict[str, Callable[..., None] | None] = {}


def _fused(name: str, eager: Callable[..., None], *tensors: torch.Tensor, force: bool = False) -> None:
    """Run ``eager(*tensors)`` compiled into one kernel (CUDA, or anywhere with ``force``), else eagerly."""
    if not (force or tensors[0].is_cuda) or not hasattr(torch, "compile"):
        eager(*tensors)
        return
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(eager, dynamic=False, fullgraph=True)
    compiled = _COMPILED[name]
    if compiled is None:
        eager(*tensors)
        return
    try:
        compiled(*tensors)
    except Exception as err:  # no Triton / C compiler, or an unsupported backend: the eager version
        warnings.warn(f"torch.compile of {name} failed ({type(err).__name__}: {err}); eager", stacklevel=3)
        _COMPILED[name] = None
        eager(*tensors)


class _TopKEncode(torch.autograd.Function):
    """TopK encoder with a backward that only touches the selected latents.

    Returns the ReLU'd top-k values and their indices, and, when ``dead_F`` marks any latent, the same for
    the ``aux_k`` largest pre-activations among the dead latents (empty tensors otherwise).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x_BD: torch.Tensor,
        b_dec_D: torch.Tensor,
        W_enc_FD: torch.Tensor,
        b_enc_F: torch.Tensor,
        k: int,
        aux_k: int,
        dead_F: torch.Tensor | None,
        encoder_dtype: torch.dtype = torch.float32,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x_BD = x_BD - b_dec_D  # the pre-encoder bias
        if encoder_dtype == torch.float32:
            pre_BF = torch.addmm(b_enc_F, x_BD, W_enc_FD.T)
        else:  # low-precision copies for the one dense product; masters and gradients stay float32
            pre_BF = torch.addmm(
                b_enc_F.to(encoder_dtype), x_BD.to(encoder_dtype), W_enc_FD.to(encoder_dtype).T
            )
        values_BK, indices_BK = pre_BF.topk(k, dim=-1, sorted=False)
        values_BK = values_BK.float().relu()
        dead_idx = None
        if dead_F is not None and aux_k > 0:
            dead_idx = dead_F.nonzero().squeeze(1)
        if dead_idx is not None and dead_idx.numel() > 0:
            # the dead columns of the same pre-activations: a (B, n_dead) gather, top-k over it only
            aux_values_BA, aux_pos_BA = pre_BF.index_select(1, dead_idx).topk(
                min(aux_k, dead_idx.numel()), dim=-1, sorted=False
            )
            aux_indices_BA = dead_idx[aux_pos_BA]
            aux_values_BA = aux_values_BA.float().relu()
        else:
            aux_values_BA = x_BD.new_zeros(x_BD.shape[0], 0)
            aux_indices_BA = indices_BK.new_zeros(x_BD.shape[0], 0)
        ctx.save_for_backward(x_BD, W_enc_FD, values_BK, indices_BK, aux_values_BA, aux_indices_BA)
        ctx.mark_non_differentiable(indices_BK, aux_indices_BA)
        ctx.n_latents = W_enc_FD.shape[0]
        return values_BK, indices_BK, aux_values_BA, aux_indices_BA

    @staticmethod
    def backward(
        ctx: Any,
        grad_values_BK: torch.Tensor,
        _grad_indices: torch.Tensor | None,
        grad_aux_BA: torch.Tensor | None,
        _grad_aux_indices: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        x_BD, W_enc_FD, values_BK, indices_BK, aux_values_BA, aux_indices_BA = ctx.saved_tensors
        grad_BK = grad_values_BK * (values_BK > 0)  # through the ReLU
        indices = indices_BK
        if aux_indices_BA.shape[1] > 0 and grad_aux_BA is not None:
            grad_BK = torch.cat([grad_BK, grad_aux_BA * (aux_values_BA > 0)], dim=1)
            indices = torch.cat([indices_BK, aux_indices_BA], dim=1)
        grad_x = grad_b_dec = grad_W = grad_b = None
        grad_F = None  # sum of the gradient per latent: dL/db_enc, and (times -W_enc) dL/db_dec
        if any(ctx.needs_input_grad[1:4:2]):
            grad_F = grad_BK.new_zeros(ctx.n_latents).index_add_(0, indices.reshape(-1), grad_BK.reshape(-1))
        if ctx.needs_input_grad[0]:  # only when the input itself needs a gradient (e.g. attribution)
            grad_x = F.embedding_bag(indices, W_enc_FD, per_sample_weights=grad_BK, mode="sum")
        if ctx.needs_input_grad[1] and grad_F is not None:
            grad_b_dec = -(grad_F @ W_enc_FD)  # = -sum_b grad_x[b], without the B*k*D gather
        if ctx.needs_input_grad[2]:
            grad_W = rows_grad(indices, grad_BK, x_BD, ctx.n_latents)
        if ctx.needs_input_grad[3]:
            grad_b = grad_F
        return grad_x, grad_b_dec, grad_W, grad_b, None, None, None, None


class DeadLatentCounter:
    """Dead-latent bookkeeping of the AuxK SAEs (:class:`TopKSAE`, BatchTopK).

    A latent is dead once it has not fired for ``dead_after_steps`` training steps; the SAE registers the
    ``steps_since_fired_F`` buffer.
    """

    steps_since_fired_F: torch.Tensor
    dead_after_steps: int

    @property
    def dead_F(self) -> torch.Tensor:
        """Latents that have not fired for ``dead_after_steps`` training steps."""
        return self.steps_since_fired_F >= self.dead_after_steps

    @torch.no_grad()
    def update_firing(self, fired_F: torch.Tensor) -> None:
        """Count one training step: reset the latents that fired, age the others."""
        self.steps_since_fired_F += 1
        self.steps_since_fired_F[fired_F] = 0


def topk_config(sae: Any) -> dict[str, Any]:
    """The keyword arguments that rebuild ``sae``'s :class:`TopKSAE` (or each seed's of a stacked module)."""
    return {
        "d_model": sae.d_model,
        "n_latents": sae.n_latents,
        "k": sae.k,
        "aux_k": sae.aux_k,
        "aux_coef": sae.aux_coef,
        "dead_after_steps": sae.dead_after_steps,
        "encoder_dtype": sae.encoder_dtype,
    }


class TopKSAE(DeadLatentCounter, SparseAutoencoder):
    """TopK sparse autoencoder with AuxK.

    Args:
        d_model: Input width.
        n_latents: Dictionary size.
        k: Active latents per input.
        aux_k: Dead latents used by the AuxK loss (0 disables it).
        aux_coef: Weight of the AuxK loss.
        dead_after_steps: Training steps without firing after which a latent counts as dead.
        generator: RNG of the initial weights (the global RNG is never touched).
        encoder_dtype: Dtype of the encoder's dense product, ``"float32"`` (default; TF32 if the caller
            allows it) or ``"bfloat16"`` (the weights stay float32; only that product and the top-k run in
            bfloat16). Saved in :meth:`config`.

    Attributes:
        rank_mean: ``None`` (default), or a function mapping this process's AuxK normaliser (a
            detached scalar, the local residual energy) to its mean over the data-parallel ranks; with it,
            DDP's gradient average gives the AuxK loss of the global batch, ``sum(aux err) / sum(energy)``.
            A plain attribute: neither a parameter nor a buffer, not in :meth:`config`.

    Raises:
        ValueError: On a ``k``, ``aux_k``, ``aux_coef``, ``dead_after_steps`` or ``encoder_dtype`` out of
            range.
    """

    architecture = "topk"
    unit_norm_decoder = True
    steps_since_fired_F: torch.Tensor

    def __init__(
        self,
        d_model: int,
        n_latents: int,
        k: int,
        aux_k: int = 256,
        aux_coef: float = 1.0 / 32.0,
        dead_after_steps: int = 1000,
        generator: torch.Generator | None = None,
        encoder_dtype: str = "float32",
    ) -> None:
        super().__init__(d_model, n_latents)
        if not 1 <= k <= n_latents:
            raise ValueError(f"k must be in [1, n_latents={n_latents}], got {k}")
        if aux_k < 0 or aux_coef < 0 or dead_after_steps < 1:
            raise ValueError(
                f"aux_k and aux_coef must be >= 0 and dead_after_steps >= 1, got {aux_k}, {aux_coef}, "
                f"{dead_after_steps}"
            )
        if encoder_dtype not in ENCODER_DTYPES:
            raise ValueError(f"encoder_dtype must be one of {sorted(ENCODER_DTYPES)}, got {encoder_dtype!r}")
        self.k, self.aux_k, self.aux_coef, self.dead_after_steps = k, aux_k, aux_coef, dead_after_steps
        self.encoder_dtype = encoder_dtype
        self.rank_mean: Callable[[torch.Tensor], torch.Tensor] | None = None
        W_dec_FD = torch.randn(n_latents, d_model, generator=generator)
        W_dec_FD /= W_dec_FD.norm(dim=1, keepdim=True)
        self.W_dec_FD = nn.Parameter(W_dec_FD)
        self.W_enc_FD = nn.Parameter(W_dec_FD.clone())
        self.b_enc_F = nn.Parameter(torch.zeros(n_latents))
        self.b_dec_D = nn.Parameter(torch.zeros(d_model))
        self.register_buffer("steps_since_fired_F", torch.zeros(n_latents, dtype=torch.long))

    def config(self) -> dict[str, Any]:
        return topk_config(self)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder row to unit norm (one compiled kernel on CUDA: one read, one write)."""
        _fused("normalize_rows", _normalize_rows_, self.W_dec_FD.detach())

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Drop each decoder row's gradient component along the row (one compiled kernel on CUDA)."""
        if self.W_dec_FD.grad is not None:
            _fused("remove_parallel", _remove_parallel_, self.W_dec_FD.detach(), self.W_dec_FD.grad)

    def encode_sparse(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(values_BK, indices_BK)`` of the active latents (normalised space)."""
        x_BD = x_BD.float() * self.input_scale
        values_BK, indices_BK, _, _ = _TopKEncode.apply(
            x_BD,
            self.b_dec_D,
            self.W_enc_FD,
            self.b_enc_F,
            self.k,
            0,
            None,
            ENCODER_DTYPES[self.encoder_dtype],
        )
        return values_BK, indices_BK

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Dense codes ``(B, F)`` (at most k non-zeros per row)."""
        return self._dense(*self.encode_sparse(x_BD))

    def _dense(self, values_BK: torch.Tensor, indices_BK: torch.Tensor) -> torch.Tensor:
        zeros_BF = values_BK.new_zeros(values_BK.shape[0], self.n_latents)
        return zeros_BF.scatter(1, indices_BK, values_BK)

    def decode(self, latents_BF: torch.Tensor) -> torch.Tensor:
        """Raw-space reconstruction of dense codes."""
        return (latents_BF @ self.W_dec_FD + self.b_dec_D) / self.input_scale

    def forward(self, x_BD: torch.Tensor, return_latents: bool = False) -> SAEOutput:
        x_BD = x_BD.float() * self.input_scale
        dead_F = self.dead_F if self.training and self.aux_k > 0 else None
        values_BK, indices_BK, aux_values_BA, aux_indices_BA = _TopKEncode.apply(
            x_BD,
            self.b_dec_D,
            self.W_enc_FD,
            self.b_enc_F,
            self.k,
            self.aux_k,
            dead_F,
            ENCODER_DTYPES[self.encoder_dtype],
        )
        parts: dict[str, torch.Tensor] = {}
        if aux_indices_BA.shape[1] == 0:
            recon_BD = sparse_decode(values_BK, indices_BK, self.W_dec_FD) + self.b_dec_D
            loss = mse = (recon_BD - x_BD).pow(2).sum(-1).mean()
        else:
            decoded_BD, aux_recon_BD = sparse_decode_pair(
                values_BK, indices_BK, aux_values_BA, aux_indices_BA, self.W_dec_FD
            )
            recon_BD = decoded_BD + self.b_dec_D
            mse = (recon_BD - x_BD).pow(2).sum(-1).mean()
            residual_BD = (x_BD - recon_BD).detach()
            # the share of the residual's energy left unexplained (OpenAI's normalised MSE): unlike a
            # variance about the batch mean it stays finite for a batch of one row
            energy = residual_BD.pow(2).sum()
            if self.rank_mean is not None:  # the mean over ranks: DDP's average is then global
                energy = self.rank_mean(energy)
            parts["aux"] = (aux_recon_BD - residual_BD).pow(2).sum() / energy.clamp_min(1e-12)
            loss = mse + self.aux_coef * parts["aux"]
        active_BK = values_BK > 0
        fired_F = torch.zeros(self.n_latents, dtype=torch.bool, device=x_BD.device)
        fired_F[indices_BK[active_BK]] = True
        return SAEOutput(
            recon_BD=recon_BD / self.input_scale,
            latents_BF=self._dense(values_BK, indices_BK) if return_latents else None,
            loss=loss,
            mse=mse,
            fvu=fvu_of(x_BD, recon_BD),
            l0=active_BK.sum(-1).float().mean(),
            fired_F=fired_F,
            parts=parts,
        )


SAE_REGISTRY[TopKSAE.architecture] = TopKSAE
