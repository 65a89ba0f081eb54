"""The ``sae-refusal`` command.

Lightning subcommands (``fit``, ``validate``, ``test``, ``predict``) go to :class:`SAERefusalCLI`
(:mod:`sae_refusal.cli_lightning`), a ``LightningCLI`` over any ``LightningModule`` (``model.class_path``)
and :class:`ActivationDataModule`, with ``data.d_model`` linked into ``model.init_args.d_model``. Project
subcommands where Lightning has none are dispatched here first:

* ``cache``: write the split manifest and fill the activation cache described by the same config file
  that ``fit`` takes (only its ``data`` section matters), then print what was cached.
* ``features``: the feature analysis (:mod:`sae_refusal.features`) of saved SAE exports on the activation
  cache a fit config describes, with that config's ``FeatureAnalysisCallback`` settings.
* ``sae-eval``: SAEBench-style metrics of saved SAE exports (:mod:`sae_refusal.sae_eval`): core metrics,
  k-sparse probing, absorption on the categories, cross-seed stability; same inputs as ``features``.
* ``generate``: greedy answers to prompts without and with a steering vector of a ``features`` artifact
  (:mod:`sae_refusal.steer.generate`), the model read from the config's ``data.llm``.
* ``finetune``: the refusal-token SFT recipe (``RefusalSFTModule`` + ``SFTDataModule``), ending with a
  held-out refusal-token report and the exported model
  (:class:`~sae_refusal.eval.callbacks.RefusalReportCallback`).
* ``steer``: the steering study (:mod:`sae_refusal.steer.job`): vectors, layer, specificity, gates.
* ``eval``: one eval job (:mod:`sae_refusal.eval.job`): refusal, over-refusal and capability of a model under
  one saved intervention, with per-item records; ``eval-table`` tabulates several jobs (one column each).
* ``export``: the project's SAE exports in sparsify's or SAELens' own layout (:mod:`sae_refusal.sae.formats`).
* ``export-vectors``: one steering vector as lm-eval-harness's steer file or a llama.cpp control vector
  (:mod:`sae_refusal.steer.exchange`).
* ``transfer``: model A's SAE, vectors and gates applied to model B, side by side with A
  (:mod:`sae_refusal.transfer.job`).

Design notes:

* **Light until needed.** This module imports neither Lightning nor torch: each command imports what it
  uses, so ``--help``, ``--version``, ``cache --help`` and ``features --help`` answer in well under a second
  (``fit --help`` and ``finetune --help`` list options read from the classes' signatures, so they import
  Lightning and the model classes).
* **Logs.** :func:`main` shows the package's ``log.info`` lines (``sae_refusal.*`` loggers) on stderr while
  a command runs (:func:`package_logging`); importing the package configures no logging. Commands that build
  a ``Trainer`` only to read a config (``cache``, ``features``) hide Lightning's start-up chatter
  (:func:`quiet_lightning_info`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

from sae_refusal import __version__
from sae_refusal.ckpt_reuse import EVAL_COMMANDS
from sae_refusal.errors import USER_ERRORS, UserError, one_line
from sae_refusal.sae_dir_args import add_sae_dir_options

if TYPE_CHECKING:
    from sae_refusal.activations.datamodule import ActivationDataModule
    from sae_refusal.cli_lightning import SAERefusalCLI

LIGHTNING_COMMANDS: dict[str, str] = {
    "fit": "Train a model (an SAE by default) on cached activations.",
    "validate": "Run one validation epoch, e.g. from --ckpt_path.",
    "test": "Run the test split, e.g. from --ckpt_path.",
    "predict": "Run prediction.",
}


#: Loggers of Lightning's start-up chatter (accelerator availability, "💡 Tip" adverts, "Seed set to").
_LIGHTNING_INFO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.fabric.utilities.seed",
    "lightning.fabric.utilities.distributed",  # "Initializing distributed: ..." (the cache command's launch)
)


@contextlib.contextmanager
def quiet_lightning_info() -> Iterator[None]:
    """Hide Lightning's info-level start-up lines (warnings still show) while the block runs.

    For project subcommands that build a ``Trainer`` only to read a config (``cache``, ``features``): its
    "GPU available" lines and "💡 Tip" adverts say nothing about what those commands do.
    """
    loggers = [logging.getLogger(name) for name in _LIGHTNING_INFO_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


class _NoTips(logging.Filter):
    """Drop Lightning's "💡 Tip: try installing litlogger / litmodels" adverts (not about the run)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


