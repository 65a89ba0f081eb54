"""SAEs in and out of other libraries' on-disk formats: sparsify and SAELens, beside the project's own.

* :func:`detect_format` tells the three apart from the files: the project's export (``cfg.json`` with an
  ``architecture`` the registry knows + ``sae.safetensors``), sparsify's (``cfg.json`` with ``d_in`` +
  ``sae.safetensors`` holding ``encoder.weight``), SAELens' (``cfg.json`` + ``sae_weights.safetensors``).
* :mod:`sae_refusal.sae.loading` (above this package and :mod:`sae_refusal.sae.base`) loads any of them as
  a project module, so every command that takes an SAE (features, steer, eval, transfer) takes them.
* :func:`resolve_sae_path` turns a hub id into a local folder: ``owner/repo`` or ``owner/repo/<hookpoint>``
  (a path that exists locally always wins, and one whose first folder exists or that is deeper is local;
  ``hf://owner/repo/<hookpoint>`` forces the hub; ``hf:/...``, what ``Path("hf://...")`` makes of it, is read
  as ``hf://``), downloading only that hookpoint's files.
* :func:`sae_metadata` gives the project's metadata (``layer``, ``model``, ``seed``...) of any folder: the
  export's own, or mapped from the library's hookpoint name (:mod:`sae_refusal.sae.formats.hookpoints`); a
  hookpoint that is no block output (``hook_resid_mid``...) is refused: no layer holds its activations.
* :func:`export_sae` writes a project SAE in a library's layout with the input scale folded into the weights
  (``W_enc' = s W_enc``, ``b_dec' = b_dec / s``, ``W_dec' = W_dec / s``): the same codes and reconstruction on
  raw activations.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from sae_refusal.errors import ArtifactError
from sae_refusal.provenance import resolve_paths
from sae_refusal.sae.base import SparseAutoencoder
from sae_refusal.sae.files import read_config

__all__ = [
    "EXPORT_FORMATS",
    "FORMATS",
    "detect_format",
    "export_sae",
    "resolve_sae_path",
    "sae_metadata",
]

#: Formats :func:`detect_format` recognises.
FORMATS: tuple[str, ...] = ("sae_refusal", "sparsify", "saelens")
#: Formats :func:`export_sae` writes.
EXPORT_FORMATS: tuple[str, ...] = ("sparsify", "saelens")

#: ``owner/repo`` plus at most one hookpoint folder (deeper paths are local paths that do not exist)
_HUB_ID = re.compile(r"^(?:hf://)?([A-Za-z0-9][\w.-]*/[\w.-]+)(?:/([^/]+))?/?$")


def detect_format(folder: str | os.PathLike[str]) -> str:
    """``sae_refusal``, ``sparsify`` or ``saelens``, from the files in ``folder``.

    Raises:
        FileNotFoundError: If ``folder`` holds none of the three (naming what it lacks).
    """
    from sae_refusal.sae.formats.saelens import SAELENS_WEIGHTS, is_saelens_folder
    from sae_refusal.sae.formats.sparsify import is_sparsify_folder

    folder = Path(folder)
    if is_saelens_folder(folder):
        return "saelens"
    if is_sparsify_folder(folder):
        return "sparsify"
    cfg = folder / "cfg.json"
    if cfg.is_file() and (folder / SAELENS_WEIGHTS).is_file():
        return "saelens"  # with a cfg.json too broken to tell: its loader names the file
    if cfg.is_file() and (folder / "sae.safetensors").is_file():
        try:
            record = read_config(cfg)
        except ValueError:
            return "sae_refusal"  # its loader names the file
        if "d_in" in record and "architecture" not in record:
            return "sparsify"  # sparsify's config beside weights too broken to read: its loader names them
        return "sae_refusal"
    raise FileNotFoundError(
        f"{folder}: no SAE there (expected cfg.json + sae.safetensors for a project or sparsify export, or "
        "cfg.json + sae_weights.safetensors for SAELens)"
    )


def sae_metadata(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The project's metadata of an SAE folder of any format (``layer``, ``model``, ``format``, ...).

    A project export gives its ``cfg.json`` ``metadata``; a foreign one its library's fields, with ``layer``
    from the hookpoint name (the library's field, else the folder's name) when that names a block output, and
    the project's own provenance block where the export was written by :func:`export_sae`. Paths recorded
    relative to the export folder (``model``, ``adapter_path``, ``exported_from``...: see
    :func:`~sae_refusal.provenance.relative_paths`) come back joined to ``folder``.

    Raises:
        ArtifactError: If ``cfg.json`` does not parse, or the hookpoint is one the library defines that is not
            a block output (``blocks.{l}.hook_resid_mid``, ``hook_mlp_out``...): no layer of the project
            reads its activations, so analysing or steering with it would use the wrong ones.
    """
    from sae_refusal.sae.formats.hookpoints import NotABlockOutputError, layer_of_hookpoint

    folder = Path(folder)
    fmt = detect_format(folder)
    if fmt == "sae_refusal":
        meta = read_config(folder / "cfg.json").get("metadata", {})
        return {**resolve_paths(meta if isinstance(meta, dict) else {}, folder), "format": fmt}
    if fmt == "sparsify":
        from sae_refusal.sae.formats.sparsify import read_sparsify_metadata

        meta = dict(read_sparsify_metadata(folder))
    else:
        from sae_refusal.sae.formats.saelens import read_saelens_metadata

        meta = dict(read_saelens_metadata(folder))
    if meta.get("layer") is None:
        for name in (meta.get("hookpoint"), meta.get("hook_name"), folder.name):
            if not name:
                continue
            try:
                meta["layer"] = layer_of_hookpoint(str(name))
                break
            except NotABlockOutputError as err:
                raise ArtifactError(
                    f"{folder}: {err}. The project's activations are block outputs only, so no data.layer "
                    "holds this SAE's inputs; it cannot be analysed, steered or transferred here"
                ) from err
            except ValueError as err:
                meta.setdefault("layer_error", str(err))
    meta["format"] = fmt
    return meta


