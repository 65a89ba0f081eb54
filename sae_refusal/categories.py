"""The CoCoNot refusal categories and the default refusal-token spellings.

The published refusal-token models (e.g.
``tomg-group-umd/zephyr-llama3-8b-sft-refusal-n-contrast-multiple-tokens``) spell each token with a leading
space; those spellings are the defaults everywhere and can be overridden in config.
"""

from __future__ import annotations

HUMANIZING = "Humanizing requests"
INCOMPLETE = "Incomplete requests"
INDETERMINATE = "Indeterminate requests"
SAFETY = "Requests with safety concerns"
UNSUPPORTED = "Unsupported requests"

#: CoCoNot categories in a fixed order; class index ``i + 1`` in classifiers (0 is benign / respond).
COCONOT_CATEGORIES: tuple[str, ...] = (HUMANIZING, INCOMPLETE, INDETERMINATE, SAFETY, UNSUPPORTED)

#: Short, file-name-safe names for each category.
CATEGORY_SHORT_NAMES: dict[str, str] = {
    HUMANIZING: "humanizing",
    INCOMPLETE: "incomplete",
    INDETERMINATE: "indeterminate",
    SAFETY: "safety",
    UNSUPPORTED: "unsupported",
}

#: Default refusal-token spelling for each category (``None`` = respond), as in the published models.
DEFAULT_REFUSAL_TOKENS: dict[str, str | None] = {
    " [Humanizing requests]": HUMANIZING,
    " [Incomplete requests]": INCOMPLETE,
    " [Indeterminate requests]": INDETERMINATE,
    " [Requests with safety concerns]": SAFETY,
    " [Unsupported requests]": UNSUPPORTED,
    " [respond]": None,
}


def resolve_category(name: str, *, key: str = "category") -> str:
    """Return the canonical CoCoNot category for ``name`` (canonical or short name, any case).

    Args:
        name: A canonical category (``"Requests with safety concerns"``) or short name (``"safety"``).
        key: The config key or column the name came from, used in the error message.

    Raises:
        ValueError: If ``name`` is not a known category; the message lists the valid names.
    """
    folded = name.strip().casefold()
    for canonical, short in CATEGORY_SHORT_NAMES.items():
        if folded in (canonical.casefold(), short):
            return canonical
    valid = ", ".join(f"{c!r} ({s})" for c, s in CATEGORY_SHORT_NAMES.items())
    raise ValueError(f"{key}: unknown category {name!r}; expected one of {valid}")