@contextlib.contextmanager
def lightning_run_quietly() -> Iterator[None]:
    """What a Lightning run prints, less the noise that says nothing about it (restored on exit).

    Lightning's litlogger / litmodels adverts, and torch's FutureWarning about ``isinstance(treespec,
    LeafSpec)`` that Lightning's own ``_pytree`` triggers on every batch-size lookup (torch >= 2.10).
    """
    loggers = [logging.getLogger(name) for name in _LIGHTNING_INFO_LOGGERS[:2]]
    tips = _NoTips()
    for logger in loggers:
        logger.addFilter(tips)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
            )
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(tips)


def _lightning_cli(args: Sequence[str], run: bool = True) -> SAERefusalCLI:
    """``SAERefusalCLI`` over ``args``; ``run=False`` builds the classes of a fit config without running."""
    from sae_refusal.activations.datamodule import ActivationDataModule
    from sae_refusal.cli_lightning import ConfigOnlyCLI, SAERefusalCLI
    from sae_refusal.sae.module import SAEModule

    quiet = lightning_run_quietly() if run else quiet_lightning_info()
    with warnings.catch_warnings(), quiet:
        # We pass the arguments explicitly on purpose (project subcommands strip their own name).
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        if args[:1] and args[0] in EVAL_COMMANDS:  # restores the training run's checkpoint callback
            warnings.filterwarnings("ignore", message="The dirpath has changed from")
        return (SAERefusalCLI if run else ConfigOnlyCLI)(
            SAEModule,
            ActivationDataModule,
            subclass_mode_model=True,
            args=list(args),
            run=run,
            save_config_kwargs={"overwrite": False},
            # errors raise (one line through main's handler) instead of printing 50 lines of usage
            # and an abbreviated option (--trainer.max_epoch) is an error, not silently another option
            parser_kwargs={
                "prog": "sae-refusal",
                "exit_on_error": False,
                "allow_abbrev": False,
                **{name: {"exit_on_error": False, "allow_abbrev": False} for name in LIGHTNING_COMMANDS},
            },
        )


def activation_datamodule(args: Sequence[str]) -> ActivationDataModule:
    """The data module a ``fit`` command line describes (parsed exactly as ``sae-refusal fit`` parses it).

    Raises:
        TypeError: If the config's data is not an :class:`ActivationDataModule`.
    """
    datamodule = _lightning_cli(args, run=False).datamodule
    if not _is_activation_datamodule(datamodule):
        raise TypeError(f"data must be an ActivationDataModule, got {type(datamodule).__name__}")
    return datamodule


def _is_activation_datamodule(datamodule: object) -> TypeGuard[ActivationDataModule]:
    from sae_refusal.activations.datamodule import ActivationDataModule

    return isinstance(datamodule, ActivationDataModule)


def cache_command(args: Sequence[str]) -> None:
    """``sae-refusal cache --config cfg.yaml``: fill the activation cache of the config's ``data`` section.

    With ``trainer.devices`` x ``trainer.num_nodes`` above one (or under ``torchrun``), the command runs as
    that many processes (:func:`sae_refusal.activations.coordinator.launch`), each extracting its share.
    """
    if any(a in ("-h", "--help") for a in args):
        print(
            "usage: sae-refusal cache --config CONFIG.yaml [--data.KEY VALUE ...]\n\n"
            "Write the split manifest and compute (or reuse) the activation cache described by the\n"
            "config's `data` section: the same file `sae-refusal fit` takes. Options are those of\n"
            "`sae-refusal fit` (see `sae-refusal fit --help`); `data.*` says what to cache, and\n"
            "`trainer.accelerator`, `trainer.devices` and `trainer.num_nodes` how many processes share\n"
            "the work (one per device; also under torchrun)."
        )
        return
    from sae_refusal.activations.coordinator import launch

    cli = _lightning_cli(args[1:] if args[:1] == ["fit"] else args, run=False)
    datamodule = cli.datamodule
    if not _is_activation_datamodule(datamodule):
        raise TypeError(f"data must be an ActivationDataModule, got {type(datamodule).__name__}")
    trainer = cli.config["trainer"]
    with quiet_lightning_info():
        launched = launch(trainer.accelerator, trainer.devices, trainer.num_nodes)
    with launched.coordinator as coordinator:
        cache = datamodule.build_cache(coordinator)
    if coordinator.rank != 0:
        return
    launched.wait_for_children()
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


