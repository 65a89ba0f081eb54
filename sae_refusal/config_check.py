"""Config files checked before anything heavy is imported, and parser errors said in one line.

``sae-refusal`` reads every YAML file a command line names (``--config F``, ``-c F``, ``--config=F``, and
a section given as a file, ``--data F.yaml``) before it imports Lightning, torch or transformers, so a
missing, empty or garbled file is reported at once, naming the file and the line: :func:`check_config_files`.

The parsers (jsonargparse, under LightningCLI and the job commands) report a bad value as a block: a
"Does not validate against any of the Union subtypes" preamble, one bullet per candidate type, the whole
namespace repeated. :func:`tidy_parse_error` keeps the reason (the config key and what is wrong) and drops
the rest, so the first line of the error is the one a user needs.

Imports only the standard library and PyYAML.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sae_refusal.errors import UserError

__all__ = ["check_config_files", "config_file_args", "tidy_parse_error"]

#: Flags whose value is a config file (jsonargparse's ``ActionConfigFile``).
_CONFIG_FLAGS = ("--config", "-c")
_YAML_SUFFIXES = (".yaml", ".yml")


def config_file_args(args: Sequence[str]) -> list[tuple[str, str]]:
    """``(flag, path)`` of every config file ``args`` name: ``--config F``, ``-c F``, ``--config=F``, and
    ``--SECTION F.yaml`` (a section given as a file, e.g. ``--data lightning_configs/data/x.yaml``)."""
    found: list[tuple[str, str]] = []
    items = list(args)
    for i, item in enumerate(items):
        flag, sep, value = item.partition("=")
        if not flag.startswith("-"):
            continue
        if not sep:
            value = items[i + 1] if i + 1 < len(items) else ""
            if value.startswith("-") and value != "-":
                continue
        if flag in _CONFIG_FLAGS:
            if value and value != "-":  # "-" reads stdin, which the parser takes
                found.append((flag, value))
        elif flag.startswith("--") and "." not in flag and value.endswith(_YAML_SUFFIXES):
            found.append((flag, value))
    return found


def _yaml_problem(err: Exception) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def check_config_files(args: Sequence[str], sections: str = "trainer, model, data") -> None:
    """Refuse a config file that is missing, unreadable, not YAML, empty, or not a mapping.

    Args:
        args: The command's arguments (after the subcommand).
        sections: Examples of top-level keys, for the message about an empty file.

    Raises:
        UserError: Naming the flag and the file (and the line of a YAML error).
    """
    import yaml

    for flag, name in config_file_args(args):
        path = Path(name)
        if not path.exists():
            raise UserError(f"{flag} {name}: no such file")
        if path.is_dir():
            raise UserError(f"{flag} {name}: is a folder, not a YAML file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"{flag} {name}: cannot be read ({err})") from None
        try:
            value: Any = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise UserError(f"{flag} {name}: not valid YAML ({_yaml_problem(err)})") from None
        if value is None:
            raise UserError(
                f"{flag} {name}: the file is empty (or only comments); a config is a mapping of "
                f"settings, e.g. {sections}"
            )
        if not isinstance(value, dict):
            raise UserError(
                f"{flag} {name}: expected a mapping of settings (key: value lines), got a YAML "
                f"{type(value).__name__}"
            )


_PARSER_KEY = re.compile(r'^Parser key "(?P<key>[^"]+)":$')
_EXPECTED = re.compile(r"^Expected a <class '(?P<type>[^']+)'>\.?(?: Got value: (?P<value>.*))?$")
_GIVEN = re.compile(r"^Given value: (?P<value>.*)$")
_CLASS_PATH = re.compile(r"^Problem with given class_path '(?P<path>[^']+)':$")
_NOT_ACCEPTED = re.compile(r"^(?:Option|Key) '(?P<key>[^']+)' is not accepted")
#: Lines of a jsonargparse error that carry no reason of their own.
_NOISE = re.compile(
    r"^(Does not validate against any of the Union subtypes|Subtypes: |Errors:$|Given value type: )"
)


def tidy_parse_error(message: str) -> str:
    """The reason inside a jsonargparse error, on one line.

    ``Parser key "model": Does not validate against any of the Union subtypes ... - model.lr must be > 0,
    got -1.0 ...`` becomes ``model.lr must be > 0, got -1.0``; ``Parser key "lr": Expected a <class
    'float'>. Got value: abc`` becomes ``lr: expected float, got 'abc'``; an unknown option inside a class
    becomes ``model: unknown option 'x' of sae_refusal.sae.SAEModule``. Messages in any other shape are
    returned unchanged.
    """
    lines = [line.strip().removeprefix("- ").strip() for line in message.strip().splitlines()]
    lines = [line for line in lines if line]
    if not lines or not (_PARSER_KEY.match(lines[0]) or _NOISE.match(lines[0])):
        return message.strip()
    keys: list[str] = []
    types: list[str] = []
    given: str | None = None
    class_path: str | None = None
    reasons: list[str] = []
    for line in lines:
        if _NOISE.match(line):
            continue
        if match := _PARSER_KEY.match(line):
            keys.append(match["key"])
        elif match := _CLASS_PATH.match(line):
            class_path = match["path"]
        elif match := _EXPECTED.match(line):
            types.append(match["type"])
            given = match["value"] if match["value"] is not None else given
        elif match := _GIVEN.match(line):
            given = match["value"] if given is None else given
        elif match := _NOT_ACCEPTED.match(line):
            owner = f" of {class_path}" if class_path else ""
            reasons.append(f"unknown option {match['key']!r}{owner}")
        else:
            reasons.append(line)
    key = ".".join(keys)
    if class_path is not None:  # "or null" there is the alternative to the whole class, not to this key
        types = [t for t in types if t != "NoneType"]
    if reasons:
        text = "; ".join(dict.fromkeys(reasons))
        return text if not key or text.startswith(keys[0] + ".") else f"{key}: {text}"
    wanted = [t for t in types if t != "NoneType"]
    if wanted:
        expected = " or ".join(dict.fromkeys(wanted)) + (" (or null)" if "NoneType" in types else "")
        got = f", got {given!r}" if given is not None else ""
        return f"{key + ': ' if key else ''}expected {expected}{got}"
    return message.strip()
