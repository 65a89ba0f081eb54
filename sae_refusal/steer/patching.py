"""Attribution patching, checked against real activation patching, for one clean / corrupted prompt pair.

A *clean* prompt (one the refusal-token model refuses with its category's token) and a *corrupted* one (a
benign prompt) are compared through a scalar ``metric`` of the answer logits, the logits at the last prompt
position (after the chat template's generation prompt); :func:`logit_diff_metric` gives the usual one,
``logit[category token] - logit[respond]``. For each *unit* of the residual stream after decoder block
``layer``:

* **attribution** (one forward and one backward of the clean prompt): ``(e_corr - e_clean) . dM/de`` at
  ``e_clean``, the first-order estimate of what replacing the unit's value would do;
* **activation patching** (the ground truth): the clean prompt runs with the unit replaced by its value in
  the corrupted run, and the effect is ``M(patched) - M(clean)``.

Units (``unit=``):

* ``"dims"``: each residual dimension at the answer position (``D`` units).
* ``"positions"``: the whole residual vector at each of the last ``n_positions`` positions (``P`` units).
  The two prompts may differ in length, so positions are **aligned from the end**: unit ``j`` is position
  ``T - P + j`` of each prompt (unit ``P - 1`` the answer position). The chat template's suffix (e.g.
  ``<|im_end|>\\n<|im_start|>assistant\\n``) is shared, so these positions hold the same tokens in both
  prompts as long as ``P`` does not reach into the user messages; past that, the alignment pairs different
  tokens and the patch moves content, not just context.
* ``"latents"``: each SAE latent at the answer position. With ``z = enc(x)`` the residual becomes
  ``x' = dec(z') + (x - dec(z))``: the reconstruction error is kept, so with ``z' = z`` nothing changes.
  The attribution pass builds ``x + (dec(z) - dec(z).detach())`` (value exactly ``x``, bit for bit; the
  gradient flows into ``z``), a patch adds ``dec(z') - dec(z) = (z' - z) W_dec / input_scale``
  (:meth:`~sae_refusal.sae.base.SparseAutoencoder.decode_direction`; every SAE of the package decodes
  affinely, so the decoder bias cancels exactly).

Design notes:

* **One hook mechanism.** Every pass places its hooks through
  :func:`sae_refusal.llm.hooks.residual_hooks`: a reading hook keeps the layer's hidden states, the
  attribution hook swaps them for a leaf tensor that requires a gradient (or routes the answer position
  through the SAE codes), the patching hook writes each row's patched values.
* **Gradients only where asked.** Attribution runs with autograd on (also inside ``torch.inference_mode``),
  the model (and SAE) in eval mode and every parameter's ``requires_grad`` off; both are restored after,
  so only the residual (or the codes) gets a gradient and no parameter's ``.grad`` is touched.
* **Batched patching from a shared prefix.** A patch at the last ``S`` positions cannot change earlier
  positions (causal attention), so the clean prompt's prefix runs once into a KV cache that is repeated to
  ``batch_size`` rows; each forward then runs only the last ``S`` tokens, one patched variant per row, and
  the cache is cropped back to the prefix after it. Row 0 of every forward is the unpatched clean prompt, so
  effects are differences within one forward (every forward has the same shape): a variant equal to the
  clean values has an effect of exactly 0. ``reuse_prefix=False`` runs whole prompts instead (the oracle).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from scipy.stats import spearmanr
from torch import Tensor, nn

from sae_refusal.llm.batched import forward_parameters
from sae_refusal.llm.hooks import StepContext, StopForward, residual_hooks
from sae_refusal.llm.layers import d_model as model_width
from sae_refusal.llm.layers import input_device, num_layers, validate_layers
from sae_refusal.sae.base import SparseAutoencoder

__all__ = [
    "UNITS",
    "MetricFn",
    "PatchingComparison",
    "Unit",
    "activation_patching_effects",
    "attribution_scores",
    "compare_patching",
    "logit_diff_metric",
    "residual_at",
    "residual_patch_effects",
    "spearman",
]

#: What one attribution / patching score is about (see the module docstring).
Unit = Literal["dims", "positions", "latents"]
#: The accepted values of ``unit``.
UNITS: tuple[str, ...] = ("dims", "positions", "latents")
#: ``metric(answer_logits_BV) -> metric_B``: a scalar per row of the logits at the answer position.
MetricFn = Callable[[Tensor], Tensor]


def logit_diff_metric(target_id: int, respond_id: int) -> MetricFn:
    """``logit[target_id] - logit[respond_id]`` at the answer position, in float32.

    Args:
        target_id: Token id of the category's refusal token.
        respond_id: Token id of the respond token.

    Raises:
        ValueError: If an id is not an integer >= 0, or the two are equal.
    """
    for key, value in (("target_id", target_id), ("respond_id", respond_id)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{key}: expected a token id >= 0, got {value!r}")
    if target_id == respond_id:
        raise ValueError(f"target_id: equals respond_id ({respond_id}); the metric would be 0 everywhere")

    def metric(logits_BV: Tensor) -> Tensor:
        if logits_BV.ndim != 2 or logits_BV.shape[1] <= max(target_id, respond_id):
            raise ValueError(
                f"target_id/respond_id: ids {target_id}, {respond_id} do not index logits of shape "
                f"{tuple(logits_BV.shape)}"
            )
        return logits_BV[:, target_id].float() - logits_BV[:, respond_id].float()

    return metric


def spearman(x_N: Tensor, y_N: Tensor) -> float:
    """Spearman rank correlation (ties get their average rank); NaN if either side is constant.

    Raises:
        ValueError: If the two are not 1-D of one length.
    """
    if x_N.ndim != 1 or x_N.shape != y_N.shape:
        raise ValueError(f"x_N, y_N: expected two 1-D tensors of one length, got {x_N.shape}, {y_N.shape}")
    x, y = x_N.detach().double().cpu(), y_N.detach().double().cpu()
    if x.numel() < 2 or bool((x == x[0]).all()) or bool((y == y[0]).all()):
        return math.nan
    return float(spearmanr(x.numpy(), y.numpy()).statistic)


@dataclass(frozen=True)
class PatchingComparison:
    """Attribution against activation patching for one prompt pair and one kind of unit.

    Attributes:
        unit: ``"dims"``, ``"positions"`` or ``"latents"``.
        step: Interpolation step of the patches (1 = the corrupted value itself).
        units_U: Indices of the compared units (dims, positions from ``T - P``, or latents).
        attribution_U: Attribution scores, times ``step`` (the first-order estimate of each patch).
        patching_U: Activation-patching effects ``M(patched) - M(clean)``.
        clean_metric: ``M`` on the clean prompt.
        corrupt_metric: ``M`` on the corrupted prompt.
    """

    unit: Unit
    step: float
    units_U: Tensor
    attribution_U: Tensor
    patching_U: Tensor
    clean_metric: float
    corrupt_metric: float

    @property
    def n_units(self) -> int:
        """How many units were compared."""
        return int(self.units_U.numel())

    @property
    def spearman(self) -> float:
        """Rank correlation of attribution and patching effects (NaN if either is constant)."""
        return spearman(self.attribution_U, self.patching_U)


# ----------------------------------------------------------------------------------------- validation


def _prompt_ids(ids: Tensor, key: str) -> Tensor:
    """One prompt's token ids as a ``(T,)`` long tensor."""
    if not isinstance(ids, Tensor) or ids.dtype.is_floating_point or ids.dtype.is_complex:
        raise ValueError(
            f"{key}: expected an integer tensor of token ids, got {getattr(ids, 'dtype', ids)!r}"
        )
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1 or ids.numel() == 0 or ids.dtype == torch.bool:
        raise ValueError(
            f"{key}: expected one prompt's token ids, shape (T,) or (1, T), got {tuple(ids.shape)}"
        )
    return ids.long()


