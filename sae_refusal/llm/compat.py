"""Known deprecation warnings of the libraries underneath, silenced at the call of ours that triggers them.

Each filter names one message exactly, so any other warning (and these, raised from anywhere else) still
shows. ``quiet_peft_wrap``: peft's ``PeftModel`` / ``get_peft_model`` read transformers'
``is_gradient_checkpointing``, deprecated in transformers 5 for ``is_activation_checkpointing``: a
``FutureWarning`` on every adapter load that says nothing about what the user ran.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

__all__ = ["enable_activation_checkpointing", "quiet_peft_wrap"]


@contextlib.contextmanager
def quiet_peft_wrap() -> Iterator[None]:
    """Wrap a model with peft without transformers' ``is_gradient_checkpointing`` deprecation warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        yield


def enable_activation_checkpointing(model: Any) -> None:
    """Turn on activation (gradient) checkpointing by the name this transformers version prefers."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
