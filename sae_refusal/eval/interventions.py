"""One intervention of an eval job, built from saved artifacts only, as per-item edits around every forward.

An :class:`InterventionConfig` names a kind and the artifacts it reads:

* ``none``: the unsteered model (the baseline column).
* ``residual``: ``a <- a + alpha * v`` at ``layer``
  (:class:`~sae_refusal.steer.interventions.ResidualSteering`)
  with ``v`` a category's vector of a :class:`~sae_refusal.features.vectors.SteeringVectors` artifact, in the
  ``caa`` space (CAA steering) or ``sas_decoded`` (SAS vectors mapped through the SAE decoder), or the
  ``global`` vector.
* ``latent``: ``z <- z + alpha * v_z`` on the SAE's codes with the reconstruction error kept
  (:class:`~sae_refusal.steer.interventions.LatentSteering`), ``v_z`` the artifact's ``sas`` vector; needs
  ``sae`` (the export the vectors were made with).
* ``ablation``: the (unit) direction projected out after every block from ``layer`` on, with strength
  ``alpha`` (1 removes it fully; :class:`~sae_refusal.steer.interventions.DirectionAblation`).
* ``gate``: a conditional gate saved by ``sae-refusal steer`` (:func:`~sae_refusal.steer.gates.load_gate`).
  The gate reads each *unsteered* prompt first; each item then gets its own vector and signed alpha.

``vectors`` may also be a gate folder: its recorded category vectors and global vector are used, so an
unconditional column steers along exactly the vector the gates steer along. ``category: global`` takes that
recorded global vector, else the plain mean of the category rows
(:func:`~sae_refusal.steer.gates.global_vector`). For ``residual`` / ``ablation``, ``vectors`` may also be a
file of another tool (an lm-eval steer ``.pt``, a llama.cpp / repeng control vector ``.gguf``, a
steering-vectors ``.pt``; ``vectors_format``): the vector of ``layer`` is the file's own edit at alpha 1
(:func:`sae_refusal.steer.exchange.file_vector`), its ``<file>.json`` sidecar's fingerprint checked as above.

**Per item.** :meth:`LoadedIntervention.plan` takes the user messages of the items a scorer will run
(prompts of a refusal set, MMLU questions, ...) and returns an :class:`ItemPlan` whose ``around(indices)``
is the per-batch context :mod:`sae_refusal.llm.batched` and :mod:`sae_refusal.eval.capability` enter around
each forward / ``generate`` call, so the intervention acts at every position of prefill and of every cached
decode step, and log-likelihood scoring sees it as well. Unconditional kinds give every item the same edit.

**Provenance.** :meth:`LoadedIntervention.record` holds everything that produced the column: kind, paths,
each artifact file's sha256, layer, alpha, category, positions and the artifact's recorded model fingerprint.
An artifact recorded for another model than the one evaluated (weights content hash, adapter, quantization:
:func:`sae_refusal.provenance.identity_differences`) is refused (naming ``intervention.vectors`` /
``intervention.gate``) unless ``allow_other_model`` is set (cross-model transfer experiments). A vector
artifact written before fingerprints were recorded is used with a warning naming it (recompute it with
``sae-refusal features`` to have it checked). An all-zero vector (a category without training rows) is refused
unless ``allow_zero_vector`` is set. ``intervention.layer`` set to another layer than the artifact's is the
user's explicit choice: allowed, and recorded (``layer_differs_from_artifact``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sae_refusal.errors import ArtifactError
from sae_refusal.eval.config import INTERVENTION_KINDS, InterventionConfig
from sae_refusal.provenance import describe_differences, identity_differences
from sae_refusal.steer.interventions import (
    DirectionAblation,
    Intervention,
    LatentSteering,
    ResidualSteering,
)

__all__ = [
    "INTERVENTION_KINDS",
    "InterventionConfig",
    "ItemPlan",
    "LoadedIntervention",
    "load_intervention",
]

log = logging.getLogger(__name__)

#: Per-batch context factory: item indices of the batch rows -> a context manager around its forward.
BatchContext = Callable[[list[int]], AbstractContextManager[Any]]


@dataclass
class ItemPlan:
    """What the intervention does to each item of one scorer's list.

    Attributes:
        around: ``around(indices)`` -> the context around a batch whose rows are those items (``None``: the
            unsteered model).
        alpha_N: Each item's signed alpha (0 = unsteered), for the per-item records.
        gate_score_N: The gate's harmfulness score per item (``None`` for unconditional kinds).
    """

    around: BatchContext | None
    alpha_N: Tensor
    gate_score_N: Tensor | None = None

    def item_record(self, i: int) -> dict[str, Any]:
        """JSON facts about item ``i`` (its alpha and gate score)."""
        out: dict[str, Any] = {"alpha": float(self.alpha_N[i])}
        if self.gate_score_N is not None:
            out["gate_score"] = float(self.gate_score_N[i])
        return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files_hash(folder: Path) -> dict[str, str]:
    return {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}


@dataclass
class _Vectors:
    """Category vectors read from a vectors or a gate folder."""

    class_names: list[str]
    by_space: dict[str, Tensor]  # space -> (C, D|F)
    global_by_space: dict[str, Tensor]  # recorded global vectors
    layer: int | None
    fingerprint: dict[str, Any] | None
    model: str | None = None  # the name recorded beside (or instead of) a fingerprint


def _read_vectors(folder: Path) -> _Vectors:
    from safetensors.torch import load_file

    from sae_refusal.features.vectors import SteeringVectors
    from sae_refusal.steer.gates.steering import GATE_FILE, GATE_TENSORS_FILE

    if (folder / GATE_FILE).is_file():
        record = json.loads((folder / GATE_FILE).read_text())
        tensors = load_file(str(folder / GATE_TENSORS_FILE))
        return _Vectors(
            class_names=list(record["steering"]["class_names"]),
            by_space={"caa": tensors["steer.vectors_CD"]},
            global_by_space={"caa": tensors["steer.global_D"]},
            layer=int(record["steering"]["layer"]),
            fingerprint=record.get("provenance", {}).get("model_fingerprint"),
        )
    if not (folder / "vectors.json").is_file():
        raise FileNotFoundError(
            f"intervention.vectors: {folder} holds neither vectors.json (steering vectors) nor gate.json"
        )
    vectors = SteeringVectors.load(folder)
    spaces = {"caa": vectors.caa_CD}
    if vectors.sas_CF is not None:
        spaces["sas"] = vectors.sas_CF
    if vectors.sas_decoded_CD is not None:
        spaces["sas_decoded"] = vectors.sas_decoded_CD
    layer = vectors.metadata.get("layer")
    return _Vectors(
        class_names=list(vectors.class_names),
        by_space=spaces,
        global_by_space={},
        layer=None if layer is None else int(layer),
        fingerprint=vectors.metadata.get("model_fingerprint"),
        model=vectors.metadata.get("model"),
    )


def _check_fingerprint(
    recorded: dict[str, Any] | None, actual: dict[str, Any] | None, key: str, ok: bool
) -> None:
    """Refuse an artifact recorded for other weights than ``actual`` (names ignored when hashes exist)."""
    if recorded is None or actual is None or ok:
        return
    diff = identity_differences(recorded, actual)
    if diff:
        raise ArtifactError(
            f"{key}: the artifact was made on another model ({describe_differences(diff, 'evaluated')}); "
            "set intervention.allow_other_model: true for a transfer experiment"
        )


@dataclass
class LoadedIntervention:
    """An intervention ready to plan items on one model.

    Build it with :func:`load_intervention`.
    """

    config: InterventionConfig
    model: nn.Module
    layer: int | None = None
    vector: Tensor | None = None
    sae: Any = None
    gate: Any = None
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The column label."""
        return self.config.label

    def _edits(self) -> Callable[[list[int]], AbstractContextManager[Any]] | None:
        cfg, model = self.config, self.model
        if cfg.kind == "none" or cfg.alpha == 0:
            return None
        layer = int(self.layer)  # type: ignore[arg-type]
        vector = self.vector
        if vector is None:  # pragma: no cover - load_intervention sets it for these kinds
            raise RuntimeError("no vector loaded")
        if cfg.kind == "residual":
            edit: Any = ResidualSteering(vector, cfg.alpha, positions=cfg.positions, unit_norm=cfg.unit_norm)
            return lambda _indices: Intervention(model, {layer: edit})
        if cfg.kind == "latent":
            edit = LatentSteering(self.sae, vector, cfg.alpha, positions=cfg.positions)
            return lambda _indices: Intervention(model, {layer: edit})
        from sae_refusal.llm.layers import num_layers

        ablate = DirectionAblation(vector, cfg.alpha, positions=cfg.positions)
        edits = dict.fromkeys(range(layer, num_layers(model)), ablate)
        return lambda _indices: Intervention(model, edits)

    def plan(
        self,
        tokenizer: Any,
        texts: Sequence[str],
        *,
        batch_size: int = 32,
        max_length: int | None = None,
        chat_template: str | None = None,
        system_prompt: str | None = None,
    ) -> ItemPlan:
        """Per-item edits for the items whose user messages are ``texts`` (a gate scores them first)."""
        n = len(texts)
        if self.config.kind != "gate":
            alpha = 0.0 if self.config.kind == "none" else self.config.alpha
            return ItemPlan(around=self._edits(), alpha_N=torch.full((n,), float(alpha)))
        from sae_refusal.steer.scoring import residual_rows

        bundle = self.gate
        scores = bundle.score_prompts(
            self.model,
            tokenizer,
            list(texts),
            batch_size=batch_size,
            max_length=max_length,
            chat_template=chat_template,
            system_prompt=system_prompt,
        )
        vectors_ND, alpha_N = bundle.plan(scores)
        rows = residual_rows(bundle.layer, vectors_ND, alpha_N, positions=bundle.positions)
        model = self.model

        def around(indices: list[int]) -> AbstractContextManager[Any]:
            if not bool((alpha_N[torch.as_tensor(indices, dtype=torch.long)] != 0).any()):
                return nullcontext()
            return Intervention(model, rows(indices))

        return ItemPlan(around=around, alpha_N=alpha_N.float().clone(), gate_score_N=scores.score_N.clone())


