"""Padding-free extraction: several prompts packed into one row, each attending only to itself.

Short prompts in a padded pass cost ``rows x longest`` tokens; packed, they cost about their own tokens.
A packed row holds prompts back to back; its 4-D additive attention mask is block-diagonal and causal (a
prompt's tokens see only the earlier tokens of the same prompt), and its ``position_ids`` restart at 0 for
each prompt, so every prompt computes what it computes alone (up to the round-off of other kernel shapes).
The row's unused tail holds padding tokens that attend only to themselves (no row of the mask is all
``-inf``). The residual of a prompt is read at its last token.

:func:`plan_packs` packs the prompts first-fit-decreasing into rows of ``pack_length`` tokens and groups the
rows into forward passes of at most ``token_budget`` tokens; :func:`packed_last_token_residuals` runs one
pass with the same early exit and hooks as :func:`~sae_refusal.llm.extraction.last_token_residuals`.

The mask is a plain additive ``(R, 1, T, T)`` tensor in the model's dtype, which Hugging Face models take as
given (eager and SDPA attention; not kernels that ignore custom masks, e.g. flash-attention's). A model with
a sliding window shorter than ``pack_length`` is refused (the custom mask would replace its window).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from sae_refusal.llm.hooks import ResidualFn, StepContext, StopForward, residual_hooks
from sae_refusal.llm.layers import decoder_layers, input_device, validate_layers

__all__ = ["check_pack_length", "packed_last_token_residuals", "plan_packs"]


def check_pack_length(
    pack_length: int | None, model: nn.Module | None = None, key: str = "pack_length"
) -> None:
    """``pack_length`` is ``None`` or a positive integer, within the model's sliding window if it has one.

    Raises:
        ValueError: Naming ``key``.
    """
    if pack_length is None:
        return
    if isinstance(pack_length, bool) or not isinstance(pack_length, int) or pack_length < 1:
        raise ValueError(f"{key}: must be a positive integer or null, got {pack_length!r}")
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None)
    if isinstance(window, int) and not isinstance(window, bool) and 0 < window < pack_length:
        raise ValueError(
            f"{key}: {pack_length} exceeds the model's sliding window ({window}); a packed row's mask would "
            "replace the window. Use a pack_length <= the window"
        )


def plan_packs(lengths: Sequence[int], *, pack_length: int, token_budget: int) -> list[list[list[int]]]:
    """Forward passes of packed rows: ``passes[p][r]`` lists the prompts (indices) of row ``r`` of pass ``p``.

    Prompts go first-fit-decreasing into rows of ``pack_length`` tokens (a longer prompt gets a row of its
    own); rows, fullest first, go into passes while ``rows x widest row`` stays within ``token_budget``
    (a row wider than the budget runs alone). Every index appears once; deterministic.

    Raises:
        ValueError: On a ``pack_length`` or ``token_budget`` below 1.
    """
    if pack_length < 1 or token_budget < 1:
        raise ValueError(f"pack_length and token_budget must be >= 1, got {pack_length}, {token_budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    fill: list[int] = []
    for i in order:
        n = lengths[i]
        for r, used in enumerate(fill):
            if used + n <= pack_length:
                rows[r].append(i)
                fill[r] += n
                break
        else:
            rows.append([i])
            fill.append(n)
    by_fill = sorted(range(len(rows)), key=lambda r: (-fill[r], r))
    passes: list[list[list[int]]] = []
    current: list[list[int]] = []
    width = 0
    for r in by_fill:
        wider = max(width, fill[r])
        if current and (len(current) + 1) * wider > token_budget:
            passes.append(current)
            current, wider = [], fill[r]
        current.append(rows[r])
        width = wider
    if current:
        passes.append(current)
    return passes


def packed_last_token_residuals(
    model: nn.Module,
    rows: Sequence[Sequence[Sequence[int]]],
    layers: Sequence[int],
    pad_id: int,
) -> dict[int, Tensor]:
    """Residuals after each requested layer at the last token of every packed prompt, from one forward.

    Args:
        model: A Hugging Face causal LM in eval mode (eager or SDPA attention).
        rows: ``rows[r]`` holds the token ids of the prompts packed into row ``r``, in order.
        layers: Layer indices (as :func:`~sae_refusal.llm.extraction.last_token_residuals`).
        pad_id: Token id of the rows' unused tails (masked: any valid id).

    Returns:
        ``{layer: acts_ND}``, prompts in row-major order (row 0's prompts, then row 1's, ...).

    Raises:
        ValueError: On an empty row or prompt, or an invalid layer.
    """
    if not rows or any(not row or any(len(p) == 0 for p in row) for row in rows):
        raise ValueError("rows: every row needs at least one prompt, and every prompt a token")
    blocks = decoder_layers(model)
    wanted = validate_layers(layers, len(blocks))
    deepest = wanted[-1]
    device = input_device(model)
    dtype = next(model.parameters()).dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    width = max(sum(len(p) for p in row) for row in rows)
    n_rows = len(rows)
    ids_RT = torch.full((n_rows, width), pad_id, dtype=torch.long)
    pos_RT = torch.zeros((n_rows, width), dtype=torch.long)
    seg_RT = torch.full((n_rows, width), -1, dtype=torch.long)  # -1: padding
    ends_row: list[int] = []
    ends_col: list[int] = []
    for r, row in enumerate(rows):
        at = 0
        for s, prompt in enumerate(row):
            n = len(prompt)
            ids_RT[r, at : at + n] = torch.as_tensor(prompt, dtype=torch.long)
            pos_RT[r, at : at + n] = torch.arange(n)
            seg_RT[r, at : at + n] = s
            ends_row.append(r)
            ends_col.append(at + n - 1)
            at += n
    causal_TT = torch.ones(width, width, dtype=torch.bool).tril()
    same_RTT = (seg_RT[:, :, None] == seg_RT[:, None, :]) & (seg_RT[:, :, None] >= 0)
    allowed_RTT = (same_RTT & causal_TT) | torch.eye(width, dtype=torch.bool)  # padding sees itself only
    mask_R1TT = torch.zeros((n_rows, 1, width, width), dtype=dtype)
    mask_R1TT.masked_fill_(~allowed_RTT[:, None], torch.finfo(dtype).min)
    row_N = torch.tensor(ends_row, device=device)
    col_N = torch.tensor(ends_col, device=device)
    captured: dict[int, Tensor] = {}

    def make_hook(layer: int) -> ResidualFn:
        def read(hidden_RTD: Tensor, _ctx: StepContext) -> None:
            captured[layer] = hidden_RTD[row_N.to(hidden_RTD.device), col_N.to(hidden_RTD.device)]
            if layer == deepest:
                raise StopForward

        return read

    with residual_hooks(model, {layer: make_hook(layer) for layer in wanted}), torch.inference_mode():
        model(
            input_ids=ids_RT.to(device),
            attention_mask=mask_R1TT.to(device),
            position_ids=pos_RT.to(device),
            use_cache=False,
        )
    missing = [layer for layer in wanted if layer not in captured]
    if missing:
        raise RuntimeError(f"decoder layers {missing} never ran; the model skipped them")
    return {layer: captured[layer] for layer in wanted}
