"""The refusal-token gate: the refusal-token model's own unsteered first token decides.

:class:`RefusalTokenGate` reads one first-token pass: a category token gives score 1 and that category
(mapped to its index among the vectors' ``class_names`` by :func:`_category_code`), ``[respond]`` score 0
(``graded=True``: the score is ``1 - P(respond)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sae_refusal.categories import resolve_category
from sae_refusal.llm.refusal_tokens import RefusalVocabulary
from sae_refusal.sae.base import SparseAutoencoder
from sae_refusal.steer.gates.base import GateScores, _check_class_names, _scores
from sae_refusal.steer.scoring import FirstTokenDecisions, first_token_decisions


def _category_code(category: str | None, class_names: Sequence[str]) -> int:
    """Index of a CoCoNot category among ``class_names[1:]`` (any spelling resolve_category knows), else 0."""
    if category is None:
        return 0
    for index, name in enumerate(class_names[1:], start=1):
        try:
            if resolve_category(name) == category:
                return index
        except ValueError:
            continue
    return 0


class RefusalTokenGate:
    """The refusal-token model's own unsteered first token: a category token means harmful.

    Args:
        class_names: Class names ``0..C`` of the steering vectors; each refusal token's category is mapped to
            its index here (a category missing from them gives category 0, i.e. the global vector).
        vocabulary: The refusal tokens; ``None`` detects them in the tokenizer's added tokens.
        graded: Score ``1 - P(respond)`` (softmax over the refusal tokens, respond bias applied) instead of
            the 0/1 decision.
        respond_bias: Bias added to the respond logit; ``None`` takes the model's calibrated bias.
    """

    kind: ClassVar[str] = "refusal_token"

    def __init__(
        self,
        class_names: Sequence[str],
        vocabulary: RefusalVocabulary | None = None,
        *,
        graded: bool = False,
        respond_bias: float | None = None,
    ) -> None:
        self._class_names = _check_class_names(class_names)
        self.vocabulary = vocabulary
        self.graded = bool(graded)
        if respond_bias is not None and not math.isfinite(respond_bias):
            raise ValueError(f"respond_bias: must be finite, got {respond_bias}")
        self.respond_bias = respond_bias

    @property
    def layer(self) -> None:
        """Reads no residuals."""
        return None

    @property
    def d_model(self) -> None:
        """Any width."""
        return None

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names of class codes ``0..C``."""
        return self._class_names

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
        """One unsteered first-token pass (:func:`~sae_refusal.steer.scoring.first_token_decisions`)."""
        vocabulary = self.vocabulary if self.vocabulary is not None else RefusalVocabulary.detect(tokenizer)
        resolved = vocabulary.resolve(tokenizer)
        decisions = first_token_decisions(
            model,
            tokenizer,
            texts,
            resolved,
            batch_size=batch_size,
            max_length=1024 if max_length is None else max_length,
            chat_template=chat_template,
            system_prompt=system_prompt,
            respond_bias=self.respond_bias,
        )
        return self.scores_from(decisions, resolved.categories)

    def scores_from(self, decisions: FirstTokenDecisions, categories: Sequence[str | None]) -> GateScores:
        """The gate's scores from an unsteered decision pass already run (``categories``: the classes' CoCoNot
        categories, ``None`` for respond, as ``ResolvedRefusalTokens.categories``)."""
        code_K = torch.tensor([_category_code(c, self._class_names) for c in categories])
        respond = list(categories).index(None)
        if self.graded:
            score_N = 1.0 - decisions.probs_NC[:, respond]
        else:
            score_N = (decisions.pred_class_N != respond).float()
        return _scores(score_N, code_K[decisions.pred_class_N])

    def config(self) -> dict[str, Any]:
        """Class names, the token spellings (``None``: detected), grading and the respond bias."""
        return {
            "class_names": list(self._class_names),
            "tokens": None if self.vocabulary is None else dict(self.vocabulary.tokens),
            "graded": self.graded,
            "respond_bias": self.respond_bias,
        }

    def tensors(self) -> dict[str, Tensor]:
        """None: nothing is fitted."""
        return {}

    @classmethod
    def from_saved(
        cls, config: Mapping[str, Any], tensors: Mapping[str, Tensor], sae: SparseAutoencoder | None = None
    ) -> RefusalTokenGate:
        """Rebuild from :meth:`config`."""
        tokens = config.get("tokens")
        return cls(
            config["class_names"],
            None if tokens is None else RefusalVocabulary(tokens=dict(tokens)),
            graded=bool(config.get("graded", False)),
            respond_bias=config.get("respond_bias"),
        )
