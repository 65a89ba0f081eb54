"""Which token positions an intervention acts on: the setting and its check (no torch needed)."""

from __future__ import annotations

from typing import Literal

__all__ = ["Positions", "check_positions"]

#: Which positions an intervention acts on.
Positions = Literal["all", "prompt", "generated"] | int


def check_positions(positions: Positions) -> None:
    """Raise ``ValueError`` (naming ``positions``) unless it is a valid :data:`Positions` value."""
    if isinstance(positions, bool) or not (
        positions in ("all", "prompt", "generated") or (isinstance(positions, int) and positions >= 0)
    ):
        raise ValueError(
            f"positions: expected 'all', 'prompt', 'generated' or a token index >= 0, got {positions!r}"
        )
