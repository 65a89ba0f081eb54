"""The ensemble gate: several gates' scores combined by a stated rule for disagreement.

:class:`EnsembleGate` asks each member gate (e.g. a probe, the refusal token and a distance gate, ideally
each a :class:`~sae_refusal.steer.gates.calibrated.CalibratedGate`, so that their scores share one scale)
and combines the answers row by row:

* **Score.** ``rule="mean"``: the weighted mean of the member scores (``weights``, default equal);
  ``"all"``: their minimum: a prompt reaches a threshold only when every member's score does (harmful only
  when all say harmful, benign as soon as one says benign); ``"any"``: their maximum (harmful as soon as one
  says harmful, benign only when all say benign).
* **Category.** That of the first member, in member order, that names one (non-zero) for the row; 0 where
  none does. Put the member whose categories you trust most first.
* **The model's own decision** (``refused_N``) is passed on from the first member that gives it.

:meth:`EnsembleGate.combine` is the pure combination, usable offline on member scores computed before.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from sae_refusal.sae.base import SparseAutoencoder
from sae_refusal.steer.gates.base import Gate, GateScores, _scores
from sae_refusal.steer.gates.nested import GateLoader, check_gate, load_nested, nested_config, nested_tensors

EnsembleRule = Literal["mean", "all", "any"]
_RULES = ("mean", "all", "any")


class EnsembleGate:
    """Member gates combined by a rule: weighted mean, ``"all"`` (min) or ``"any"`` (max) of their scores.

    See the module docstring for the rules and the category. :attr:`layer` is the deepest member layer
    (``None`` when no member reads residuals), :attr:`d_model` the members' common width and
    :attr:`class_names` their common class names (members with ``None`` are left out of both checks).

    Args:
        members: The gates, in the order that decides the category.
        rule: ``"mean"``, ``"all"`` or ``"any"``.
        weights: ``rule="mean"`` only: one weight >= 0 per member, positive sum (default: equal).

    Raises:
        ValueError: Naming ``members`` (none; widths or class names that disagree), ``rule`` or
            ``weights``.
        TypeError: Naming ``members`` if one is not a gate.
    """

    kind: ClassVar[str] = "ensemble"

    def __init__(
        self, members: Sequence[Gate], *, rule: EnsembleRule = "mean", weights: Sequence[float] | None = None
    ) -> None:
        if isinstance(members, str) or not isinstance(members, Sequence) or len(members) == 0:
            raise ValueError(f"members: expected a non-empty sequence of gates, got {members!r}")
        self.members: tuple[Gate, ...] = tuple(
            check_gate(member, f"members[{i}]") for i, member in enumerate(members)
        )
        if rule not in _RULES:
            raise ValueError(f"rule: expected one of {list(_RULES)}, got {rule!r}")
        self.rule: EnsembleRule = rule
        self.weights: tuple[float, ...] | None = None
        if weights is not None:
            if rule != "mean":
                raise ValueError(f"weights: only rule='mean' weighs its members (rule is {rule!r})")
            values = list(weights)
            if (
                len(values) != len(self.members)
                or any(isinstance(w, bool) or not isinstance(w, int | float) for w in values)
                or not all(math.isfinite(w) and w >= 0 for w in values)
                or sum(values) <= 0
            ):
                raise ValueError(
                    f"weights: expected {len(self.members)} finite weights >= 0 with a positive sum, "
                    f"got {values!r}"
                )
            self.weights = tuple(float(w) for w in values)
        widths = {i: m.d_model for i, m in enumerate(self.members) if m.d_model is not None}
        if len(set(widths.values())) > 1:
            raise ValueError(f"members: their residual widths disagree ({widths})")
        self._d_model = next(iter(widths.values()), None)
        named = {i: tuple(m.class_names) for i, m in enumerate(self.members) if m.class_names is not None}
        if len(set(named.values())) > 1:
            raise ValueError(
                f"members: their class_names disagree ({ {i: list(n) for i, n in named.items()} })"
            )
        self._class_names = next(iter(named.values()), None)

    @property
    def layer(self) -> int | None:
        """The deepest layer a member reads (``None``: no member reads residuals)."""
        layers = [m.layer for m in self.members if m.layer is not None]
        return max(layers) if layers else None

    @property
    def d_model(self) -> int | None:
        """The members' common residual width (``None``: no member has one)."""
        return self._d_model

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """The members' common class names (``None``: no member names categories)."""
        return self._class_names

    def combine(self, member_scores: Sequence[GateScores]) -> GateScores:
        """Combine the members' scores of the same prompts (one :class:`GateScores` per member, in order).

        Pure: the members are not asked, so scores computed before (the study's) can be combined offline.
        ``refused_N`` (the unsteered model's own decisions: a fact about the model, not an opinion of a
        member) is the first member's that has one, else ``None``.

        Raises:
            ValueError: Naming ``member_scores`` if their number or row counts do not fit.
        """
        if len(member_scores) != len(self.members):
            raise ValueError(
                f"member_scores: expected one GateScores per member ({len(self.members)}), "
                f"got {len(member_scores)}"
            )
        scores = [torch.as_tensor(s.score_N).detach().cpu().double() for s in member_scores]
        categories = [torch.as_tensor(s.category_N).detach().cpu().long() for s in member_scores]
        n_rows = scores[0].shape
        if any(t.ndim != 1 or t.shape != n_rows for t in (*scores, *categories)):
            raise ValueError(
                "member_scores: expected vectors of one length, got score shapes "
                f"{[tuple(t.shape) for t in scores]}, category shapes {[tuple(t.shape) for t in categories]}"
            )
        score_KN, category_KN = torch.stack(scores), torch.stack(categories)
        if self.rule == "mean":
            weights = self.weights if self.weights is not None else (1.0,) * len(self.members)
            weight_K = torch.tensor(weights, dtype=torch.float64)
            score_N = (weight_K[:, None] * score_KN).sum(dim=0) / weight_K.sum()
        elif self.rule == "all":
            score_N = score_KN.min(dim=0).values
        else:
            score_N = score_KN.max(dim=0).values
        names_KN = category_KN != 0
        first_N = names_KN.to(torch.uint8).argmax(dim=0)  # the first member naming one (0 if none does)
        category_N = category_KN.gather(0, first_N[None]).squeeze(0)
        refused_N = next((s.refused_N for s in member_scores if s.refused_N is not None), None)
        if refused_N is not None and tuple(refused_N.shape) != tuple(n_rows):
            raise ValueError(
                f"member_scores: refused_N of shape {tuple(refused_N.shape)} for {tuple(n_rows)} rows"
            )
        return _scores(score_N, category_N)._replace(refused_N=refused_N)

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
        """Ask every member (each its own pass), then :meth:`combine` their answers."""
        return self.combine(
            [
                member.score_prompts(
                    model,
                    tokenizer,
                    texts,
                    batch_size=batch_size,
                    max_length=max_length,
                    chat_template=chat_template,
                    system_prompt=system_prompt,
                )
                for member in self.members
            ]
        )

    def config(self) -> dict[str, Any]:
        """JSON facts: rule, weights and the members (``kind`` included), in order."""
        return {
            "rule": self.rule,
            "weights": None if self.weights is None else list(self.weights),
            "members": [nested_config(member) for member in self.members],
        }

    def tensors(self) -> dict[str, Tensor]:
        """The members' tensors, member ``i``'s under ``m<i>.``."""
        out: dict[str, Tensor] = {}
        for i, member in enumerate(self.members):
            out.update(nested_tensors(member, f"m{i}."))
        return out

    @classmethod
    def from_saved(
        cls,
        config: Mapping[str, Any],
        tensors: Mapping[str, Tensor],
        sae: SparseAutoencoder | None = None,
        *,
        loaders: Mapping[str, GateLoader] | None = None,
    ) -> EnsembleGate:
        """Rebuild from :meth:`config` and :meth:`tensors`; the members through ``loaders``.

        ``loaders`` is the gate registry (``GATE_LOADERS``: :func:`load_gate` binds it); ``sae`` goes to
        every member (those reading no SAE ignore it).
        """
        members = [
            load_nested(record, tensors, f"m{i}.", sae, loaders, f"members[{i}]")
            for i, record in enumerate(config["members"])
        ]
        return cls(members, rule=config["rule"], weights=config.get("weights"))
