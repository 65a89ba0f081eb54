"""Steering vectors out to lm-eval-harness and llama.cpp, and files of theirs back in as eval columns.

``sae-refusal export-vectors --vectors DIR --format lm-eval|gguf-control-vector --category C --alpha A
--out F`` writes one category's vector (or ``global``) of a project artifact (a ``vectors.json`` folder
written by the feature callback, ``sae-refusal features`` or ``sae-refusal steer``, or a gate folder) as:

* ``lm-eval``: the ``.pt`` file lm-eval-harness's ``steered`` model loads
  (``lm_eval --model steered --model_args pretrained=MODEL,steer_path=F``; lm-eval 0.4.13
  ``lm_eval/models/hf_steered.py``): ``{hookpoint: {"steering_vector", "steering_coefficient", "action",
  "bias", "head_index"}}``, each hookpoint a module name of ``model.base_model.named_modules()`` whose
  forward output lm-eval edits. ``add`` adds ``steering_coefficient * steering_vector`` at every position;
  ``clamp`` sets the component along the unit ``steering_vector`` to ``steering_coefficient``.
* ``gguf-control-vector``: a llama.cpp control vector as repeng's ``ControlVector.export_gguf`` and
  llama.cpp's ``cvector-generator`` write it: ``general.architecture = controlvector``,
  ``controlvector.model_hint`` (the model's ``model_type``, as repeng writes it),
  ``controlvector.layer_count`` (the number of direction tensors, as repeng writes it) and one F32 tensor
  ``direction.{layer}`` per layer.
  Apply it with ``llama-cli -m MODEL.gguf --control-vector F`` (strength 1: exactly the exported edit),
  ``--control-vector-scaled F S`` (times ``S``) and ``--control-vector-layer-range START END`` (only the
  directions whose index lies in ``[START, END]``; the default is ``1 .. n_layer``).

**Layer conventions** (the project's layer ``l`` is the residual stream right after decoder block ``l``,
0-based: :mod:`sae_refusal.llm.layers`):

* lm-eval: the hookpoint of layer ``l`` is the name, under ``model.base_model``, of the module
  :func:`~sae_refusal.llm.layers.decoder_layers` returns at index ``l`` (``layers.{l}`` for Llama, Qwen2,
  Mistral, GPT-NeoX; ``h.{l}`` for GPT-2); lm-eval's forward hook on it edits that block's output, the very
  tensor :class:`~sae_refusal.steer.interventions.ResidualSteering` edits. The names are derived from the
  model (:func:`model_shape`) so other layouts follow; the export builds the model's skeleton on the meta
  device from its config (no weights).
* llama.cpp: ``common_control_vector_load_one`` (``common/common.cpp``) stores ``direction.N`` at
  ``data[(N - 1) * n_embd]``, ``llama_control_vector_apply`` (``src/llama-adapter.cpp``) copies
  ``data[(il - 1) * n_embd]`` into ``tensors[il]``, and every model graph adds ``tensors[il]`` right after
  block ``il``'s final residual add (``cur = build_cvec(cur, il); cb(cur, "l_out", il)``, ``il`` 0-based).
  So ``direction.N`` is added to the output of 0-based block ``N``: the project's layer ``N``, unshifted.
  repeng agrees (its ``ControlModel`` adds ``directions[i]`` to the output of ``model.model.layers[i]`` and
  its export writes ``direction.{i}``). llama.cpp refuses ``direction.0`` ("invalid (zero) direction tensor
  layer index"), so layer 0 cannot be exported (it is accepted on import: the same convention).

**Strength.** ``alpha`` (and ``--unit_norm``: ``v / |v|`` first) maps to lm-eval's ``steering_coefficient``
with ``steering_vector = v`` (or ``v / |v|``), and is baked into the llama.cpp direction (``alpha * v``),
which has no coefficient of its own. The edit acts at every position (the project's ``positions: all``);
lm-eval and llama.cpp also edit padding positions, which no real token attends to.

**Ablation** (``--action ablate``, lm-eval only): the project's
:class:`~sae_refusal.steer.interventions.DirectionAblation` projects the unit direction out after every
block from ``l`` to the last (``a <- a - alpha (a . d) d``). lm-eval's ``clamp`` with
``steering_coefficient = 0`` computes ``a + d (0 - a . d)``, the same projection at one hookpoint, so the
export writes one ``clamp`` entry per block ``l .. n_layers - 1``. A partial ablation (alpha != 1) has no
lm-eval form (clamp sets the component to a value, it cannot scale it) and is refused; llama.cpp control
vectors only add, so ``ablate`` with ``gguf-control-vector`` is refused.

**Provenance.** Each export writes ``<out>.json`` beside the file: the source folder and each of its files'
sha256, category, space, layer, alpha, unit_norm, action, the recorded model name and fingerprint, the model
the layer was mapped on, the entries written and the exported file's own sha256. Both files are written
atomically (:func:`sae_refusal.atomic.atomic_file`); an existing ``--out`` is an error unless ``--force``.

**Import** (:func:`file_vector`; ``intervention.vectors`` naming a file, ``intervention.vectors_format``):
``auto`` (default) takes a folder as a project artifact, a ``.gguf`` file as a control vector (repeng,
llama.cpp's generator or this export) and a ``.pt`` / ``.pth`` file by its content: an lm-eval steer file
(``{hookpoint: {"steering_vector", "action", ...}}``) or a steering-vectors-library-style file
(``{"layer_activations": {layer: tensor}, "layer_type": "decoder_block"}``, i.e.
``dataclasses.asdict(SteeringVector)``, or a bare ``{layer: tensor}``; that library adds
``layer_activations[l]`` to the output of decoder block ``l``, the project's convention). The vector of the
requested layer (``intervention.layer``; needed when the file holds several) is the file's own edit at
``alpha = 1``: lm-eval's ``steering_coefficient * steering_vector``, the control vector's direction at
strength 1, the steering vector at multiplier 1; ``intervention.alpha`` scales it. ``kind: ablation`` takes
the direction of that layer (an lm-eval ``clamp`` entry must clamp to 0 with no bias). A ``<file>.json``
sidecar written by the export (or the provenance a GGUF of this export carries) gives the model fingerprint
the eval job checks; a file without one is used with a warning. Files are read with
``torch.load(weights_only=True)`` (a pickled ``SteeringVector`` object is refused: save its ``asdict``).

Light until needed: only the standard library is imported at module level, so ``export-vectors --help``
answers at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sae_refusal.errors import ArtifactError, UserError, one_line

if TYPE_CHECKING:
    from torch import Tensor, nn

    from sae_refusal.llm.config import LLMConfig

__all__ = [
    "EXPORT_FORMATS",
    "FILE_SUFFIXES",
    "VECTORS_FORMATS",
    "ExportRequest",
    "FileVector",
    "ModelShape",
    "SourceVector",
    "export_parser",
    "export_vectors",
    "file_vector",
    "is_vectors_file",
    "model_shape",
    "parse_export",
    "read_control_vector",
    "read_source_vector",
    "run_export_command",
    "sidecar_path",
    "write_control_vector",
]

log = logging.getLogger(__name__)

#: ``--format`` values of ``sae-refusal export-vectors``.
EXPORT_FORMATS: tuple[str, ...] = ("lm-eval", "gguf-control-vector")
#: ``intervention.vectors_format`` values (``auto``: by the path, see the module notes).
VECTORS_FORMATS: tuple[str, ...] = ("auto", "project", "lm-eval", "steering-vectors", "gguf-control-vector")
#: File suffixes ``auto`` reads as a vectors file rather than a project folder.
FILE_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".gguf")
#: ``--action`` values.
ACTIONS: tuple[str, ...] = ("add", "ablate")
#: The suffixes each export format writes (lm-eval dispatches on ``.pt`` / ``.pth``).
_OUT_SUFFIXES = {"lm-eval": (".pt", ".pth"), "gguf-control-vector": (".gguf",)}
#: GGUF key holding this export's provenance (JSON); llama.cpp ignores keys it does not know.
_GGUF_PROVENANCE = "sae_refusal.provenance"


def sidecar_path(out: str | Path) -> Path:
    """The provenance JSON written beside an exported file: ``<out>.json``."""
    out = Path(out)
    return out.with_name(out.name + ".json")


# ----------------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelShape:
    """What an exchange needs to know of a model's architecture.

    Attributes:
        n_layers: Number of decoder blocks.
        d_model: Residual width.
        model_type: ``config.model_type`` (``llama``, ...; ``""`` when unknown).
        hookpoints: lm-eval's name of each decoder block (its name under ``model.base_model``), by layer.
    """

    n_layers: int
    d_model: int
    model_type: str
    hookpoints: tuple[str, ...]


def model_shape(model: nn.Module) -> ModelShape:
    """Depth, width, type and lm-eval hookpoint names of a Hugging Face causal LM (a meta-device one too).

    Raises:
        TypeError: If the decoder blocks are not found under ``model.base_model``.
    """
    from torch import nn

    from sae_refusal.llm.layers import d_model, decoder_layers

    blocks = decoder_layers(model)
    base = getattr(model, "base_model", None)
    root = base if isinstance(base, nn.Module) else model
    index = {id(block): i for i, block in enumerate(blocks)}
    names: dict[int, str] = {}
    for name, module in root.named_modules():
        i = index.get(id(module))
        if i is not None and i not in names:
            names[i] = name
    if len(names) != len(blocks):
        raise TypeError(
            f"the decoder blocks of {type(model).__name__} are not under model.base_model "
            f"({type(root).__name__}), where lm-eval resolves hookpoints"
        )
    model_type = str(getattr(getattr(model, "config", None), "model_type", "") or "")
    return ModelShape(len(blocks), d_model(model), model_type, tuple(names[i] for i in range(len(blocks))))


def _architecture(llm: LLMConfig) -> ModelShape:
    """:func:`model_shape` of the model ``llm`` names, built on the meta device from its config (no weights).

    Raises:
        UserError: Naming ``--model`` when the config cannot be read.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from sae_refusal.llm.loading import load_model_config

    try:
        config = load_model_config(llm)
    except (OSError, ValueError) as err:
        raise UserError(
            f"--model: cannot read the model config of {llm.name_or_path!r} ({one_line(err)}); give --model "
            "a local Hugging Face folder, a .gguf file, a hub id in the cache, or smollm2"
        ) from None
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=llm.trust_remote_code)
    return model_shape(skeleton)