def _features_parser(with_config: bool = True) -> argparse.ArgumentParser:
    """The ``features`` options; ``with_config=False`` leaves ``--config`` to the fit parser (in order)."""
    parser = argparse.ArgumentParser(
        prog="sae-refusal features",
        allow_abbrev=False,  # an abbreviation must not swallow a fit option
        description="Steering vectors, heads, cluster metrics, plots and cross-seed consensus from saved SAE "
        "exports and the activation cache a fit config describes. The analysis settings are those of the "
        "config's FeatureAnalysisCallback (defaults if it has none), so the numbers equal the callback's; "
        "--analysis.KEY VALUE changes one (e.g. --analysis.tau 0.1 --analysis.projections '[pca]'). "
        "Other options are those of `sae-refusal fit` (e.g. --data.layer, --data.cache.root).",
    )
    add_sae_dir_options(
        parser,
        with_config=with_config,
        out_default="<sae_dir>/../features/standalone",
        other_model_use="analyse (e.g. for transfer studies)",
    )
    return parser


def features_command(args: Sequence[str]) -> None:
    """``sae-refusal features --config fit.yaml --sae_dir DIR [--out DIR]``: the analysis, standalone."""
    _features_parser().parse_known_args(list(args))  # --help, and a missing --config or --sae_dir, end here
    # --config stays among the fit options, in its place: `--config a.yaml --data.layer 1` keeps its order
    known, rest = _features_parser(with_config=False).parse_known_args(list(args))
    out = _features_out(known.sae_dir, known.out)

    from sae_refusal.atomic import FolderClaim

    with FolderClaim(out, key="--out"):  # claimed before any work: a second job on it fails at once
        _features_job(known, rest, out)


def _features_out(sae_dir: str, out: str | None) -> Path:
    """``--out``, else ``<sae_dir>/../features/standalone`` for a local ``--sae_dir``.

    Raises:
        UserError: If ``--sae_dir`` is a hub id and ``--out`` is not given (no local run to write beside).
    """
    if out:
        return Path(out)
    if sae_dir.startswith(("hf://", "hf:/")) or (not Path(sae_dir).exists() and sae_dir.count("/") in (1, 2)):
        raise UserError(
            f"--out: give an output folder; --sae_dir {sae_dir} is a hub id (or a missing folder), with no "
            "local run folder to write the analysis beside"
        )
    return Path(sae_dir).parent / "features" / "standalone"


