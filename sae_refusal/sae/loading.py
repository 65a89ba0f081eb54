"""Loading an SAE of any format, from a folder or the hub: :func:`load_sae` and :func:`find_sae_exports`.

This module sits above :mod:`sae_refusal.sae.base` (the modules and the project's export writer) and
:mod:`sae_refusal.sae.formats` (sparsify and SAELens layouts, hub ids), so neither imports the other's
loader: ``base`` knows nothing of ``formats``, and ``formats`` only writes and describes folders.

Every format is read through :mod:`sae_refusal.sae.files`: the ``cfg.json`` must parse (the error names the
file), the tensor file must be readable and non-empty, every tensor finite, and the tensor file's sha256 must
match the one ``cfg.json`` records (``verify=False`` skips that; exports written before sha256s were recorded
load unverified). A project ``cfg.json`` whose shape (``d_model``, ``n_latents``) does not describe the
weights is refused naming both files.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# the architectures register themselves in SAE_REGISTRY when imported
import sae_refusal.sae.batchtopk
import sae_refusal.sae.jumprelu
import sae_refusal.sae.jumprelu_train
import sae_refusal.sae.relu
import sae_refusal.sae.topk  # noqa: F401
from sae_refusal.errors import ArtifactError
from sae_refusal.sae.base import CONFIG_FILE, SAE_REGISTRY, WEIGHTS_FILE, SparseAutoencoder
from sae_refusal.sae.files import SHA256_KEY, read_config, read_tensors, verify_sha256
from sae_refusal.sae.formats import detect_format, resolve_sae_path

__all__ = ["find_sae_exports", "load_any_sae", "load_project_sae", "load_sae"]


def load_project_sae(
    folder: str | os.PathLike[str], device: str | torch.device = "cpu", *, verify: bool = True
) -> SparseAutoencoder:
    """Load the project's own export (``cfg.json`` names the architecture; see :mod:`sae_refusal.sae.base`).

    Args:
        folder: The export folder.
        device: Where the SAE goes.
        verify: Check ``sae.safetensors`` against the sha256 recorded in ``cfg.json``.

    Raises:
        FileNotFoundError: If ``cfg.json`` or ``sae.safetensors`` is missing.
        ArtifactError: If ``cfg.json`` does not parse, the weights file is empty, unreadable, altered (sha256)
            or non-finite, or the weights do not fit the config (naming the files and the tensor).
        ValueError: If the architecture is unknown or the config does not fit the class.
    """
    folder = Path(folder)
    cfg_path, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no SAE export at {folder} (missing {CONFIG_FILE})")
    if not weights.is_file():
        raise FileNotFoundError(f"SAE export {folder} lacks {WEIGHTS_FILE}")
    raw = read_config(cfg_path)
    architecture = raw.pop("architecture", None)
    if architecture is None and "d_in" in raw:  # sparsify's config, with weights too broken to tell
        from sae_refusal.sae.formats.sparsify import load_sparsify

        return load_sparsify(folder, device=device, verify=verify)
    if architecture not in SAE_REGISTRY:
        raise ValueError(f"{cfg_path}: unknown architecture {architecture!r} (known: {sorted(SAE_REGISTRY)})")
    recorded = raw.pop(SHA256_KEY, None)
    raw.pop("input_scale", None)
    raw.pop("metadata", None)
    if verify:
        verify_sha256(folder, recorded, cfg_path)
    tensors = read_tensors(weights)
    try:
        sae = SAE_REGISTRY[architecture](**raw)
    except TypeError as err:
        raise ValueError(f"{cfg_path}: config does not fit a {architecture} SAE: {err}") from err
    expected = sae.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ArtifactError(
            f"{weights}: does not hold a {architecture} SAE's tensors (missing {missing}, unexpected "
            f"{unexpected}); export it again"
        )
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ArtifactError(
                f"{weights}: tensor {name!r} has shape {tuple(tensor.shape)}, but {cfg_path} (d_model "
                f"{raw.get('d_model')}, n_latents {raw.get('n_latents')}) gives "
                f"{tuple(expected[name].shape)}: the config does not describe these weights"
            )
    sae.load_state_dict(tensors)
    return sae.to(device).eval()


def load_any_sae(
    folder: str | os.PathLike[str], device: str | torch.device = "cpu", *, verify: bool = True
) -> SparseAutoencoder:
    """Load a local SAE folder of any format as a project module (foreign ones with ``input_scale`` 1), in
    eval mode: a loaded SAE is used for inference (a BatchTopK SAE in training mode would select over the
    batch it is given and move its threshold; :mod:`sae_refusal.sae.batchtopk`).

    Raises:
        FileNotFoundError: If the folder holds no SAE of a known format (naming what it lacks).
        ArtifactError, ValueError: See :func:`load_project_sae` and the format's loader.
    """
    fmt = detect_format(folder)
    sae: SparseAutoencoder
    if fmt == "sparsify":
        from sae_refusal.sae.formats.sparsify import load_sparsify

        sae = load_sparsify(folder, device=device, verify=verify)
    elif fmt == "saelens":
        from sae_refusal.sae.formats.saelens import load_saelens

        sae = load_saelens(folder, device=device, verify=verify)
    else:
        sae = load_project_sae(folder, device=device, verify=verify)
    return sae.eval()


def load_sae(
    folder: str | os.PathLike[str], device: str | torch.device = "cpu", *, verify: bool = True
) -> SparseAutoencoder:
    """Load an SAE (no Lightning needed), in eval mode: a project export (``cfg.json`` says which
    architecture), a sparsify or SAELens folder (:mod:`sae_refusal.sae.formats`), or a hub id
    ``owner/repo[/hookpoint]`` of one.

    Args:
        folder: A local folder or a hub id (kept a string until resolved: ``hf://`` survives).
        device: Where the SAE goes.
        verify: Check the tensor file against the sha256 its ``cfg.json`` records (exports written before
            sha256s were recorded are read unchecked).

    Raises:
        FileNotFoundError: If ``cfg.json`` or the tensor file is missing.
        ArtifactError: If a file is unreadable, altered since it was written, non-finite or does not fit its
            config (naming the file and the tensor).
        ValueError: If the architecture is unknown or the config does not fit the class.
    """
    from sae_refusal.sae.formats.saelens import SAELENS_WEIGHTS

    local = resolve_sae_path(folder)
    if not (local / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"no SAE export at {local} (missing {CONFIG_FILE})")
    if not (local / WEIGHTS_FILE).is_file() and not (local / SAELENS_WEIGHTS).is_file():
        raise FileNotFoundError(f"SAE export {local} lacks {WEIGHTS_FILE}")
    return load_any_sae(local, device=device, verify=verify)


def find_sae_exports(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """The exports under ``folder``: itself when it holds ``cfg.json``, else its ``seed*/`` exports, by name.

    ``folder`` may be a hub id (``owner/repo[/hookpoint]`` or ``hf://...``, see
    :func:`sae_refusal.sae.formats.resolve_sae_path`; pass it as the string given, not a ``Path``, which
    would turn ``hf://`` into ``hf:/``); any format :func:`load_sae` reads counts (each has a ``cfg.json``).

    Raises:
        FileNotFoundError: If there is no ``cfg.json`` there nor in any ``seed*/`` subfolder.
    """
    local = resolve_sae_path(folder)
    if (local / CONFIG_FILE).is_file():
        return {local.name: local}
    found = {p.name: p for p in sorted(local.glob("seed*")) if (p / CONFIG_FILE).is_file()}
    if not found:
        raise FileNotFoundError(f"{local}: no SAE export (no cfg.json there nor in any seed*/ subfolder)")
    return found