def _layer(model: nn.Module, layer: int) -> int:
    (index,) = validate_layers(layer, num_layers(model), key="layer")
    return index


@dataclass(frozen=True)
class _Units:
    """A validated kind of unit: how many there are, how many last positions they touch."""

    unit: Unit
    n_positions: int
    sae: SparseAutoencoder | None

    @property
    def n_suffix(self) -> int:
        """The last positions a patch of this kind rewrites."""
        return self.n_positions if self.unit == "positions" else 1

    def count(self, d_model: int) -> int:
        if self.unit == "dims":
            return d_model
        if self.unit == "positions":
            return self.n_positions
        return self.latent_sae.n_latents

    @property
    def latent_sae(self) -> SparseAutoencoder:
        """The SAE of ``unit="latents"``."""
        if self.sae is None:
            raise ValueError("sae: unit='latents' needs the SAE trained at this layer")
        return self.sae


def _units(unit: str, sae: SparseAutoencoder | None, n_positions: int, d_model: int, shortest: int) -> _Units:
    if unit not in UNITS:
        raise ValueError(f"unit: expected one of {UNITS}, got {unit!r}")
    if unit == "positions" and (
        isinstance(n_positions, bool) or not isinstance(n_positions, int) or not 1 <= n_positions <= shortest
    ):
        raise ValueError(f"n_positions: expected an integer in [1, {shortest}] (the shorter prompt's length)")
    if unit == "latents":
        if sae is None:
            raise ValueError("sae: unit='latents' needs the SAE trained at this layer")
        if sae.d_model != d_model:
            raise ValueError(f"sae: its width {sae.d_model} != the model's width {d_model}")
    return _Units(cast(Unit, unit), n_positions, sae)


