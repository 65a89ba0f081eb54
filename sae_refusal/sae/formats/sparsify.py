"""EleutherAI sparsify's on-disk SAE format: export a :class:`TopKSAE` to it, and read one back.

Layout (one folder per hookpoint, named as sparsify names it, e.g. ``layers.15/``)::

    cfg.json          SparseCoderConfig fields (activation, expansion_factor, normalize_decoder,
                      num_latents, k, multi_topk, skip_connection, transcode) + "d_in", nothing else
    sae.safetensors   encoder.weight (F, D), encoder.bias (F,), W_dec (F, D), b_dec (D,) [+ W_skip (D, D)]
    sae_refusal_provenance.json  the project's provenance (the project's only; sparsify never reads it)

sparsify computes, on the activations ``x`` it was trained on::

    top_acts, top_idx = TopK_k(ReLU((x - b_dec) @ encoder.weight.T + encoder.bias))
    x_hat = top_acts @ W_dec[top_idx] + b_dec

which is the project's TopK SAE (``TopK`` then ``ReLU`` keeps the same non-zero codes as ``ReLU`` then
``TopK``; only the indices of zero codes can differ, when fewer than ``k`` pre-activations are positive).

Design notes:

* **The input scale is folded into the weights.** Our SAE multiplies its input by ``s`` and divides its
  reconstruction by ``s``; sparsify has no such buffer. With ``W_enc' = s W_enc``, ``b_dec' = b_dec / s``,
  ``W_dec' = W_dec / s`` and ``b_enc`` unchanged, ``(x - b_dec') W_enc'^T + b_enc = (s x - b_dec) W_enc^T +
  b_enc``: the same pre-activations, hence the same codes, and ``z W_dec' + b_dec' = (z W_dec + b_dec) / s``:
  the same raw-space reconstruction. The exported decoder rows therefore have norm ``1 / s``, not 1;
  ``normalize_decoder`` is still written ``true`` (sparsify's default, and how the SAE was trained) and only
  matters if sparsify's trainer fine-tunes the export (it would rescale the rows).
* **Only TopK.** sparsify 1.3.3's ``SparseCoderConfig.activation`` is ``"topk"`` or ``"groupmax"``; it has
  no BatchTopK (batch-level selection, inference threshold), JumpReLU or Matryoshka coder, so
  :func:`save_sparsify` refuses those (and ReLU) SAEs naming the class; SAELens holds them
  (:mod:`sae_refusal.sae.formats.saelens`).
* **Reading is strict.** Anything that the project's TopK SAE cannot compute exactly (``groupmax``, a skip
  connection, a transcoder, missing, extra or misshapen tensors) is refused with a ``ValueError`` naming the
  file and the field, rather than loaded approximately. ``multi_topk`` (a training-loss option) is accepted.
  A loaded SAE has ``input_scale`` 1 and the weights as stored (float32).
* **Provenance** (model, layer, hookpoint, seed, architecture, the folded scale, and the ``sha256`` of
  ``sae.safetensors``, verified on load) goes into the sidecar :data:`PROVENANCE_FILE`, its paths relative
  to the export folder (:func:`~sae_refusal.provenance.relative_paths`), not into ``cfg.json``: sparsify
  1.3.3's ``SparseCoder.load_from_disk`` pops ``d_in`` and reads the rest with simple-parsing's
  ``from_dict(..., drop_extra_fields=True)``, which logs ``Dropping extra args {...}`` (the whole block) for
  any other key on every load. Exports written before kept the block in ``cfg.json`` under
  ``"sae_refusal"``; they are still read (the sidecar wins when both exist).
  :func:`read_sparsify_metadata` returns it with the format facts. Tensors are read and written through
  :mod:`sae_refusal.sae.files` (an empty or garbled file, or inf / nan, is refused naming file and tensor).
* Written atomically (:class:`~sae_refusal.atomic.AtomicFolder`), tensors float32 and contiguous.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from sae_refusal.atomic import AtomicFolder
from sae_refusal.provenance import relative_paths, resolve_paths
from sae_refusal.sae.base import SparseAutoencoder
from sae_refusal.sae.files import SHA256_KEY, read_config, read_tensors, verify_sha256, write_tensors
from sae_refusal.sae.topk import TopKSAE

__all__ = [
    "PROVENANCE_FILE",
    "PROVENANCE_KEY",
    "SPARSIFY_CONFIG",
    "SPARSIFY_WEIGHTS",
    "is_sparsify_folder",
    "load_sparsify",
    "read_sparsify_metadata",
    "save_sparsify",
]

#: Weights file of a sparsify hookpoint folder.
SPARSIFY_WEIGHTS = "sae.safetensors"
#: Config file of a sparsify hookpoint folder.
SPARSIFY_CONFIG = "cfg.json"
#: Sidecar file of the project's provenance block (beside ``cfg.json``, which sparsify reads whole).
PROVENANCE_FILE = "sae_refusal_provenance.json"
#: ``cfg.json`` key of the project's provenance block in exports written before :data:`PROVENANCE_FILE`.
PROVENANCE_KEY = "sae_refusal"
#: The tensors a plain TopK sparse coder stores.
_KEYS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")


def is_sparsify_folder(folder: Path) -> bool:
    """Whether ``folder`` looks like a sparsify hookpoint folder.

    That is: a ``cfg.json`` object with ``"d_in"`` and a ``sae.safetensors`` holding ``encoder.weight``. Never
    raises: an unreadable or malformed file gives ``False``.
    """
    folder = Path(folder)
    cfg_path, weights = folder / SPARSIFY_CONFIG, folder / SPARSIFY_WEIGHTS
    if not cfg_path.is_file() or not weights.is_file():
        return False
    try:
        cfg = json.loads(cfg_path.read_text())
        if not isinstance(cfg, dict) or "d_in" not in cfg:
            return False
        with safe_open(str(weights), framework="pt", device="cpu") as fh:
            return "encoder.weight" in set(fh.keys())
    except Exception:  # unreadable file, bad JSON, a corrupt safetensors header: not a sparsify folder
        return False


def save_sparsify(
    sae: SparseAutoencoder, folder: str | os.PathLike[str], *, metadata: dict[str, Any] | None = None
) -> Path:
    """Export a TopK SAE as a sparsify hookpoint folder (``cfg.json`` + ``sae.safetensors``), atomically.

    The input scale is folded into the weights (module notes), so the export computes the same codes and the
    same reconstruction on raw activations as ``sae``.

    Args:
        sae: The SAE; only :class:`TopKSAE` has a sparsify equivalent.
        folder: The hookpoint folder to write (replaced if it exists); sparsify names it after the hookpoint,
            e.g. ``layers.15`` (:func:`~sae_refusal.sae.formats.hookpoints.hookpoint_for_layer`).
        metadata: JSON-serialisable provenance (model, layer, hookpoint, seed, architecture, ...), kept in
            :data:`PROVENANCE_FILE` beside the SAE's architecture and folded input scale, local paths
            relative to ``folder``.

    Returns:
        The written folder.

    Raises:
        ValueError: If ``sae`` is not a TopK SAE (sparsify has no equivalent of the others: BatchTopK,
            Matryoshka, JumpReLU, ReLU), its input scale is not finite and positive, or ``metadata`` is not
            JSON-serialisable.
        ArtifactError: If a weight holds inf / nan (nothing is written).
    """
    if not isinstance(sae, TopKSAE):
        raise ValueError(
            f"sparsify has no equivalent of a {type(sae).__name__} (architecture {sae.architecture!r}): its "
            "SparseCoder keeps the k largest codes of each row ('topk'; or 'groupmax'), with no batch-level "
            "top-k, threshold (BatchTopK, JumpReLU) or Matryoshka prefixes, so only a TopKSAE can be "
            "exported to it (this SAE's formats: the project's own export, SAELens)"
        )
    s = float(sae.input_scale)
    if not math.isfinite(s) or s <= 0.0:
        raise ValueError(f"input_scale: must be finite and > 0 to fold into the weights, got {s}")
    d_model, n_latents = sae.d_model, sae.n_latents
    provenance = relative_paths({"architecture": sae.architecture, **(metadata or {})}, folder)
    provenance["input_scale_folded"] = s
    provenance.pop(SHA256_KEY, None)  # a re-export's source's own; this export's is added when written
    cfg = {
        "activation": "topk",
        "expansion_factor": n_latents // d_model,
        "normalize_decoder": True,
        "num_latents": n_latents,
        "k": sae.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": d_model,
    }
    try:
        json.dumps(provenance)
    except (TypeError, ValueError) as err:
        raise ValueError(f"metadata: not JSON-serialisable ({err})") from err
    with torch.no_grad():
        tensors = {
            "encoder.weight": sae.W_enc_FD.detach().double() * s,
            "encoder.bias": sae.b_enc_F.detach().double(),
            "W_dec": sae.W_dec_FD.detach().double() / s,
            "b_dec": sae.b_dec_D.detach().double() / s,
        }
    with AtomicFolder(folder) as out:
        label = Path(folder) / SPARSIFY_WEIGHTS
        provenance[SHA256_KEY] = {
            SPARSIFY_WEIGHTS: write_tensors(tensors, out.tmp / SPARSIFY_WEIGHTS, label=label)
        }
        (out.tmp / SPARSIFY_CONFIG).write_text(json.dumps(cfg, indent=2))
        (out.tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
        return out.commit()


def _provenance(folder: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """The project's provenance block of a sparsify folder as written (paths not resolved), else ``{}``.

    :data:`PROVENANCE_FILE` when present, else ``cfg.json``'s ``"sae_refusal"`` entry (older exports).

    Raises:
        ArtifactError: If :data:`PROVENANCE_FILE` does not parse or is not a JSON object.
        ValueError: If the block is not an object (naming the file and field).
    """
    sidecar = folder / PROVENANCE_FILE
    if sidecar.is_file():
        return read_config(sidecar)
    block = cfg.get(PROVENANCE_KEY, {})
    if not isinstance(block, dict):
        raise ValueError(f"{folder / SPARSIFY_CONFIG}: field {PROVENANCE_KEY!r} must be an object")
    return block


def _read_cfg(folder: Path) -> dict[str, Any]:
    """``cfg.json`` of a sparsify folder, checked to be an object with an integer ``d_in``."""
    cfg_path = folder / SPARSIFY_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no sparsify SAE at {folder} (missing {SPARSIFY_CONFIG})")
    cfg = read_config(cfg_path)
    if "d_in" not in cfg:
        raise ValueError(f"{cfg_path}: field 'd_in' is missing (not a sparsify config)")
    _positive_int(cfg, "d_in", cfg_path)
    return cfg


def _positive_int(cfg: dict[str, Any], field: str, cfg_path: Path) -> int:
    value = cfg[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{cfg_path}: field {field!r} must be a positive integer, got {value!r}")
    return value


def load_sparsify(
    folder: str | os.PathLike[str], device: str | torch.device = "cpu", *, verify: bool = True
) -> TopKSAE:
    """Read a sparsify TopK SAE folder as a :class:`TopKSAE` (input scale 1, float32 weights, default aux_k).

    Its provenance (if the project wrote it) and format facts: :func:`read_sparsify_metadata`.

    Args:
        folder: A sparsify hookpoint folder (``cfg.json`` + ``sae.safetensors``).
        device: Where the SAE goes.
        verify: Check ``sae.safetensors`` against the sha256 the project's provenance block records (a folder
            sparsify wrote records none).

    Raises:
        FileNotFoundError: If ``cfg.json`` or ``sae.safetensors`` is missing.
        ArtifactError: If ``cfg.json`` does not parse, or ``sae.safetensors`` is empty, unreadable, altered
            (sha256) or holds inf / nan (naming the file and the tensor).
        ValueError: Naming the file and field, for a config the TopK SAE cannot compute exactly (activation
            other than ``topk``, ``skip_connection`` or ``transcode`` true, bad ``d_in`` / ``k`` /
            ``num_latents``) or weights that do not fit it (``W_skip``, missing or unexpected tensors, wrong
            shapes).
    """
    folder = Path(folder)
    cfg = _read_cfg(folder)
    cfg_path = folder / SPARSIFY_CONFIG
    weights = folder / SPARSIFY_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"sparsify SAE {folder} lacks {SPARSIFY_WEIGHTS}")
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise ValueError(
            f"{cfg_path}: field 'activation' is {activation!r}; only 'topk' maps to the project's TopK SAE"
        )
    for flag in ("skip_connection", "transcode"):
        if cfg.get(flag, False):
            raise ValueError(f"{cfg_path}: field {flag!r} is true; the project's TopK SAE has no equivalent")
    d_in = _positive_int(cfg, "d_in", cfg_path)
    if "k" not in cfg:
        raise ValueError(f"{cfg_path}: field 'k' is missing")
    k = _positive_int(cfg, "k", cfg_path)
    if cfg.get("num_latents", 0) == 0:  # sparsify's convention: expansion_factor * d_in latents
        cfg = {**cfg, "expansion_factor": cfg.get("expansion_factor", 32)}
        n_latents = d_in * _positive_int(cfg, "expansion_factor", cfg_path)
    else:
        n_latents = _positive_int(cfg, "num_latents", cfg_path)
    if k > n_latents:
        raise ValueError(f"{cfg_path}: field 'k' ({k}) exceeds num_latents ({n_latents})")

    if verify:
        sidecar = folder / PROVENANCE_FILE
        block = _provenance(folder, cfg)
        verify_sha256(folder, block.get(SHA256_KEY), sidecar if sidecar.is_file() else cfg_path)
    tensors = read_tensors(weights)
    if "W_skip" in tensors:
        raise ValueError(f"{weights}: holds 'W_skip' (a skip connection); the project's TopK SAE has none")
    missing = [key for key in _KEYS if key not in tensors]
    if missing:
        raise ValueError(f"{weights}: missing tensor(s) {missing} (a sparsify TopK SAE stores {list(_KEYS)})")
    extra = sorted(set(tensors) - set(_KEYS))
    if extra:
        raise ValueError(
            f"{weights}: unexpected tensor(s) {extra} (a sparsify TopK SAE stores {list(_KEYS)})"
        )
    expected = {
        "encoder.weight": (n_latents, d_in),
        "encoder.bias": (n_latents,),
        "W_dec": (n_latents, d_in),
        "b_dec": (d_in,),
    }
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(
                f"{weights}: tensor {key!r} has shape {tuple(tensors[key].shape)}, expected {shape} "
                f"(d_in {d_in}, num_latents {n_latents} from {SPARSIFY_CONFIG})"
            )

    sae = TopKSAE(d_in, n_latents, k)
    with torch.no_grad():
        sae.W_enc_FD.copy_(tensors["encoder.weight"].float())
        sae.b_enc_F.copy_(tensors["encoder.bias"].float())
        sae.W_dec_FD.copy_(tensors["W_dec"].float())
        sae.b_dec_D.copy_(tensors["b_dec"].float())
        sae.input_scale.fill_(1.0)
    return sae.to(device)


def read_sparsify_metadata(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The provenance and format facts of a sparsify folder.

    Returns:
        The provenance block (:data:`PROVENANCE_FILE`, or ``cfg.json``'s ``"sae_refusal"`` entry in older
        exports; empty for a folder the project did not write) with its folder-relative paths resolved
        against ``folder`` (:func:`~sae_refusal.provenance.resolve_paths`), plus ``"format": "sparsify"``,
        ``"k"`` and ``"d_in"`` from the config, and ``"hookpoint"``: the block's own when it has one, else the
        folder's name (sparsify names hookpoint folders after the hookpoint).

    Raises:
        FileNotFoundError: If ``cfg.json`` is missing.
        ArtifactError: If ``cfg.json`` or :data:`PROVENANCE_FILE` does not parse.
        ValueError: If ``cfg.json`` is not a sparsify config or its ``"sae_refusal"`` entry is not an object.
    """
    folder = Path(folder)
    cfg = _read_cfg(folder)
    meta = resolve_paths(_provenance(folder, cfg), folder)
    meta.setdefault("hookpoint", folder.name)
    meta.update(format="sparsify", k=cfg.get("k"), d_in=cfg["d_in"])
    return meta