def _features_job(known: argparse.Namespace, rest: list[str], out: Path) -> None:
    """``features_command`` once its output folder ``out`` is claimed."""
    from sae_refusal.activations.datamodule import ActivationDataModule
    from sae_refusal.atomic import AtomicFolder
    from sae_refusal.features.analysis import FeatureAnalysisConfig
    from sae_refusal.features.callback import FeatureAnalysisCallback
    from sae_refusal.sae.formats import sae_metadata
    from sae_refusal.sae.loading import find_sae_exports, load_sae
    from sae_refusal.sae.provenance import check_exports_match_data

    rest, overrides = _analysis_overrides(rest)
    try:
        folders = find_sae_exports(known.sae_dir)  # a string: Path() would turn hf:// into hf:/
    except FileNotFoundError as err:
        raise UserError(f"--sae_dir {err}") from None
    cli = _lightning_cli(rest, run=False)
    datamodule = cli.datamodule
    if not isinstance(datamodule, ActivationDataModule):
        raise UserError(f"data: must be an ActivationDataModule, got {type(datamodule).__name__}")
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, FeatureAnalysisCallback)]  # type: ignore[attr-defined]
    config = callbacks[0].analysis if callbacks else FeatureAnalysisConfig()
    if overrides:
        known_keys = {f.name for f in dataclasses.fields(FeatureAnalysisConfig)}
        unknown = sorted(set(overrides) - known_keys)
        if unknown:
            raise UserError(f"unknown --analysis option(s) {unknown}; valid: {sorted(known_keys)}")
        try:
            config = dataclasses.replace(config, **overrides)
        except (TypeError, ValueError) as err:
            raise UserError(f"--analysis: {err}") from None
    datamodule.setup("fit")  # writes the split manifest and fills the cache when missing, then reads it
    saes = {name: load_sae(folder, verify=not known.no_verify) for name, folder in folders.items()}
    widths = {name: sae.d_model for name, sae in saes.items() if sae.d_model != datamodule.d_model}
    if widths:
        raise UserError(f"--sae_dir: SAE width {widths} differs from the data's d_model {datamodule.d_model}")
    export_meta = {name: sae_metadata(f) for name, f in folders.items()}  # any format (sparsify, SAELens)
    if not known.allow_other_model:
        check_exports_match_data(export_meta, datamodule)
    with AtomicFolder(out, replace=False, key="--out") as atomic:
        result = _standalone_analysis(datamodule, saes, folders, export_meta, config, atomic.tmp)
        atomic.commit()
    print(f"feature analysis of {len(saes)} SAE(s) written to {out}")
    summary = result.report.get("across_seeds", {}).get("summary", {})
    for key in ("head_accuracy", "head_macro_f1", "sparse_full_silhouette", "sparse_topk_silhouette"):
        if key in summary:
            stats = summary[key]
            print(f"  {key}: {stats['mean']:.4f} +- {stats['std']:.4f} over {stats['n']} seed(s)")


def _standalone_analysis(
    datamodule: ActivationDataModule,
    saes: dict[str, Any],
    folders: dict[str, Path],
    export_meta: dict[str, dict[str, Any]],
    config: Any,
    out: Path,
) -> Any:
    """``analyze_features`` of ``features_command``, written into ``out`` (the job's temporary folder)."""
    from sae_refusal.features.analysis import analyze_features

    metadata = {
        **datamodule.provenance(),  # model, model_fingerprint (weights + adapter), layer, d_model
        "sae_paths": {name: str(folder) for name, folder in folders.items()},
        # the training position of the exported weights (the same for seeds trained side by side)
        **{
            key: values.pop() if len(values := {m.get(key) for m in export_meta.values()}) == 1 else None
            for key in ("epoch", "global_step")
        },
    }
    return analyze_features(datamodule.splits, saes, config, out_dir=out, metadata=metadata)


def sae_eval_command(args: Sequence[str]) -> None:
    """``sae-refusal sae-eval --config fit.yaml --sae_dir DIR [--out DIR]`` (:mod:`sae_refusal.sae_eval`)."""
    from sae_refusal.sae_eval.command import run_sae_eval_command

    run_sae_eval_command(args, build_cli=_lightning_cli)


