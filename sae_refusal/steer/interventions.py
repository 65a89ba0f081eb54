"""Interventions on the residual stream: steering (residual or SAE latent), ablation (latents, a direction).

Each intervention is a hook function ``fn(hidden_BTD, ctx)`` for :func:`sae_refusal.llm.hooks.residual_hooks`
and :class:`Intervention` applies one or several of them to a model inside a ``with`` block, so the same edit
reaches a plain forward (log-likelihood scoring), ``generate`` (prefill and every decode step, with or without
the KV cache) and the patching passes.

Design notes:

* **Per row.** Vectors may be one ``(D,)`` for the batch or ``(B, D)``, alphas a float or ``(B,)``: each
  prompt can get its own category vector, strength and sign (the conditional gates need this). A row whose
  alpha is 0 (or whose vector is all zero) is never touched: its hidden states stay the very same values, so
  it is bit-identical to the unsteered model, and so is a whole batch at alpha 0.
* **Positions.** ``"all"`` (default), ``"prompt"``, ``"generated"`` or an int ``k`` (tokens whose index among
  the row's real tokens is >= k). Padding is never edited.
* **SAE latents keep the error term.** ``x' = dec(f(enc(x))) + (x - dec(enc(x)))``, so an edit ``f`` that
  changes nothing changes nothing, whatever the SAE's reconstruction error.
* **Static generation.** Every intervention here has a ``static_key`` and follows the rules of
  :class:`~sae_refusal.llm.hooks.StaticStep`, so the fast engine (:mod:`sae_refusal.llm.engine`) can capture
  its decode steps as one CUDA graph: when ``ctx.static`` is set, the per-batch tensors (vectors, alphas,
  latent indices) go through ``ctx.static.hold`` and the edit is a ``torch.where`` over every position
  (untouched positions keep their very values) instead of an early return or a gather of the edited ones.
  The prefill of a latent edit still gathers the edited positions (the arithmetic of the unsteered path); a
  captured decode step encodes every row, which equals the gathered rows up to floating-point rounding
  where some rows of a step are not edited.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from contextlib import ExitStack

import torch
from torch import Tensor, nn

from sae_refusal.llm.hooks import ResidualFn, StepContext, residual_hooks
from sae_refusal.llm.layers import num_layers, validate_layers
from sae_refusal.sae.base import SparseAutoencoder
from sae_refusal.steer.positions import Positions, check_positions

__all__ = [
    "DirectionAblation",
    "Intervention",
    "LatentAblation",
    "LatentSteering",
    "Positions",
    "ResidualSteering",
    "check_positions",
    "position_mask",
]


def position_mask(ctx: StepContext, positions: Positions) -> Tensor:
    """``(B, T)`` True where an intervention with these ``positions`` acts (never on padding)."""
    if positions == "all":
        return ctx.real_BT
    if positions == "prompt":
        return ctx.prompt_BT
    if positions == "generated":
        return ctx.real_BT & ctx.generated_BT
    if isinstance(positions, int) and not isinstance(positions, bool):
        return ctx.real_BT & (ctx.token_index_BT >= positions)
    raise ValueError(f"positions: unknown value {positions!r}")


def _rows(value: float | Sequence[float] | Tensor, n_rows: int, what: str) -> Tensor:
    tensor = torch.as_tensor(value, dtype=torch.float32)
    if tensor.ndim == 0:
        return tensor.expand(n_rows)
    if tensor.ndim != 1 or tensor.shape[0] != n_rows:
        raise ValueError(
            f"{what}: expected a number or {n_rows} values (one per row), got shape {tuple(tensor.shape)}"
        )
    return tensor


class _RowEdit:
    """Shared per-row bookkeeping: which rows and positions an edit touches."""

    def __init__(self, alpha: float | Sequence[float] | Tensor, positions: Positions) -> None:
        check_positions(positions)
        self.alpha = torch.as_tensor(alpha, dtype=torch.float32)
        if self.alpha.ndim > 1:
            raise ValueError(
                f"alpha: expected a number or one value per row, got shape {tuple(self.alpha.shape)}"
            )
        if not torch.isfinite(self.alpha).all():
            raise ValueError("alpha: values must be finite")
        self.positions = positions

    def alpha_B(self, n_rows: int, device: torch.device) -> Tensor:
        return _rows(self.alpha, n_rows, "alpha").to(device)

    def where_BT(self, ctx: StepContext, active_B: Tensor) -> Tensor:
        return position_mask(ctx, self.positions) & active_B[:, None]

    @staticmethod
    def held(ctx: StepContext, make: Callable[[], Tensor]) -> Tensor:
        """``make()``, through ``ctx.static.hold`` in a static generator's step (fixed address)."""
        return make() if ctx.static is None else ctx.static.hold(make)

    @property
    def static_key(self) -> Hashable:
        """What a captured decode step bakes in besides the held tensors (see ``StaticStep``)."""
        return (type(self).__name__, self.positions)