def _category_vector(vectors: _Vectors, cfg: InterventionConfig) -> Tensor:
    from sae_refusal.steer.gates import global_vector

    if cfg.space not in vectors.by_space:
        raise ValueError(
            f"intervention.space: {cfg.vectors} has no {cfg.space!r} vectors (has {sorted(vectors.by_space)})"
        )
    rows_CD = vectors.by_space[cfg.space]
    if cfg.category == "global":
        recorded = vectors.global_by_space.get(cfg.space)
        return recorded if recorded is not None else global_vector(rows_CD)
    names = vectors.class_names[1:]
    if cfg.category not in names:
        raise ValueError(f"intervention.category: {cfg.category!r} is not one of {[*names, 'global']}")
    return rows_CD[names.index(cfg.category)]


def _load_file_column(
    cfg: InterventionConfig, loaded: LoadedIntervention, fingerprint: dict[str, Any] | None
) -> LoadedIntervention:
    """A ``residual`` / ``ablation`` column whose ``vectors`` is a file of another tool
    (:func:`sae_refusal.steer.exchange.file_vector`); its sidecar's fingerprint is checked like a folder's."""
    from sae_refusal.features.vectors import require_nonzero
    from sae_refusal.steer.exchange import file_vector

    path = Path(str(cfg.vectors))
    found = file_vector(path, loaded.model, kind=cfg.kind, layer=cfg.layer, vectors_format=cfg.vectors_format)
    _check_fingerprint(found.fingerprint, fingerprint, "intervention.vectors", cfg.allow_other_model)
    if found.fingerprint is None and fingerprint is not None and not cfg.allow_other_model:
        log.warning(
            "intervention.vectors: %s (%s) records no model fingerprint (no %s.json beside it); it cannot be "
            "checked to come from the evaluated model %r",
            path,
            found.format,
            path.name,
            fingerprint.get("model"),
        )
    if not cfg.allow_zero_vector:
        require_nonzero(
            found.vector,
            f"intervention.vectors: the layer-{found.layer} vector of {path}",
            "intervention.allow_zero_vector: true",
        )
    loaded.layer, loaded.vector = found.layer, found.vector.float()
    loaded.record.update(
        vectors_files={path.name: found.file_sha256},
        vectors_format=found.format,
        layer=found.layer,
        file_layers=list(found.file_layers),
        vector_norm=float(found.vector.norm()),
        artifact_fingerprint=found.fingerprint,
        **({"file_notes": list(found.notes)} if found.notes else {}),
    )
    return loaded


