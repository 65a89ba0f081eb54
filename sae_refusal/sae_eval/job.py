"""One SAE evaluation: every seed's SAE on one layer's cached activations, the report and its files.

:func:`evaluate_saes` is the pure part (splits and SAEs in, a JSON-serialisable report out);
:func:`write_report` writes ``report.json`` (every number and the provenance, local paths relative to the
folder), ``report.md`` (tables) and ``density.png`` into a folder. ``sae-refusal sae-eval``
(:mod:`sae_refusal.sae_eval.command`) runs both on the exports of ``--sae_dir``.

Rows: the dense and k-sparse probes, the latent rankings, the main latents of the absorption and the L1
heads are fitted on ``fit_split`` (default ``train``); everything is scored on ``eval_split`` (default
``test``). Core metrics use every eval row (ambiguous prompts too: the SAE is trained on them); probing,
absorption and heads use its benign and harmful rows (class 0 benign, ``c`` the ``c``-th category,
:data:`sae_refusal.features.analysis.CLASS_NAMES`).

The report (``report.json``)::

    config, head_config          the settings (this job's and the L1 heads')
    metadata                     model, model_fingerprint, layer, d_model, sae_paths, epoch, global_step,
                                 config_files, row counts
    set_sizes                    per split, rows per class
    dense_probe                  the residual baseline: per task scores, summary
    seeds/<name>/core            CoreMetrics (+ density_histogram)
    seeds/<name>/probing         k-sparse probes per task and k, summary per k
    seeds/<name>/absorption      per category and mean
    seeds/<name>/head            the L1 head's held-out accuracy, macro F1 and top features per class
    stability                    cross-seed matching per ordered pair and mean (or skipped)
    summary                      headline numbers: mean, std, min, max, n over the seeds
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sae_refusal.activations.datamodule import ActivationBatch
from sae_refusal.atomic import atomic_write_text
from sae_refusal.features.analysis import CLASS_NAMES, class_codes, fit_head
from sae_refusal.features.config import FeatureAnalysisConfig
from sae_refusal.features.consensus import mean_and_spread
from sae_refusal.progress import Stage
from sae_refusal.provenance import relative_paths
from sae_refusal.sae.base import SparseAutoencoder
from sae_refusal.sae_eval.absorption import absorption_report
from sae_refusal.sae_eval.config import SAEEvalConfig
from sae_refusal.sae_eval.core import core_metrics, density_histogram, encode_decode, firing_density
from sae_refusal.sae_eval.probing import dense_probes, sparse_probing
from sae_refusal.sae_eval.report import render_markdown, write_density_plot
from sae_refusal.sae_eval.stability import stability_report

__all__ = ["evaluate_saes", "headline", "write_report"]

JOB = "sae-eval"


def _split(splits: Mapping[str, ActivationBatch], name: str, option: str) -> ActivationBatch:
    if name not in splits:
        raise ValueError(f"{option} {name!r} is not a split of the data (have {sorted(splits)})")
    batch = splits[name]
    if len(batch.acts_ND) == 0:
        raise ValueError(f"{option} {name!r} has no rows")
    return batch


def _labelled(batch: ActivationBatch, name: str, option: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of the benign and harmful rows of ``batch`` and their class codes."""
    codes = class_codes(batch)
    keep = codes >= 0
    if not bool(keep.any()):
        raise ValueError(f"{option} {name!r} has no benign or harmful rows")
    return keep, codes[keep]


def json_safe(node: Any) -> Any:
    """``node`` with NaN / infinite floats as ``None`` and tuples as lists (strict JSON)."""
    if isinstance(node, Mapping):
        return {str(key): json_safe(value) for key, value in node.items()}
    if isinstance(node, list | tuple):
        return [json_safe(value) for value in node]
    if isinstance(node, float) and not math.isfinite(node):
        return None
    return node


