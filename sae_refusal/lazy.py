"""Lazy package exports: ``from sae_refusal.llm import LLMConfig`` imports only the module that defines it.

A package ``__init__`` lists its exports by module (:func:`lazy_exports`) instead of importing them, so
importing one light module of a package (its plain config settings, say) does not pull in torch,
transformers or Lightning through its siblings. Type checkers see the real imports under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` of a package whose ``exports`` (name -> defining module) load on first use.

    Args:
        package: The package's ``__name__`` (for error messages and its module globals).
        exports: Exported name -> the module that defines it.
    """
    import sys

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)  # the next lookup is a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__
