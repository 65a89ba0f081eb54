"""First-token refusal decisions of a refusal-token model under per-row interventions.

The refusal-token model's first response token is its decision: ``[respond]`` or one category's refusal
token. :func:`first_token_decisions` reads it for a list of prompts with an intervention given *per prompt*
(each row its own vector, alpha and sign; rows without one run unsteered), the measurement behind the
specificity tables, the alpha sweeps and the gate tuning. The decision is the argmax over the refusal tokens
after the artifact's calibrated respond bias (what ``generate`` applies), as in the fine-tuning report.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sae_refusal.llm.first_token import iter_first_token_logits
from sae_refusal.llm.hooks import ResidualFn
from sae_refusal.llm.refusal_tokens import ResolvedRefusalTokens, respond_bias_of
from sae_refusal.steer.config import JUDGES
from sae_refusal.steer.interventions import Intervention, Positions, ResidualSteering

__all__ = ["JUDGES", "FirstTokenDecisions", "RowEdits", "first_token_decisions", "residual_rows"]

#: Readings of the first token (see :class:`FirstTokenDecisions`).

#: ``edits(indices)`` -> ``{layer: fn}`` for the prompts ``indices`` of one batch (in that row order).
RowEdits = Callable[[list[int]], Mapping[int, ResidualFn]]


@dataclass(frozen=True)
class FirstTokenDecisions:
    """Per-prompt first-token decisions, in input order.

    Two readings of the first token:

    * ``restricted``: the argmax over the six refusal tokens only (the fine-tuning report's reading): always
      a class, even when the model would emit some other token;
    * ``emitted``: the argmax over the whole vocabulary, what greedy ``generate`` emits (respond bias
      applied): a class when that token is a refusal token, ``-1`` ("other") when it is any other token.
      A strong steering vector can push the emitted token off the refusal tokens while the restricted
      argmax still names a category, so claims about what the model *emits* use this reading.

    Attributes:
        pred_class_N: Restricted class index (0 = respond, ``c`` = the c-th category token).
        probs_NC: Softmax over the refusal-token logits (respond bias applied).
        class_names: Class names in index order (``respond`` first).
        top_class_N: Emitted class index, ``-1`` for a token that is not a refusal token.
        judge: Which reading :attr:`refused_N` uses (``"emitted"`` or ``"restricted"``).
    """

    pred_class_N: Tensor
    probs_NC: Tensor
    class_names: tuple[str, ...]
    top_class_N: Tensor
    judge: str = "emitted"

    @property
    def refused_N(self) -> Tensor:
        """True where the first token is a category's refusal token (under :attr:`judge`)."""
        if self.judge == "restricted":
            return self.pred_class_N != 0
        return self.top_class_N > 0

    def rate(self, mask_N: Tensor | None = None) -> float:
        """Share of (masked) prompts refused; NaN for none."""
        refused = self.refused_N if mask_N is None else self.refused_N[mask_N]
        return float(refused.float().mean()) if refused.numel() else float("nan")


def residual_rows(
    layer: int,
    vectors_ND: Tensor,
    alpha_N: Tensor | float,
    positions: Positions = "all",
) -> RowEdits:
    """Per-prompt residual steering: prompt ``i`` gets ``alpha_N[i] * vectors_ND[i]`` at ``layer``.

    ``vectors_ND`` may be one ``(D,)`` vector for all prompts; rows with alpha 0 run unsteered.
    """
    alpha = torch.as_tensor(alpha_N, dtype=torch.float32)

    def edits(indices: list[int]) -> Mapping[int, ResidualFn]:
        index = torch.as_tensor(indices, dtype=torch.long)
        vectors = vectors_ND if vectors_ND.ndim == 1 else vectors_ND[index]
        alphas = alpha if alpha.ndim == 0 else alpha[index]
        return {layer: ResidualSteering(vectors, alphas, positions=positions)}

    return edits


def first_token_decisions(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    resolved: ResolvedRefusalTokens,
    *,
    edits: RowEdits | None = None,
    batch_size: int = 32,
    max_length: int = 1024,
    chat_template: str | None = None,
    system_prompt: str | None = None,
    respond_bias: float | None = None,
    judge: str = "emitted",
) -> FirstTokenDecisions:
    """The refusal-token decision of each prompt, with an optional per-row intervention.

    Args:
        model: A refusal-token model (any HF causal LM with the tokens in its vocabulary).
        tokenizer: Its tokenizer (chat template applied to ``texts``).
        texts: User messages.
        resolved: The refusal tokens bound to ``tokenizer`` (``RefusalVocabulary.resolve``).
        edits: Per-batch interventions (e.g. :func:`residual_rows`); ``None`` runs the model unsteered.
        batch_size: Prompts per forward.
        max_length: Most prompt tokens kept (longer prompts lose their beginning).
        chat_template: Template overriding the tokenizer's.
        system_prompt: Optional system message.
        respond_bias: Added to the respond logit; ``None`` takes the model's calibrated bias (artifact).
        judge: ``"emitted"`` (whole-vocabulary argmax, what ``generate`` emits) or ``"restricted"`` (argmax
            over the refusal tokens); see :class:`FirstTokenDecisions`.

    Returns:
        Decisions in input order.

    Raises:
        ValueError: On an unknown ``judge``.
    """
    if judge not in JUDGES:
        raise ValueError(f"judge: expected one of {JUDGES}, got {judge!r}")
    bias = respond_bias_of(model, resolved.respond_id) if respond_bias is None else float(respond_bias)

    def around(indices: list[int]) -> Intervention:
        assert edits is not None  # only passed below when edits are given
        return Intervention(model, edits(indices))

    ids = torch.tensor(resolved.token_ids)
    logits_NC = torch.empty(len(texts), len(resolved.token_ids))
    top_class_N = torch.full((len(texts),), -1, dtype=torch.long)
    class_of_id = {int(token_id): c for c, token_id in enumerate(resolved.token_ids)}
    for batch in iter_first_token_logits(
        model,
        tokenizer,
        texts,
        batch_size=batch_size,
        max_length=max_length,
        chat_template=chat_template,
        system_prompt=system_prompt,
        around=around if edits is not None else None,
    ):
        rows = torch.as_tensor(batch.indices)
        logits_NC[rows] = batch.logits_BV[:, ids]
        logits_BV = batch.logits_BV
        logits_BV[:, resolved.respond_id] += bias
        top_class_N[rows] = torch.tensor([class_of_id.get(int(t), -1) for t in logits_BV.argmax(dim=1)])
    respond = resolved.categories.index(None)
    logits_NC[:, respond] += bias
    return FirstTokenDecisions(
        pred_class_N=logits_NC.argmax(dim=1),
        probs_NC=torch.softmax(logits_NC, dim=1),
        class_names=tuple(resolved.class_names),
        top_class_N=top_class_N,
        judge=judge,
    )
