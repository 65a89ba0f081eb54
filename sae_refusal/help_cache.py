"""``--help`` of the heavy subcommands without importing the heavy stack: the text is kept per environment.

The help of ``fit`` / ``validate`` / ``test`` / ``predict`` / ``finetune`` (LightningCLI) lists the options
read from the classes' signatures, ``Trainer``'s included, so building it imports Lightning (4-5 s on a
2-core machine, before transformers). The text depends only on the code and the libraries that describe it,
so it is computed once and kept in the user's cache folder under a key made of everything it depends on:

* the command line (``fit --config a.yaml --help``) and the content of every config file it names;
* the package's version and a stamp of its source files (path, size, mtime of every ``*.py``);
* the versions of Python, lightning, jsonargparse, torch and transformers (from the installed metadata:
  nothing is imported);
* the terminal width (argparse wraps the text to it).

Any change gives another key: a stale text is never shown. The folder is ``$SAE_REFUSAL_CACHE_DIR``, else
``$XDG_CACHE_HOME/sae_refusal``, else ``~/.cache/sae_refusal``; a folder that cannot be written only costs
the time (nothing is cached). ``sae_refusal.cli.warm_help_cache()`` fills it for every heavy subcommand in one
process (``docker/install.sh`` runs it), so even the first ``--help`` after an install is fast.

Imports only the standard library.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["HEAVY_COMMANDS", "cache_dir", "cached_help", "help_key", "wants_help"]

_PACKAGE = Path(__file__).resolve().parent
#: Distributions whose version changes what the parsers list.
_DISTRIBUTIONS = ("lightning", "jsonargparse", "torch", "transformers", "sae_refusal")


def wants_help(args: Sequence[str]) -> bool:
    """Whether ``args`` (after the subcommand) ask for the help text."""
    return any(a in ("-h", "--help") for a in args)


def cache_dir() -> Path:
    """Where help texts are kept (see the module notes)."""
    explicit = os.environ.get("SAE_REFUSAL_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sae_refusal"


def _source_stamp() -> list[tuple[str, int, int]]:
    stamp = []
    for path in sorted(_PACKAGE.rglob("*.py")):
        stat = path.stat()
        stamp.append((str(path.relative_to(_PACKAGE)), stat.st_size, stat.st_mtime_ns))
    return stamp


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _config_digests(args: Sequence[str]) -> dict[str, str | None]:
    from sae_refusal.config_check import config_file_args

    digests: dict[str, str | None] = {}
    for _, name in config_file_args(args):
        try:
            digests[name] = hashlib.sha256(Path(name).read_bytes()).hexdigest()
        except OSError:
            digests[name] = None
    return digests


def help_key(command: str, args: Sequence[str]) -> str:
    """The cache key of ``sae-refusal COMMAND ARGS`` (see the module notes)."""
    record = {
        "command": command,
        "args": list(args),
        "configs": _config_digests(args),
        "python": sys.version,
        "versions": {name: _version(name) for name in _DISTRIBUTIONS},
        "source": _source_stamp(),
        "columns": shutil.get_terminal_size().columns,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]


def _capture(produce: Callable[[], object]) -> str:
    """What ``produce`` prints on stdout before it exits with status 0 (argparse's ``--help``)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            produce()
        except SystemExit as exit_:
            if exit_.code not in (0, None):
                raise
    return out.getvalue()


def cached_help(command: str, args: Sequence[str], produce: Callable[[], object]) -> str:
    """The help text of ``sae-refusal COMMAND ARGS``: kept from an earlier call, else ``produce``'s (kept).

    Args:
        command: The subcommand.
        args: Its arguments (with ``--help`` among them).
        produce: Prints the help on stdout and exits 0 (e.g. builds the parser and parses ``args``).
    """
    from sae_refusal.atomic import atomic_write_text

    path = cache_dir() / "help" / f"{command}-{help_key(command, args)}.txt"
    with contextlib.suppress(OSError):
        return path.read_text(encoding="utf-8")
    text = _capture(produce)
    with contextlib.suppress(OSError):  # a read-only home: no cache, same text
        atomic_write_text(path, text)
    return text


#: Subcommands whose help imports the heavy stack (:func:`sae_refusal.cli.warm_help_cache` warms them): the
#: LightningCLI ones. ``steer``, ``eval`` and ``transfer`` parse light config classes and need no cache.
HEAVY_COMMANDS = ("fit", "validate", "test", "predict", "finetune")