def evaluate_saes(
    splits: Mapping[str, ActivationBatch],
    saes: Mapping[str, SparseAutoencoder],
    config: SAEEvalConfig | None = None,
    head_config: FeatureAnalysisConfig | None = None,
    *,
    metadata: Mapping[str, Any] | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Core metrics, k-sparse probing, absorption, heads and cross-seed stability (module docstring).

    Args:
        splits: The data module's splits (``ActivationDataModule.splits``).
        saes: SAEs by seed name (``seed0``, ...), at least one.
        config: What to compute.
        head_config: The L1 heads' settings (the fit config's ``FeatureAnalysisCallback`` analysis, as
            ``sae-refusal features`` uses them); its splits and ``top_k_features`` are this job's.
        metadata: Provenance kept in the report (model, layer, SAE paths...).
        verbose: Print a line as each stage starts and ends.

    Raises:
        ValueError: Naming ``--fit_split`` / ``--eval_split`` when a split is missing or has no benign or
            harmful rows, or when no SAE is given.
    """
    config = config or SAEEvalConfig()
    if not saes:
        raise ValueError("--sae_dir: no SAE to evaluate")
    heads = dataclasses.replace(
        head_config or FeatureAnalysisConfig(),
        fit_split=config.fit_split,
        eval_split=config.eval_split,
        top_k_features=config.top_k,
    )
    fit = _split(splits, config.fit_split, "--fit_split")
    held_out = _split(splits, config.eval_split, "--eval_split")
    fit_mask, c_fit = _labelled(fit, config.fit_split, "--fit_split")
    eval_mask, c_eval = _labelled(held_out, config.eval_split, "--eval_split")
    X_fit, X_all = fit.acts_ND[fit_mask].float(), held_out.acts_ND.float()
    X_eval = X_all[eval_mask]

    def stage(name: str) -> Any:
        return Stage(JOB, name) if verbose else _Quiet()

    probe_args: dict[str, Any] = {"C": config.probe_c, "seed": config.seed}
    with stage("dense probes on the residual"):
        dense, probes = dense_probes(X_fit.numpy(), c_fit, X_eval.numpy(), c_eval, CLASS_NAMES, **probe_args)
    seeds: dict[str, Any] = {}
    top_features: dict[str, dict[int, list[int]]] = {}
    for name, sae in saes.items():
        with stage(f"{name}: core metrics, probing, absorption, head"):
            Z_all, recon = encode_decode(sae, X_all)
            Z_fit, _ = encode_decode(sae, X_fit)
            Z_eval = Z_all[eval_mask]
            W_dec = sae.W_dec_FD.detach().float().cpu()
            core = core_metrics(X_all, Z_all, recon, W_dec, dense_threshold=config.dense_threshold)
            with torch.no_grad():
                offset_D = sae.decode(torch.zeros(1, sae.n_latents, device=sae.W_dec_FD.device))[0]
            directions_FD = W_dec / float(sae.input_scale)
            head = fit_head(heads, Z_fit, c_fit, Z_eval, c_eval)
            top_features[name] = head.feature_sets()
            seeds[name] = {
                "architecture": sae.architecture,
                "core": {
                    **core.to_dict(),
                    "density_histogram": density_histogram(firing_density(Z_all), len(Z_all)),
                },
                "probing": sparse_probing(
                    Z_fit.numpy(), c_fit, Z_eval.numpy(), c_eval, CLASS_NAMES, config.k, **probe_args
                ),
                "absorption": absorption_report(
                    Z_fit,
                    c_fit,
                    X_eval,
                    Z_eval,
                    c_eval,
                    CLASS_NAMES,
                    probes,
                    directions_FD,
                    offset_D.detach().float().cpu(),
                    tau_fs=config.tau_fs,
                    max_k_main=config.max_k_main,
                    full_absorption_cos=config.full_absorption_cos,
                    fraction_cos=config.fraction_cos,
                    proportion=config.proportion,
                    max_absorbers=config.max_absorbers,
                    **probe_args,
                ),
                "head": {
                    "accuracy": head.accuracy,
                    "macro_f1": head.macro_f1,
                    "top_features": head.top_features,
                    "n_train": head.n_train,
                    "n_test": head.n_test,
                },
            }
    with stage("cross-seed stability (Hungarian matching of decoder rows)"):
        decoders = {name: sae.W_dec_FD.detach().float().cpu() for name, sae in saes.items()}
        stability = stability_report(decoders, top_features, config.match_cosines, CLASS_NAMES)
    sizes = {
        split: {n: int((codes == i).sum()) for i, n in enumerate(CLASS_NAMES)}
        for split, codes in ((config.fit_split, c_fit), (config.eval_split, c_eval))
    }
    report: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "head_config": {
            k: v
            for k, v in dataclasses.asdict(heads).items()
            if k.startswith("head") or k in ("top_k_features",)
        },
        "metadata": {
            **dict(metadata or {}),
            "n_eval_rows": len(X_all),
            "n_eval_labelled": len(X_eval),
            "n_fit_labelled": len(X_fit),
        },
        "class_names": CLASS_NAMES,
        "set_sizes": sizes,
        "dense_probe": dense,
        "seeds": seeds,
        "stability": stability,
    }
    report["summary"] = _summary(report, config)
    return json_safe(report)


class _Quiet:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _summary(report: Mapping[str, Any], config: SAEEvalConfig) -> dict[str, Any]:
    """Headline numbers over the seeds (mean, std, min, max, n)."""
    seeds = list(report["seeds"].values())

    def over(*path: str) -> dict[str, float]:
        """Mean and spread over the seeds of the number at ``path`` in each seed's report."""
        values = []
        for s in seeds:
            node = s
            for key in path:
                node = node[key]
            values.append(float(node) if node is not None else math.nan)
        return mean_and_spread(values)

    out: dict[str, Any] = {}
    core_keys = (
        "fvu",
        "explained_variance",
        "l0",
        "dead_share",
        "dense_share",
        "shrinkage",
        "max_cosine_mean",
    )
    for key in core_keys:
        out[key] = over("core", key)
    out["max_cosine_mean"] = over("core", "max_cosine_mean")
    for k in (str(k) for k in config.k):
        for task in ("harmful_vs_benign", "category_mean"):
            out[f"sparse_probe_k{k}/{task}"] = over("probing", "summary", "accuracy", k, task)
    for metric in ("main_miss_rate", "full_absorption_rate", "absorption_fraction"):
        out[f"absorption/{metric}"] = over("absorption", "mean", metric)
    out["head_accuracy"] = over("head", "accuracy")
    dense = report["dense_probe"]["summary"]["accuracy"]
    out["dense_probe/harmful_vs_benign"] = dense["harmful_vs_benign"]
    out["dense_probe/category_mean"] = dense["category_mean"]
    stability = report["stability"]
    if "mean" in stability:
        for t, values in stability["mean"].items():
            for metric, value in values.items():
                out[f"stability/{metric}@{t}"] = value
    return out