def export_command(args: Sequence[str]) -> None:
    """``sae-refusal export --sae_dir <run>/sae --format sparsify|saelens --out DIR [--hookpoint NAME]``."""
    parser = argparse.ArgumentParser(
        prog="sae-refusal export",
        description="Write the project's SAE exports in sparsify's or SAELens' own on-disk layout (one "
        "folder per seed, then per hookpoint: OUT/seed0/layers.21/ or "
        "OUT/seed0/blocks.21.hook_resid_post/), with the input scale folded into the weights so the exported "
        "SAE computes the same codes and reconstruction on raw activations; what the library has fields for "
        "goes into them (SAELens: model_name as a hub id, hook_name, model_adapter), the project's full "
        "provenance (model, layer, seed, k; paths relative to the export folder) where the library ignores "
        "it quietly (SAELens: cfg.json metadata.sae_refusal; sparsify: sae_refusal_provenance.json beside "
        "cfg.json).",
    )
    parser.add_argument(
        "--sae_dir", required=True, help="an SAE export folder, or a folder of seed{n}/ exports"
    )
    parser.add_argument("--format", required=True, choices=["sparsify", "saelens"], help="the target library")
    parser.add_argument("--out", required=True, help="output folder (must not exist)")
    parser.add_argument(
        "--hookpoint",
        default=None,
        help="the hookpoint name to write (default from the export's layer: layers.{l} for sparsify, "
        "blocks.{l}.hook_resid_post for SAELens)",
    )
    parser.add_argument(
        "--no_verify",
        action="store_true",
        help="read the SAE tensor files without checking them against the sha256 their cfg.json records",
    )
    known = parser.parse_args(list(args))

    from sae_refusal.atomic import FolderClaim

    with FolderClaim(known.out, key="--out"):  # claimed before any work: a second job on it fails at once
        _export_job(known)


def _export_job(known: argparse.Namespace) -> None:
    """``export_command`` once its output folder ``known.out`` is claimed."""
    import torch

    from sae_refusal.atomic import AtomicFolder
    from sae_refusal.llm.hashing import file_sha256
    from sae_refusal.provenance import is_local_path
    from sae_refusal.sae.formats import export_sae, sae_metadata
    from sae_refusal.sae.formats.hookpoints import hookpoint_for_layer
    from sae_refusal.sae.loading import find_sae_exports, load_any_sae, load_sae

    out = Path(known.out)
    try:
        folders = find_sae_exports(known.sae_dir)
    except FileNotFoundError as err:
        raise UserError(f"--sae_dir: {err}") from err
    hub = None if is_local_path(known.sae_dir) else known.sae_dir.rstrip("/")  # not the hub cache's path
    lines = []
    with AtomicFolder(out, replace=False, key="--out") as atomic:
        for name, folder in folders.items():
            meta = sae_metadata(folder)
            if known.hookpoint is None and meta.get("layer") is None:
                raise UserError(f"--hookpoint: {folder} records no layer; give the hookpoint name to write")
            hookpoint = known.hookpoint or hookpoint_for_layer(int(meta["layer"]), known.format)
            sae = load_sae(folder, verify=not known.no_verify)
            provenance = {
                **{k: v for k, v in meta.items() if k != "format"},
                "hookpoint": hookpoint,
                "hook_name": hookpoint,
                # a local folder is recorded relative to the export (its writer makes it so; the atomic
                # temporary is a sibling of --out, so the relative path is the same after the rename)
                "exported_from": (
                    str(folder) if hub is None else hub if len(folders) == 1 else f"{hub}/{name}"
                ),
                "exported_from_sha256": {
                    f.name: file_sha256(f) for f in sorted(folder.iterdir()) if f.is_file()
                },
            }
            target = export_sae(sae, atomic.tmp / name / hookpoint, known.format, metadata=provenance)
            # the export must compute what the project's SAE computes on raw activations
            generator = torch.Generator().manual_seed(0)
            x = torch.randn(64, sae.d_model, generator=generator) / float(sae.input_scale)
            with torch.no_grad():
                diff = float((load_any_sae(target)(x).recon_BD - sae(x).recon_BD).abs().max())
            lines.append(
                f"  {name}: {out / name / hookpoint} ({sae.architecture}, {sae.n_latents} latents; "
                f"reconstruction max |diff| {diff:.2e})"
            )
        atomic.commit()
    print(f"[export] wrote {len(folders)} SAE(s) in {known.format} format to {out}")
    print("\n".join(lines))


def export_vectors_command(args: Sequence[str]) -> None:
    """``sae-refusal export-vectors --vectors DIR --format lm-eval|gguf-control-vector --category C --alpha A
    --out FILE``: one steering vector for lm-eval-harness or llama.cpp (:mod:`sae_refusal.steer.exchange`)."""
    from sae_refusal.steer.exchange import run_export_command

    run_export_command(args)


