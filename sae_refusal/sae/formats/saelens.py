"""SAELens' on-disk SAE format: export the project's SAEs to it, and read SAELens SAEs back.

Layout written (SAELens 6, as its ``SAE.save_model`` writes it and ``SAE.load_from_disk`` reads it; checked
against sae-lens 6.54.12, :data:`SAELENS_VERSION`)::

    cfg.json                 {"architecture": "standard" | "topk" | "jumprelu", "d_in": D, "d_sae": F,
                              "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": true,
                              "normalize_activations": "none", "reshape_activations": "none",
                              ["k": k, "rescale_acts_by_decoder_norm": false,]          (topk only)
                              "metadata": {"sae_lens_version": "6.54.12", "sae_lens_training_version": null,
                                           "model_name": <hub id>, "hook_name": "blocks.{l}.hook_resid_post",
                                           ["model_adapter": "../<artifact folder>",] ...,
                                           "sae_refusal": {provenance}}}
    sae_weights.safetensors  W_enc (D, F), b_enc (F,), W_dec (F, D), b_dec (D,)
                             [+ threshold (F,) for jumprelu]

BatchTopK and Matryoshka-BatchTopK are training architectures in SAELens (``BatchTopKTrainingSAE``,
``MatryoshkaBatchTopKTrainingSAE``, registered for training only: ``SAE.load_from_disk`` of their folder
fails, ``TrainingSAE.load_from_disk`` reads it). Its ``save_inference_model`` writes them as a ``jumprelu``
SAE: every latent's ``threshold`` is the scalar ``topk_threshold`` (the EMA of the smallest kept activation),
the decoder norms folded in when ``rescale_acts_by_decoder_norm``, and ``metadata.training_architecture``
(``"batchtopk"`` / ``"matryoshka_batchtopk"``) with ``training_architecture_details`` (``k``,
``topk_threshold_lr``, ``matryoshka_widths``, ...) recording what it was. :func:`save_saelens` writes the
project's :class:`~sae_refusal.sae.batchtopk.BatchTopKSAE` and
:class:`~sae_refusal.sae.batchtopk.MatryoshkaBatchTopKSAE` the same way (eval-mode codes
``ReLU(pre) * (pre > threshold)`` are SAELens' JumpReLU ones; ``topk_threshold_lr = 1 - threshold_momentum``),
and a :class:`~sae_refusal.sae.jumprelu_train.TrainableJumpReLUSAE` as ``jumprelu`` with
``threshold = exp(log_threshold)``. SAELens' training folder (``save_model`` of a BatchTopK training SAE)::

    cfg.json                 {"architecture": "batchtopk" | "matryoshka_batchtopk", "k": k (a float there),
                              "topk_threshold_lr": lr, "rescale_acts_by_decoder_norm": bool,
                              ["matryoshka_widths": [m_1, ..., d_sae],] ..., "metadata": {...}}
    sae_weights.safetensors  W_enc, b_enc, W_dec, b_dec, topk_threshold () float64

computes ``ReLU(pre)`` kept at its ``k * B`` largest entries over the batch (``pre`` times the decoder row
norms, and the codes divided by them before decoding, when ``rescale_acts_by_decoder_norm``), in training and
eval mode alike; its inference export thresholds at ``topk_threshold``. :func:`load_saelens` reads it as the
project's class: the same batch top-k in training mode, the same thresholded codes in eval mode.

SAELens computes (``apply_b_dec_to_input`` true, ``normalize_activations`` "none")::

    pre = (x - b_dec) @ W_enc + b_enc
    z   = ReLU(pre)                        standard  -> the project's ReLUSAE ("relu_l1")
          ReLU(TopK_k(pre))                topk      -> TopKSAE
          ReLU(pre) * (pre > threshold)    jumprelu  -> JumpReLUSAE
    x_hat = z @ W_dec + b_dec

Design notes:

* **The input scale is folded into the weights on export.** With ``W_enc' = s W_enc``,
  ``b_dec' = b_dec / s``, ``W_dec' = W_dec / s`` (``b_enc`` and ``threshold`` unchanged),
  ``(x - b_dec') W_enc' + b_enc = (s x - b_dec) W_enc + b_enc``: the same pre-activations and codes on raw
  activations, and ``z W_dec' + b_dec' = (z W_dec + b_dec) / s``: the same raw-space reconstruction.
  ``normalize_activations`` is therefore ``"none"``. A TopK SAE trained with ``encoder_dtype="bfloat16"``
  is exported in float32 (its top-k may then differ on near ties).
* **Metadata** goes into SAELens' own fields (``model_name``: the hub id of the model, see
  :func:`saelens_model_name`; ``hook_name`` given or made from ``layer`` as
  ``blocks.{layer}.hook_resid_post``, and any other SAELens metadata field the caller names:
  ``context_size``, ``prepend_bos``, ``dataset_path``...), the refusal-token adapter the SAE's activations
  were read with under ``metadata["model_adapter"]`` (the artifact folder relative to the export folder;
  absent for the base model; not in ``model_from_pretrained_kwargs``, which SAELens passes to the model
  loader and warns about), and the project's full provenance (the caller's metadata, the architecture, its
  config, the folded scale) under ``metadata["sae_refusal"]``, its paths relative to the export folder
  (:func:`~sae_refusal.provenance.relative_paths`). SAELens keeps unknown metadata keys as attributes of its
  ``SAEMetadata`` (and writes them back on ``save_model``) without a word, so its loader stays quiet
  (checked by the ``interop`` tests). ``metadata.sae_lens_version`` is written so that SAELens reads the
  file as a 6.x config (without it, its pre-6.0 conversion keeps only a fixed list of metadata keys).
  Exports written before ``model_name`` was the hub id (``"smollm2"``, a local path) load as they are.
* **Reading folds what the project's modules cannot express as such**, exactly, in float64:
  ``apply_b_dec_to_input`` false (the project's encoders always subtract ``b_dec``) becomes ``b_enc' = b_enc +
  b_dec @ W_enc``; ``rescale_acts_by_decoder_norm`` (topk) becomes SAELens' own ``fold_W_dec_norm`` (``W_enc``
  and ``b_enc`` times the decoder row norms, ``W_dec`` rows divided by them); a SAELens 5 ``scaling_factor``
  (fine-tuning scale of the codes before decoding) multiplies the ``W_dec`` rows. Codes and reconstructions
  are those SAELens computes.
* **Reading is otherwise strict**: an architecture without a project equivalent (``gated``, ``abstopk``,
  transcoders...), ``normalize_activations`` other than ``"none"``, missing, unexpected or misshapen tensors
  are refused with a ``ValueError`` naming the file and the field. ``reshape_activations: "hook_z"`` is
  accepted (the SAE then takes the flattened ``n_heads * d_head`` input). A BatchTopK training folder's
  ``k`` must be a whole number (the project keeps ``k * B`` entries of a batch of ``B``), its
  ``topk_threshold_lr`` in ``(0, 1]`` and its ``matryoshka_widths`` increasing (SAELens appends ``d_sae``
  when the last is smaller; so does the reader).
* **Which class a ``jumprelu`` folder gives**: a :class:`BatchTopKSAE` / :class:`MatryoshkaBatchTopKSAE`
  when the project's provenance block says the export was one (its config rebuilt from the block's
  ``sae_config``), or, for SAELens' own inference export, when ``metadata.training_architecture`` is
  ``batchtopk`` / ``matryoshka_batchtopk`` (``k``, ``threshold_momentum = 1 - topk_threshold_lr`` and the
  prefixes from ``training_architecture_details``; the other training settings are the class defaults) -
  provided every latent's threshold is the same number and the config builds; otherwise, and for every other
  ``jumprelu`` folder (a :class:`TrainableJumpReLUSAE` export included: its inference form), the plain
  :class:`JumpReLUSAE`. The codes are SAELens' either way. Every loaded SAE is returned in eval mode (a
  SAELens folder is an inference SAE; a BatchTopK SAE then uses its threshold; ``.train()`` gives the batch
  top-k).
* **SAELens 5 configs** (flat: ``activation_fn_str`` / ``activation_fn_kwargs {"k"}``, ``hook_name`` or
  ``hook_point``, ``hook_layer``, ``model_name``, no ``sae_lens_version`` >= 6) are read like SAELens 6's own
  ``handle_pre_6_0_config`` reads them; an activation other than ``relu`` / ``topk`` is refused.
* Written atomically (:class:`~sae_refusal.atomic.AtomicFolder`), tensors float32 and contiguous, with the
  ``sha256`` of ``sae_weights.safetensors`` in the provenance block (verified on load). Tensors are read and
  written through :mod:`sae_refusal.sae.files` (an empty or garbled file, or inf / nan, is refused naming file
  and tensor). A loaded SAE has ``input_scale`` 1, float32 weights and the class's default training settings.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from sae_refusal.atomic import AtomicFolder
from sae_refusal.llm.config import SMOLLM2_ALIAS, SMOLLM2_HUB_ID
from sae_refusal.provenance import is_local_path, relative_paths, resolve_paths
from sae_refusal.sae.base import SparseAutoencoder
from sae_refusal.sae.batchtopk import BatchTopKSAE, MatryoshkaBatchTopKSAE
from sae_refusal.sae.files import SHA256_KEY, read_config, read_tensors, verify_sha256, write_tensors
from sae_refusal.sae.formats.hookpoints import hookpoint_for_layer
from sae_refusal.sae.jumprelu import JumpReLUSAE
from sae_refusal.sae.relu import ReLUSAE
from sae_refusal.sae.topk import TopKSAE

__all__ = [
    "ADAPTER_FIELD",
    "PROVENANCE_KEY",
    "SAELENS_CONFIG",
    "SAELENS_VERSION",
    "SAELENS_WEIGHTS",
    "is_saelens_folder",
    "load_saelens",
    "read_saelens_metadata",
    "saelens_model_name",
    "save_saelens",
]

#: Weights file of a SAELens SAE folder.
SAELENS_WEIGHTS = "sae_weights.safetensors"
#: Config file of a SAELens SAE folder.
SAELENS_CONFIG = "cfg.json"
#: Key of the project's provenance block inside ``cfg.json``'s ``metadata``.
PROVENANCE_KEY = "sae_refusal"
#: The SAELens release whose layout :func:`save_saelens` writes (and was verified against).
SAELENS_VERSION = "6.54.12"
#: ``cfg.json`` ``metadata`` key naming the refusal-token adapter (artifact folder) applied on top of
#: ``model_name``, relative to the export folder; absent when the SAE was trained on the base model.
ADAPTER_FIELD = "model_adapter"
#: A hub id: ``owner/name``.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

#: SAELens architecture -> the project's SAE class computing the same codes.
_CLASS_OF: dict[str, type[SparseAutoencoder]] = {
    "standard": ReLUSAE,
    "topk": TopKSAE,
    "jumprelu": JumpReLUSAE,
}
#: SAELens training-only architectures (a training folder: ``save_model`` of its training SAE) -> the
#: project's class; both are written for inference as ``jumprelu`` (their ``topk_threshold`` per latent).
_TRAINING_CLASS_OF: dict[str, type[BatchTopKSAE]] = {
    "batchtopk": BatchTopKSAE,
    "matryoshka_batchtopk": MatryoshkaBatchTopKSAE,
}
#: The project's classes -> the SAELens architecture each is exported as (the first match wins).
_EXPORTED_AS: tuple[tuple[type[SparseAutoencoder], str], ...] = (
    (TopKSAE, "topk"),
    (ReLUSAE, "standard"),
    (JumpReLUSAE, "jumprelu"),  # TrainableJumpReLUSAE too: threshold = exp(log_threshold)
    (BatchTopKSAE, "jumprelu"),  # MatryoshkaBatchTopKSAE too: SAELens' save_inference_model of them
)
#: SAELens' metadata fields (its ``LLM_METADATA_KEYS``) copied from the caller's metadata on export.
_METADATA_FIELDS = (
    "model_name",
    "hook_name",
    "model_class_name",
    "hook_head_index",
    "model_from_pretrained_kwargs",
    "prepend_bos",
    "exclude_special_tokens",
    "neuronpedia_id",
    "context_size",
    "seqpos_slice",
    "dataset_path",
    "hook_name_out",
    "hook_head_index_out",
    "hf_hook_name",
    "hf_hook_name_out",
)
#: Keys of a SAELens 5 flat config that become 6.x metadata (``hook_layer`` kept for the project).
_V5_METADATA = (*_METADATA_FIELDS, "hook_layer", "sae_lens_training_version")
_V5_RENAMES = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index"}


def _saelens_architecture(sae: SparseAutoencoder) -> str:
    for cls, name in _EXPORTED_AS:
        if isinstance(sae, cls):
            return name
    raise ValueError(
        f"SAELens has no equivalent of a {type(sae).__name__} (architecture {sae.architecture!r}); "
        f"exportable: {', '.join(f'{cls.__name__} -> {name!r}' for cls, name in _EXPORTED_AS)}"
    )


def _batchtopk_threshold(sae: BatchTopKSAE) -> float:
    """The inference threshold SAELens' ``jumprelu`` gets for every latent; refused while it is unset."""
    theta = float(sae.threshold)
    if not theta >= 0.0:
        raise ValueError(
            f"threshold: this {type(sae).__name__}'s inference threshold was never set ({theta} < 0; "
            "training estimates it), so its codes depend on the batch and SAELens' 'jumprelu' (a fixed "
            "threshold per latent) cannot hold it; train it first (or set its threshold buffer)"
        )
    return theta