def _unit_index(units: Sequence[int] | Tensor | None, count: int) -> Tensor:
    if units is None:
        return torch.arange(count)
    index = torch.as_tensor(units)
    if index.dtype.is_floating_point or index.dtype == torch.bool or index.ndim != 1 or index.numel() == 0:
        raise ValueError(f"units: expected a non-empty 1-D list of integer indices, got {units!r}")
    index = index.long()
    if int(index.min()) < 0 or int(index.max()) >= count:
        raise ValueError(f"units: indices must lie in [0, {count - 1}]")
    if index.unique().numel() != index.numel():
        raise ValueError("units: indices repeat")
    return index


def _metric(metric_fn: MetricFn, logits_BV: Tensor, n_rows: int) -> Tensor:
    metric_B = metric_fn(logits_BV)
    if not isinstance(metric_B, Tensor) or tuple(metric_B.shape) != (n_rows,):
        raise ValueError(
            "metric_fn: must map answer logits (B, V) to a (B,) tensor, got "
            f"{getattr(metric_B, 'shape', type(metric_B).__name__)}"
        )
    return metric_B


# ------------------------------------------------------------------------------------- model passes


def _answer_kwargs(model: nn.Module) -> dict[str, Any]:
    """Keyword arguments that make a forward compute the last position's logits only (where supported)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters(model) else {}


def _answer_logits(model: nn.Module, ids_BT: Tensor, **kwargs: Any) -> Tensor:
    out = model(input_ids=ids_BT, **_answer_kwargs(model), **kwargs)
    return out.logits[:, -1]


@contextmanager
def _eval_mode(*modules: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextmanager
def _residual_gradients(*modules: nn.Module) -> Iterator[None]:
    """Autograd on, every parameter's ``requires_grad`` off (restored after), modules in eval mode."""
    params = [p for module in modules for p in module.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        with _eval_mode(*modules), torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def residual_at(model: nn.Module, ids: Tensor, layer: int) -> Tensor:
    """One prompt's ``(T, D)`` residual stream after block ``layer`` (the forward stops there).

    Raises:
        ValueError: On bad ``ids`` or ``layer``.
    """
    ids_T, index = _prompt_ids(ids, "ids"), _layer(model, layer)
    kept: list[Tensor] = []

    def read(hidden_BTD: Tensor, _ctx: StepContext) -> None:
        kept.append(hidden_BTD[0].detach().clone())
        raise StopForward

    with torch.no_grad(), _eval_mode(model), residual_hooks(model, {index: read}):
        model(input_ids=ids_T[None].to(input_device(model)), use_cache=False)
    return kept[0]


def _run(model: nn.Module, ids_T: Tensor, layer: int, metric_fn: MetricFn) -> tuple[Tensor, float]:
    """``(residual_TD after block layer, metric)`` of one unpatched prompt."""
    kept: list[Tensor] = []

    def read(hidden_BTD: Tensor, _ctx: StepContext) -> None:
        kept.append(hidden_BTD[0].detach().clone())

    with torch.no_grad(), _eval_mode(model), residual_hooks(model, {layer: read}):
        logits_1V = _answer_logits(model, ids_T[None].to(input_device(model)), use_cache=False)
    return kept[0], float(_metric(metric_fn, logits_1V, 1)[0])


def _codes(sae: SparseAutoencoder, x_ND: Tensor) -> Tensor:
    return sae.encode(x_ND.float().to(sae.W_dec_FD.device))


def _residual_grad(model: nn.Module, ids_T: Tensor, layer: int, metric_fn: MetricFn) -> tuple[Tensor, Tensor]:
    """``(residual_TD, dM/d residual_TD)`` of one prompt at ``layer``."""
    leaves: list[Tensor] = []

    def as_leaf(hidden_BTD: Tensor, _ctx: StepContext) -> Tensor:
        leaves.append(hidden_BTD.detach().clone().requires_grad_(True))
        return leaves[0]

    with _residual_gradients(model), residual_hooks(model, {layer: as_leaf}):
        metric = _metric(metric_fn, _answer_logits(model, ids_T[None].to(input_device(model))), 1)
        (grad_1TD,) = torch.autograd.grad(metric.sum(), leaves[0])
    return leaves[0][0].detach(), grad_1TD[0].float()


def _latent_grad(
    model: nn.Module, ids_T: Tensor, layer: int, metric_fn: MetricFn, sae: SparseAutoencoder
) -> tuple[Tensor, Tensor]:
    """``(z_F, dM/dz_F)`` of the SAE codes at the answer position, reconstruction error kept."""
    leaves: list[Tensor] = []

    def through_codes(hidden_BTD: Tensor, _ctx: StepContext) -> Tensor:
        x_D = hidden_BTD[0, -1].detach().float()
        z_1F = _codes(sae, x_D[None]).detach().requires_grad_(True)
        leaves.append(z_1F)
        recon_1D = sae.decode(z_1F).to(x_D.device)
        x_new_D = x_D + (recon_1D - recon_1D.detach())[0]  # exactly x; the gradient flows into z
        return torch.cat([hidden_BTD[:, :-1], x_new_D.to(hidden_BTD.dtype)[None, None]], dim=1)

    with _residual_gradients(model, sae), residual_hooks(model, {layer: through_codes}):
        metric = _metric(metric_fn, _answer_logits(model, ids_T[None].to(input_device(model))), 1)
        (grad_1F,) = torch.autograd.grad(metric.sum(), leaves[0])
    return leaves[0][0].detach(), grad_1F[0]


class _SuffixRunner:
    """Runs ``n_rows`` copies of one prompt, adding per-row deltas to the last ``n_suffix`` residual vectors.

    Row 0 stays unpatched. The prefix runs once into a KV cache repeated to ``n_rows`` rows (see the module
    docstring); models whose forward takes no cache run whole prompts.
    """

    def __init__(self, model: nn.Module, ids_T: Tensor, n_suffix: int, n_rows: int, reuse_prefix: bool):
        self.model, self.n_suffix, self.n_rows = model, n_suffix, n_rows
        ids_T = ids_T.to(input_device(model))
        self.ids_BT = ids_T[None].expand(n_rows, -1)
        self.cache: dict[str, Any] = {}
        self.n_prefix = n_prefix = ids_T.shape[0] - n_suffix
        parameters = forward_parameters(model)
        keyword = next((k for k in ("cache", "past_key_values") if k in parameters), None)
        if not reuse_prefix or n_prefix == 0 or keyword is None:
            return
        from transformers import DynamicCache

        cache = DynamicCache()
        model(input_ids=ids_T[None, :n_prefix], use_cache=True, **{keyword: cache}, **_answer_kwargs(model))
        cache.batch_repeat_interleave(n_rows)
        self.cache = {keyword: cache}
        self.ids_BT = self.ids_BT[:, n_prefix:]

    def metrics(self, layer: int, deltas_USD: Tensor, metric_fn: MetricFn) -> Tensor:
        """``(n_rows,)`` metrics; rows ``1..U`` get ``deltas_USD`` added, the others stay clean."""
        n_values, n_suffix = deltas_USD.shape[0], self.n_suffix

        def add(hidden_BTD: Tensor, _ctx: StepContext) -> Tensor:
            out_BTD = hidden_BTD.clone()
            rows = slice(1, 1 + n_values)
            out_BTD[rows, -n_suffix:] = (
                out_BTD[rows, -n_suffix:].float() + deltas_USD.to(out_BTD.device)
            ).to(out_BTD.dtype)
            return out_BTD

        with residual_hooks(self.model, {layer: add}):
            logits_BV = _answer_logits(self.model, self.ids_BT, use_cache=bool(self.cache), **self.cache)
        if self.cache:
            cache = next(iter(self.cache.values()))
            cache.crop(-n_suffix)
            if cache.get_seq_length() != self.n_prefix:
                raise RuntimeError(f"KV cache holds {cache.get_seq_length()} positions, not {self.n_prefix}")
        return _metric(metric_fn, logits_BV, self.n_rows)


def residual_patch_effects(
    model: nn.Module,
    clean_ids: Tensor,
    layer: int,
    metric_fn: MetricFn,
    deltas_USD: Tensor,
    *,
    batch_size: int = 64,
    reuse_prefix: bool = True,
) -> Tensor:
    """Metric change of the clean prompt when ``deltas`` are added to its last ``S`` residual vectors.

    Variant ``u`` adds ``deltas_USD[u]`` to positions ``T - S .. T - 1`` after block ``layer``; the effect is
    ``M(variant) - M(clean)``. A patch to a value ``e'`` is the delta ``e' - e_clean``: entries it leaves
    alone get an exact 0 added, so they keep the very values of the forward they run in (a KV-cache suffix
    forward and a whole-prompt forward round differently). ``batch_size - 1`` variants share one forward with
    the clean row.

    Args:
        model: A Hugging Face causal LM.
        clean_ids: The clean prompt's token ids, ``(T,)`` or ``(1, T)``.
        layer: The residual stream after this decoder block.
        metric_fn: Answer logits ``(B, V)`` -> ``(B,)``.
        deltas_USD: ``U`` additions to the last ``S`` positions (``1 <= S <= T``).
        batch_size: Rows per forward (>= 2).
        reuse_prefix: Run the unpatched prefix once into a KV cache (exact under causal attention).

    Returns:
        ``(U,)`` float32 effects on the CPU.

    Raises:
        ValueError: On a bad argument (named in the message).
    """
    ids_T, index = _prompt_ids(clean_ids, "clean_ids"), _layer(model, layer)
    if deltas_USD.ndim != 3 or deltas_USD.shape[0] == 0 or not 1 <= deltas_USD.shape[1] <= ids_T.shape[0]:
        raise ValueError(
            f"deltas_USD: expected (U >= 1, 1 <= S <= {ids_T.shape[0]}, D), got {tuple(deltas_USD.shape)}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(
            f"batch_size: expected an integer >= 2 (the clean row plus a variant), got {batch_size!r}"
        )
    n_rows = min(batch_size, deltas_USD.shape[0] + 1)
    effects: list[Tensor] = []
    with torch.no_grad(), _eval_mode(model):
        runner = _SuffixRunner(model, ids_T, deltas_USD.shape[1], n_rows, reuse_prefix)
        for start in range(0, deltas_USD.shape[0], n_rows - 1):
            chunk_USD = deltas_USD[start : start + n_rows - 1]
            metric_B = runner.metrics(index, chunk_USD, metric_fn).float()
            effects.append((metric_B[1 : 1 + chunk_USD.shape[0]] - metric_B[0]).cpu())
    return torch.cat(effects)


# ----------------------------------------------------------------------------------- unit arithmetic


@dataclass(frozen=True)
class _Pair:
    """Both prompts' residual streams at the layer and their metrics."""

    clean_T: Tensor
    corrupt_T: Tensor
    clean_TD: Tensor
    corrupt_TD: Tensor
    clean_metric: float
    corrupt_metric: float


def _pair(
    model: nn.Module,
    clean_ids: Tensor,
    corrupt_ids: Tensor,
    layer: int,
    metric_fn: MetricFn,
    unit: str,
    sae: SparseAutoencoder | None,
    n_positions: int,
) -> tuple[int, _Pair, _Units]:
    clean_T, corrupt_T = _prompt_ids(clean_ids, "clean_ids"), _prompt_ids(corrupt_ids, "corrupt_ids")
    index = _layer(model, layer)
    shortest = min(clean_T.shape[0], corrupt_T.shape[0])
    spec = _units(unit, sae, n_positions, model_width(model), shortest)
    clean_TD, clean_metric = _run(model, clean_T, index, metric_fn)
    corrupt_TD, corrupt_metric = _run(model, corrupt_T, index, metric_fn)
    return index, _Pair(clean_T, corrupt_T, clean_TD, corrupt_TD, clean_metric, corrupt_metric), spec


def _attribution(model: nn.Module, layer: int, pair: _Pair, spec: _Units, metric_fn: MetricFn) -> Tensor:
    if spec.unit == "latents":
        z_F, grad_F = _latent_grad(model, pair.clean_T, layer, metric_fn, spec.latent_sae)
        with torch.no_grad():
            z_corrupt_F = _codes(spec.latent_sae, pair.corrupt_TD[-1:])[0]
        return ((z_corrupt_F - z_F) * grad_F).cpu()
    clean_TD, grad_TD = _residual_grad(model, pair.clean_T, layer, metric_fn)
    P = spec.n_suffix
    delta_PD = pair.corrupt_TD[-P:].float() - clean_TD[-P:].float()
    scores_PD = delta_PD * grad_TD[-P:]
    return (scores_PD[-1] if spec.unit == "dims" else scores_PD.sum(dim=-1)).cpu()


def _deltas(pair: _Pair, spec: _Units, units_U: Tensor, step: float) -> Tensor:
    """``(U, S, D)`` float32 deltas of the last ``S`` positions: one unit moved ``step`` toward corrupt."""
    P, n_units = spec.n_suffix, units_U.shape[0]
    clean_PD, corrupt_PD = pair.clean_TD[-P:].float(), pair.corrupt_TD[-P:].float()
    rows_U = torch.arange(n_units)
    if spec.unit == "positions":
        deltas_UPD = clean_PD.new_zeros(n_units, P, clean_PD.shape[-1])
        deltas_UPD[rows_U, units_U] = step * (corrupt_PD[units_U] - clean_PD[units_U])
        return deltas_UPD
    if spec.unit == "dims":
        deltas_UD = clean_PD.new_zeros(n_units, clean_PD.shape[-1])
        deltas_UD[rows_U, units_U] = step * (corrupt_PD[0, units_U] - clean_PD[0, units_U])
        return deltas_UD[:, None]
    sae = spec.latent_sae
    z_2F = _codes(sae, torch.cat([clean_PD, corrupt_PD]))
    units_dev = units_U.to(z_2F.device)
    dz_UF = z_2F.new_zeros(n_units, sae.n_latents)
    dz_UF[rows_U.to(z_2F.device), units_dev] = step * (z_2F[1, units_dev] - z_2F[0, units_dev])
    # dec(z') + (x - dec(z)) = x + dec(z') - dec(z): the decoders are affine, so the bias cancels exactly
    return sae.decode_direction(dz_UF)[:, None]


def _check_step(step: float) -> float:
    if isinstance(step, bool) or not isinstance(step, int | float) or not math.isfinite(step) or step == 0:
        raise ValueError(f"step: expected a finite non-zero number, got {step!r}")
    return float(step)


def _patching(
    model: nn.Module,
    layer: int,
    pair: _Pair,
    spec: _Units,
    metric_fn: MetricFn,
    units_U: Tensor,
    step: float,
    batch_size: int,
    reuse_prefix: bool,
) -> Tensor:
    with torch.no_grad():
        deltas_USD = _deltas(pair, spec, units_U, step)
    return residual_patch_effects(
        model, pair.clean_T, layer, metric_fn, deltas_USD, batch_size=batch_size, reuse_prefix=reuse_prefix
    )


# ----------------------------------------------------------------------------------------- public API


def attribution_scores(
    model: nn.Module,
    clean_ids: Tensor,
    corrupt_ids: Tensor,
    layer: int,
    metric_fn: MetricFn,
    unit: Unit = "dims",
    *,
    sae: SparseAutoencoder | None = None,
    n_positions: int = 6,
) -> Tensor:
    """Attribution scores ``(e_corr - e_clean) . dM/de`` at ``e_clean``, one per unit.

    Args:
        model: A Hugging Face causal LM (eval mode is set for the call and restored after).
        clean_ids: The clean prompt's token ids, ``(T,)`` or ``(1, T)``.
        corrupt_ids: The corrupted prompt's token ids (any length; positions align from the end).
        layer: The residual stream after this decoder block.
        metric_fn: Answer logits ``(B, V)`` -> ``(B,)``, e.g. :func:`logit_diff_metric`.
        unit: ``"dims"`` (``D`` scores), ``"positions"`` (``n_positions``) or ``"latents"`` (``F``).
        sae: The SAE trained at ``layer`` (``unit="latents"`` only).
        n_positions: How many last positions ``unit="positions"`` scores.

    Returns:
        ``(U,)`` float32 scores on the CPU.

    Raises:
        ValueError: On a bad argument (named in the message).
    """
    index, pair, spec = _pair(model, clean_ids, corrupt_ids, layer, metric_fn, unit, sae, n_positions)
    return _attribution(model, index, pair, spec, metric_fn)


def activation_patching_effects(
    model: nn.Module,
    clean_ids: Tensor,
    corrupt_ids: Tensor,
    layer: int,
    metric_fn: MetricFn,
    unit: Unit = "dims",
    *,
    sae: SparseAutoencoder | None = None,
    n_positions: int = 6,
    units: Sequence[int] | Tensor | None = None,
    step: float = 1.0,
    batch_size: int = 64,
    reuse_prefix: bool = True,
) -> Tensor:
    """Activation-patching effects ``M(clean with one unit patched) - M(clean)``, one per unit.

    Args:
        model: A Hugging Face causal LM (eval mode is set for the call and restored after).
        clean_ids: The clean prompt's token ids, ``(T,)`` or ``(1, T)``.
        corrupt_ids: The corrupted prompt's token ids (any length; positions align from the end).
        layer: The residual stream after this decoder block.
        metric_fn: Answer logits ``(B, V)`` -> ``(B,)``.
        unit: ``"dims"``, ``"positions"`` or ``"latents"`` (see the module docstring).
        sae: The SAE trained at ``layer`` (``unit="latents"`` only).
        n_positions: How many last positions ``unit="positions"`` patches.
        units: Indices of the units to patch (default: all).
        step: Patch ``e_clean + step (e_corr - e_clean)`` (on the codes for latents); 1 is the real patch,
            a small step the regime where attribution is exact to first order.
        batch_size: Rows per forward (the clean row plus ``batch_size - 1`` variants).
        reuse_prefix: Run the unpatched prefix once into a KV cache.

    Returns:
        ``(len(units),)`` float32 effects on the CPU, in ``units`` order.

    Raises:
        ValueError: On a bad argument (named in the message).
    """
    step = _check_step(step)
    index, pair, spec = _pair(model, clean_ids, corrupt_ids, layer, metric_fn, unit, sae, n_positions)
    units_U = _unit_index(units, spec.count(pair.clean_TD.shape[-1]))
    return _patching(model, index, pair, spec, metric_fn, units_U, step, batch_size, reuse_prefix)


def compare_patching(
    model: nn.Module,
    clean_ids: Tensor,
    corrupt_ids: Tensor,
    layer: int,
    metric_fn: MetricFn,
    unit: Unit = "dims",
    *,
    sae: SparseAutoencoder | None = None,
    n_positions: int = 6,
    units: Sequence[int] | Tensor | None = None,
    step: float = 1.0,
    batch_size: int = 64,
) -> PatchingComparison:
    """Attribution and activation patching of the same units of one prompt pair, side by side.

    Arguments as in :func:`activation_patching_effects`; the attribution scores are multiplied by ``step``
    (the first-order estimate of a patch of that size).

    Raises:
        ValueError: On a bad argument (named in the message).
    """
    step = _check_step(step)
    index, pair, spec = _pair(model, clean_ids, corrupt_ids, layer, metric_fn, unit, sae, n_positions)
    units_U = _unit_index(units, spec.count(pair.clean_TD.shape[-1]))
    attribution_U = _attribution(model, index, pair, spec, metric_fn)[units_U] * step
    patching_U = _patching(model, index, pair, spec, metric_fn, units_U, step, batch_size, True)
    return PatchingComparison(
        unit=spec.unit,
        step=step,
        units_U=units_U,
        attribution_U=attribution_U,
        patching_U=patching_U,
        clean_metric=pair.clean_metric,
        corrupt_metric=pair.corrupt_metric,
    )
