"""Saving and rebuilding gates that hold other gates (:mod:`.calibrated`, :mod:`.ensemble`).

A wrapper gate records each gate it holds as ``{"kind": gate.kind, **gate.config()}`` in its own config and
its tensors under a prefix (``inner.``, ``m0.``, ...). Rebuilding one needs the gate registry
(:data:`~sae_refusal.steer.gates.steering.GATE_LOADERS`), which imports the wrapper modules: so the registry
is handed in (``loaders=``; :mod:`.steering` registers the wrappers' loaders with the registry bound)
instead of imported here, which would close an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from sae_refusal.sae.base import SparseAutoencoder
from sae_refusal.steer.gates.base import Gate

#: What :data:`~sae_refusal.steer.gates.steering.GATE_LOADERS` maps a gate kind to.
GateLoader = Callable[[Mapping[str, Any], Mapping[str, Tensor], SparseAutoencoder | None], Gate]


def check_gate(gate: Any, key: str) -> Gate:
    """``gate`` if it follows the :class:`Gate` protocol (TypeError naming ``key`` otherwise)."""
    if not isinstance(gate, Gate):
        raise TypeError(f"{key}: expected a gate (the Gate protocol), got {type(gate).__name__}")
    return gate


def nested_config(gate: Gate) -> dict[str, Any]:
    """``{"kind": gate.kind, **gate.config()}``: how a wrapper records a gate it holds."""
    return {"kind": gate.kind, **gate.config()}


def nested_tensors(gate: Gate, prefix: str) -> dict[str, Tensor]:
    """The gate's tensors, each name prefixed with ``prefix`` (e.g. ``"inner."``)."""
    return {f"{prefix}{name}": tensor for name, tensor in gate.tensors().items()}


def load_nested(
    record: Mapping[str, Any],
    tensors: Mapping[str, Tensor],
    prefix: str,
    sae: SparseAutoencoder | None,
    loaders: Mapping[str, GateLoader] | None,
    key: str,
) -> Gate:
    """Rebuild a gate recorded by :func:`nested_config` / :func:`nested_tensors` through ``loaders``.

    Args:
        record: The nested gate's config, ``kind`` included.
        tensors: The wrapper's tensors; those starting with ``prefix`` are the nested gate's.
        prefix: The nested gate's tensor prefix.
        sae: Handed to the nested gate's loader (a latent-space gate needs it).
        loaders: The gate registry (``GATE_LOADERS``).
        key: The config key of the nested gate, for error messages.

    Raises:
        ValueError: If ``loaders`` is missing or the recorded kind is unknown.
    """
    if loaders is None:
        raise ValueError(
            "loaders: a gate that holds other gates is rebuilt through the gate registry; "
            "use load_gate, or pass loaders=GATE_LOADERS"
        )
    config = dict(record)
    kind = config.pop("kind", None)
    if kind not in loaders:
        raise ValueError(f"{key}.kind: unknown gate {kind!r} (known: {sorted(loaders)})")
    own = {name.removeprefix(prefix): t for name, t in tensors.items() if name.startswith(prefix)}
    return loaders[kind](config, own, sae)


def gate_label(gate: Any) -> str:
    """A gate's kind with the gates it holds: ``calibrated(probe)``, ``ensemble(calibrated(probe), ...)``."""
    inner = getattr(gate, "inner", None)
    members = getattr(gate, "members", None)
    if inner is not None:
        return f"{gate.kind}({gate_label(inner)})"
    if members:
        return f"{gate.kind}({', '.join(gate_label(m) for m in members)})"
    return str(gate.kind)