def _training_metadata(sae: BatchTopKSAE) -> dict[str, Any]:
    """``training_architecture`` and its details, as SAELens' ``save_inference_model`` records them."""
    details: dict[str, Any] = {"k": sae.k, "topk_threshold_lr": 1.0 - sae.threshold_momentum}
    if isinstance(sae, MatryoshkaBatchTopKSAE):
        details["matryoshka_widths"] = list(sae.prefixes)
    return {"training_architecture": sae.architecture, "training_architecture_details": details}


def is_saelens_folder(folder: Path) -> bool:
    """Whether ``folder`` looks like a SAELens SAE folder: a ``cfg.json`` object + the weights file.

    Never raises: an unreadable or malformed ``cfg.json`` gives ``False``.
    """
    folder = Path(folder)
    cfg_path = folder / SAELENS_CONFIG
    if not cfg_path.is_file() or not (folder / SAELENS_WEIGHTS).is_file():
        return False
    try:
        return isinstance(json.loads(cfg_path.read_text()), dict)
    except Exception:  # unreadable file, bad JSON: not a SAELens folder
        return False


def saelens_model_name(model: Any) -> str | None:
    """SAELens' ``model_name`` for the model the project loaded as ``model`` (its ``name_or_path``): a hub id.

    SAELens and TransformerLens load the model by this name, so it is the hub id of the weights, never the
    project's alias or a path of the machine the SAE was trained on:

    * the ``smollm2`` alias: :data:`~sae_refusal.llm.config.SMOLLM2_HUB_ID` (the alias loads a quantised
      copy of it);
    * a hub id (``owner/name``, not a local path): itself;
    * a local model folder: the ``_name_or_path`` its ``config.json`` records when that is a hub id (what
      ``save_pretrained`` of a hub model keeps), else the folder's name;
    * a ``.gguf`` file, or a local path that is not there any more (an export made elsewhere): its name
      (without ``.gguf``).

    Returns:
        The name, or ``None`` when ``model`` is ``None``.
    """
    if model is None:
        return None
    name = str(model)
    if name == SMOLLM2_ALIAS:
        return SMOLLM2_HUB_ID
    if not is_local_path(name):
        return name if _HUB_ID.match(name) else Path(name).name.removesuffix(".gguf") or name
    path = Path(name).expanduser()
    config = path / "config.json"
    if config.is_file():
        try:
            recorded = json.loads(config.read_text()).get("_name_or_path")
        except (OSError, ValueError, AttributeError):  # unreadable: the folder's name below
            recorded = None
        if isinstance(recorded, str) and _HUB_ID.match(recorded) and not is_local_path(recorded):
            return recorded
    return Path(os.path.abspath(path)).name.removesuffix(".gguf")