class ResidualSteering(_RowEdit):
    """``a <- a + alpha * v`` on the residual stream after the block (CAA steering).

    Args:
        vector: ``(D,)`` for every row or ``(B, D)`` one per row (e.g. each prompt's category vector).
        alpha: A float or ``(B,)``; positive adds the vector, negative subtracts it.
        positions: ``"all"``, ``"prompt"``, ``"generated"`` or a token index (see :func:`position_mask`).
        unit_norm: Scale each vector to norm 1 first (then alpha is in units of the residual norm, e.g.
            the layer's mean activation norm times a fraction).
    """

    def __init__(
        self,
        vector: Tensor,
        alpha: float | Sequence[float] | Tensor = 1.0,
        positions: Positions = "all",
        unit_norm: bool = False,
    ) -> None:
        super().__init__(alpha, positions)
        if vector.ndim not in (1, 2):
            raise ValueError(f"vector: expected (D,) or (B, D), got shape {tuple(vector.shape)}")
        vector = vector.detach().float()
        if unit_norm:
            vector = vector / vector.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        self.vector = vector

    def _delta_BD(self, hidden_BTD: Tensor) -> Tensor:
        n_rows, device = hidden_BTD.shape[0], hidden_BTD.device
        vector = self.vector.to(device)
        if vector.shape[-1] != hidden_BTD.shape[-1]:
            raise ValueError(f"vector width {vector.shape[-1]} != the model's width {hidden_BTD.shape[-1]}")
        v_BD = vector.expand(n_rows, -1) if vector.ndim == 1 else vector
        if v_BD.shape[0] != n_rows:
            raise ValueError(f"vector: {v_BD.shape[0]} rows for a batch of {n_rows}")
        return self.alpha_B(n_rows, device)[:, None] * v_BD

    def __call__(self, hidden_BTD: Tensor, ctx: StepContext) -> Tensor | None:
        delta_BD = self.held(ctx, lambda: self._delta_BD(hidden_BTD))
        where_BT = self.where_BT(ctx, (delta_BD != 0).any(dim=1))
        if ctx.static is None and not bool(where_BT.any()):
            return None
        steered = hidden_BTD + delta_BD[:, None, :].to(hidden_BTD.dtype)
        return torch.where(where_BT[..., None], steered, hidden_BTD)


class _LatentEdit(_RowEdit):
    """``x' = dec(f(z)) + (x - dec(z))`` with ``z = enc(x)`` on the chosen positions of active rows."""

    def __init__(
        self, sae: SparseAutoencoder, alpha: float | Sequence[float] | Tensor, positions: Positions
    ) -> None:
        super().__init__(alpha, positions)
        self.sae = sae

    def _edit(self, z_NF: Tensor, rows_N: Tensor, alpha_B: Tensor, edit: Tensor) -> Tensor:
        raise NotImplementedError

    def _edit_tensor(self, n_rows: int, device: torch.device) -> Tensor:
        """The per-batch tensor :meth:`_edit` reads (a latent vector, latent indices), on ``device``."""
        raise NotImplementedError

    def _active_B(self, alpha_B: Tensor) -> Tensor:
        return alpha_B != 0

    @property
    def static_key(self) -> Hashable:
        """Also the SAE itself: a captured step reads its weights where they are."""
        return (type(self).__name__, self.positions, self.sae)

    def _apply(self, x_ND: Tensor, rows_N: Tensor, alpha_B: Tensor, edit: Tensor) -> Tensor:
        z_NF = self.sae.encode(x_ND)
        recon_ND = self.sae.decode(z_NF)
        return self.sae.decode(self._edit(z_NF, rows_N, alpha_B, edit)) + (x_ND - recon_ND)

    def __call__(self, hidden_BTD: Tensor, ctx: StepContext) -> Tensor | None:
        n_rows, n_cols, width = hidden_BTD.shape
        device = hidden_BTD.device
        if width != self.sae.d_model:
            raise ValueError(f"the SAE's width {self.sae.d_model} != the model's width {width}")
        alpha_B = self.held(ctx, lambda: self.alpha_B(n_rows, device))
        edit = self.held(ctx, lambda: self._edit_tensor(n_rows, device))
        where_BT = self.where_BT(ctx, self._active_B(alpha_B))
        if self.sae.W_dec_FD.device != device:  # an SAE loaded on the CPU, a model on a GPU: follow the layer
            self.sae.to(device)
        if ctx.static is not None and not ctx.static.prefill:  # capturable: every position, then a where
            rows_N = torch.arange(n_rows, device=device).repeat_interleave(n_cols)
            x_ND = hidden_BTD.reshape(n_rows * n_cols, width).float()
            edited_BTD = self._apply(x_ND, rows_N, alpha_B, edit).reshape(hidden_BTD.shape)
            return torch.where(where_BT[..., None], edited_BTD.to(hidden_BTD.dtype), hidden_BTD)
        if not bool(where_BT.any()):
            return None
        rows_N, cols_N = where_BT.nonzero(as_tuple=True)
        x_ND = hidden_BTD[rows_N, cols_N].float()
        edited_ND = self._apply(x_ND, rows_N, alpha_B, edit)
        out = hidden_BTD.clone()
        out[rows_N, cols_N] = edited_ND.to(hidden_BTD.dtype)
        return out