def finetune_command(args: Sequence[str]) -> None:
    """``sae-refusal finetune --config cfg.yaml``: refusal-token SFT, held-out report and export."""
    from sae_refusal.cli_lightning import FinetuneCLI
    from sae_refusal.finetune.datamodule import SFTDataModule
    from sae_refusal.finetune.module import RefusalSFTModule

    with warnings.catch_warnings(), lightning_run_quietly():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        FinetuneCLI(
            RefusalSFTModule,
            SFTDataModule,
            args=["fit", *args],  # FinetuneCLI names the fit parser `sae-refusal finetune` in help and errors
            save_config_kwargs={"overwrite": False},
            parser_kwargs={
                "prog": "sae-refusal finetune",
                "exit_on_error": False,
                "allow_abbrev": False,
                "fit": {
                    "allow_abbrev": False,
                    "description": "Fine-tune a chat model to emit refusal tokens (LoRA SFT), then write the "
                    "held-out refusal-token report and export the model.",
                    "exit_on_error": False,
                },
            },
        )


def generate_command(args: Sequence[str]) -> None:
    """``sae-refusal generate --config cfg.yaml --vectors DIR --category C --alpha A --prompt P``."""
    from sae_refusal.steer.generate import parse_request, run_generate

    request = parse_request(args)  # --help and a missing option end here, before any heavy import
    datamodule = activation_datamodule(request.fit_args)
    template, system = datamodule.cache.chat_template, datamodule.cache.system_prompt
    run_generate(request, datamodule.llm, chat_template=template, system_prompt=system)


def _job_parser(cls: type[Any], prog: str, description: str, config_help: str) -> Any:
    """A jsonargparse parser of a job's config dataclass ``cls``: ``--config`` YAML files (later ones override
    earlier ones) + one flag per field."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False, allow_abbrev=False)
    parser.add_argument("--config", action=ActionConfigFile, help=config_help)
    parser.add_class_arguments(cls, as_group=False)
    return parser


def steer_parser() -> Any:
    """The ``sae-refusal steer`` parser (a ``SteerJobConfig`` from YAML + flags)."""
    from sae_refusal.steer.config import SteerJobConfig

    return _job_parser(
        SteerJobConfig,
        "sae-refusal steer",
        "The steering study on a refusal-token model: CAA vectors, layer choice, specificity, "
        "unconditional vs conditional steering (gates tuned on validation splits), report on test splits.",
        "A steering study YAML (lightning_configs/steer/).",
    )


def job_config(parser: Any, args: Sequence[str], cls: type[Any]) -> Any:
    """Parse ``args`` (``--config`` YAML files + flags) with a job's parser and build its config dataclass."""
    return config_from_namespace(parser, parser.parse_args(list(args)), cls)


def config_from_namespace(parser: Any, namespace: Any, cls: type[Any]) -> Any:
    """A job's config dataclass from a namespace of its parser (``parse_args`` or ``parse_object``)."""
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # jsonargparse >= 4.49
    values = {
        k: v for k, v in vars(instantiate(namespace)).items() if k != "config" and not k.startswith("__")
    }
    return cls(**values)


def steer_command(args: Sequence[str]) -> None:
    """``sae-refusal steer --config lightning_configs/steer/refuse_smollm2.yaml``."""
    from sae_refusal.steer.config import SteerJobConfig

    cfg = job_config(steer_parser(), args, SteerJobConfig)  # parsed and checked before the heavy imports
    from sae_refusal.steer.job import run_steer_job

    run_steer_job(cfg)


def eval_parser() -> Any:
    """The ``sae-refusal eval`` parser (an ``EvalJobConfig`` from YAML files + flags)."""
    from sae_refusal.eval.config import EvalJobConfig

    return _job_parser(
        EvalJobConfig,
        "sae-refusal eval",
        "Refusal, over-refusal and capability of a model under one intervention (unsteered, "
        "residual / SAS steering, ablation, a saved gate), from saved artifacts; one column of the results "
        "table per run.",
        "An eval YAML (lightning_configs/eval/); give several: later files override earlier ones.",
    )