def _export_metadata(
    sae: SparseAutoencoder, metadata: dict[str, Any], s: float, folder: Path
) -> dict[str, Any]:
    """SAELens' ``metadata`` block: its own fields from ``metadata``, and the project's provenance (its paths
    relative to ``folder``, the export folder)."""
    hook_name = metadata.get("hook_name")
    layer = metadata.get("layer")
    if hook_name is None and isinstance(layer, int) and not isinstance(layer, bool):
        hook_name = hookpoint_for_layer(layer, "saelens")
    model_name = metadata.get("model_name")
    block: dict[str, Any] = {
        "sae_lens_version": SAELENS_VERSION,
        "sae_lens_training_version": None,  # not trained with SAELens
        "model_name": model_name if model_name is not None else saelens_model_name(metadata.get("model")),
        "hook_name": hook_name,
    }
    metadata = relative_paths(metadata, folder)
    adapter = metadata.get("adapter_path")
    if adapter is not None:
        block[ADAPTER_FIELD] = adapter  # its own field: model_from_pretrained_kwargs go to the model loader
    for key in _METADATA_FIELDS:
        if key not in block and metadata.get(key) is not None:
            block[key] = metadata[key]
    if isinstance(sae, BatchTopKSAE):
        block.update(_training_metadata(sae))
    block[PROVENANCE_KEY] = {
        "architecture": sae.architecture,
        **{k: v for k, v in metadata.items() if k != SHA256_KEY},  # a re-export's source's own sha256s
        "sae_config": sae.config(),
        "input_scale_folded": s,
    }
    return block