class LatentSteering(_LatentEdit):
    """SAE-latent steering: ``z <- z + alpha * v_z`` (e.g. a SAS vector), reconstruction error kept.

    Args:
        sae: The SAE trained at the hooked layer.
        vector: ``(F,)`` or ``(B, F)`` latent-space direction(s).
        alpha: A float or ``(B,)``.
        positions: See :func:`position_mask`.
        clamp: Keep edited codes >= 0 (codes of ReLU / TopK SAEs are never negative).
    """

    def __init__(
        self,
        sae: SparseAutoencoder,
        vector: Tensor,
        alpha: float | Sequence[float] | Tensor = 1.0,
        positions: Positions = "all",
        clamp: bool = False,
    ) -> None:
        super().__init__(sae, alpha, positions)
        if vector.ndim not in (1, 2) or vector.shape[-1] != sae.n_latents:
            raise ValueError(
                f"vector: expected (F,) or (B, F) with F = {sae.n_latents}, got {tuple(vector.shape)}"
            )
        self.vector = vector.detach().float()
        self.clamp = clamp

    @property
    def static_key(self) -> Hashable:
        return (type(self).__name__, self.positions, self.sae, self.clamp)

    def _edit_tensor(self, n_rows: int, device: torch.device) -> Tensor:
        if self.vector.ndim == 2 and self.vector.shape[0] != n_rows:
            raise ValueError(f"vector: {self.vector.shape[0]} rows for a batch of {n_rows}")
        return self.vector.to(device)

    def _edit(self, z_NF: Tensor, rows_N: Tensor, alpha_B: Tensor, edit: Tensor) -> Tensor:
        v_NF = edit.expand(rows_N.shape[0], -1) if edit.ndim == 1 else edit[rows_N]
        edited = z_NF + alpha_B[rows_N, None] * v_NF
        return edited.clamp_min(0.0) if self.clamp else edited


class LatentAblation(_LatentEdit):
    """Zero chosen SAE latents, reconstruction error kept: ``z[:, latents] <- (1 - alpha) z[:, latents]``.

    Args:
        sae: The SAE trained at the hooked layer.
        latents: Latent indices to ablate.
        alpha: 1 ablates fully (default), 0 is the identity; a float or ``(B,)``.
        positions: See :func:`position_mask`.
    """

    def __init__(
        self,
        sae: SparseAutoencoder,
        latents: Sequence[int] | Tensor,
        alpha: float | Sequence[float] | Tensor = 1.0,
        positions: Positions = "all",
    ) -> None:
        super().__init__(sae, alpha, positions)
        index = torch.as_tensor(latents, dtype=torch.long).reshape(-1)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= sae.n_latents):
            raise ValueError(f"latents: indices must lie in [0, {sae.n_latents - 1}]")
        self.latents = index

    def _edit_tensor(self, n_rows: int, device: torch.device) -> Tensor:
        return self.latents.to(device)

    def _edit(self, z_NF: Tensor, rows_N: Tensor, alpha_B: Tensor, edit: Tensor) -> Tensor:
        keep_NF = torch.ones_like(z_NF)
        keep_NF[:, edit] = 1.0 - alpha_B[rows_N, None]
        return z_NF * keep_NF


