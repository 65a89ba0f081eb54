"""The bundle: gate, policy, vectors and steering layer as per-row edits, and its saved artifact.

:class:`GatedSteering` turns a gate's scores into per-row edits for
:func:`~sae_refusal.steer.scoring.first_token_decisions` or an
:class:`~sae_refusal.steer.interventions.Intervention` around ``generate``.

* **Two passes.** The gate reads the unsteered prompt (an early-exit residual pass, a first-token pass or
  the guard model), then the steered pass runs with per-row edits; nothing is decided during generation.
* **Artifact.** :meth:`GatedSteering.save` writes ``gate.json`` (gate config, policy, steering layer and
  width, class names, tuning provenance) and ``gate.safetensors`` (the gate's fitted tensors under
  ``gate.*``, the vectors under ``steer.*``) atomically; :func:`load_gate` reads it back (each gate kind
  through :data:`GATE_LOADERS`) and, given the model, refuses a folder whose recorded layer or width does
  not fit it. SAEs and guard models are referenced by path, not copied.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from sae_refusal.atomic import AtomicFolder
from sae_refusal.llm.layers import d_model as model_width
from sae_refusal.llm.layers import num_layers
from sae_refusal.sae.base import SparseAutoencoder
from sae_refusal.steer.config import JUDGES
from sae_refusal.steer.gates.base import Gate, GateScores, _check_class_names, _check_layer
from sae_refusal.steer.gates.calibrated import CalibratedGate
from sae_refusal.steer.gates.distance import DistanceGate
from sae_refusal.steer.gates.ensemble import EnsembleGate
from sae_refusal.steer.gates.guard import GuardGate
from sae_refusal.steer.gates.head import HeadGate
from sae_refusal.steer.gates.multilayer import MultiLayerProbeGate
from sae_refusal.steer.gates.policy import GatePolicy, row_vectors
from sae_refusal.steer.gates.probe import ProbeGate
from sae_refusal.steer.gates.refusal_token import RefusalTokenGate
from sae_refusal.steer.interventions import Positions, check_positions
from sae_refusal.steer.scoring import RowEdits, residual_rows

GATE_FILE = "gate.json"
GATE_TENSORS_FILE = "gate.safetensors"
_FORMAT = "sae_refusal.gate/1"
#: Keyword arguments of ``score_prompts`` that the decision pass of a disagreement policy also takes.
_DECISION_OPTIONS = ("batch_size", "max_length", "chat_template", "system_prompt")


_GateLoader = Callable[[Mapping[str, Any], Mapping[str, Tensor], SparseAutoencoder | None], Gate]

#: ``gate.json`` ``gate.kind`` -> the function that rebuilds that gate.
GATE_LOADERS: dict[str, _GateLoader] = {
    ProbeGate.kind: ProbeGate.from_saved,
    HeadGate.kind: HeadGate.from_saved,
    DistanceGate.kind: DistanceGate.from_saved,
    RefusalTokenGate.kind: RefusalTokenGate.from_saved,
    GuardGate.kind: GuardGate.from_saved,
    MultiLayerProbeGate.kind: MultiLayerProbeGate.from_saved,
}
# Gates that hold gates rebuild them through this registry, bound here (importing it there is a cycle).
GATE_LOADERS[CalibratedGate.kind] = partial(CalibratedGate.from_saved, loaders=GATE_LOADERS)
GATE_LOADERS[EnsembleGate.kind] = partial(EnsembleGate.from_saved, loaders=GATE_LOADERS)


@dataclass
class GatedSteering:
    """A gate, its policy and the vectors it steers along: everything conditional steering needs.

    Args:
        gate: Any :class:`Gate`.
        policy: Thresholds, alphas and the vector mode.
        layer: Layer whose residual stream is steered (after block ``layer``).
        vectors_CD: Category CAA vectors (``SteeringVectors.caa_CD``; row ``c - 1`` for category ``c``).
        global_D: The global vector (:func:`global_vector`).
        class_names: Class names ``0..C`` of the vectors (must match the gate's when it has some).
        positions: Where the steering acts (see :func:`~sae_refusal.steer.interventions.position_mask`).
        provenance: JSON facts on how the policy was chosen (:meth:`TuningResult.provenance`).
        judge: How the model's own unsteered decision is read for ``policy.act_on="disagreement"``
            (``emitted`` or ``restricted``, as in :func:`~sae_refusal.steer.scoring.first_token_decisions`);
            the tuning tables' reading.
    """

    gate: Gate
    policy: GatePolicy
    layer: int
    vectors_CD: Tensor
    global_D: Tensor
    class_names: Sequence[str]
    positions: Positions = "all"
    provenance: dict[str, Any] = field(default_factory=dict)
    judge: str = "emitted"

    def __post_init__(self) -> None:
        _check_layer(self.layer)
        if self.judge not in JUDGES:
            raise ValueError(f"judge: expected one of {list(JUDGES)}, got {self.judge!r}")
        check_positions(self.positions)
        self.class_names = _check_class_names(self.class_names)
        if self.vectors_CD.ndim != 2 or self.vectors_CD.shape[0] != len(self.class_names) - 1:
            raise ValueError(
                f"vectors_CD: expected one row per category ({len(self.class_names) - 1}), "
                f"got shape {tuple(self.vectors_CD.shape)}"
            )
        if tuple(self.global_D.shape) != (self.vectors_CD.shape[1],):
            raise ValueError(
                f"global_D: expected shape ({self.vectors_CD.shape[1]},), got {tuple(self.global_D.shape)}"
            )
        gate_names = self.gate.class_names
        if gate_names is not None and tuple(gate_names) != tuple(self.class_names):
            raise ValueError(
                f"class_names: the gate's {list(gate_names)} != the vectors' {list(self.class_names)}"
            )
        self.vectors_CD = self.vectors_CD.detach().float().cpu()
        self.global_D = self.global_D.detach().float().cpu()

    @property
    def d_model(self) -> int:
        """Width of the steering vectors."""
        return int(self.vectors_CD.shape[1])

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model whose depth or width does not fit the recorded layer(s) and width.

        Raises:
            ValueError: Naming the key (``layer``, ``d_model``, ``gate.layer``, ``gate.d_model``).
        """
        depth, width = num_layers(model), model_width(model)
        checks: list[tuple[str, int | None, int]] = [
            ("layer", self.layer, depth),
            ("gate.layer", self.gate.layer, depth),
        ]
        for key, layer, n_layers in checks:
            if layer is not None and layer >= n_layers:
                raise ValueError(
                    f"{key}: recorded layer {layer} does not exist in a model with {n_layers} layers"
                )
        for key, recorded in (("d_model", self.d_model), ("gate.d_model", self.gate.d_model)):
            if recorded is not None and recorded != width:
                raise ValueError(f"{key}: recorded width {recorded} != the model's width {width}")

    def score_prompts(
        self, model: nn.Module, tokenizer: Any, texts: Sequence[str], **kwargs: Any
    ) -> GateScores:
        """The gate's scores of ``texts`` (keyword arguments go to :meth:`Gate.score_prompts`).

        With ``policy.act_on="disagreement"`` the model's own unsteered decisions are added
        (``refused_N``: one first-token pass read with :attr:`judge`) unless the gate already gave them.
        """
        scores = self.gate.score_prompts(model, tokenizer, texts, **kwargs)
        if self.policy.act_on == "disagreement" and scores.refused_N is None:
            from sae_refusal.llm.refusal_tokens import RefusalVocabulary
            from sae_refusal.steer.scoring import first_token_decisions

            resolved = RefusalVocabulary.detect(tokenizer).resolve(tokenizer)
            options = {k: v for k, v in kwargs.items() if k in _DECISION_OPTIONS and v is not None}
            decisions = first_token_decisions(model, tokenizer, texts, resolved, judge=self.judge, **options)
            scores = scores._replace(refused_N=decisions.refused_N.cpu())
        return scores

    def plan(self, scores: GateScores) -> tuple[Tensor, Tensor]:
        """``(vectors_ND, alpha_N)``: each prompt's vector and signed alpha."""
        alpha_N = self.policy.alphas(scores.score_N, scores.refused_N)
        vectors_ND = row_vectors(
            scores.category_N, self.vectors_CD, self.global_D, self.policy.vector, alpha_N=alpha_N
        )
        return vectors_ND, alpha_N

    def edits(self, scores: GateScores) -> RowEdits:
        """Per-row edits for :func:`~sae_refusal.steer.scoring.first_token_decisions` (``edits=``)."""
        vectors_ND, alpha_N = self.plan(scores)
        return residual_rows(self.layer, vectors_ND, alpha_N, positions=self.positions)

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``gate.json`` + ``gate.safetensors`` into ``folder`` atomically; returns the folder."""
        tensors = {f"gate.{k}": v.detach().cpu().contiguous() for k, v in self.gate.tensors().items()}
        tensors["steer.vectors_CD"] = self.vectors_CD.contiguous()
        tensors["steer.global_D"] = self.global_D.contiguous()
        record = {
            "format": _FORMAT,
            "gate": {"kind": self.gate.kind, **self.gate.config()},
            "policy": self.policy.to_dict(),
            "steering": {
                "layer": self.layer,
                "d_model": self.d_model,
                "positions": self.positions,
                "class_names": list(self.class_names),
                "judge": self.judge,
            },
            "provenance": self.provenance,
        }
        text = json.dumps(record, indent=2)  # fails before anything is written if something is not JSON
        with AtomicFolder(folder) as out:
            save_file(tensors, str(out.tmp / GATE_TENSORS_FILE), metadata={"format": _FORMAT})
            (out.tmp / GATE_FILE).write_text(text)
            return out.commit()


def load_gate(
    folder: str | os.PathLike[str], *, model: nn.Module | None = None, sae: SparseAutoencoder | None = None
) -> GatedSteering:
    """Read a folder written by :meth:`GatedSteering.save`.

    Args:
        folder: The gate folder.
        model: If given, the folder must fit it (recorded layers exist, widths equal).
        sae: The SAE of a latent-space gate (else loaded from its recorded path).

    Raises:
        FileNotFoundError: If a file is missing.
        ValueError: On an unknown format or gate kind, or a layer / width that does not fit ``model``
            (naming the key).
    """
    folder = Path(folder)
    meta_path, tensor_path = folder / GATE_FILE, folder / GATE_TENSORS_FILE
    for path in (meta_path, tensor_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: not a gate folder")
    record = json.loads(meta_path.read_text())
    if record.get("format") != _FORMAT:
        raise ValueError(f"format: {meta_path} has format {record.get('format')!r}, expected {_FORMAT!r}")
    tensors = load_file(str(tensor_path))
    gate_config = dict(record["gate"])
    kind = gate_config.pop("kind", None)
    if kind not in GATE_LOADERS:
        raise ValueError(f"gate.kind: unknown gate {kind!r} in {meta_path} (known: {sorted(GATE_LOADERS)})")
    gate_tensors = {k.removeprefix("gate."): v for k, v in tensors.items() if k.startswith("gate.")}
    steering = record["steering"]
    bundle = GatedSteering(
        gate=GATE_LOADERS[kind](gate_config, gate_tensors, sae),
        policy=GatePolicy(**record["policy"]),
        layer=int(steering["layer"]),
        vectors_CD=tensors["steer.vectors_CD"],
        global_D=tensors["steer.global_D"],
        class_names=steering["class_names"],
        positions=steering.get("positions", "all"),
        provenance=dict(record.get("provenance", {})),
        judge=steering.get("judge", "emitted"),
    )
    if int(steering["d_model"]) != bundle.d_model:
        raise ValueError(
            f"d_model: {meta_path} records {steering['d_model']}, its vectors are {bundle.d_model} wide"
        )
    if model is not None:
        bundle.check_model(model)
    return bundle