def save_saelens(
    sae: SparseAutoencoder, folder: str | os.PathLike[str], *, metadata: dict[str, Any] | None = None
) -> Path:
    """Export an SAE as a SAELens 6 folder (``cfg.json`` + ``sae_weights.safetensors``), atomically.

    The input scale is folded into the weights (module notes), so SAELens' ``SAE.load_from_disk`` of the
    folder computes the same codes and reconstruction on raw activations as ``sae``.

    Args:
        sae: A :class:`TopKSAE` (-> ``"topk"``), :class:`ReLUSAE` (-> ``"standard"``), :class:`JumpReLUSAE`
            or :class:`~sae_refusal.sae.jumprelu_train.TrainableJumpReLUSAE` (-> ``"jumprelu"``), or a
            :class:`BatchTopKSAE` / :class:`MatryoshkaBatchTopKSAE` (-> ``"jumprelu"`` with its threshold for
            every latent, as SAELens' ``save_inference_model`` writes them; module notes). Eval-mode codes
            are what SAELens computes.
        folder: The folder to write (replaced if it exists).
        metadata: JSON-serialisable provenance (``model``, ``layer``, ``hook_name``, ``seed``,
            ``adapter_path``...). ``model_name`` (else the hub id of ``model``, :func:`saelens_model_name`),
            ``hook_name`` (else ``blocks.{layer}.hook_resid_post``) and ``adapter_path`` fill SAELens'
            ``model_name`` / ``hook_name`` / ``model_adapter``, other SAELens metadata fields given are
            copied, and all of it is kept under ``metadata["sae_refusal"]`` (local paths relative to
            ``folder``).

    Returns:
        The written folder.

    Raises:
        ValueError: If the SAE's class has no SAELens equivalent (naming it), a BatchTopK SAE's threshold
            was never set, its input scale is not finite and positive, ``metadata['layer']`` is negative,
            or ``metadata`` is not JSON-serialisable.
    """
    architecture = _saelens_architecture(sae)
    theta = _batchtopk_threshold(sae) if isinstance(sae, BatchTopKSAE) else None
    s = float(sae.input_scale)
    if not math.isfinite(s) or s <= 0.0:
        raise ValueError(f"input_scale: must be finite and > 0 to fold into the weights, got {s}")
    cfg: dict[str, Any] = {
        "d_in": sae.d_model,
        "d_sae": sae.n_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": _export_metadata(sae, dict(metadata or {}), s, Path(folder)),
    }
    if isinstance(sae, TopKSAE):
        cfg.update(k=sae.k, rescale_acts_by_decoder_norm=False)
    cfg["architecture"] = architecture
    try:
        json.dumps(cfg)
    except (TypeError, ValueError) as err:
        raise ValueError(f"metadata: not JSON-serialisable ({err})") from err

    with torch.no_grad():
        if isinstance(sae, (TopKSAE, BatchTopKSAE)):
            W_enc_DF, b_enc_F = sae.W_enc_FD.T, sae.b_enc_F
        elif isinstance(sae, (ReLUSAE, JumpReLUSAE)):
            W_enc_DF, b_enc_F = sae.W_enc_DF, sae.b_enc_F
        tensors = {
            "W_enc": W_enc_DF.detach().double() * s,
            "b_enc": b_enc_F.detach().double(),
            "W_dec": sae.W_dec_FD.detach().double() / s,
            "b_dec": sae.b_dec_D.detach().double() / s,
        }
        if isinstance(sae, JumpReLUSAE):
            tensors["threshold"] = sae.threshold_F.detach().double()
        elif theta is not None:  # the threshold is in the pre-activations' space: unchanged by the fold
            tensors["threshold"] = torch.full((sae.n_latents,), theta, dtype=torch.float64)
    with AtomicFolder(folder) as out:
        label = Path(folder) / SAELENS_WEIGHTS
        digest = write_tensors(tensors, out.tmp / SAELENS_WEIGHTS, label=label)
        cfg["metadata"][PROVENANCE_KEY][SHA256_KEY] = {SAELENS_WEIGHTS: digest}
        (out.tmp / SAELENS_CONFIG).write_text(json.dumps(cfg, indent=2))
        return out.commit()