def headline(report: Mapping[str, Any]) -> list[str]:
    """A few lines of the report's headline numbers (printed at the end of the command)."""
    summary = report["summary"]

    def stat(key: str, spec: str = "{:.3f}") -> str:
        value = summary.get(key)
        if isinstance(value, Mapping):
            value = value.get("mean")
        return "-" if value is None else spec.format(value)

    ks = [str(k) for k in report["config"]["k"]]
    lines = [
        f"  FVU {stat('fvu')}  L0 {stat('l0', '{:.1f}')}  dead {stat('dead_share', '{:.1%}')}  "
        f"dense {stat('dense_share', '{:.1%}')}  shrinkage {stat('shrinkage')}  "
        f"max decoder cos {stat('max_cosine_mean')}",
        "  k-sparse probe accuracy, harmful vs benign: "
        + ", ".join(f"k={k} {stat(f'sparse_probe_k{k}/harmful_vs_benign')}" for k in ks)
        + f" (dense {stat('dense_probe/harmful_vs_benign')})",
        "  k-sparse probe accuracy, category mean: "
        + ", ".join(f"k={k} {stat(f'sparse_probe_k{k}/category_mean')}" for k in ks)
        + f" (dense {stat('dense_probe/category_mean')})",
        f"  absorption: main-latent miss {stat('absorption/main_miss_rate')}, full "
        f"{stat('absorption/full_absorption_rate')}, fraction {stat('absorption/absorption_fraction')}",
    ]
    t = str(report["config"]["match_cosines"][0])
    if f"stability/matched_share@{t}" in summary:
        lines.append(
            f"  stability (cosine >= {t}): latents matched {stat(f'stability/matched_share@{t}')}, head top-"
            f"{report['config']['top_k']} shared {stat(f'stability/head_shared@{t}')}"
        )
    return lines


def write_report(report: Mapping[str, Any], out: Path) -> list[Path]:
    """``report.json`` (local paths relative to ``out``), ``report.md`` and ``density.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = {**report, "metadata": relative_paths(report["metadata"], out)}
    atomic_write_text(out / "report.json", json.dumps(written, indent=2, allow_nan=False))
    atomic_write_text(out / "report.md", render_markdown(report) + "\n")
    meta = report["metadata"]
    title = f"latent firing density, {report['config']['eval_split']} split"
    if meta.get("layer") is not None:
        title = f"{Path(str(meta.get('model'))).name} layer {meta['layer']}: {title}"
    histograms = {name: s["core"]["density_histogram"] for name, s in report["seeds"].items()}
    write_density_plot(histograms, out / "density.png", title)
    return [out / "report.json", out / "report.md", out / "density.png"]
