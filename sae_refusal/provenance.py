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

At the bottom of the import graph (standard library only), so every row can use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "describe_differences",
    "identity_differences",
    "model_identity",
    "provenance_mismatches",
]


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
            fact it does not record is not compared (a fingerprint missing falls back to the name).
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
    elif recorded.get("model") is not None and served.get("model") not in (None, recorded["model"]):
        problems.append(f"{made} on {recorded['model']!r}, {keys['model']} is {served['model']!r}")
    return problems