def _major_version(version: Any) -> int | None:
    match = re.match(r"\s*v?(\d+)", str(version)) if version else None
    return int(match.group(1)) if match else None


def _read_cfg(folder: Path) -> dict[str, Any]:
    """``cfg.json`` as a SAELens 6 config dict (a SAELens 5 flat config converted), with ``"layout"`` added.

    Nothing about the architecture is checked here (see :func:`load_saelens`).
    """
    cfg_path = folder / SAELENS_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no SAELens SAE at {folder} (missing {SAELENS_CONFIG})")
    raw = read_config(cfg_path)
    meta = raw.get("metadata", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise ValueError(f"{cfg_path}: field 'metadata' must be an object, got {type(meta).__name__}")
    major = _major_version(raw.get("sae_lens_version") or meta.get("sae_lens_version"))
    if major is not None and major >= 6:
        cfg = dict(raw)
        cfg["metadata"] = dict(meta)
        cfg.setdefault("architecture", "standard")
        cfg["layout"] = "saelens6"
        return cfg
    # SAELens < 6: a flat config (what SAELens 6's handle_pre_6_0_config converts)
    flat = {_V5_RENAMES.get(k, k): v for k, v in raw.items()}
    activation = flat.get("activation_fn_str", flat.get("activation_fn", "relu"))
    kwargs = flat.get("activation_fn_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"{cfg_path}: field 'activation_fn_kwargs' must be an object, got {kwargs!r}")
    cfg = {
        k: flat[k]
        for k in ("d_in", "d_sae", "dtype", "apply_b_dec_to_input", "normalize_activations", "k")
        if k in flat
    }
    cfg["architecture"] = flat.get("architecture", "standard")
    if activation == "topk" and kwargs.get("k") is not None:
        cfg["architecture"] = "topk"
        cfg["k"] = kwargs["k"]
    cfg["activation_fn"] = activation
    cfg["finetuning_scaling_factor"] = bool(flat.get("finetuning_scaling_factor", False))
    cfg["reshape_activations"] = flat.get(
        "reshape_activations", "hook_z" if "hook_z" in str(flat.get("hook_name", "")) else "none"
    )
    cfg["metadata"] = {k: flat[k] for k in _V5_METADATA if k in flat}
    cfg["metadata"].update(meta)
    cfg["metadata"].setdefault("sae_lens_version", raw.get("sae_lens_version"))
    cfg["layout"] = "saelens5"
    return cfg


def _positive_int(cfg: dict[str, Any], field: str, cfg_path: Path) -> int:
    if field not in cfg:
        raise ValueError(f"{cfg_path}: field {field!r} is missing")
    value = cfg[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{cfg_path}: field {field!r} must be a positive integer, got {value!r}")
    return value


def _whole_number(value: Any) -> int | None:
    """``value`` as an int when it is a whole number (SAELens' BatchTopK ``k`` is a float), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return None
    return int(value)


def _batchtopk_settings(source: dict[str, Any], architecture: str, d_sae: int, where: str) -> dict[str, Any]:
    """The project's BatchTopK settings (``k``, ``threshold_momentum``, Matryoshka ``prefixes``) from
    SAELens' fields in ``source`` (a training ``cfg.json``, or an inference export's
    ``training_architecture_details``).

    Raises:
        ValueError: Naming ``where`` (the file and the field's prefix) and the field.
    """
    k = _whole_number(source.get("k"))
    if k is None or not 1 <= k <= d_sae:
        raise ValueError(
            f"{where}'k' must be a whole number in [1, {d_sae}] (the project's BatchTopK keeps k * B "
            f"entries of a batch of B), got {source.get('k')!r}"
        )
    settings: dict[str, Any] = {"k": k}
    lr = source.get("topk_threshold_lr")
    if lr is not None:
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0.0 < float(lr) <= 1.0:
            raise ValueError(f"{where}'topk_threshold_lr' must be in (0, 1], got {lr!r}")
        settings["threshold_momentum"] = 1.0 - float(lr)  # theta <- (1 - lr) theta + lr m
    if architecture == "matryoshka_batchtopk":
        raw = source.get("matryoshka_widths")
        widths = [_whole_number(w) for w in raw] if isinstance(raw, list) else [None]
        if widths and widths[-1] is not None and widths[-1] < d_sae:
            widths.append(d_sae)  # SAELens adds the full width as the last level (with a warning)
        if (
            not widths
            or any(w is None or w < 1 for w in widths)
            or any(b <= a for a, b in itertools.pairwise(w or 0 for w in widths))
            or widths[-1] != d_sae
        ):
            raise ValueError(
                f"{where}'matryoshka_widths' must be increasing widths >= 1 up to d_sae ({d_sae}), "
                f"got {raw!r}"
            )
        settings["prefixes"] = widths
    return settings


def _check_cfg(cfg: dict[str, Any], cfg_path: Path) -> tuple[str, int, int]:
    """``(architecture, d_in, d_sae)`` of a config the project's SAEs compute exactly, else ValueError."""
    architecture = cfg["architecture"]
    if architecture not in _CLASS_OF and architecture not in _TRAINING_CLASS_OF:
        known = {**_CLASS_OF, **_TRAINING_CLASS_OF}
        raise ValueError(
            f"{cfg_path}: field 'architecture' is {architecture!r}; only "
            f"{', '.join(f'{name!r} ({cls.__name__})' for name, cls in known.items())} map to the "
            "project's SAEs"
        )
    if cfg["layout"] == "saelens5":
        activation = cfg.get("activation_fn", "relu")
        if activation == "topk" and architecture != "topk":
            raise ValueError(f"{cfg_path}: field 'activation_fn_kwargs' lacks 'k' for activation 'topk'")
        if activation not in ("relu", "topk"):
            raise ValueError(
                f"{cfg_path}: field 'activation_fn_str' is {activation!r}; only 'relu' and 'topk' map to the "
                "project's SAEs"
            )
    normalize = cfg.get("normalize_activations", "none")
    if normalize is None or normalize is False:
        normalize = "none"
    if normalize != "none":
        shown = "true (expected_average_only_in)" if normalize is True else repr(normalize)
        raise ValueError(
            f"{cfg_path}: field 'normalize_activations' is {shown}; only 'none' is supported (the project's "
            "SAEs take raw activations: fold the normalisation into the weights first, e.g. with SAELens' "
            "fold_activation_norm_scaling_factor, and save with normalize_activations 'none')"
        )
    reshape = cfg.get("reshape_activations", "none")
    if reshape not in ("none", "hook_z"):
        raise ValueError(
            f"{cfg_path}: field 'reshape_activations' is {reshape!r}; expected 'none' or 'hook_z'"
        )
    apply_b_dec = cfg.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise ValueError(
            f"{cfg_path}: field 'apply_b_dec_to_input' must be true or false, got {apply_b_dec!r}"
        )
    d_in, d_sae = _positive_int(cfg, "d_in", cfg_path), _positive_int(cfg, "d_sae", cfg_path)
    if architecture == "topk":
        k = _positive_int(cfg, "k", cfg_path)
        if k > d_sae:
            raise ValueError(f"{cfg_path}: field 'k' ({k}) exceeds d_sae ({d_sae})")
    if architecture in _TRAINING_CLASS_OF:
        _batchtopk_settings(cfg, architecture, d_sae, f"{cfg_path}: field ")
    return architecture, d_in, d_sae


def _rescales_by_decoder_norm(cfg: dict[str, Any], architecture: str) -> bool:
    """Whether SAELens scales the codes by the decoder row norms (SAELens' defaults when the field is absent:
    false for an inference ``topk``, true for a BatchTopK training config)."""
    if architecture == "topk":
        return bool(cfg.get("rescale_acts_by_decoder_norm", False))
    return architecture in _TRAINING_CLASS_OF and bool(cfg.get("rescale_acts_by_decoder_norm", True))


def _read_tensors(
    weights: Path, cfg: dict[str, Any], architecture: str, d_in: int, d_sae: int
) -> dict[str, torch.Tensor]:
    """The checked tensors of ``weights``, float64 (a SAELens 5 ``scaling_factor`` folded into W_dec)."""
    tensors = read_tensors(weights)
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if architecture == "jumprelu":
        expected["threshold"] = (d_sae,)
    if architecture in _TRAINING_CLASS_OF:
        expected["topk_threshold"] = ()  # a float64 scalar
    missing = [key for key in expected if key not in tensors]
    if missing:
        raise ValueError(
            f"{weights}: missing tensor(s) {missing} (a SAELens {architecture!r} SAE stores {list(expected)})"
        )
    extra = sorted(set(tensors) - set(expected) - {"scaling_factor"})
    if extra:
        raise ValueError(
            f"{weights}: unexpected tensor(s) {extra} (a SAELens {architecture!r} SAE stores "
            f"{list(expected)})"
        )
    if "scaling_factor" in tensors:
        expected["scaling_factor"] = (d_sae,)
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(
                f"{weights}: tensor {key!r} has shape {tuple(tensors[key].shape)}, expected {shape} "
                f"(d_in {d_in}, d_sae {d_sae} from {SAELENS_CONFIG})"
            )
    out = {key: tensors[key].double() for key in expected}
    scaling_F = out.pop("scaling_factor", None)
    if scaling_F is not None and not torch.equal(scaling_F, torch.ones_like(scaling_F)):
        if not cfg.get("finetuning_scaling_factor", False):
            raise ValueError(
                f"{weights}: tensor 'scaling_factor' is not all ones but {SAELENS_CONFIG} field "
                "'finetuning_scaling_factor' is false"
            )
        out["W_dec"] = out["W_dec"] * scaling_F[:, None]  # decode((z * sf)) = z @ (sf * W_dec)
    return out


def load_saelens(
    folder: str | os.PathLike[str], device: str | torch.device = "cpu", *, verify: bool = True
) -> SparseAutoencoder:
    """Read a SAELens SAE folder as the project's equivalent module (module notes: what is folded, refused).

    Args:
        folder: A SAELens SAE folder (``cfg.json`` + ``sae_weights.safetensors``), SAELens 6 or 5 layout.
        device: Where the SAE goes.
        verify: Check the weights against the sha256 the project's provenance block records (a folder SAELens
            wrote records none).

    Returns:
        A :class:`TopKSAE` (``topk``), :class:`ReLUSAE` (``standard``), :class:`JumpReLUSAE` (``jumprelu``),
        or a :class:`BatchTopKSAE` / :class:`MatryoshkaBatchTopKSAE` (SAELens' BatchTopK training folders,
        and ``jumprelu`` folders recorded as one: module notes), in eval mode, with ``input_scale`` 1 and
        float32 weights, computing SAELens' codes and reconstruction.

    Raises:
        FileNotFoundError: If ``cfg.json`` or ``sae_weights.safetensors`` is missing.
        ArtifactError: If ``cfg.json`` does not parse, or the weights file is empty, unreadable, altered
            (sha256) or holds inf / nan (naming the file and the tensor).
        ValueError: Naming the file and field, for an architecture without a project equivalent, a
            normalisation other than ``"none"``, a bad ``d_in`` / ``d_sae`` / ``k`` / ``topk_threshold_lr`` /
            ``matryoshka_widths``, or tensors that are missing, unexpected, misshapen or (``topk_threshold``)
            negative.
    """
    folder = Path(folder)
    cfg_path, weights = folder / SAELENS_CONFIG, folder / SAELENS_WEIGHTS
    cfg = _read_cfg(folder)
    if not weights.is_file():
        raise FileNotFoundError(f"SAELens SAE {folder} lacks {SAELENS_WEIGHTS}")
    architecture, d_in, d_sae = _check_cfg(cfg, cfg_path)
    provenance = cfg["metadata"].get(PROVENANCE_KEY)
    if verify and isinstance(provenance, dict):
        verify_sha256(folder, provenance.get(SHA256_KEY), cfg_path)
    t = _read_tensors(weights, cfg, architecture, d_in, d_sae)
    if not cfg.get("apply_b_dec_to_input", True):  # pre = x @ W_enc + b_enc = (x - b_dec) @ W_enc + b_enc'
        t["b_enc"] = t["b_enc"] + t["b_dec"] @ t["W_enc"]
    if _rescales_by_decoder_norm(cfg, architecture):
        # SAELens: TopK(pre * |W_dec_f|), decoded as (z / |W_dec_f|) @ W_dec: its fold_W_dec_norm, exactly
        # (BatchTopK: its threshold is in those units already, so it stays as it is)
        norm_F = t["W_dec"].norm(dim=1).clamp_min(1e-12)
        t["W_enc"] = t["W_enc"] * norm_F
        t["b_enc"] = t["b_enc"] * norm_F
        t["W_dec"] = t["W_dec"] / norm_F[:, None]
    t = {key: value.float() for key, value in t.items()}

    sae: SparseAutoencoder
    with torch.no_grad():
        if architecture == "topk":
            topk = TopKSAE(d_in, d_sae, _positive_int(cfg, "k", cfg_path))
            topk.W_enc_FD.copy_(t["W_enc"].T)
            topk.b_enc_F.copy_(t["b_enc"])
            sae = topk
        elif architecture == "standard":
            relu = ReLUSAE(d_in, d_sae)
            relu.W_enc_DF.copy_(t["W_enc"])
            relu.b_enc_F.copy_(t["b_enc"])
            sae = relu
        elif architecture in _TRAINING_CLASS_OF:
            if float(t["topk_threshold"]) < 0:
                raise ValueError(
                    f"{weights}: tensor 'topk_threshold' is {float(t['topk_threshold'])} < 0 (SAELens' "
                    "estimate starts at 0 and averages positive activations; the project reads < 0 as unset)"
                )
            sae = _batchtopk(
                _TRAINING_CLASS_OF[architecture],
                dict(d_model=d_in, n_latents=d_sae, **_batchtopk_settings(cfg, architecture, d_sae, "")),
                t,
                t["topk_threshold"],
            )
        else:
            sae = _jumprelu_as_recorded(cfg["metadata"], provenance, d_in, d_sae, t)
        sae.W_dec_FD.copy_(t["W_dec"])
        sae.b_dec_D.copy_(t["b_dec"])
        sae.input_scale.fill_(1.0)
    return sae.to(device).eval()


def _batchtopk(
    cls: type[BatchTopKSAE], config: dict[str, Any], t: dict[str, torch.Tensor], threshold: torch.Tensor
) -> BatchTopKSAE:
    """A ``cls`` built from ``config`` with the encoder of ``t`` and the scalar threshold ``threshold``."""
    sae = cls(**config)
    sae.W_enc_FD.copy_(t["W_enc"].T)
    sae.b_enc_F.copy_(t["b_enc"])
    sae.threshold.copy_(threshold)
    return sae


def _jumprelu_as_recorded(
    metadata: dict[str, Any], provenance: Any, d_in: int, d_sae: int, t: dict[str, torch.Tensor]
) -> SparseAutoencoder:
    """The SAE a ``jumprelu`` folder holds: a BatchTopK one where the project's provenance or SAELens'
    ``training_architecture`` says so and every latent has the same threshold, else a plain JumpReLU SAE."""
    threshold_F = t["threshold"]
    config: dict[str, Any] | None = None
    cls: type[BatchTopKSAE] | None = None
    recorded = provenance.get("architecture") if isinstance(provenance, dict) else None
    if recorded is not None:  # the project's own export: its class and config, as they were
        cls = _TRAINING_CLASS_OF.get(recorded)
        if cls is not None and isinstance(provenance.get("sae_config"), dict):
            config = dict(provenance["sae_config"])
    else:  # SAELens' save_inference_model of its BatchTopK training SAEs
        cls = _TRAINING_CLASS_OF.get(str(metadata.get("training_architecture")))
        details = metadata.get("training_architecture_details")
        if cls is not None and isinstance(details, dict):
            try:
                settings = _batchtopk_settings(details, cls.architecture, d_sae, "")
            except ValueError:  # not settings the project's class takes: the plain JumpReLU SAE below
                settings = None
            if settings is not None:
                config = {"d_model": d_in, "n_latents": d_sae, **settings}
    uniform = bool((threshold_F == threshold_F[0]).all()) and float(threshold_F[0]) >= 0.0
    if cls is not None and config is not None and uniform:
        try:
            sae = _batchtopk(cls, config, t, threshold_F[0])
        except (TypeError, ValueError):  # a config that does not build: the plain JumpReLU SAE below
            pass
        else:
            if (sae.d_model, sae.n_latents) == (d_in, d_sae):
                return sae
    jump = JumpReLUSAE(d_in, d_sae)
    jump.W_enc_DF.copy_(t["W_enc"])
    jump.b_enc_F.copy_(t["b_enc"])
    jump.threshold_F.copy_(threshold_F)
    return jump


def read_saelens_metadata(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The format facts and provenance of a SAELens folder (its architecture need not map to the project's).

    Returns:
        ``"format": "saelens"``, ``"saelens_architecture"``, ``"saelens_layout"`` (``"saelens6"`` or
        ``"saelens5"``), ``"model"`` (SAELens' ``model_name``), ``"hook_name"``, ``"k"`` (topk, else
        ``None``), ``"d_in"``, ``"d_sae"``, ``"sae_lens_version"``, the other SAELens metadata fields that
        are set (``context_size``, ``hook_layer``...), and, for a folder the project wrote, its provenance
        block (``layer``, ``seed``, ``architecture``, ``input_scale_folded``, ``model`` as the project named
        it, ...) on top, its folder-relative paths resolved against ``folder``
        (:func:`~sae_refusal.provenance.resolve_paths`; older exports' absolute paths as they are).

    Raises:
        FileNotFoundError: If ``cfg.json`` is missing.
        ValueError: If ``cfg.json`` is not a JSON object, or its provenance entry is not an object.
    """
    folder = Path(folder)
    cfg = _read_cfg(folder)
    meta: dict[str, Any] = cfg["metadata"]
    provenance = meta.get(PROVENANCE_KEY, {})
    if not isinstance(provenance, dict):
        raise ValueError(f"{folder / SAELENS_CONFIG}: field 'metadata.{PROVENANCE_KEY}' must be an object")
    facts: dict[str, Any] = {
        key: value
        for key, value in meta.items()
        if key not in (PROVENANCE_KEY, "model_name") and value is not None
    }
    facts.update(
        saelens_architecture=cfg["architecture"],
        saelens_layout=cfg["layout"],
        model=meta.get("model_name"),
        hook_name=meta.get("hook_name"),
        k=cfg.get("k") if cfg["architecture"] in ("topk", *_TRAINING_CLASS_OF) else None,
        d_in=cfg.get("d_in"),
        d_sae=cfg.get("d_sae"),
        sae_lens_version=meta.get("sae_lens_version"),
    )
    return resolve_paths({**facts, **provenance, "format": "saelens"}, folder)
