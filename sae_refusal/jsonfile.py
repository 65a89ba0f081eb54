"""Reading a JSON object from a file, with errors that name the file (artifact and library configs)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["read_json_object"]


def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object stored in ``path``.

    Raises:
        FileNotFoundError: If ``path`` is not a file (naming it).
        ValueError: If it is not valid JSON, or holds something other than an object (naming it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
