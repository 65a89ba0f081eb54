"""Reusing a training run's checkpoints in eval jobs: finding them, and refusing settings they override.

Shared by the light ``sae-refusal`` dispatcher (:mod:`sae_refusal.cli`) and the ``LightningCLI`` classes
(:mod:`sae_refusal.cli_lightning`); imports neither Lightning nor torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sae_refusal.errors import UserError

__all__ = [
    "EVAL_COMMANDS",
    "checkpoint_conflicts",
    "eval_log_name",
    "find_last_checkpoint",
    "logger_roots",
    "plain",
    "read_checkpoint",
]

#: Lightning subcommands that evaluate a checkpoint (they log into a folder of their own).
EVAL_COMMANDS = ("validate", "test", "predict")


def logger_roots(trainer: Any) -> list[Path]:
    """Folders that hold a run's ``version_*`` subfolders, from the trainer's logger settings."""
    roots: list[Path] = []
    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        init_args = getattr(logger, "init_args", None)
        if init_args is not None and init_args.get("save_dir") is not None:
            name = init_args.get("name", "lightning_logs")
            roots.append(Path(init_args["save_dir"]) / name if name else Path(init_args["save_dir"]))
    root_dir = trainer.get("default_root_dir")
    roots.append(Path(root_dir if root_dir is not None else ".") / "lightning_logs")
    return roots


def _version_number(folder: Path) -> int:
    tail = folder.name.removeprefix("version_")
    return int(tail) if tail.isdigit() else -1


def find_last_checkpoint(trainer: Any) -> Path:
    """The newest run's ``last.ckpt`` (else its newest ``*.ckpt``) under the configured logger folders.

    Raises:
        UserError: If no run there has a checkpoint (naming the folders searched).
    """
    roots = logger_roots(trainer)
    for root in roots:
        versions = sorted(root.glob("version_*"), key=_version_number, reverse=True)
        for version in versions:
            ckpts = sorted((version / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
            if ckpts:
                last = version / "checkpoints" / "last.ckpt"
                return last if last.is_file() else ckpts[-1]
    raise UserError(
        f"--ckpt_path last: no checkpoint under {', '.join(str(r) for r in roots)} (no version_*/checkpoints/"
        "*.ckpt); give the checkpoint file, or the trainer.default_root_dir / trainer.logger of the run"
    )


def plain(value: Any) -> Any:
    """Namespaces (jsonargparse) as plain dicts, recursively."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    return value


def _same_setting(key: str, asked: Any, stored: Any) -> bool:
    if key == "architecture":
        from sae_refusal.sae.architectures import architecture_from_config

        return architecture_from_config(plain(asked)) == architecture_from_config(plain(stored))
    return bool(plain(asked) == plain(stored))


def checkpoint_conflicts(model_config: Any, hparams: dict[str, Any], model_class: type) -> list[str]:
    """Model settings the config sets (away from their defaults) that differ from the checkpoint's.

    Args:
        model_config: The parsed ``model`` section (``class_path`` + ``init_args``).
        hparams: The checkpoint's ``hyper_parameters``.
        model_class: The class whose signature gives the defaults.
    """
    import inspect

    init_args = model_config.get("init_args") or {}
    defaults = {
        name: p.default
        for name, p in inspect.signature(model_class).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    conflicts = []
    for key, stored in hparams.items():
        if key.startswith("_") or key == "d_model" or key not in init_args:
            continue
        asked = init_args[key]
        if asked is None or (key in defaults and plain(asked) == defaults[key]):
            continue  # not set by the user: the checkpoint's value is taken
        if not _same_setting(key, asked, stored):
            conflicts.append(f"model.init_args.{key}: config {plain(asked)!r}, checkpoint {stored!r}")
    return conflicts


def eval_log_name(root: Path, subcommand: str, ckpt: Path) -> str:
    """``{subcommand}-{run}-{checkpoint}``, made unique under ``root`` (``-2``, ``-3``, ...)."""
    run = ckpt.parent.parent.name if ckpt.parent.name == "checkpoints" else ckpt.parent.name
    base = f"{subcommand}-{run}-{ckpt.stem}".replace("=", "")
    name, n = base, 1
    while (root / name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


def read_checkpoint(path: str | Path, key: str = "--ckpt_path") -> dict[str, Any]:
    """A Lightning checkpoint's contents (``torch.load(weights_only=True)``, on the CPU).

    Raises:
        UserError: Naming ``key`` and the file if it cannot be read that way (not a checkpoint, truncated, or
            holding pickled objects, which are never unpickled) or is not a Lightning checkpoint.
    """
    import pickle

    import torch

    try:
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        raise UserError(
            f"{key} {path}: cannot be read as a Lightning checkpoint ({_load_failure(err)}); give a .ckpt "
            "written by `sae-refusal fit`"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "pytorch-lightning_version" not in ckpt:
        found = sorted(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(
            f"{key} {path}: not a Lightning checkpoint (no 'state_dict' and 'pytorch-lightning_version'; "
            f"found {found}); give a .ckpt written by `sae-refusal fit`"
        )
    return ckpt


def _load_failure(err: BaseException) -> str:
    """The cause inside ``torch.load``'s error (its weights-only advice is about trusting pickles)."""
    import re

    text = str(err)
    match = re.search(r"WeightsUnpickler error:\s*(?P<cause>[^\n]+?)(?:\. Please use|\n|$)", text)
    if match:
        cause = match["cause"].strip()
        if cause.startswith("Unsupported global"):
            return f"it holds pickled Python objects, which are never loaded ({cause})"
        return f"not a torch checkpoint file: {cause}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
