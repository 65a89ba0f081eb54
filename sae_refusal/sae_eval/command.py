"""``sae-refusal sae-eval --config FIT.yaml --sae_dir DIR [--out DIR] [--k 1,2,5,10,20] ...``.

The same inputs as ``sae-refusal features``: the fit config (a run's saved ``config.yaml`` works) gives the
data section (model, layer, prompt sets, split, activation cache), ``--sae_dir`` one export per seed; the L1
heads take the config's ``FeatureAnalysisCallback`` settings. The output folder is claimed before any work
and written atomically (a second job on it fails at once; an existing folder is never replaced).

Spliced KL / loss recovered are not recomputed here (they need the LLM): the fit's
``SpliceMetricsCallback`` logs them (``val/seed{n}/splice/...``) and the fit summary prints them.

Light until needed: this module imports argparse only; the parse (``--help``, a missing or bad option)
ends before torch or Lightning loads. It never imports :mod:`sae_refusal.cli` (which dispatches here): the
Lightning CLI builder is passed in.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sae_refusal.errors import UserError
from sae_refusal.sae_dir_args import add_sae_dir_options
from sae_refusal.sae_eval.config import SAEEvalConfig

__all__ = ["run_sae_eval_command", "sae_eval_out", "sae_eval_parser"]


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


#: The options that are fields of :class:`SAEEvalConfig`: (flag, type, help).
_CONFIG_OPTIONS: tuple[tuple[str, Callable[[str], Any], str], ...] = (
    ("fit_split", str, "split the probes, rankings and heads are fitted on"),
    ("eval_split", str, "held-out split every metric is scored on"),
    ("k", _ints, "latent counts of the k-sparse probes, comma-separated"),
    ("dense_threshold", float, "a latent is dense when it fires on more than this share of the rows"),
    ("probe_c", float, "inverse L2 strength of every logistic probe"),
    ("tau_fs", float, "absorption: F1 gain that adds a main latent (SAEBench's f1_jump_threshold)"),
    ("max_k_main", int, "absorption: most main latents per category"),
    ("full_absorption_cos", float, "absorption: least probe cosine of the absorbing latent (full)"),
    ("fraction_cos", float, "absorption: least probe cosine of an absorbing latent (fraction)"),
    ("proportion", float, "absorption: least share of the probe projection the absorber(s) carry"),
    ("max_absorbers", int, "absorption: most absorbing latents per row (fraction)"),
    ("top_k", int, "head features per class compared across seeds"),
    ("match_cosines", _floats, "decoder cosines at which a latent counts as matched, comma-separated"),
    ("seed", int, "random state of the probes' and heads' solvers"),
)


def sae_eval_parser(with_config: bool = True) -> argparse.ArgumentParser:
    """The ``sae-eval`` options; ``with_config=False`` leaves ``--config`` to the fit parser (in order)."""
    defaults = SAEEvalConfig()
    parser = argparse.ArgumentParser(
        prog="sae-refusal sae-eval",
        allow_abbrev=False,  # an abbreviation must not swallow a fit option
        description="SAEBench-style metrics of saved SAE exports on the activation cache a fit config "
        "describes: core metrics (FVU, explained variance, L0, dead and dense shares, firing-density "
        "histogram, shrinkage, max decoder cosine), k-sparse probing on harmful-vs-benign and each refusal "
        "category against a dense residual probe, feature absorption on the categories, and cross-seed "
        "stability (Hungarian matching of decoder rows, shared L1-head features). Writes report.json, "
        "report.md and density.png. Other options are those of `sae-refusal fit` (e.g. --data.layer).",
    )
    add_sae_dir_options(
        parser,
        with_config=with_config,
        out_default="<sae_dir>/../sae_eval",
        other_model_use="evaluate",
    )
    for name, kind, text in _CONFIG_OPTIONS:
        default = getattr(defaults, name)
        shown = ",".join(str(v) for v in default) if isinstance(default, tuple) else default
        parser.add_argument(f"--{name}", type=kind, default=default, help=f"{text} (default: {shown})")
    return parser


def sae_eval_out(sae_dir: str, out: str | None) -> Path:
    """``--out``, else ``<sae_dir>/../sae_eval`` for a local ``--sae_dir``.

    Raises:
        UserError: If ``--sae_dir`` is a hub id (or a missing folder) and ``--out`` is not given.
    """
    if out:
        return Path(out)
    if sae_dir.startswith(("hf://", "hf:/")) or not Path(sae_dir).exists():
        raise UserError(
            f"--out: give an output folder; --sae_dir {sae_dir} is a hub id (or a missing folder), with no "
            "local run folder to write the evaluation beside"
        )
    return Path(sae_dir).parent / "sae_eval"


def run_sae_eval_command(args: Sequence[str], build_cli: Callable[..., Any]) -> None:
    """Parse ``args``, claim the output folder, evaluate, write, print where and the headline numbers.

    Args:
        args: The command line after ``sae-eval``.
        build_cli: ``sae_refusal.cli._lightning_cli`` (``build_cli(fit_args, run=False)`` builds the fit
            config's classes without running).
    """
    sae_eval_parser().parse_known_args(list(args))  # --help, and a missing --config or --sae_dir, end here
    # --config stays among the fit options, in its place: `--config a.yaml --data.layer 1` keeps its order
    known, rest = sae_eval_parser(with_config=False).parse_known_args(list(args))
    values = {name: getattr(known, name) for name, _, _ in _CONFIG_OPTIONS}
    config = SAEEvalConfig(**values)  # a bad value: ValueError naming its option, before any heavy import
    out = sae_eval_out(known.sae_dir, known.out)

    from sae_refusal.atomic import FolderClaim

    with FolderClaim(out, key="--out"):  # claimed before any work: a second job on it fails at once
        _job(known, rest, config, out, build_cli)


def _job(
    known: argparse.Namespace,
    rest: list[str],
    config: SAEEvalConfig,
    out: Path,
    build_cli: Callable[..., Any],
) -> None:
    """``run_sae_eval_command`` once its output folder ``out`` is claimed."""
    from sae_refusal.activations.datamodule import ActivationDataModule
    from sae_refusal.atomic import AtomicFolder
    from sae_refusal.features.analysis import FeatureAnalysisConfig
    from sae_refusal.features.callback import FeatureAnalysisCallback
    from sae_refusal.sae.formats import sae_metadata
    from sae_refusal.sae.loading import find_sae_exports, load_sae
    from sae_refusal.sae.provenance import check_exports_match_data
    from sae_refusal.sae_eval.job import evaluate_saes, headline, write_report

    try:
        folders = find_sae_exports(known.sae_dir)  # a string: Path() would turn hf:// into hf:/
    except FileNotFoundError as err:
        raise UserError(f"--sae_dir {err}") from None
    cli = build_cli(rest, run=False)
    datamodule = cli.datamodule
    if not isinstance(datamodule, ActivationDataModule):
        raise UserError(f"data: must be an ActivationDataModule, got {type(datamodule).__name__}")
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, FeatureAnalysisCallback)]
    head_config = callbacks[0].analysis if callbacks else FeatureAnalysisConfig()
    datamodule.setup("fit")  # writes the split manifest and fills the cache when missing, then reads it
    saes = {name: load_sae(folder, verify=not known.no_verify) for name, folder in folders.items()}
    widths = {name: sae.d_model for name, sae in saes.items() if sae.d_model != datamodule.d_model}
    if widths:
        raise UserError(f"--sae_dir: SAE width {widths} differs from the data's d_model {datamodule.d_model}")
    export_meta = {name: sae_metadata(f) for name, f in folders.items()}
    if not known.allow_other_model:
        check_exports_match_data(export_meta, datamodule)
    metadata = {
        **datamodule.provenance(),  # model, model_fingerprint (weights + adapter), layer, d_model
        "sae_paths": {name: str(folder) for name, folder in folders.items()},
        **{
            key: values.pop() if len(values := {m.get(key) for m in export_meta.values()}) == 1 else None
            for key in ("epoch", "global_step")
        },
        "config_files": [str(c) for c in _config_files(rest)],
    }
    report = evaluate_saes(datamodule.splits, saes, config, head_config, metadata=metadata)
    with AtomicFolder(out, replace=False, key="--out") as atomic:
        written = write_report(report, atomic.tmp)
        atomic.commit()
    print(f"[sae-eval] evaluated {len(saes)} SAE(s); wrote {', '.join(p.name for p in written)} to {out}")
    print("\n".join(headline(report)))


def _config_files(args: Sequence[str]) -> list[str]:
    """The ``--config`` / ``-c`` files among the fit options, in order."""
    files = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            files.append(args[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.partition("=")[2])
    return files