class DirectionAblation(_RowEdit):
    """Project a direction out of the residual stream: ``a <- a - alpha (a . d) d`` with ``|d| = 1``.

    Register it at every layer from ``l`` on (:meth:`Intervention.ablate_direction` does) to remove the
    direction from the stream the later blocks read.

    Args:
        direction: ``(D,)`` or ``(B, D)``; normalised to unit norm.
        alpha: 1 removes the component fully; a float or ``(B,)``.
        positions: See :func:`position_mask`.
    """

    def __init__(
        self, direction: Tensor, alpha: float | Sequence[float] | Tensor = 1.0, positions: Positions = "all"
    ) -> None:
        super().__init__(alpha, positions)
        if direction.ndim not in (1, 2):
            raise ValueError(f"direction: expected (D,) or (B, D), got shape {tuple(direction.shape)}")
        direction = direction.detach().float()
        self.direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def __call__(self, hidden_BTD: Tensor, ctx: StepContext) -> Tensor | None:
        n_rows, device = hidden_BTD.shape[0], hidden_BTD.device

        def rows_BD() -> Tensor:
            direction = self.direction.to(device)
            return direction.expand(n_rows, -1) if direction.ndim == 1 else direction

        d_BD = self.held(ctx, rows_BD)
        alpha_B = self.held(ctx, lambda: self.alpha_B(n_rows, device))
        where_BT = self.where_BT(ctx, alpha_B != 0)
        if ctx.static is None and not bool(where_BT.any()):
            return None
        x = hidden_BTD.float()
        coef_BT = torch.einsum("btd,bd->bt", x, d_BD) * alpha_B[:, None]
        projected = (x - coef_BT[..., None] * d_BD[:, None, :]).to(hidden_BTD.dtype)
        return torch.where(where_BT[..., None], projected, hidden_BTD)


class _Chain:
    """Several hook functions at one layer, applied in order."""

    def __init__(self, fns: list[ResidualFn]) -> None:
        self.fns = fns

    @property
    def static_key(self) -> Hashable:
        """The functions' keys; ``None`` (not capturable) when one of them has none."""
        keys = [getattr(fn, "static_key", None) for fn in self.fns]
        return None if any(key is None for key in keys) else tuple(keys)

    def __call__(self, hidden_BTD: Tensor, ctx: StepContext) -> Tensor | None:
        current, changed = hidden_BTD, False
        for fn in self.fns:
            new = fn(current, ctx)
            if new is not None:
                current, changed = new, True
        return current if changed else None


class Intervention:
    """Apply interventions to a model inside a ``with`` block (one block per batch of prompts).

    Example::

        v = SteeringVectors.load(run / "vectors").vector("Requests with safety concerns")
        with Intervention(model, {18: ResidualSteering(v, alpha=4.0)}):
            out = model.generate(**batch, max_new_tokens=32)

    Args:
        model: Any Hugging Face causal LM (PEFT-wrapped too).
        edits: ``{layer: fn}`` or ``{layer: [fn, ...]}`` (applied in order); layers follow the project
            convention (the residual stream after block ``l``).
    """

    def __init__(self, model: nn.Module, edits: Mapping[int, ResidualFn | Sequence[ResidualFn]]) -> None:
        self.model = model
        n_layers = num_layers(model)
        self.fns: dict[int, ResidualFn] = {}
        for layer, value in edits.items():
            (index,) = validate_layers(layer, n_layers, key="layer")
            fns = list(value) if isinstance(value, Sequence) else [value]
            previous = self.fns.get(index)
            if previous is not None:
                fns = [previous, *fns]
            self.fns[index] = fns[0] if len(fns) == 1 else _Chain(fns)
        self._stack: ExitStack | None = None

    @classmethod
    def ablate_direction(
        cls, model: nn.Module, direction: Tensor, from_layer: int, alpha: float | Tensor = 1.0
    ) -> Intervention:
        """Project ``direction`` out after every block from ``from_layer`` to the last."""
        n_layers = num_layers(model)
        (start,) = validate_layers(from_layer, n_layers, key="from_layer")
        edit = DirectionAblation(direction, alpha)
        return cls(model, dict.fromkeys(range(start, n_layers), edit))

    def __enter__(self) -> Intervention:
        if self._stack is not None:
            raise RuntimeError("this Intervention is already active; use one `with` block at a time")
        stack = ExitStack()
        stack.enter_context(residual_hooks(self.model, self.fns))
        self._stack = stack
        return self

    def __exit__(self, *exc: object) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.__exit__(None, None, None)
