"""The ``LightningCLI`` classes behind ``sae-refusal``: imported only when a command needs Lightning.

:mod:`sae_refusal.cli` stays light (``--help``, ``cache --help`` and ``--version`` import neither Lightning
nor torch); it imports this module inside the commands that build a Lightning parser.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, cast

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from sae_refusal.ckpt_reuse import (
    EVAL_COMMANDS,
    checkpoint_conflicts,
    eval_log_name,
    find_last_checkpoint,
    logger_roots,
    plain,
    read_checkpoint,
)
from sae_refusal.errors import UserError

__all__ = ["ConfigOnlyCLI", "FinetuneCLI", "SAERefusalCLI"]


class SAERefusalCLI(LightningCLI):
    """LightningCLI with the activation data module and the data -> model width link.

    ``--ckpt_path`` is handled for reuse in eval jobs: ``last`` means the newest run's last checkpoint
    under the configured logger folder (an error if there is none); the checkpoint's model settings rebuild
    the model (architecture included), and a setting the config asks for that differs from the checkpoint's
    is refused;
    ``validate``, ``test`` and ``predict`` log into a folder of their own beside the run
    (``{subcommand}-{run}-{checkpoint}``) unless ``trainer.logger.init_args.version`` is set. A checkpoint
    whose SAEs were trained at another layer, width or on another model than the ``data`` section serves is
    refused before any activation is read (:func:`~sae_refusal.sae.provenance.check_checkpoint_matches_data`).
    """

    #: ``(path, what the checkpoint records of its data)`` of a ``--ckpt_path`` file, for the data check.
    _ckpt_record: tuple[Path, dict[str, Any]] | None = None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.d_model", "model.init_args.d_model", apply_on="instantiate")

    def after_instantiate_classes(self) -> None:
        """``fit`` always ends by printing what it wrote and the headline numbers (FitSummaryCallback)."""
        super().after_instantiate_classes()
        from sae_refusal.sae.summary import FitSummaryCallback

        trainer = getattr(self, "trainer", None)
        callbacks = list(getattr(trainer, "callbacks", []))
        if self.subcommand == "fit" and not any(isinstance(c, FitSummaryCallback) for c in callbacks):
            trainer.callbacks.append(FitSummaryCallback())  # type: ignore[union-attr]
        datamodule = getattr(self, "datamodule", None)
        if self._ckpt_record is not None and hasattr(datamodule, "served_layer"):
            from sae_refusal.sae.provenance import check_checkpoint_matches_data

            ckpt, record = self._ckpt_record
            check_checkpoint_matches_data(record, datamodule, ckpt)

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        section = self.config[subcommand]
        ckpt_path = section.get("ckpt_path")
        if ckpt_path is None:
            return
        if ckpt_path == "last":
            ckpt_path = str(find_last_checkpoint(section.trainer))
            section.ckpt_path = ckpt_path
            print(f"--ckpt_path last: {ckpt_path}", file=sys.stderr)
        elif ckpt_path in ("best", "hpc", "registry") or ckpt_path.startswith("registry:"):
            return
        ckpt = Path(ckpt_path)
        if not ckpt.is_file():
            raise UserError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
        from sae_refusal.sae.provenance import CHECKPOINT_KEY

        checkpoint = read_checkpoint(ckpt)
        hparams = dict(checkpoint.get("hyper_parameters", {}))
        self._ckpt_record = (
            ckpt,
            {CHECKPOINT_KEY: checkpoint.get(CHECKPOINT_KEY), "hyper_parameters": hparams},
        )
        del checkpoint
        hparams.pop("_instantiator", None)
        if hparams:
            class_path = hparams.pop("_class_path", section.model.get("class_path"))
            if class_path != section.model.get("class_path"):
                raise UserError(
                    f"--ckpt_path {ckpt}: the checkpoint holds a {class_path}, the config asks for "
                    f"model.class_path {section.model.get('class_path')}"
                )
            conflicts = checkpoint_conflicts(section.model, hparams, self._model_of(class_path))
            if conflicts:
                raise UserError(
                    f"--ckpt_path {ckpt}: the checkpoint's model settings replace the config's, and these "
                    f"differ: {'; '.join(conflicts)}. Use the run's saved config.yaml (beside the "
                    "checkpoints folder) or drop those settings."
                )
            if "architecture" not in hparams and section.model.init_args.get("architecture") is not None:
                # checkpoints written before the architecture was kept: the config's architecture
                hparams["architecture"] = plain(section.model.init_args.architecture)
            self.config = self.parser.parse_object(
                {subcommand: {"model": {"class_path": class_path, "init_args": hparams}}}, self.config
            )
        if subcommand in EVAL_COMMANDS:
            self._own_eval_folder(self.config[subcommand].trainer, subcommand, ckpt)

    @staticmethod
    def _model_of(class_path: str) -> type:
        import importlib

        module, _, name = class_path.rpartition(".")
        return cast(type, getattr(importlib.import_module(module), name))

    @staticmethod
    def _own_eval_folder(trainer: Any, subcommand: str, ckpt: Path) -> None:
        """Point a TensorBoard/CSV logger with no explicit version at a new folder named after the job."""
        logger = trainer.get("logger")
        init_args = getattr(logger, "init_args", None)
        if init_args is None or "version" not in init_args or init_args.get("version") is not None:
            return
        roots = logger_roots(trainer)
        init_args.version = eval_log_name(roots[0], subcommand, ckpt)


class ConfigOnlyCLI(SAERefusalCLI):
    """The fit CLI's classes without a subcommand (for project subcommands that read a fit config).

    Accepts (and ignores) the options of ``Trainer.fit`` itself (``ckpt_path``, ``weights_only``), so the
    ``config.yaml`` a fit run saves can be read back.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        skip = {"model", "train_dataloaders", "val_dataloaders", "datamodule"}
        parser.add_method_arguments(L.Trainer, "fit", skip=skip)


class FinetuneCLI(LightningCLI):
    """LightningCLI of the refusal-token fine-tuning recipe: one model config shared by module and data."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.llm", "data.llm", apply_on="parse")
        parser.link_arguments("model.refusal_tokens", "data.refusal_tokens", apply_on="parse")

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """Name the ``fit`` parser ``sae-refusal finetune``: users never type the ``fit`` passed for them."""
        super()._add_subcommands(parser, **kwargs)
        self._subcommand_parsers["fit"].prog = str(parser.prog)
