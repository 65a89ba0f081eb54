"""The ``sae-refusal`` command.

Lightning subcommands (``fit``, ``validate``, ``test``, ``predict``) go to :class:`SAERefusalCLI`, a
``LightningCLI`` over any ``LightningModule`` (``model.class_path``) and :class:`ActivationDataModule`,
with ``data.d_model`` linked into ``model.init_args.d_model``. Project subcommands where Lightning has none
are dispatched here first:

* ``cache``: write the split manifest and fill the activation cache described by the same config file
  that ``fit`` takes (only its ``data`` section matters), then print what was cached.
* ``features``: the feature analysis (:mod:`sae_refusal.features`) of saved SAE exports on the activation
  cache a fit config describes, with that config's ``FeatureAnalysisCallback`` settings.
* ``finetune``: the refusal-token SFT recipe (``RefusalSFTModule`` + ``SFTDataModule``), ending with a
  held-out refusal-token report and the exported model (``RefusalReportCallback``).
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
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


class _ConfigOnlyCLI(SAERefusalCLI):
    """The fit CLI's classes without a subcommand (for project subcommands that read a fit config).

    Accepts (and ignores) the options of ``Trainer.fit`` itself (``ckpt_path``, ``weights_only``), so the
    ``config.yaml`` a fit run saves can be read back.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        skip = {"model", "train_dataloaders", "val_dataloaders", "datamodule"}
        parser.add_method_arguments(L.Trainer, "fit", skip=skip)


def _lightning_cli(args: Sequence[str], run: bool = True) -> SAERefusalCLI:
    with warnings.catch_warnings():
        # We pass the arguments explicitly on purpose (project subcommands strip their own name).
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return (SAERefusalCLI if run else _ConfigOnlyCLI)(
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


def _analysis_overrides(args: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """Split ``--analysis.KEY VALUE`` / ``--analysis.KEY=VALUE`` pairs (values read as YAML) from ``args``."""
    import yaml

    rest: list[str] = []
    overrides: dict[str, Any] = {}
    items = list(args)
    i = 0
    while i < len(items):
        item = items[i]
        if item.startswith("--analysis."):
            key, sep, value = item.removeprefix("--analysis.").partition("=")
            if not sep:
                if i + 1 >= len(items):
                    raise SystemExit(f"{item} needs a value")
                value, i = items[i + 1], i + 1
            overrides[key] = yaml.safe_load(value)
        else:
            rest.append(item)
        i += 1
    return rest, overrides


def features_command(args: Sequence[str]) -> None:
    """``sae-refusal features --config fit.yaml --sae_dir DIR [--out DIR]``: the analysis, standalone."""
    import argparse

    from sae_refusal.features.analysis import FeatureAnalysisConfig, analyze_features
    from sae_refusal.features.callback import FeatureAnalysisCallback
    from sae_refusal.sae.base import load_sae

    parser = argparse.ArgumentParser(
        prog="sae-refusal features",
        description="Steering vectors, heads, cluster metrics, plots and cross-seed consensus from saved SAE "
        "exports and the activation cache a fit config describes. The analysis settings are those of the "
        "config's FeatureAnalysisCallback (defaults if it has none), so the numbers equal the callback's; "
        "--analysis.KEY VALUE changes one (e.g. --analysis.tau 0.1 --analysis.projections '[pca]'). "
        "Other options are those of `sae-refusal fit` (e.g. --config, --data.layer).",
    )
    parser.add_argument(
        "--sae_dir", required=True, help="an SAE export folder, or a folder of seed{n}/ exports"
    )
    parser.add_argument(
        "--out", default=None, help="output folder (default: <sae_dir>/../features/standalone)"
    )
    known, rest = parser.parse_known_args(list(args))
    rest, overrides = _analysis_overrides(rest)
    sae_dir = Path(known.sae_dir)
    if (sae_dir / "cfg.json").is_file():
        folders = {sae_dir.name: sae_dir}
    else:
        folders = {p.name: p for p in sorted(sae_dir.glob("seed*")) if (p / "cfg.json").is_file()}
    if not folders:
        raise SystemExit(f"--sae_dir {sae_dir}: no cfg.json there nor in any seed*/ subfolder")
    cli = _lightning_cli(rest, run=False)
    datamodule = cli.datamodule
    if not isinstance(datamodule, ActivationDataModule):
        raise SystemExit(f"data must be an ActivationDataModule, got {type(datamodule).__name__}")
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, FeatureAnalysisCallback)]  # type: ignore[attr-defined]
    config = callbacks[0].analysis if callbacks else FeatureAnalysisConfig()
    if overrides:
        known_keys = {f.name for f in dataclasses.fields(FeatureAnalysisConfig)}
        unknown = sorted(set(overrides) - known_keys)
        if unknown:
            raise SystemExit(f"unknown --analysis option(s) {unknown}; valid: {sorted(known_keys)}")
        try:
            config = dataclasses.replace(config, **overrides)
        except (TypeError, ValueError) as err:
            raise SystemExit(f"--analysis: {err}") from err
    datamodule.setup("fit")  # writes the split manifest and fills the cache when missing, then reads it
    saes = {name: load_sae(folder) for name, folder in folders.items()}
    widths = {name: sae.d_model for name, sae in saes.items() if sae.d_model != datamodule.d_model}
    if widths:
        raise SystemExit(
            f"--sae_dir: SAE width {widths} differs from the data's d_model {datamodule.d_model}"
        )
    out = Path(known.out) if known.out else sae_dir.parent / "features" / "standalone"
    metadata = {
        "model": datamodule.llm.name_or_path,
        "layer": datamodule.layer,
        "sae_paths": {name: str(folder) for name, folder in folders.items()},
    }
    result = analyze_features(datamodule.splits, saes, config, out_dir=out, metadata=metadata)
    print(f"feature analysis of {len(saes)} SAE(s) written to {out}")
    summary = result.report.get("across_seeds", {}).get("summary", {})
    for key in ("head_accuracy", "head_macro_f1", "sparse_silhouette"):
        if key in summary:
            stats = summary[key]
            print(f"  {key}: {stats['mean']:.4f} +- {stats['std']:.4f} over {stats['n']} seed(s)")


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
    "features": (features_command, "Steering vectors, heads, cluster metrics, plots from saved SAEs."),
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