def load_intervention(
    cfg: InterventionConfig, model: nn.Module, *, fingerprint: dict[str, Any] | None = None
) -> LoadedIntervention:
    """Read an intervention's artifacts and check them against ``model``.

    Args:
        cfg: What to apply.
        model: The model it acts on (its depth and width are checked).
        fingerprint: The evaluated model's :func:`~sae_refusal.llm.loading.model_fingerprint`; an artifact
            recorded for other weights is refused unless ``cfg.allow_other_model``.

    Raises:
        FileNotFoundError: Naming the folder when an artifact is missing.
        ValueError: Naming the config key on a wrong space / category / layer / width / model.
    """
    from sae_refusal.llm.layers import d_model, num_layers

    record: dict[str, Any] = {"config": asdict(cfg), "name": cfg.label}
    loaded = LoadedIntervention(config=cfg, model=model, record=record)
    if cfg.kind == "none":
        return loaded
    depth, width = num_layers(model), d_model(model)
    sae = None
    if cfg.sae:
        from sae_refusal.sae.formats import resolve_sae_path
        from sae_refusal.sae.loading import load_sae

        sae_path = resolve_sae_path(cfg.sae)  # a hub id stays a string until resolved
        if not sae_path.is_dir():
            raise FileNotFoundError(
                f"intervention.sae: {cfg.sae} is not a folder (an SAE export) nor a hub id"
            )
        sae = load_sae(sae_path, verify=cfg.verify_sae)  # its errors name the files
        if sae.d_model != width:
            raise ValueError(f"intervention.sae: the SAE's width {sae.d_model} != the model's width {width}")
        record["sae_files"] = _files_hash(sae_path)
    if cfg.kind == "gate":
        from sae_refusal.steer.gates import load_gate
        from sae_refusal.steer.gates.nested import gate_label

        gate_path = Path(str(cfg.gate))
        if not gate_path.is_dir():
            raise FileNotFoundError(f"intervention.gate: {gate_path} is not a folder (a saved gate)")
        try:
            bundle = load_gate(gate_path, model=model, sae=sae)
        except ValueError as err:
            raise ValueError(f"intervention.gate: {err}") from err
        _check_fingerprint(
            bundle.provenance.get("model_fingerprint"),
            fingerprint,
            "intervention.gate",
            cfg.allow_other_model,
        )
        loaded.gate, loaded.layer = bundle, bundle.layer
        record.update(
            gate_files=_files_hash(gate_path),
            layer=bundle.layer,
            policy=bundle.policy.to_dict(),
            gate_kind=gate_label(bundle.gate),
        )
        return loaded
    folder = Path(str(cfg.vectors))
    from sae_refusal.steer.exchange import is_vectors_file

    if is_vectors_file(folder, cfg.vectors_format):  # an lm-eval / llama.cpp / steering-vectors file
        return _load_file_column(cfg, loaded, fingerprint)
    if not folder.is_dir():
        raise FileNotFoundError(f"intervention.vectors: {folder} is not a folder")
    vectors = _read_vectors(folder)
    _check_fingerprint(vectors.fingerprint, fingerprint, "intervention.vectors", cfg.allow_other_model)
    if vectors.fingerprint is None and fingerprint is not None and not cfg.allow_other_model:
        made_on = f"made on {vectors.model!r}, " if vectors.model else ""
        log.warning(
            "intervention.vectors: %s records no model fingerprint (%sevaluated: %r); it cannot be "
            "checked to come from these weights and adapter. Recompute it with sae-refusal features to have "
            "it checked",
            folder,
            made_on,
            fingerprint.get("model"),
        )
    layer = cfg.layer if cfg.layer is not None else vectors.layer
    if layer is None:
        raise ValueError(f"intervention.layer: {folder} records no layer; set intervention.layer")
    if layer >= depth:
        raise ValueError(f"intervention.layer: {layer} does not exist in a model with {depth} layers")
    vector = _category_vector(vectors, cfg).detach().float()
    if not cfg.allow_zero_vector:
        from sae_refusal.features.vectors import require_nonzero

        require_nonzero(
            vector,
            f"intervention.vectors: the {cfg.space} vector of category {cfg.category!r} in {folder}",
            "intervention.allow_zero_vector: true",
        )
    if cfg.kind == "latent":
        if sae is None or vector.shape[-1] != sae.n_latents:
            raise ValueError(
                f"intervention.sae: the vectors have {vector.shape[-1]} latents, the SAE has "
                f"{None if sae is None else sae.n_latents}"
            )
    elif vector.shape[-1] != width:
        raise ValueError(
            f"intervention.vectors: vectors of width {vector.shape[-1]} != the model's width {width}"
        )
    if cfg.layer is not None and vectors.layer is not None and cfg.layer != vectors.layer:
        record["layer_differs_from_artifact"] = vectors.layer
    loaded.layer, loaded.vector, loaded.sae = layer, vector, sae
    record.update(
        vectors_files=_files_hash(folder),
        layer=layer,
        vector_norm=float(vector.norm()),
        artifact_fingerprint=vectors.fingerprint,
    )
    return loaded