def eval_command(args: Sequence[str]) -> None:
    """``sae-refusal eval --config lightning_configs/eval/refuse_smollm2.yaml --config columns/caa.yaml``."""
    from sae_refusal.eval.config import EvalJobConfig

    cfg = job_config(eval_parser(), args, EvalJobConfig)  # parsed and checked before the heavy imports
    from sae_refusal.eval.job import run_eval_job

    run_eval_job(cfg)


def transfer_parser() -> Any:
    """The ``sae-refusal transfer`` parser (a ``TransferJobConfig`` from YAML files + flags)."""
    from sae_refusal.transfer.config import TransferJobConfig

    return _job_parser(
        TransferJobConfig,
        "sae-refusal transfer",
        "Model A's SAE, steering vectors and gates applied to model B, side by side with A: SAE "
        "quality, vector cosines, feature overlap, heads, cluster metrics, and eval jobs on B with A's vs "
        "B's own artifacts (refusal / over-refusal / capability deltas with CIs).",
        "A transfer YAML (lightning_configs/transfer/); later files override earlier ones.",
    )


def transfer_command(args: Sequence[str]) -> None:
    """``sae-refusal transfer --config lightning_configs/transfer/refuse_to_base.yaml``."""
    from sae_refusal.transfer.config import TransferJobConfig

    cfg = job_config(transfer_parser(), args, TransferJobConfig)  # parsed and checked before heavy imports
    from sae_refusal.transfer.job import run_transfer_job

    run_transfer_job(cfg)


def eval_table_command(args: Sequence[str]) -> None:
    """``sae-refusal eval-table DIR [DIR ...] [--out table.md]``."""
    from sae_refusal.eval.table import table_command

    table_command(args)


