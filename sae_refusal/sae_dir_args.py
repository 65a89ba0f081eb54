"""The command-line options shared by the commands that read SAE exports against a fit config's data.

``sae-refusal features`` and ``sae-refusal sae-eval`` take the same ``--config`` / ``--sae_dir`` / ``--out`` /
``--allow_other_model`` / ``--no_verify`` options; this module (argparse only, nothing heavy imported) adds
them, so their spelling and checks cannot drift apart.
"""

from __future__ import annotations

import argparse

__all__ = ["add_sae_dir_options"]


def add_sae_dir_options(
    parser: argparse.ArgumentParser, *, with_config: bool, out_default: str, other_model_use: str
) -> None:
    """Add the shared options to ``parser``.

    Args:
        parser: The command's parser.
        with_config: Whether to add ``-c/--config`` (a second pass without it keeps ``--config`` among the
            fit options, in its place).
        out_default: Where ``--out`` defaults to, for its help (e.g. ``"<sae_dir>/../sae_eval"``).
        other_model_use: What the command does with SAEs of another model or layer, for the help of
            ``--allow_other_model`` (e.g. ``"evaluate"``).
    """
    if with_config:
        parser.add_argument(
            "-c",
            "--config",
            required=True,
            action="append",
            metavar="CONFIG.yaml",
            help="the fit config whose data section describes the activations (the run's saved config.yaml "
            "works); repeat it to layer configs as `sae-refusal fit` does",
        )
    parser.add_argument(
        "--sae_dir", required=True, help="an SAE export folder, or a folder of seed{n}/ exports"
    )
    parser.add_argument("--out", default=None, help=f"output folder; must not exist (default: {out_default})")
    parser.add_argument(
        "--allow_other_model",
        action="store_true",
        help=f"{other_model_use}: SAEs trained on another model or layer than the data's; by default the "
        "exports' model and layer must match data.llm and data.layer",
    )
    parser.add_argument(
        "--no_verify",
        action="store_true",
        help="load the SAE tensor files without checking them against the sha256 their cfg.json records",
    )