# ---------------------------------------------------------------------------------- the project side


@dataclass(frozen=True)
class SourceVector:
    """One vector of a project artifact, with what produced it.

    Attributes:
        folder: The artifact folder.
        vector_D: The raw residual-space vector (float32).
        category: The artifact's class name, or ``global``.
        space: ``caa`` or ``sas_decoded``.
        layer: The layer the artifact records (``None`` if none).
        model: The model name it records.
        fingerprint: The model fingerprint it records (``None`` for older artifacts).
        files_sha256: sha256 of each file of the folder.
        kind: ``vectors`` (a ``vectors.json`` folder) or ``gate`` (a gate folder).
    """

    folder: Path
    vector_D: Tensor
    category: str
    space: str
    layer: int | None
    model: str | None
    fingerprint: dict[str, Any] | None
    files_sha256: dict[str, str]
    kind: str = "vectors"


def _artifact_category(category: str, names: Sequence[str], folder: Path) -> str:
    """``category`` as the artifact's class name (its own name, or a CoCoNot name / short name of it)."""
    from sae_refusal.categories import CATEGORY_SHORT_NAMES, resolve_category

    if category in names:
        return category
    try:
        canonical: str | None = resolve_category(category, key="--category")
    except ValueError:
        canonical = None
    for candidate in (canonical, CATEGORY_SHORT_NAMES.get(canonical or "")):
        if candidate is not None and candidate in names:
            return candidate
    raise ValueError(
        f"--category: unknown category {category!r}; the vectors in {folder} have {[*names, 'global']}"
    )


