"""Comparing what an artifact records it was made on with what it is about to be used on.

Every saved artifact that reads a residual stream (an SAE export, a Lightning checkpoint of the SAEs, a
steering-vector artifact, a gate) records the model, layer and width it was made on: ``layer``, ``d_model``,
``model`` (the name it was loaded by) and ``model_fingerprint``
(:func:`sae_refusal.llm.loading.model_fingerprint`: weights content hash or hub revision, the refusal-token
adapter, the quantization). A consumer builds the same facts for what it serves and calls
:func:`provenance_mismatches`; each mismatch names the config key or flag that serves the other value, and
both values.

Models are compared by :func:`model_identity`: the weights' content hash (hub models: id and revision), the
adapter and the quantization. The name a model was loaded by is not part of it when a content hash exists,
so the same weights staged under another path are the same model.

Paths in provenance (:data:`PATH_KEYS`: the model's and the adapter's, the folder an export was made from)
are written relative to the artifact's own folder by :func:`relative_paths` (``./sub/x`` or ``../../x``, so
they never name the machine they were made on, and still point at the same files when a run folder and its
neighbours are moved together) and read back by :func:`resolve_paths` (joined to the folder the artifact is
read from). Hub ids and the ``smollm2`` alias are no local paths and are kept as they are; absolute paths of
artifacts written before are read as they are. Names are compared by :func:`same_name_or_path`: local paths
by the real path they resolve to, not by their spelling.

At the bottom of the import graph (standard library only), so every row can use it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "MODEL_ALIASES",
    "PATH_KEYS",
    "describe_differences",
    "identity_differences",
    "is_local_path",
    "model_identity",
    "provenance_mismatches",
    "relative_paths",
    "resolve_paths",
    "same_name_or_path",
]

#: Model names the LLM loader reads as aliases before any path (``sae_refusal.llm.config.SMOLLM2_ALIAS``;
#: kept here so this module needs nothing of the package).
MODEL_ALIASES = frozenset({"smollm2"})
#: Keys of a provenance record that may hold a local path (``a.b``: key ``b`` of the record under ``a``;
#: ``a.*``: every value of the record under ``a``).
PATH_KEYS: tuple[str, ...] = (
    "model",
    "adapter_path",
    "model_adapter",
    "exported_from",
    "model_fingerprint.model",
    "sae_paths.*",
    "sae.path",
)


def is_local_path(value: str) -> bool:
    """Whether a recorded name is a local path rather than a hub id or an alias.

    It is when it is absolute, starts with ``./``, ``../`` or ``~``, or exists on disk (relative to the
    working directory: what the model loader would open). ``owner/repo`` hub ids and ``hf://`` ids are not
    (unless such a folder exists here, which the loaders would read too), nor the model loader's aliases
    (:data:`MODEL_ALIASES`), which it reads before any path.
    """
    if not value or value in MODEL_ALIASES:
        return False
    if value in (".", "..") or value.startswith(("./", "../", "~")) or os.path.isabs(value):
        return True
    return not value.startswith("hf:") and os.path.exists(value)


def _is_folder_relative(value: Any) -> bool:
    return isinstance(value, str) and (value in (".", "..") or value.startswith(("./", "../")))


def _relative_path(value: Any, folder: Path) -> Any:
    if not isinstance(value, str) or not is_local_path(value):
        return value
    target = os.path.abspath(os.path.expanduser(value))
    rel = Path(os.path.relpath(target, os.path.abspath(folder))).as_posix()
    return rel if _is_folder_relative(rel) else f"./{rel}"


def _resolved_path(value: Any, folder: Path) -> Any:
    if not _is_folder_relative(value):
        return value  # a hub id, an alias, or an absolute path of an artifact written before
    return os.path.normpath(os.path.join(os.path.abspath(folder), value))


def _map_paths(record: Mapping[str, Any], keys: Sequence[str], fn: Callable[[Any], Any]) -> dict[str, Any]:
    out = dict(record)
    for key in keys:
        head, _, rest = key.partition(".")
        if head not in out:
            continue
        value = out[head]
        if not rest:
            out[head] = fn(value)
        elif isinstance(value, Mapping):
            out[head] = {k: fn(v) for k, v in value.items()} if rest == "*" else _map_paths(value, [rest], fn)
    return out


def relative_paths(
    record: Mapping[str, Any], folder: str | os.PathLike[str], keys: Sequence[str] = PATH_KEYS
) -> dict[str, Any]:
    """A copy of ``record`` whose local paths (:func:`is_local_path`) are relative to ``folder``.

    Args:
        record: A provenance record (what an artifact writes beside its data).
        folder: The folder the record is written into (it need not exist yet).
        keys: The keys that may hold paths (:data:`PATH_KEYS`).

    Returns:
        The record with each local path under ``keys`` as ``./x`` or ``../x`` relative to ``folder`` (the
        other values, hub ids and aliases included, unchanged).
    """
    base = Path(folder)
    return _map_paths(record, keys, lambda value: _relative_path(value, base))


def resolve_paths(
    record: Mapping[str, Any], folder: str | os.PathLike[str], keys: Sequence[str] = PATH_KEYS
) -> dict[str, Any]:
    """A copy of ``record`` whose folder-relative paths (``./x``, ``../x``) are joined to ``folder``.

    Args:
        record: A provenance record as written by :func:`relative_paths` (or before it existed: absolute
            paths, hub ids and aliases are returned unchanged).
        folder: The folder the record was read from.
        keys: The keys that may hold paths (:data:`PATH_KEYS`).
    """
    base = Path(folder)
    return _map_paths(record, keys, lambda value: _resolved_path(value, base))


def same_name_or_path(recorded: Any, actual: Any) -> bool:
    """Whether two model names name the same model: equal, or local paths resolving to the same real path."""
    if recorded == actual:
        return True
    if not isinstance(recorded, str) or not isinstance(actual, str):
        return False
    if not (is_local_path(recorded) and is_local_path(actual)):
        return False
    return os.path.realpath(os.path.expanduser(recorded)) == os.path.realpath(os.path.expanduser(actual))


def model_identity(fingerprint: Mapping[str, Any]) -> dict[str, str]:
    """What identifies weights: their content hash (else hub id and revision), the adapter, the quantization.

    Args:
        fingerprint: A :func:`~sae_refusal.llm.loading.model_fingerprint` (as recorded in an artifact).
    """
    weights = str(fingerprint.get("weights_hash") or "")
    if not weights:
        weights = f"{fingerprint.get('model', '')}@{fingerprint.get('revision', '')}"
    return {
        "weights": weights,
        "adapter": str(fingerprint.get("adapter") or ""),
        "quantization": str(fingerprint.get("quantization") or "none"),
    }


def identity_differences(
    recorded: Mapping[str, Any], actual: Mapping[str, Any]
) -> dict[str, tuple[str, str]]:
    """The fields of :func:`model_identity` that differ, each with its two values (empty: the same model)."""
    a, b = model_identity(recorded), model_identity(actual)
    return {name: (a[name], b[name]) for name in a if a[name] != b[name]}


def _short(value: str) -> str:
    """A hash shortened for a message (names and revisions are kept whole)."""
    return value[:12] if len(value) == 64 and all(c in "0123456789abcdef" for c in value) else value


def describe_differences(diff: Mapping[str, tuple[str, str]], actual: str = "now") -> str:
    """``weights '621413ca0660' recorded vs 'aee2c11f8c6c' <actual>, ...`` (hashes shortened)."""
    return ", ".join(f"{f} {_short(r)!r} recorded vs {_short(a)!r} {actual}" for f, (r, a) in diff.items())


def provenance_mismatches(
    recorded: Mapping[str, Any],
    served: Mapping[str, Any],
    keys: Mapping[str, str],
    *,
    made: str = "made",
) -> list[str]:
    """What an artifact records that differs from what it is used with, one phrase per mismatch.

    Args:
        recorded: The artifact's facts: ``layer``, ``d_model``, ``model`` (name), ``model_fingerprint``; a
            fact it does not record is not compared (a fingerprint missing falls back to the name, compared
            by :func:`same_name_or_path`; a recorded relative path must be resolved first,
            :func:`resolve_paths`).
        served: The same facts of what the artifact is used with (each may be a callable returning it, so
            e.g. the weights are hashed only when the artifact records a fingerprint).
        keys: The config key or flag serving each fact: ``layer`` and ``model`` (``d_model`` defaults to the
            model's key); facts without a key are not compared.
        made: The verb of the phrases (``trained`` for an SAE).

    Returns:
        Phrases such as ``"trained at layer 2, data.layer serves 1"`` (the caller puts the artifact and
        ``was`` / ``were`` before them), empty when everything recorded matches.
    """

    def value(key: str) -> Any:
        found = served.get(key)
        return found() if callable(found) else found

    problems: list[str] = []
    layer = value("layer") if "layer" in keys and recorded.get("layer") is not None else None
    if layer is not None and int(recorded["layer"]) != int(layer):
        problems.append(f"{made} at layer {recorded['layer']}, {keys['layer']} serves {layer}")
    width_key = keys.get("d_model", keys.get("model"))
    width = value("d_model") if width_key and recorded.get("d_model") is not None else None
    if width is not None and int(recorded["d_model"]) != int(width):
        problems.append(f"{made} on width {recorded['d_model']}, {width_key} has width {width}")
    if "model" not in keys:
        return problems
    fingerprint = recorded.get("model_fingerprint")
    if isinstance(fingerprint, Mapping):
        actual = value("model_fingerprint")
        if actual is not None:
            diff = identity_differences(fingerprint, actual)
            if diff:
                shown = describe_differences(diff)
                problems.append(
                    f"{made} on model {recorded.get('model')!r} whose weights differ from {keys['model']} "
                    f"{served.get('model')!r} (differing: {shown})"
                )
    elif (
        recorded.get("model") is not None
        and served.get("model") is not None
        and not same_name_or_path(recorded["model"], served["model"])
    ):
        problems.append(f"{made} on {recorded['model']!r}, {keys['model']} is {served['model']!r}")
    return problems