def resolve_sae_path(spec: str | os.PathLike[str], *, hookpoint: str | None = None) -> Path:
    """A local folder for ``spec``: itself when it exists, else a hub download (see the module notes).

    Args:
        spec: A local folder, or ``owner/repo[/hookpoint]`` / ``hf://owner/repo[/hookpoint]``.
        hookpoint: The hookpoint subfolder of a hub repo holding several (overrides one given in ``spec``).

    Raises:
        FileNotFoundError: If ``spec`` is neither a local folder nor a hub id, or the download fails (naming
            the id; offline machines set ``HF_HUB_OFFLINE``).
    """
    text = str(spec)
    if text.startswith("hf:/") and not text.startswith("hf://"):
        text = "hf://" + text.removeprefix("hf:/")  # Path("hf://x") is hf:/x: a hub spec all the same
    path = Path(text)
    if not text.startswith("hf://"):
        if path.exists():
            return path / hookpoint if hookpoint else path
        if path.is_absolute() or text.startswith((".", "~")) or (path.parts and Path(path.parts[0]).exists()):
            return path  # a local path that does not exist: the caller names what is missing
    match = _HUB_ID.match(text)
    if match is None and not text.startswith("hf://"):
        return path  # deeper than owner/repo/<hookpoint>: a local path that does not exist
    if match is None:
        raise FileNotFoundError(f"{text}: no such folder, and not a hub id (owner/repo[/hookpoint])")
    repo, sub = match.group(1), hookpoint or match.group(2)
    from huggingface_hub import snapshot_download

    try:
        root = Path(snapshot_download(repo, allow_patterns=[f"{sub}/*"] if sub else None))
    except Exception as err:  # network, auth, offline mode: one message naming the id
        raise FileNotFoundError(
            f"{text}: not a local folder, and the hub repo {repo!r} could not be downloaded "
            f"({type(err).__name__}: {err})"
        ) from err
    folder = root / sub if sub else root
    if not folder.is_dir():
        raise FileNotFoundError(f"{text}: the hub repo {repo!r} has no folder {sub!r}")
    return folder


def export_sae(
    sae: SparseAutoencoder,
    folder: str | os.PathLike[str],
    fmt: str,
    *,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``sae`` into ``folder`` in a library's layout (input scale folded in; see the module notes).

    Raises:
        ValueError: On an unknown format, or an architecture the format cannot hold (naming both).
    """
    if fmt == "sparsify":
        from sae_refusal.sae.formats.sparsify import save_sparsify

        return save_sparsify(sae, folder, metadata=metadata)
    if fmt == "saelens":
        from sae_refusal.sae.formats.saelens import save_saelens

        return save_saelens(sae, folder, metadata=metadata)
    raise ValueError(f"--format: expected one of {list(EXPORT_FORMATS)}, got {fmt!r}")