def read_source_vector(folder: str | Path, category: str, space: str = "caa") -> SourceVector:
    """One category's vector (or ``global``) of a ``vectors.json`` or gate folder, as an eval column reads it.

    ``global`` is the gate's recorded global vector, else the plain mean of the non-zero category rows
    (:func:`~sae_refusal.steer.gates.global_vector`), as an eval column takes it
    (:func:`sae_refusal.eval.interventions.load_intervention`).

    Raises:
        FileNotFoundError: Naming ``--vectors`` when the folder or its files are missing.
        ArtifactError: Naming ``--vectors`` when a file does not parse or holds inf/nan.
        ValueError: Naming ``--category`` / ``--space``.
    """
    from safetensors.torch import load_file

    from sae_refusal.features.vectors import SteeringVectors
    from sae_refusal.llm.hashing import file_sha256
    from sae_refusal.steer.gates import global_vector
    from sae_refusal.steer.gates.steering import GATE_FILE, GATE_TENSORS_FILE

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--vectors: folder {folder} does not exist")
    recorded_global = None
    kind = "vectors"
    if (folder / GATE_FILE).is_file():
        kind = "gate"
        try:
            record = json.loads((folder / GATE_FILE).read_text())
            tensors = load_file(str(folder / GATE_TENSORS_FILE))
            names = list(record["steering"]["class_names"])[1:]
            layer: int | None = int(record["steering"]["layer"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ArtifactError(
                f"--vectors: {folder} is not a readable gate folder ({one_line(err)})"
            ) from None
        spaces = {"caa": tensors["steer.vectors_CD"]}
        recorded_global = tensors.get("steer.global_D")
        provenance = record.get("provenance", {})
        fingerprint, model = provenance.get("model_fingerprint"), provenance.get("model")
    elif (folder / "vectors.json").is_file():
        try:
            vectors = SteeringVectors.load(folder)
        except (FileNotFoundError, ArtifactError) as err:
            raise type(err)(f"--vectors: {err}") from None
        names = list(vectors.class_names[1:])
        spaces = {"caa": vectors.caa_CD}
        if vectors.sas_decoded_CD is not None:
            spaces["sas_decoded"] = vectors.sas_decoded_CD
        recorded = vectors.metadata.get("layer")
        layer = None if recorded is None else int(recorded)
        fingerprint, model = vectors.metadata.get("model_fingerprint"), vectors.metadata.get("model")
    else:
        raise FileNotFoundError(
            f"--vectors: {folder} holds neither vectors.json (steering vectors) nor gate.json (a gate)"
        )
    if space not in spaces:
        raise ValueError(f"--space: {folder} has no {space!r} vectors (has {sorted(spaces)})")
    rows_CD = spaces[space].detach().float()
    if category == "global":
        name = "global"
        if recorded_global is not None and space == "caa":
            vector_D = recorded_global.detach().float()
        else:
            try:
                vector_D = global_vector(rows_CD)
            except ValueError as err:
                raise ValueError(f"--category global: {folder}: {err}") from None
    else:
        name = _artifact_category(category, names, folder)
        vector_D = rows_CD[names.index(name)]
    if model is None and isinstance(fingerprint, dict):
        model = fingerprint.get("model")
    files = {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}
    return SourceVector(folder, vector_D.clone(), name, space, layer, model, fingerprint, files, kind)


# -------------------------------------------------------------------------------------- export


@dataclass(frozen=True)
class ExportRequest:
    """What ``sae-refusal export-vectors`` was asked to do (see :func:`export_parser` for each option)."""

    vectors: Path
    format: str
    category: str
    alpha: float
    out: Path
    space: str = "caa"
    layer: int | None = None
    action: str = "add"
    unit_norm: bool = False
    force: bool = False
    model: str | None = None


def export_parser() -> argparse.ArgumentParser:
    """The ``export-vectors`` options."""
    parser = argparse.ArgumentParser(
        prog="sae-refusal export-vectors",
        allow_abbrev=False,
        description="Write one steering vector of a project artifact (a vectors.json or gate folder) as "
        "lm-eval-harness's steer file (lm_eval --model steered --model_args "
        "pretrained=MODEL,steer_path=OUT.pt) or a llama.cpp control vector (llama-cli -m MODEL.gguf "
        "--control-vector OUT.gguf), with OUT.json beside it recording what produced it. Layer l (the "
        "residual stream after decoder block l) is lm-eval's hookpoint of block l (layers.{l} for Llama-like "
        "models) and llama.cpp's direction.{l}.",
    )
    parser.add_argument(
        "--vectors",
        required=True,
        metavar="DIR",
        help="a steering-vector folder (vectors.json + vectors.safetensors: <steer out_dir>/vectors, a "
        "features seed folder) or a gate folder",
    )
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="the target tool")
    parser.add_argument(
        "--category", required=True, help="the category whose vector is written (e.g. safety), or global"
    )
    parser.add_argument(
        "--alpha",
        required=True,
        type=float,
        help="steering strength: the edit adds alpha * v (ablate: the removed share; lm-eval takes only 1)",
    )
    parser.add_argument(
        "--space", choices=("caa", "sas_decoded"), default="caa", help="the vectors' space (default caa)"
    )
    parser.add_argument(
        "--layer", type=int, default=None, help="layer to act at (default: the layer the vectors record)"
    )
    parser.add_argument(
        "--action",
        choices=ACTIONS,
        default="add",
        help="add (residual steering, default) or ablate (project the direction out after every block from "
        "the layer on; lm-eval only)",
    )
    parser.add_argument(
        "--unit_norm", action="store_true", help="scale the vector to norm 1 first (alpha in residual units)"
    )
    parser.add_argument(
        "--model",
        default=None,
        help="the model whose layout maps the layer (a HF folder, hub id, .gguf or smollm2; default: the "
        "model the vectors record); only its config is read",
    )
    parser.add_argument(
        "--out", required=True, help="the file to write (.pt / .pth for lm-eval, .gguf for llama.cpp)"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing --out (and its .json)")
    return parser


def parse_export(args: Sequence[str]) -> ExportRequest:
    """Parse the ``export-vectors`` command line (``--help`` and a missing option exit here).

    Raises:
        UserError: On a non-finite ``--alpha``, an ``--out`` suffix the format's tool does not read, or an
            existing ``--out`` without ``--force``, naming the flag.
    """
    known = export_parser().parse_args(list(args))
    if not math.isfinite(known.alpha):
        raise UserError(f"--alpha: must be finite, got {known.alpha}")
    out = Path(known.out)
    suffixes = _OUT_SUFFIXES[known.format]
    if out.suffix.lower() not in suffixes:
        raise UserError(f"--out: {out} must end with {' or '.join(suffixes)} for --format {known.format}")
    return ExportRequest(
        vectors=Path(known.vectors),
        format=known.format,
        category=known.category,
        alpha=float(known.alpha),
        out=out,
        space=known.space,
        layer=known.layer,
        action=known.action,
        unit_norm=bool(known.unit_norm),
        force=bool(known.force),
        model=known.model,
    )


def _export_llm(request: ExportRequest, source: SourceVector) -> LLMConfig:
    from sae_refusal.llm.config import LLMConfig

    name = request.model or source.model
    if not name:
        raise UserError(
            f"--model: the vectors in {source.folder} record no model; give the model they were made on "
            "(a HF folder, hub id, .gguf file or smollm2) to map the layer to its blocks"
        )
    gguf_file = None
    if request.model is None and isinstance(source.fingerprint, dict) and Path(name).is_dir():
        gguf_file = source.fingerprint.get("gguf_file") or None  # a folder holding the recorded GGUF
    return LLMConfig(name_or_path=name, gguf_file=gguf_file)


def _unit(vector_D: Tensor) -> Tensor:
    """``v / |v|`` exactly as the project's steering code computes it."""
    return vector_D / vector_D.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _lm_eval_payload(
    request: ExportRequest, vector_D: Tensor, layer: int, shape: ModelShape
) -> dict[str, dict[str, Any]]:
    if request.action == "add":
        steering = _unit(vector_D) if request.unit_norm else vector_D
        return {
            shape.hookpoints[layer]: {
                "steering_vector": steering.contiguous(),
                "steering_coefficient": float(request.alpha),
                "action": "add",
                "bias": None,
                "head_index": None,
            }
        }
    if request.alpha != 1.0:
        raise UserError(
            "--alpha: lm-eval's clamp action sets the component along the direction to a value and cannot "
            "remove a share of it, so only a full ablation (--alpha 1) can be exported, got "
            f"{request.alpha:g}"
        )
    direction = _unit(vector_D).contiguous()
    return {
        shape.hookpoints[i]: {
            "steering_vector": direction.clone(),
            "steering_coefficient": 0.0,  # clamp the component along the direction to 0: project it out
            "action": "clamp",
            "bias": None,
            "head_index": None,
        }
        for i in range(layer, shape.n_layers)
    }


def write_control_vector(
    path: str | Path,
    directions: Mapping[int, Tensor],
    model_hint: str,
    *,
    provenance: Mapping[str, Any] | None = None,
) -> None:
    """Write a llama.cpp control vector GGUF at ``path`` (as repeng's ``export_gguf`` does), not atomically.

    Args:
        path: The file (use :func:`sae_refusal.atomic.atomic_file` around it).
        directions: ``{layer: (D,) vector}``; ``direction.{layer}`` is added to the output of 0-based block
            ``layer`` (see the module notes).
        model_hint: ``controlvector.model_hint`` (the model's ``model_type``).
        provenance: JSON facts kept under ``sae_refusal.provenance`` (llama.cpp ignores the key).

    Raises:
        UserError: If the ``gguf`` package is missing.
    """
    import numpy as np

    try:
        import gguf
    except ImportError:
        raise UserError(
            "--format gguf-control-vector: needs the gguf package (pip install gguf, or the gguf extra)"
        ) from None
    arch = "controlvector"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_string(f"{arch}.model_hint", model_hint)
    writer.add_uint32(f"{arch}.layer_count", len(directions))
    if provenance is not None:
        writer.add_string(_GGUF_PROVENANCE, json.dumps(provenance, sort_keys=True))
    for layer in sorted(directions):
        array = np.ascontiguousarray(directions[layer].detach().float().cpu().numpy(), dtype=np.float32)
        writer.add_tensor(f"direction.{layer}", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _gguf_string(reader: Any, key: str) -> str | None:
    found = reader.get_field(key)
    if found is None or not len(found.parts):
        return None
    return str(bytes(found.parts[-1]), encoding="utf-8", errors="replace")


@dataclass(frozen=True)
class ControlVectorFile:
    """A control vector GGUF read back.

    Attributes:
        architecture: ``general.architecture`` (``controlvector``).
        model_hint: ``controlvector.model_hint`` (``None`` when absent).
        layer_count: ``controlvector.layer_count`` (``None`` when absent).
        directions: ``{layer: (D,) float32 tensor}`` from the ``direction.{layer}`` tensors.
        provenance: This export's recorded provenance (``None`` for files from elsewhere).
    """

    architecture: str | None
    model_hint: str | None
    layer_count: int | None
    directions: dict[int, Tensor]
    provenance: dict[str, Any] | None = None


def read_control_vector(path: str | Path, *, key: str = "intervention.vectors") -> ControlVectorFile:
    """Read a llama.cpp control vector GGUF (repeng's, llama.cpp's generator's or this export's).

    Raises:
        ArtifactError: Naming ``key`` and the file when it is not a control vector (another architecture, a
            tensor not named ``direction.N``, not 1-D F32, widths that differ, non-finite values).
        UserError: If the ``gguf`` package is missing.
    """
    import numpy as np
    import torch

    try:
        import gguf
    except ImportError:
        raise UserError(f"{key}: reading {path} needs the gguf package (pip install gguf)") from None
    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{key}: {path} is not a readable GGUF file ({one_line(err)})") from None
    arch = _gguf_string(reader, "general.architecture")
    if arch != "controlvector":
        raise ArtifactError(f"{key}: {path} is a GGUF of architecture {arch!r}, not a control vector")
    count_field = reader.get_field("controlvector.layer_count")
    layer_count = None if count_field is None else int(count_field.parts[-1][0])
    directions: dict[int, Tensor] = {}
    for tensor in reader.tensors:
        prefix, _, index = tensor.name.partition(".")
        if prefix != "direction" or not index.isdigit():
            raise ArtifactError(f"{key}: {path} has tensor {tensor.name!r}; control vectors hold direction.N")
        data = np.array(tensor.data, dtype=np.float32)  # a copy: the reader maps the file
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32 or data.ndim != 1:
            raise ArtifactError(f"{key}: {path}: {tensor.name} is not a 1-D F32 tensor, as llama.cpp needs")
        directions[int(index)] = torch.from_numpy(data)
    widths = {int(t.shape[0]) for t in directions.values()}
    if len(widths) > 1:
        raise ArtifactError(f"{key}: {path}: direction tensors of different widths {sorted(widths)}")
    bad = [f"direction.{i}" for i, t in directions.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise ArtifactError(f"{key}: {path}: {bad[0]} holds inf/nan")
    provenance = None
    text = _gguf_string(reader, _GGUF_PROVENANCE)
    if text:
        try:
            provenance = json.loads(text)
        except ValueError:
            provenance = None
    return ControlVectorFile(
        arch, _gguf_string(reader, "controlvector.model_hint"), layer_count, directions, provenance
    )


def _differences(request: ExportRequest, shape: ModelShape, layer: int, recorded: int | None) -> list[str]:
    """What the target tool does differently from the project's intervention (recorded in the sidecar)."""
    notes = [
        "acts at every position, as the project's positions: all; the target tool also edits padding "
        "positions, which no real token attends to"
    ]
    if recorded is not None and recorded != layer:
        notes.append(f"--layer {layer} is not the layer the vectors were computed at ({recorded})")
    if request.format == "lm-eval":
        notes.append(
            "lm-eval casts steering_vector to the model's dtype and adds steering_coefficient * "
            "steering_vector in that dtype (the project adds alpha * v computed in float32, then cast)"
        )
        notes.append(
            "hookpoints are names under model.base_model of a plain Hugging Face model; with lm-eval's peft= "
            "model argument the names gain the PeftModel prefix (model.model.) and do not resolve"
        )
        if request.action == "ablate":
            notes.append(
                f"ablation: one clamp-to-0 entry per block {layer}..{shape.n_layers - 1}, as the project's "
                "DirectionAblation acts after every block from the layer on"
            )
    else:
        notes.append(
            "llama.cpp adds direction.N (alpha baked in) after block N; --control-vector-scaled FILE S "
            "multiplies it by S, --control-vector-layer-range START END must include the layer"
        )
    return notes


def _usage(request: ExportRequest, source: SourceVector, model: str) -> str:
    """The command that applies the export (the model as the vectors record it, adapter included)."""
    adapter = isinstance(source.fingerprint, dict) and bool(source.fingerprint.get("adapter"))
    label = f"{model}{' with its refusal-token adapter merged' if adapter else ''}"
    if request.format == "lm-eval":
        return (
            f"lm_eval --model steered --model_args pretrained=<HF folder of {label}>,"
            f"steer_path={request.out} --tasks <tasks>"
        )
    return f"llama-cli -m <GGUF of {label}> --control-vector {request.out}"


def export_vectors(
    request: ExportRequest, *, print_fn: Callable[[str], None] | None = print
) -> dict[str, Any]:
    """Write ``request.out`` and its ``.json`` sidecar; return the sidecar's record.

    Raises:
        UserError: On an existing ``--out`` (without ``--force``), a layer the target cannot express, a
            model that cannot be read, naming the flag.
        FileNotFoundError, ArtifactError, ValueError: On a bad ``--vectors`` / ``--category`` / ``--space``.
    """
    import torch

    from sae_refusal import __version__
    from sae_refusal.atomic import atomic_file
    from sae_refusal.llm.hashing import file_sha256
    from sae_refusal.llm.layers import validate_layers

    out, side = Path(request.out), sidecar_path(request.out)
    existing = [p for p in (out, side) if p.exists()]
    if existing and not request.force:
        raise UserError(f"--out: {existing[0]} exists; choose another file or pass --force to replace it")
    if out.is_dir():
        raise UserError(f"--out: {out} is a folder; give a file name")
    source = read_source_vector(request.vectors, request.category, request.space)
    llm = _export_llm(request, source)
    shape = _architecture(llm)
    asked = request.layer if request.layer is not None else source.layer
    if asked is None:
        raise UserError(f"--layer: the vectors in {source.folder} record no layer; give --layer")
    (layer,) = validate_layers(asked, shape.n_layers, key="--layer")  # the layer the edit acts at
    if source.vector_D.shape[-1] != shape.d_model:
        raise ArtifactError(
            f"--vectors: {source.folder} holds vectors of width {source.vector_D.shape[-1]}, the model "
            f"{llm.name_or_path!r} (--model) has width {shape.d_model}"
        )
    if not bool(torch.any(source.vector_D != 0)):
        raise ArtifactError(
            f"--category: the {source.space} vector of {source.category!r} in {source.folder} is all zeros "
            "(a category without training rows); it steers nothing"
        )
    if request.format == "gguf-control-vector":
        if request.action == "ablate":
            raise UserError(
                "--action: llama.cpp control vectors only add a vector to the residual stream; export an "
                "ablation with --format lm-eval"
            )
        if layer == 0:
            raise UserError(
                "--layer: llama.cpp has no control-vector slot for layer 0 (it refuses direction.0); steer "
                "at layer 1 or later"
            )
        entries = [f"direction.{layer}"]
    else:
        payload = _lm_eval_payload(request, source.vector_D, layer, shape)
        entries = list(payload)
    record: dict[str, Any] = {
        "format": request.format,
        "file": out.name,
        "produced_by": f"sae-refusal export-vectors (sae_refusal {__version__})",
        "source": {"vectors": str(source.folder), "kind": source.kind, "files_sha256": source.files_sha256},
        "category": source.category,
        "space": source.space,
        "layer": layer,
        "artifact_layer": source.layer,
        "alpha": float(request.alpha),
        "unit_norm": bool(request.unit_norm),
        "action": request.action,
        "positions": "all",
        "vector_norm": float(source.vector_D.norm()),
        "model": source.model,
        "model_fingerprint": source.fingerprint,
        "mapped_on": {
            "model": llm.name_or_path,
            "model_type": shape.model_type,
            "n_layers": shape.n_layers,
            "d_model": shape.d_model,
        },
        "entries": entries,
        "differences": _differences(request, shape, layer, source.layer),
        "usage": _usage(request, source, source.model or llm.name_or_path),
    }
    with atomic_file(out) as tmp_out, atomic_file(side) as tmp_side:
        if request.format == "gguf-control-vector":
            vector = _unit(source.vector_D) if request.unit_norm else source.vector_D
            provenance = {k: v for k, v in record.items() if k not in ("differences", "usage")}
            write_control_vector(
                tmp_out,
                {layer: request.alpha * vector},
                shape.model_type or llm.name_or_path,
                provenance=provenance,
            )
        else:
            torch.save(payload, tmp_out)
        record["file_sha256"] = file_sha256(tmp_out)
        tmp_side.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if print_fn is not None:
        what = "ablation" if request.action == "ablate" else f"alpha {request.alpha:g}"
        print_fn(
            f"[export-vectors] wrote {out} ({request.format}: {source.space} vector of {source.category!r}, "
            f"{what}, layer {layer} -> {', '.join(entries)}) and {side}"
        )
        print_fn(f"  use it: {record['usage']}")
        for note in record["differences"]:
            print_fn(f"  note: {note}")
    return record


def run_export_command(args: Sequence[str]) -> None:
    """``sae-refusal export-vectors ...``: parse, then :func:`export_vectors`."""
    export_vectors(parse_export(args))


# -------------------------------------------------------------------------------------- import


@dataclass(frozen=True)
class FileVector:
    """The vector an eval column takes from a file of another tool.

    Attributes:
        path: The file.
        format: ``lm-eval``, ``steering-vectors`` or ``gguf-control-vector``.
        layer: The layer it acts at.
        vector: ``residual``: the file's edit at alpha 1; ``ablation``: the direction.
        file_layers: The layers the file holds.
        file_sha256: The file's sha256.
        model: The model name its provenance records (``None`` when unknown).
        fingerprint: The model fingerprint its provenance records (``None`` when unknown).
        notes: What differs from the file's own application (recorded with the column).
    """

    path: Path
    format: str
    layer: int
    vector: Tensor
    file_layers: tuple[int, ...]
    file_sha256: str
    model: str | None = None
    fingerprint: dict[str, Any] | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


def is_vectors_file(path: str | Path, vectors_format: str = "auto") -> bool:
    """Whether ``intervention.vectors`` names a file of another tool (else a project folder)."""
    if vectors_format not in ("auto", "project"):
        return True
    path = Path(path)
    return vectors_format == "auto" and not path.is_dir() and path.suffix.lower() in FILE_SUFFIXES


@dataclass(frozen=True)
class _Entry:
    vector: Tensor  # add: the edit at alpha 1; clamp: the steering vector
    action: str  # add | clamp


def _torch_file(path: Path, key: str) -> Any:
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ArtifactError(
            f"{key}: {path} holds objects torch.load(weights_only=True) refuses "
            f"({one_line(err).splitlines()[0]}); save plain tensors (for a steering_vectors SteeringVector: "
            "dataclasses.asdict(vector))"
        ) from None
    except (OSError, RuntimeError, ValueError, EOFError) as err:
        raise ArtifactError(f"{key}: {path} is not a readable torch file ({one_line(err)})") from None


def _pt_format(payload: Any) -> str | None:
    if not isinstance(payload, dict) or not payload:
        return None
    if all(isinstance(v, dict) and "steering_vector" in v and "action" in v for v in payload.values()):
        return "lm-eval"
    if "layer_activations" in payload or all(isinstance(k, int) for k in payload):
        return "steering-vectors"
    return None


def _lm_eval_entries(payload: dict[Any, Any], path: Path, shape: ModelShape, key: str) -> dict[int, _Entry]:
    import torch

    by_name = {name: i for i, name in enumerate(shape.hookpoints)}
    entries: dict[int, _Entry] = {}
    for hookpoint, info in payload.items():
        if hookpoint not in by_name:
            raise ValueError(
                f"{key}: hookpoint {hookpoint!r} of {path} is no decoder block of this model (lm-eval names "
                f"them {shape.hookpoints[0]!r} .. {shape.hookpoints[-1]!r})"
            )
        vector = info["steering_vector"]
        if not isinstance(vector, torch.Tensor) or vector.ndim != 1:
            raise ArtifactError(f"{key}: {path}: {hookpoint}.steering_vector is not a 1-D tensor")
        if info.get("head_index") is not None:
            raise ValueError(
                f"{key}: {path}: {hookpoint} steers one attention head (head_index); not supported"
            )
        coefficient = float(info.get("steering_coefficient", 1.0))
        action = info["action"]
        if action == "add":
            entries[by_name[hookpoint]] = _Entry(coefficient * vector.detach().float(), "add")
        elif action == "clamp":
            if coefficient != 0.0 or info.get("bias") is not None:
                raise ValueError(
                    f"{key}: {path}: {hookpoint} clamps to {coefficient:g}"
                    + (" with a bias" if info.get("bias") is not None else "")
                    + "; only a clamp to 0 without bias (an ablation) has a project form"
                )
            entries[by_name[hookpoint]] = _Entry(vector.detach().float(), "clamp")
        else:
            raise ValueError(f"{key}: {path}: {hookpoint} has action {action!r}; lm-eval knows add and clamp")
    return entries


def _steering_vectors_entries(payload: dict[Any, Any], path: Path, key: str) -> dict[int, _Entry]:
    import torch

    layer_type = payload.get("layer_type", "decoder_block")
    if layer_type != "decoder_block":
        raise ValueError(
            f"{key}: {path} steers {layer_type!r} modules; only decoder_block (the residual stream after "
            "each block) has a project form"
        )
    activations = payload.get("layer_activations", payload)
    entries: dict[int, _Entry] = {}
    for layer, tensor in activations.items():
        if not isinstance(layer, int) or not isinstance(tensor, torch.Tensor) or tensor.ndim != 1:
            raise ArtifactError(f"{key}: {path}: layer_activations must map layer ints to 1-D tensors")
        entries[layer] = _Entry(tensor.detach().float(), "add")
    return entries


def _file_provenance(path: Path, embedded: dict[str, Any] | None, key: str) -> dict[str, Any] | None:
    side = sidecar_path(path)
    if side.is_file():
        try:
            record = json.loads(side.read_text(encoding="utf-8"))
        except ValueError as err:
            raise ArtifactError(
                f"{key}: {side} (the provenance of {path.name}) does not parse ({err})"
            ) from None
        return record if isinstance(record, dict) else None
    return embedded


def _resolve_format(path: Path, declared: str, payload: Any, key: str) -> str:
    if path.suffix.lower() == ".gguf" and declared in ("auto", "gguf-control-vector"):
        return "gguf-control-vector"
    if declared == "gguf-control-vector":
        return declared
    found = _pt_format(payload)
    if found is None:
        raise ArtifactError(
            f"{key}: {path} is neither an lm-eval steer file "
            "({hookpoint: {steering_vector, action, ...}}) nor a steering-vectors file "
            "({layer_activations: {layer: tensor}}); set intervention.vectors_format"
        )
    if declared not in ("auto", found):
        raise ArtifactError(
            f"{key}: {path} holds a {found} file, not {declared} (intervention.vectors_format)"
        )
    return found


def file_vector(
    path: str | Path,
    model: nn.Module,
    *,
    kind: str,
    layer: int | None = None,
    vectors_format: str = "auto",
    key: str = "intervention.vectors",
) -> FileVector:
    """The vector of a file of another tool (lm-eval steer file, control vector, steering-vectors file).

    Args:
        path: The file.
        model: The model the column acts on (its hookpoint names, depth and width).
        kind: ``residual`` or ``ablation``.
        layer: ``intervention.layer``; ``None``: the file's one layer (an lm-eval ablation: its first).
        vectors_format: ``auto`` or a format of :data:`VECTORS_FORMATS`.
        key: The config key named in errors.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: Naming ``key`` (or ``intervention.layer``) on a format, layer, width or action the column
            cannot use.
    """
    from sae_refusal.llm.hashing import file_sha256

    path = Path(path)
    if vectors_format not in VECTORS_FORMATS or vectors_format == "project":
        raise ValueError(
            f"intervention.vectors_format: {vectors_format!r} is no file format; expected one of "
            f"{[f for f in VECTORS_FORMATS if f != 'project']}"
        )
    if kind not in ("residual", "ablation"):
        raise ValueError(
            f"{key}: {path} holds residual-space vectors; kind {kind!r} needs a project vectors folder"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{key}: file {path} does not exist")
    shape = model_shape(model)
    is_gguf = path.suffix.lower() == ".gguf" or vectors_format == "gguf-control-vector"
    payload: Any = None if is_gguf else _torch_file(path, key)
    fmt = _resolve_format(path, vectors_format, payload, key)
    embedded = None
    if fmt == "gguf-control-vector":
        control = read_control_vector(path, key=key)
        entries = {i: _Entry(t, "add") for i, t in control.directions.items()}
        embedded = control.provenance
    elif fmt == "lm-eval":
        entries = _lm_eval_entries(payload, path, shape, key)
    else:
        entries = _steering_vectors_entries(payload, path, key)
    if not entries:
        raise ArtifactError(f"{key}: {path} holds no vectors")
    layers = tuple(sorted(entries))
    clamps = [i for i in layers if entries[i].action == "clamp"]
    if layer is None:
        if clamps:  # an lm-eval ablation: it starts at its first layer
            layer = clamps[0]
        elif len(layers) == 1:
            layer = layers[0]
        else:
            raise ValueError(
                f"intervention.layer: {path} holds vectors for layers {list(layers)}; set intervention.layer "
                "to the one this column acts at"
            )
    if layer >= shape.n_layers:
        raise ValueError(
            f"intervention.layer: {layer} does not exist in a model with {shape.n_layers} layers"
        )
    if layer not in entries:
        raise ValueError(f"{key}: {path} has no vector for layer {layer} (it has layers {list(layers)})")
    entry = entries[layer]
    if kind == "residual" and entry.action == "clamp":
        raise ValueError(
            f"{key}: {path} ablates at layer {layer} (an lm-eval clamp to 0); use kind: ablation for it"
        )
    if entry.vector.shape[-1] != shape.d_model:
        raise ValueError(
            f"{key}: {path} holds vectors of width {entry.vector.shape[-1]}, the model's width is "
            f"{shape.d_model}"
        )
    notes: list[str] = []
    if kind == "residual" and len(layers) > 1:
        notes.append(f"only layer {layer} of the file's layers {list(layers)} is applied")
    if kind == "ablation" and clamps and clamps != list(range(layer, shape.n_layers)):
        notes.append(
            f"the file ablates at layers {clamps}; the column ablates after every block {layer}.."
            f"{shape.n_layers - 1} (the project's ablation)"
        )
    for note in notes:
        log.warning("%s: %s: %s", key, path, note)
    provenance = _file_provenance(path, embedded, key)
    fingerprint = provenance.get("model_fingerprint") if provenance else None
    model_name = provenance.get("model") if provenance else None
    return FileVector(
        path=path,
        format=fmt,
        layer=layer,
        vector=entry.vector.clone(),
        file_layers=layers,
        file_sha256=file_sha256(path),
        model=model_name if isinstance(model_name, str) else None,
        fingerprint=fingerprint if isinstance(fingerprint, dict) else None,
        notes=tuple(notes),
    )
