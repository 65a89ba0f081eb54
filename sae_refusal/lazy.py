"""Lazy package exports: ``from sae_refusal.llm import LLMConfig`` imports only the module that defines it.

A package ``__init__`` lists its exports by module (:func:`lazy_exports`, which also gives its ``__all__``)
instead of importing them, so importing one light module of a package (its plain config settings, say) does
not pull in torch, transformers or Lightning through its siblings. Type checkers see the real imports under
``TYPE_CHECKING``; ``tests/test_import_graph.py`` checks that those imports and the lazy list agree.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, exports: Mapping[str, Sequence[str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` of a package whose ``exports`` load on first use.

    Args:
        package: The package's ``__name__`` (for error messages and its module globals).
        exports: Defining module -> the names the package exports from it.

    Raises:
        ValueError: A name is listed under two modules.
    """
    import sys

    module_of: dict[str, str] = {}
    for module, names in exports.items():
        for name in names:
            if module_of.setdefault(name, module) != module:
                raise ValueError(f"{package}: {name!r} is exported from {module_of[name]} and {module}")

    def __getattr__(name: str) -> Any:
        module = module_of.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)  # the next lookup is a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *module_of})

    return __getattr__, __dir__, sorted(module_of)
