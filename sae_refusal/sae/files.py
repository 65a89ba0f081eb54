"""Reading and writing the files of an SAE export, whatever its format: checked, so a bad one is named.

Every SAE writer (the project's :meth:`~sae_refusal.sae.base.SparseAutoencoder.save`, the sparsify and
SAELens exports of :mod:`sae_refusal.sae.formats`) writes its tensors through :func:`write_tensors` and
records the returned sha256 (the project's ``cfg.json`` under ``"sha256"``; the libraries' in the project's
provenance block, which the libraries leave alone: SAELens' ``cfg.json`` ``metadata["sae_refusal"]``,
sparsify's ``sae_refusal_provenance.json`` sidecar); every reader reads through :func:`read_tensors`
and :func:`verify_sha256`. So:

* an empty, truncated or garbled tensor file is an :class:`~sae_refusal.errors.ArtifactError` naming it;
* a tensor file changed since it was written (a flipped bit) no longer matches its recorded sha256 (an
  ``ArtifactError`` naming the file; ``verify=False`` skips the check; an export written before sha256s were
  recorded is read unchecked);
* a tensor holding inf or nan is refused on write and on read, naming the file and the tensor.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sae_refusal.errors import ArtifactError
from sae_refusal.jsonfile import read_json_object

__all__ = [
    "SHA256_KEY",
    "check_finite",
    "non_finite_tensor",
    "read_config",
    "read_tensors",
    "verify_sha256",
    "write_tensors",
]

#: ``cfg.json`` key (of the project's export, or of the provenance block of a library's) holding
#: ``{file name: sha256}`` of the tensor files.
SHA256_KEY = "sha256"


def non_finite_tensor(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first tensor holding inf or nan, else ``None``."""
    return next((name for name, tensor in tensors.items() if not bool(torch.isfinite(tensor).all())), None)


def check_finite(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """Refuse tensors holding inf or nan.

    Raises:
        ArtifactError: Naming ``path``, the first such tensor and how many of its values are not finite.
    """
    name = non_finite_tensor(tensors)
    if name is None:
        return
    tensor = tensors[name]
    bad = int((~torch.isfinite(tensor)).sum())
    kinds = [k for k, f in (("nan", torch.isnan), ("inf", torch.isinf)) if bool(f(tensor).any())]
    raise ArtifactError(
        f"{path}: tensor {name!r} holds {bad} non-finite value(s) ({'/'.join(kinds)}) of "
        f"{tensor.numel()}; the SAE is unusable (retrain it, or export it again from good weights)"
    )


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in an SAE's ``cfg.json``.

    Raises:
        FileNotFoundError: If it is missing.
        ArtifactError: If it is not valid JSON or not an object (naming the file).
    """
    try:
        return read_json_object(path)
    except FileNotFoundError:
        raise
    except ValueError as err:
        raise ArtifactError(str(err)) from err


def _refuse_empty(path: Path) -> None:
    if path.stat().st_size == 0:
        raise ArtifactError(f"{path}: empty file (0 bytes), not a safetensors file; copy or export it again")


def read_tensors(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, refusing an empty or unreadable file and non-finite values.

    Raises:
        FileNotFoundError: If the file is missing.
        ArtifactError: If it is empty, not a readable safetensors file, or holds inf / nan (naming it and the
            tensor).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    _refuse_empty(path)
    try:
        tensors = load_file(str(path), device=str(device))
    except Exception as err:  # safetensors raises its own error types on a corrupt header or truncation
        raise ArtifactError(
            f"{path}: not a readable safetensors file ({type(err).__name__}: {err}); copy or export it again"
        ) from err
    check_finite(tensors, path)
    return tensors


def write_tensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str], *, label: str | os.PathLike[str]
) -> str:
    """Save ``tensors`` (float32, contiguous, CPU) to ``path`` after refusing non-finite ones.

    Args:
        tensors: Name -> tensor.
        path: The file to write (in a writer's temporary folder).
        label: The file's final path, named in errors (not the temporary one).

    Returns:
        The file's sha256, to record in ``cfg.json``.

    Raises:
        ArtifactError: If a tensor holds inf / nan (nothing is written).
    """
    ready = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    check_finite(ready, label)
    save_file(ready, str(path))
    return _sha256(path)


def _sha256(path: str | os.PathLike[str]) -> str:
    """Whole-file sha256, memoised (imported here: ``sae_refusal.llm`` pulls in transformers)."""
    from sae_refusal.llm.hashing import file_sha256

    return file_sha256(path)


def verify_sha256(folder: Path, recorded: Any, cfg_path: Path) -> None:
    """Check each tensor file against the sha256 recorded in ``cfg_path`` (nothing recorded: nothing to do).

    Raises:
        ArtifactError: If a recorded file is missing or its sha256 differs (naming the file).
    """
    if recorded is None:
        return
    if not isinstance(recorded, Mapping) or not all(isinstance(v, str) for v in recorded.values()):
        raise ArtifactError(f"{cfg_path}: field {SHA256_KEY!r} must map file names to sha256 hex digests")
    for name, digest in recorded.items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in {cfg_path} ({SHA256_KEY}) but missing")
        _refuse_empty(path)  # say so, rather than only that its sha256 differs
        if _sha256(path) != digest:
            raise ArtifactError(
                f"{path}: sha256 differs from the one recorded in {cfg_path} (the file was altered or "
                "corrupted after it was written); export or copy it again, or load it unverified "
                "(verify=False; --no_verify / verify_sae: false) if the change is intended"
            )
