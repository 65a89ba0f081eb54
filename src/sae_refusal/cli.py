"""The ``sae-refusal`` command.

Lightning subcommands (``fit``, ``validate``, ``test``, ``predict``) go to :class:`SAERefusalCLI`, a
``LightningCLI`` over any ``LightningModule`` (``model.class_path``) and :class:`ActivationDataModule`,
with ``data.d_model`` linked into ``model.init_args.d_model``. Project subcommands where Lightning has none
are dispatched here first:

* ``cache``: write the split manifest and fill the activation cache described by the same config file
  that ``fit`` takes (only its ``data`` section matters), then print what was cached.
* ``finetune``: the refusal-token SFT recipe (``RefusalSFTModule`` + ``SFTDataModule``), ending with a
  held-out refusal-token report and the exported model (``RefusalReportCallback``).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from sae_refusal import __version__
from sae_refusal.activations.datamodule import ActivationDataModule
from sae_refusal.sae.module import SAEModule

LIGHTNING_COMMANDS: dict[str, str] = {
    "fit": "Train a model (an SAE by default) on cached activations.",
    "validate": "Run one validation epoch, e.g. from --ckpt_path.",
    "test": "Run the test split, e.g. from --ckpt_path.",
    "predict": "Run prediction.",
}


class SAERefusalCLI(LightningCLI):
    """LightningCLI with the activation data module and the data -> model width link."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.d_model", "model.init_args.d_model", apply_on="instantiate")


def _lightning_cli(args: Sequence[str], run: bool = True) -> SAERefusalCLI:
    with warnings.catch_warnings():
        # We pass the arguments explicitly on purpose (project subcommands strip their own name).
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return SAERefusalCLI(
            SAEModule,
            ActivationDataModule,
            subclass_mode_model=True,
            args=list(args),
            run=run,
            save_config_kwargs={"overwrite": False},
            parser_kwargs={"prog": "sae-refusal"},
        )


def activation_datamodule(args: Sequence[str]) -> ActivationDataModule:
    """The data module a ``fit`` command line describes (parsed exactly as ``sae-refusal fit`` parses it).

    Raises:
        TypeError: If the config's data is not an :class:`ActivationDataModule`.
    """
    datamodule = _lightning_cli(args, run=False).datamodule
    if not isinstance(datamodule, ActivationDataModule):
        raise TypeError(f"data must be an ActivationDataModule, got {type(datamodule).__name__}")
    return datamodule


def cache_command(args: Sequence[str]) -> None:
    """``sae-refusal cache --config cfg.yaml``: fill the activation cache of the config's ``data`` section."""
    if any(a in ("-h", "--help") for a in args):
        print(
            "usage: sae-refusal cache --config CONFIG.yaml [--data.KEY VALUE ...]\n\n"
            "Write the split manifest and compute (or reuse) the activation cache described by the\n"
            "config's `data` section: the same file `sae-refusal fit` takes. Options are those of\n"
            "`sae-refusal fit` (see `sae-refusal fit --help`); only `data.*` matters here."
        )
        return
    cache = activation_datamodule(args[1:] if args[:1] == ["fit"] else args).build_cache()
    extra = cache.manifest.get("extra", {})
    print(f"activation cache: {cache.folder}")
    print(
        f"  rows: {len(cache)}  layers: {list(cache.layers)}  d_model: {cache.d_model}"
        f"  dtype: {cache.identity.dtype}"
    )
    print(f"  truncated prompts: {extra.get('n_truncated', 0)}")


class FinetuneCLI(LightningCLI):
    """LightningCLI of the refusal-token fine-tuning recipe: one model config shared by module and data."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.llm", "data.llm", apply_on="parse")
        parser.link_arguments("model.refusal_tokens", "data.refusal_tokens", apply_on="parse")


def finetune_command(args: Sequence[str]) -> None:
    """``sae-refusal finetune --config cfg.yaml``: refusal-token SFT, held-out report and export."""
    from sae_refusal.finetune.datamodule import SFTDataModule
    from sae_refusal.finetune.module import RefusalSFTModule

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        FinetuneCLI(
            RefusalSFTModule,
            SFTDataModule,
            args=["fit", *args],
            save_config_kwargs={"overwrite": False},
            parser_kwargs={"prog": "sae-refusal finetune"},
        )


PROJECT_COMMANDS: dict[str, tuple[Callable[[Sequence[str]], None], str]] = {
    "cache": (cache_command, "Write the split manifest and cache last-token activations (no training)."),
    "finetune": (finetune_command, "Fine-tune a chat model to emit refusal tokens; report and export it."),
}


def _top_help() -> str:
    lines = [
        f"usage: sae-refusal {{{','.join([*LIGHTNING_COMMANDS, *PROJECT_COMMANDS])}}}"
        " [--config CONFIG.yaml] ...",
        "",
        "Interpret, steer and patch category-specific refusal in chat LLMs with sparse autoencoders.",
        "",
        "Lightning subcommands:",
        *(f"  {name:<10} {text}" for name, text in LIGHTNING_COMMANDS.items()),
        "Project subcommands:",
        *(f"  {name:<10} {text}" for name, (_, text) in PROJECT_COMMANDS.items()),
        "",
        "`sae-refusal SUBCOMMAND --help` shows each one's options; configs live in lightning_configs/.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``sae-refusal`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_top_help())
        return
    if args[0] == "--version":
        print(f"sae-refusal {__version__}")
        return
    if args[0] in PROJECT_COMMANDS:
        PROJECT_COMMANDS[args[0]][0](args[1:])
        return
    if args[0] not in LIGHTNING_COMMANDS:
        print(f"sae-refusal: unknown subcommand {args[0]!r}\n\n{_top_help()}", file=sys.stderr)
        raise SystemExit(2)
    _lightning_cli(args)


if __name__ == "__main__":
    main()
