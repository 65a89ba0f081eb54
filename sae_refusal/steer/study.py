"""Building blocks of a steering study on a refusal-token model: vectors, specificity, sweeps.

Every function here takes prompts and a loaded model and returns plain tensors / dicts; the job
(:mod:`sae_refusal.steer.job`) chains them and writes the artifacts. Alphas are in units of the vector they
scale: ``alpha = 1`` adds one CAA vector, i.e. moves a benign prompt's mean activation onto the harmful mean.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sae_refusal.data.chat import format_prompts
from sae_refusal.llm.extraction import iter_last_token_residuals
from sae_refusal.llm.hooks import ResidualFn
from sae_refusal.llm.layers import num_layers, validate_layers
from sae_refusal.llm.refusal_tokens import ResolvedRefusalTokens
from sae_refusal.steer.interventions import DirectionAblation
from sae_refusal.steer.scoring import FirstTokenDecisions, RowEdits, first_token_decisions, residual_rows

__all__ = ["caa_by_category", "direction_ablation_rates", "last_token_acts", "specificity_table"]

log = logging.getLogger(__name__)

#: Called with (done, total) after each unit of work, for progress display.
Progress = Callable[[int, int], object]


def last_token_acts(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    layers: Sequence[int],
    *,
    batch_size: int = 32,
    max_length: int | None = None,
    chat_template: str | None = None,
    system_prompt: str | None = None,
) -> dict[int, Tensor]:
    """Last-token residuals ``{layer: acts_ND}`` (float32, CPU) of user messages, in input order.

    The messages are chat-formatted as everywhere (generation prompt included: the position whose next
    token is the refusal decision) and run through one early-exit pass per batch; negative layers count from
    the end and are keyed by their non-negative index.

    Raises:
        TypeError: If ``texts`` is a single string.
        ValueError: If ``texts`` is empty or a layer is invalid.
    """
    if isinstance(texts, str):
        raise TypeError("texts: expected a sequence of strings, got a single string")
    if len(texts) == 0:
        raise ValueError("texts: no prompts")
    formatted = format_prompts(tokenizer, texts, chat_template=chat_template, system_prompt=system_prompt)
    keys = validate_layers(list(layers), num_layers(model))
    chunks: dict[int, list[Tensor]] = {layer: [] for layer in keys}
    for batch in iter_last_token_residuals(
        model, tokenizer, formatted, keys, batch_size=batch_size, max_length=max_length
    ):
        for layer, acts_BD in batch.acts.items():
            chunks[layer].append(acts_BD.float().cpu())
    return {layer: torch.cat(parts) for layer, parts in chunks.items()}


def caa_by_category(
    harmful_acts_ND: Tensor,
    harmful_categories: Sequence[str],
    benign_acts_ND: Tensor,
    categories: Sequence[str],
) -> tuple[Tensor, Tensor]:
    """CAA vectors per category ``(C, D)`` (``mean(H_c) - mean(B)``) and the pooled one ``(D,)``.

    Raises:
        ValueError: If a category has no harmful prompt or the row counts disagree.
    """
    if harmful_acts_ND.shape[0] != len(harmful_categories):
        raise ValueError(
            f"harmful_categories: {len(harmful_categories)} labels for {harmful_acts_ND.shape[0]} rows"
        )
    benign_mean_D = benign_acts_ND.mean(0)
    rows = []
    for category in categories:
        mask = torch.tensor([c == category for c in harmful_categories])
        if not bool(mask.any()):
            raise ValueError(f"categories: no harmful prompt of category {category!r}")
        rows.append(harmful_acts_ND[mask].mean(0) - benign_mean_D)
    return torch.stack(rows), harmful_acts_ND.mean(0) - benign_mean_D


def specificity_table(
    model: nn.Module,
    tokenizer: Any,
    resolved: ResolvedRefusalTokens,
    texts: Sequence[str],
    vectors_CD: Tensor,
    layer: int,
    alpha: float,
    *,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> tuple[Tensor, Tensor]:
    """Confusion counts of ``texts`` steered with ``+alpha v_c``, row ``c``, under both first-token readings.

    Returns:
        ``(restricted_CK, emitted_CK1)``: columns follow ``resolved.class_names`` (``respond`` first), the
        emitted table has one more column, "other" (the emitted token is no refusal token). The
        specificity of category ``c`` is ``table[c, c + 1] / len(texts)`` in either.
    """
    n_categories = vectors_CD.shape[0]
    n_classes = len(resolved.token_ids)
    table = torch.zeros(n_categories, n_classes, dtype=torch.long)
    emitted = torch.zeros(n_categories, n_classes + 1, dtype=torch.long)
    for c in range(n_categories):
        decisions = first_token_decisions(
            model,
            tokenizer,
            texts,
            resolved,
            edits=residual_rows(layer, vectors_CD[c], alpha),
            batch_size=batch_size,
        )
        table[c] = torch.bincount(decisions.pred_class_N, minlength=n_classes)
        other_last = torch.where(decisions.top_class_N < 0, n_classes, decisions.top_class_N)
        emitted[c] = torch.bincount(other_last, minlength=n_classes + 1)
        if progress is not None:
            progress(c + 1, n_categories)
    return table, emitted


def _classes(decisions: FirstTokenDecisions) -> Tensor:
    return decisions.pred_class_N if decisions.judge == "restricted" else decisions.top_class_N


def _same_edits(edits: Mapping[int, ResidualFn]) -> RowEdits:
    return lambda _rows: edits


def direction_ablation_rates(
    model: nn.Module,
    tokenizer: Any,
    resolved: ResolvedRefusalTokens,
    texts_by_category: Mapping[str, Sequence[str]],
    vectors_CD: Tensor,
    categories: Sequence[str],
    layer: int,
    *,
    batch_size: int = 32,
    judge: str = "emitted",
) -> dict[str, dict[str, float | int]]:
    """Each category's refusal before / after projecting its CAA direction out of every layer from ``layer``.

    Args:
        texts_by_category: Held-out harmful prompts per category (canonical names).
        vectors_CD: CAA vectors, row ``i`` for ``categories[i]``.
        categories: Category names in the order of ``vectors_CD`` and of the refusal tokens.

    Returns:
        Per category: ``n``, and before / after shares refused (any refusal token) and refused with the
        category's own token.
    """
    n_layers = num_layers(model)
    out: dict[str, dict[str, float | int]] = {}
    for index, category in enumerate(categories):
        texts = list(texts_by_category.get(category, []))
        if not texts:
            continue
        ablate = DirectionAblation(vectors_CD[index])
        edits = {lay: ablate for lay in range(layer, n_layers)}
        before = first_token_decisions(model, tokenizer, texts, resolved, batch_size=batch_size, judge=judge)
        after = first_token_decisions(
            model, tokenizer, texts, resolved, batch_size=batch_size, edits=_same_edits(edits), judge=judge
        )
        own = index + 1  # refusal-token classes follow the categories, respond first
        out[category] = {
            "n": len(texts),
            "refused_before": before.rate(),
            "refused_after": after.rate(),
            "own_token_before": float((_classes(before) == own).float().mean()),
            "own_token_after": float((_classes(after) == own).float().mean()),
        }
    return out
