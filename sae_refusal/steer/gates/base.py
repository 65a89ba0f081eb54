"""What every gate shares: the :class:`GateScores` it returns, the :class:`Gate` protocol, common checks.

A *gate* gives every prompt a harmfulness score in ``[0, 1]`` and a category code (``1..C``, the class codes
of :class:`~sae_refusal.features.vectors.SteeringVectors`; ``0`` where the gate names no harmful category).

**Category codes are the vectors' codes.** Residual gates are fitted with the same ``class_names`` as the
steering vectors (benign first); the refusal-token gate maps each refusal token to the index of its category
in ``class_names``; :func:`_check_class_names` is the one check of such a list (gates and the bundle alike).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


class GateScores(NamedTuple):
    """What a gate says about each prompt, in input order (CPU tensors).

    Attributes:
        score_N: Harmfulness score in ``[0, 1]`` (float32); the policy thresholds it.
        category_N: The harmful category the gate sees, ``1..C`` (int64, codes of the gate's
            ``class_names``), or 0 where it names none (a ``[respond]`` decision of the refusal-token gate,
            a guard model). Residual gates always name their most likely category, also for prompts they
            score benign, so a benign row can be steered away from the category it resembles.
        refused_N: The unsteered model's own decision per prompt (bool: it refuses), where known; a policy
            that acts only where gate and model disagree (``act_on="disagreement"``) needs it.
            :meth:`~sae_refusal.steer.gates.GatedSteering.score_prompts` fills it when its policy does.
    """

    score_N: Tensor
    category_N: Tensor
    refused_N: Tensor | None = None


def _scores(score_N: Tensor, category_N: Tensor) -> GateScores:
    return GateScores(
        score_N.detach().float().cpu().clamp(0.0, 1.0), category_N.detach().to(torch.long).cpu()
    )


@runtime_checkable
class Gate(Protocol):
    """The common face of all gates: score prompts, and describe themselves for saving.

    Residual gates (:class:`ProbeGate`, :class:`HeadGate`, :class:`DistanceGate`) also offer
    ``score(acts_ND)`` on activations already extracted at their ``layer``.
    """

    kind: ClassVar[str]

    @property
    def layer(self) -> int | None:
        """Residual layer the gate reads (``None``: it reads no residuals)."""
        ...

    @property
    def d_model(self) -> int | None:
        """Residual width the gate expects (``None``: any)."""
        ...

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """Names of the class codes ``0..C`` its categories refer to (``None``: it names no category)."""
        ...

    def score_prompts(
        self,
        model: nn.Module,
        tokenizer: Any,
        texts: Sequence[str],
        *,
        batch_size: int = 32,
        max_length: int | None = None,
        chat_template: str | None = None,
        system_prompt: str | None = None,
    ) -> GateScores:
        """Score user messages with the (unsteered) ``model``; a guard gate uses its own model instead."""
        ...

    def config(self) -> dict[str, Any]:
        """JSON facts that rebuild the gate together with :meth:`tensors`."""
        ...

    def tensors(self) -> dict[str, Tensor]:
        """The gate's fitted parameters (saved as safetensors)."""
        ...


def _check_class_names(class_names: Sequence[str], key: str = "class_names") -> tuple[str, ...]:
    if isinstance(class_names, str) or len(class_names) < 2:
        raise ValueError(f"{key}: expected benign + at least one category name, got {class_names!r}")
    return tuple(str(name) for name in class_names)


def _check_layer(layer: int) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"layer: expected a layer index >= 0, got {layer!r}")
    return layer