PROJECT_COMMANDS: dict[str, tuple[Callable[[Sequence[str]], None], str]] = {
    "cache": (cache_command, "Write the split manifest and cache last-token activations (no training)."),
    "finetune": (finetune_command, "Fine-tune a chat model to emit refusal tokens; report and export it."),
    "features": (features_command, "Steering vectors, heads, cluster metrics, plots from saved SAEs."),
    "sae-eval": (sae_eval_command, "SAEBench-style SAE metrics: core, probing, absorption, stability."),
    "generate": (generate_command, "Answers to prompts without and with a steering vector, side by side."),
    "steer": (steer_command, "Steering study: vectors, specificity, conditional vs unconditional steering."),
    "eval": (eval_command, "Refusal, over-refusal and capability under one intervention (a table column)."),
    "eval-table": (eval_table_command, "The results table across eval job folders."),
    "export": (export_command, "Write SAE exports in sparsify's or SAELens' own format (scale folded in)."),
    "export-vectors": (export_vectors_command, "Write a steering vector for lm-eval-harness or llama.cpp."),
    "transfer": (transfer_command, "A model's SAE, vectors and gates applied to another model, side by side"),
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


class _PlainFormatter(logging.Formatter):
    """The message alone for info lines; ``warning: ...`` (the level in lower case) above that."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno <= logging.INFO else f"{record.levelname.lower()}: {message}"


@contextlib.contextmanager
def package_logging(level: int = logging.INFO) -> Iterator[None]:
    """Show the package's log lines (``sae_refusal.*`` loggers, ``level`` and up) on stderr in the block.

    The CLI's own logging set-up, undone on exit; importing the package configures nothing.
    """
    logger = logging.getLogger("sae_refusal")
    handler = logging.StreamHandler()  # the current sys.stderr
    handler.setFormatter(_PlainFormatter("%(message)s"))
    previous = logger.level
    if previous == logging.NOTSET or previous > level:
        logger.setLevel(level)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


#: Examples of each command's top-level config keys (for the message about an empty config file).
_CONFIG_SECTIONS = {
    "steer": "llm, sets, study, out_dir",
    "eval": "llm, sets, intervention, out_dir",
    "transfer": "source, target, data, out_dir",
}


def help_producer(command: str, rest: Sequence[str]) -> Callable[[], None]:
    """A function that prints ``sae-refusal COMMAND REST``'s help the slow way (the parsers themselves)."""

    def produce() -> None:
        if command in PROJECT_COMMANDS:
            PROJECT_COMMANDS[command][0](list(rest))
        else:
            _lightning_cli([command, *rest])

    return produce


def warm_help_cache() -> None:
    """Keep the bare ``--help`` of every heavy subcommand (``docker/install.sh`` runs this once; one
    process, so the heavy stack is imported once): even the first ``sae-refusal fit --help`` is fast."""
    from sae_refusal.help_cache import HEAVY_COMMANDS, cache_dir, cached_help

    for command in HEAVY_COMMANDS:
        cached_help(command, ["--help"], help_producer(command, ["--help"]))
    print(f"help texts of {', '.join(HEAVY_COMMANDS)} kept in {cache_dir() / 'help'}")


def _dispatch(args: list[str]) -> None:
    from sae_refusal.config_check import check_config_files
    from sae_refusal.help_cache import HEAVY_COMMANDS, cached_help, wants_help

    # every config file is read before anything heavy is imported: a bad one is named at once
    check_config_files(args[1:], _CONFIG_SECTIONS.get(args[0], "trainer, model, data"))
    if args[0] in (*LIGHTNING_COMMANDS, "cache") and not wants_help(args[1:]):
        from sae_refusal.config_check import preflight_fit

        preflight_fit(args[1:])  # the SAE and data settings' ranges, before Lightning is imported
    if args[0] == "finetune" and not wants_help(args[1:]):
        from sae_refusal.config_check import preflight_finetune

        preflight_finetune(args[1:])
    if args[0] in HEAVY_COMMANDS and wants_help(args[1:]):  # kept from an earlier call: no heavy import
        print(cached_help(args[0], args[1:], help_producer(args[0], args[1:])), end="")
        return
    if args[0] in PROJECT_COMMANDS:
        PROJECT_COMMANDS[args[0]][0](args[1:])
        return
    if args[0] not in LIGHTNING_COMMANDS:
        print(f"sae-refusal: unknown subcommand {args[0]!r}\n\n{_top_help()}", file=sys.stderr)
        raise SystemExit(2)
    _lightning_cli(args)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``sae-refusal`` console script.

    A user error (bad config value, missing file, checkpoint mismatch, ...) is printed as one line,
    ``sae-refusal: error: ...``, with exit status 2; ``--debug`` (anywhere) or ``SAE_REFUSAL_DEBUG=1``
    shows the full traceback instead.
    """
    import os

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("SAE_REFUSAL_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    if not args or args[0] in ("-h", "--help"):
        print(_top_help())
        return
    if args[0] == "--version":
        print(f"sae-refusal {__version__}")
        return
    if args[0] == "--warm-help-cache":  # for install scripts (docker/install.sh); not in the help
        warm_help_cache()
        return
    try:
        with package_logging():
            _dispatch(args)
    except argparse.ArgumentError as err:  # the parsers' own errors (a bad flag or config value)
        if debug:
            raise
        from sae_refusal.config_check import tidy_parse_error

        print(f"sae-refusal {args[0]}: error: {tidy_parse_error(str(err))}", file=sys.stderr)
        print(f"  (sae-refusal {args[0]} --help lists the options)", file=sys.stderr)
        raise SystemExit(2) from None
    except USER_ERRORS as err:
        if debug:
            raise
        from sae_refusal.config_check import tidy_parse_error

        print(f"sae-refusal: error: {tidy_parse_error(one_line(err))}", file=sys.stderr)
        print("  (run with --debug or SAE_REFUSAL_DEBUG=1 for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


def __getattr__(name: str) -> Any:
    """The Lightning CLI classes, imported on first use (``from sae_refusal.cli import SAERefusalCLI``)."""
    if name in ("SAERefusalCLI", "FinetuneCLI", "ConfigOnlyCLI"):
        from sae_refusal import cli_lightning

        return getattr(cli_lightning, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
