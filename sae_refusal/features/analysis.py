"""One feature analysis of a layer's activations and its SAEs (one per seed): vectors, heads, metrics, plots.

:func:`analyze_features` is the single entry point used by the epoch-end callback
(:class:`~sae_refusal.features.callback.FeatureAnalysisCallback`) and by ``sae-refusal features`` (a saved
SAE export and the activation cache), so both give the same numbers for the same weights and data. It
returns a JSON-serialisable report and, given ``out_dir``, writes::

    report.json                     everything below, numbers only
    seed{n}/vectors.safetensors     CAA + SAS (+ decoded SAS) vectors of that seed's SAE, with
    seed{n}/vectors.json            their metadata (model, layer, SAE, epoch and global step of its
                                    weights, tau, top_k, set sizes)
    plots/residual_{method}.png     2-D projections of the residual activations, coloured by class
    plots/seed{n}_sparse_full_{method}.png   the same for the SAE codes, all latents
    plots/seed{n}_sparse_topk_{method}.png   the same for the SAE codes, the top-K selected latents only

Rows: vectors and heads are fitted on ``fit_split`` (default ``train``); heads are scored, and cluster
metrics and plots computed, on ``eval_split`` (default ``test``, held out). Classes are benign (0) and the
harmful categories (1..C); ambiguous prompts are left out.

**Selected (top-K) features.** Each seed's *selected features* are, with ``consensus_source: head`` (the
default), the ``top_k_features`` latents with the largest positive weights of the L1 head for each class,
united over the classes; with ``consensus_source: sas`` the latents of the SAS vectors (at most
``sas_top_k`` per category). We read the seed's "cluster metrics and 2-D projections on the top-K selected
features" as this set: the latents the sparse classifier picks, chosen on the fit split only. Cluster
metrics and projections of the SAE codes are computed twice on the held-out rows and named so:
``sparse_full`` (every latent) and ``sparse_topk`` (only the selected latents' columns). Per seed the
report holds ``clusters_full``, ``clusters_topk`` (null, with the reason in ``clusters_topk_skipped``, when
the metrics are undefined there: no selected latent, or codes constant on those columns; likewise
``clusters_full`` / ``clusters_full_skipped`` for an SAE whose every latent is silent), ``topk_features``
and ``topk_source``; across seeds ``summary`` holds ``sparse_full_{metric}`` and ``sparse_topk_{metric}``
(``sparse_{metric}``, the old name of ``sparse_full_{metric}``, is kept in the report for readers of old
keys but not logged). The residual stream has no selected features: its metrics (``residual.clusters``) use
every dimension.

Across seeds: the selected features are matched by decoder cosine and optimal assignment with every seed as
the reference in turn (:func:`~sae_refusal.features.consensus.consensus_features`, independent of the
seeds' order), a feature is kept when found in at least ``consensus_min_share`` of the seeds, and per-seed
numbers are summarised as mean and spread.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sae_refusal.activations.datamodule import LABEL_INDEX, ActivationBatch
from sae_refusal.atomic import atomic_write_text
from sae_refusal.categories import CATEGORY_SHORT_NAMES, COCONOT_CATEGORIES
from sae_refusal.features.clusters import METRIC_NAMES, cluster_metrics
from sae_refusal.features.config import FeatureAnalysisConfig
from sae_refusal.features.consensus import consensus_features, mean_and_spread
from sae_refusal.features.heads import HeadReport, fit_sklearn_head, fit_torch_head
from sae_refusal.features.plots import ProjectionPlot, write_projection_plots
from sae_refusal.features.vectors import SteeringVectors, caa_vectors, sas_vectors
from sae_refusal.provenance import relative_paths
from sae_refusal.sae.base import SparseAutoencoder

__all__ = [
    "CLASS_NAMES",
    "FeatureAnalysis",
    "FeatureAnalysisConfig",
    "analyze_features",
    "class_codes",
    "cluster_report",
    "fit_head",
    "labelled_rows",
    "selected_cluster_report",
]

#: Class ``0`` benign, ``c`` the harmful category ``COCONOT_CATEGORIES[c - 1]`` (short names).
CLASS_NAMES: list[str] = ["benign", *(CATEGORY_SHORT_NAMES[c] for c in COCONOT_CATEGORIES)]


#: Old names of ``sparse_full_{metric}`` in the across-seed summary, kept in the report only.
LEGACY_SUMMARY_KEYS = frozenset(f"sparse_{metric}" for metric in METRIC_NAMES)

#: Report entries too fine-grained for a logger (per-latent shares, feature lists, config echoes) or
#: duplicates of logged ones.
SKIPPED_SCALARS = frozenset(
    {"share", "kept", "top_features", "confusion", "config", "n_train", "n_test", *LEGACY_SUMMARY_KEYS}
)


def plot_title_context(metadata: Mapping[str, Any], eval_split: str) -> str:
    """The first line of every plot title: model, layer, split and epoch where the metadata knows them
    (e.g. ``smollm2 layer 15, test split, epoch 29``)."""
    model, layer, epoch = metadata.get("model"), metadata.get("layer"), metadata.get("epoch")
    model_name = Path(str(model)).name if model else ""  # a hub id or a folder: its last part
    where = " ".join(part for part in (model_name, f"layer {layer}" if layer is not None else "") if part)
    parts = [where] if where else []
    parts.append(f"{eval_split} split")
    if epoch is not None:
        parts.append(f"epoch {epoch}")
    return ", ".join(parts)


def class_codes(batch: ActivationBatch) -> torch.Tensor:
    """Per row: 0 benign, ``c`` for a harmful prompt of category ``c``, -1 for ambiguous (left out)."""
    harmful = batch.label_N == LABEL_INDEX["harmful"]
    benign = batch.label_N == LABEL_INDEX["benign"]
    codes = torch.full_like(batch.label_N, -1)
    codes[benign] = 0
    codes[harmful] = batch.category_N[harmful]
    return codes


@dataclass
class FeatureAnalysis:
    """What :func:`analyze_features` produced.

    Args:
        report: JSON-serialisable numbers (also written as ``report.json``).
        vectors: Steering vectors per seed name.
        plots: The projection plots written, by tag (``residual_pca``, ``seed0_sparse_full_umap``,
            ``seed0_sparse_topk_umap``, ...).
    """

    report: dict[str, Any]
    vectors: dict[str, SteeringVectors]
    plots: dict[str, ProjectionPlot]

    def scalars(self) -> dict[str, float]:
        """Flat ``name -> number`` view of the report (for loggers); non-finite numbers are left out."""
        out: dict[str, float] = {}

        def walk(prefix: str, node: Any) -> None:
            if isinstance(node, Mapping):
                for key, value in node.items():
                    if key in SKIPPED_SCALARS:
                        continue
                    walk(f"{prefix}/{key}" if prefix else str(key), value)
            elif isinstance(node, bool):
                return
            elif isinstance(node, int | float) and math.isfinite(node):
                out[prefix] = float(node)

        for section in ("residual", "seeds", "across_seeds"):
            walk(section, self.report.get(section, {}))
        return out


def _json_safe(node: Any) -> Any:
    """The report with NaN / infinite numbers as ``None`` (strict JSON; a metric that cannot be computed)."""
    if isinstance(node, Mapping):
        return {key: _json_safe(value) for key, value in node.items()}
    if isinstance(node, list | tuple):
        return [_json_safe(value) for value in node]
    if isinstance(node, float) and not math.isfinite(node):
        return None
    return node


def _cosine_matrix(A_KD: torch.Tensor) -> list[list[float]]:
    unit = A_KD.float() / A_KD.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (unit @ unit.T).tolist()


def _row_cosine(A_KD: torch.Tensor, B_KD: torch.Tensor) -> list[float]:
    return torch.nn.functional.cosine_similarity(A_KD.float(), B_KD.float(), dim=1, eps=1e-12).tolist()


@torch.no_grad()
def encode_rows(sae: SparseAutoencoder, acts_ND: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Dense SAE codes of ``acts_ND`` in eval mode, batched, on the SAE's device; returned on the CPU."""
    was_training = sae.training
    sae.eval()
    try:
        device = sae.W_dec_FD.device
        chunks = [
            sae.encode(acts_ND[i : i + batch_size].to(device)).float().cpu()
            for i in range(0, len(acts_ND), batch_size)
        ]
        return torch.cat(chunks) if chunks else acts_ND.new_zeros(0, sae.n_latents)
    finally:
        sae.train(was_training)


def labelled_rows(
    splits: Mapping[str, ActivationBatch], name: str, key: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Benign + harmful rows of split ``name`` and their class codes (ambiguous prompts left out).

    Raises:
        ValueError: Naming ``features.{key}`` when the split is missing or has no benign or harmful rows.
    """
    if name not in splits:
        raise ValueError(f"features.{key}={name!r} is not a split of the data (have {sorted(splits)})")
    batch = splits[name]
    codes = class_codes(batch)
    keep = codes >= 0
    if not bool(keep.any()):
        raise ValueError(f"features.{key}={name!r} has no benign or harmful rows")
    return batch.acts_ND[keep].float(), codes[keep]


def fit_head(
    config: FeatureAnalysisConfig,
    X_fit: torch.Tensor,
    y_fit: torch.Tensor,
    X_eval: torch.Tensor,
    y_eval: torch.Tensor,
) -> HeadReport:
    """The configured L1 head (scikit-learn or torch) fitted on ``X_fit`` and scored on ``X_eval``."""
    data = (X_fit, y_fit, X_eval, y_eval, CLASS_NAMES)
    top_k, seed = config.top_k_features, config.seed
    if config.head == "sklearn":
        report, _ = fit_sklearn_head(*data, C=config.head_c, top_k=top_k, seed=seed)
    else:
        report, _ = fit_torch_head(*data, l1=config.head_l1, steps=config.head_steps, top_k=top_k)
    return report


def cluster_report(X_ND: torch.Tensor, y_N: torch.Tensor, config: FeatureAnalysisConfig) -> dict[str, Any]:
    """Cluster metrics of rows ``X_ND`` labelled ``y_N`` with the permutation baseline of ``config``."""
    return cluster_metrics(
        X_ND,
        y_N,
        n_permutations=config.n_permutations,
        seed=config.seed,
        max_rows=config.metrics_max_rows,
    ).to_dict()


def selected_cluster_report(
    Z_sel: torch.Tensor, y_N: torch.Tensor, config: FeatureAnalysisConfig
) -> tuple[dict[str, Any] | None, str | None]:
    """Cluster metrics on selected latent columns, or ``None`` and why they are undefined there."""
    if Z_sel.shape[1] == 0:
        return None, "no selected features"
    if not bool((Z_sel != Z_sel[:1]).any()):
        return None, "the codes are constant on the selected features"
    try:
        return cluster_report(Z_sel, y_N, config), None
    except ValueError as err:  # e.g. constant on the max_rows subsample
        return None, str(err)


def analyze_features(
    splits: Mapping[str, ActivationBatch],
    saes: Mapping[str, SparseAutoencoder],
    config: FeatureAnalysisConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> FeatureAnalysis:
    """Vectors, heads, cluster metrics, plots and cross-seed consensus (see the module docstring).

    Args:
        splits: The data module's splits (``ActivationDataModule.splits``).
        saes: SAEs by seed name (``seed0``, ...); may be empty (residual-space results only).
        config: What to compute.
        out_dir: Where to write the report, vector artifacts and plots (nothing written when ``None``).
        metadata: Facts kept with every vector artifact and the report (model, layer, SAE paths by seed
            name under ``sae_paths``, epoch).
    """
    config = config or FeatureAnalysisConfig()
    metadata = dict(metadata or {})
    plot_context = plot_title_context(metadata, config.eval_split)
    X_fit, y_fit = labelled_rows(splits, config.fit_split, "fit_split")
    X_eval, y_eval = labelled_rows(splits, config.eval_split, "eval_split")
    n_classes = len(CLASS_NAMES)
    out = Path(out_dir) if out_dir is not None else None
    plots: dict[str, ProjectionPlot] = {}

    def draw(X: torch.Tensor, prefix: str, subject: str) -> None:
        if out is None or not config.projections:
            return
        for plot in write_projection_plots(
            X,
            y_eval,
            CLASS_NAMES,
            out / "plots",
            prefix=prefix,
            methods=config.projections,
            seed=config.seed,
            max_rows=config.plot_max_rows,
            title=f"{plot_context}\n{subject}",
        ):
            plots[f"{prefix}_{plot.method}"] = plot

    def clusters(X: torch.Tensor) -> dict[str, Any]:
        return cluster_report(X, y_eval, config)

    caa_CD, counts_K = caa_vectors(X_fit, y_fit, n_classes)
    categories = CLASS_NAMES[1:]
    report: dict[str, Any] = {
        "config": asdict(config),
        "metadata": metadata,
        "class_names": CLASS_NAMES,
        "set_sizes": {
            config.fit_split: {n: int(c) for n, c in zip(CLASS_NAMES, counts_K.tolist(), strict=True)},
            config.eval_split: {n: int((y_eval == i).sum()) for i, n in enumerate(CLASS_NAMES)},
        },
        "residual": {
            "caa_norm": dict(zip(categories, caa_CD.norm(dim=1).tolist(), strict=True)),
            "caa_cosine": _cosine_matrix(caa_CD),
            "clusters": clusters(X_eval),
        },
    }
    draw(X_eval, "residual", f"residual stream ({X_eval.shape[1]} dims)")

    vectors: dict[str, SteeringVectors] = {}
    seed_reports: dict[str, Any] = {}
    selected: dict[str, dict[int, list[int]]] = {}
    sae_paths = dict(metadata.get("sae_paths", {}))
    for name, sae in saes.items():
        Z_fit, Z_eval = encode_rows(sae, X_fit), encode_rows(sae, X_eval)
        sas = sas_vectors(
            Z_fit,
            y_fit,
            n_classes,
            tau=config.tau,
            top_k=config.sas_top_k,
            remove_shared=config.remove_shared,
        )
        with torch.no_grad():
            decoded_CD = sae.decode_direction(sas.vectors_CF.to(sae.W_dec_FD.device)).float().cpu()
        head = fit_head(config, Z_fit, y_fit, Z_eval, y_eval)
        selected[name] = (
            head.feature_sets()
            if config.consensus_source == "head"
            else {c: sas.features(c) for c in range(1, n_classes)}
        )
        topk_features = sorted({f for fs in selected[name].values() for f in fs})
        Z_eval_topk = Z_eval[:, topk_features]
        clusters_topk, topk_skipped = selected_cluster_report(Z_eval_topk, y_eval, config)
        # an SAE whose every latent is dead on these rows (a collapsed fit) gets its report, not an error
        clusters_full, full_skipped = selected_cluster_report(Z_eval, y_eval, config)
        seed_reports[name] = {
            "sas": {
                "n_features": {cat: len(sas.features(c)) for c, cat in enumerate(categories, start=1)},
                "n_shared_removed": dict(zip(categories, sas.shared_CF.sum(1).tolist(), strict=True)),
                "cosine_with_caa": dict(zip(categories, _row_cosine(decoded_CD, caa_CD), strict=True)),
                "decoded_cosine": _cosine_matrix(decoded_CD),
            },
            "head": head.to_dict(),
            "clusters_full": clusters_full,
            "topk_source": config.consensus_source,
            "topk_features": topk_features,
            "clusters_topk": clusters_topk,
        }
        if topk_skipped is not None:
            seed_reports[name]["clusters_topk_skipped"] = topk_skipped
        if full_skipped is not None:
            seed_reports[name]["clusters_full_skipped"] = full_skipped
        else:
            draw(Z_eval, f"{name}_sparse_full", f"{name} SAE codes, all {Z_eval.shape[1]} latents")
        if len(topk_features) >= 2 and clusters_topk is not None:
            draw(
                Z_eval_topk,
                f"{name}_sparse_topk",
                f"{name} SAE codes, {len(topk_features)} selected latents ({config.consensus_source})",
            )
        vectors[name] = SteeringVectors(
            class_names=CLASS_NAMES,
            caa_CD=caa_CD,
            sas_CF=sas.vectors_CF,
            sas_decoded_CD=decoded_CD,
            metadata={
                **{k: v for k, v in metadata.items() if k != "sae_paths"},
                "epoch": metadata.get("epoch"),
                "global_step": metadata.get("global_step"),
                "sae": {
                    "name": name,
                    "path": sae_paths.get(name),
                    "architecture": sae.architecture,
                    **sae.config(),
                },
                "tau": config.tau,
                "top_k": config.sas_top_k,
                "remove_shared": config.remove_shared,
                "fit_split": config.fit_split,
                "set_sizes": report["set_sizes"][config.fit_split],
            },
        )
    report["seeds"] = seed_reports
    if saes:
        report["across_seeds"] = _across_seeds(config, seed_reports, selected, saes)
    report = _json_safe(report)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for name, vec in vectors.items():
            vec.save(out / name)
        written = {**report, "metadata": relative_paths(report["metadata"], out)}  # paths relative to out
        atomic_write_text(out / "report.json", json.dumps(written, indent=2, allow_nan=False))
    return FeatureAnalysis(report=report, vectors=vectors, plots=plots)


def _across_seeds(
    config: FeatureAnalysisConfig,
    seed_reports: Mapping[str, Any],
    selected: Mapping[str, Mapping[int, list[int]]],
    saes: Mapping[str, SparseAutoencoder],
) -> dict[str, Any]:
    decoders = {name: sae.W_dec_FD.detach().float().cpu() for name, sae in saes.items()}
    consensus = consensus_features(
        selected, decoders, min_share=config.consensus_min_share, min_cosine=config.consensus_min_cosine
    )
    per_seed = list(seed_reports.values())
    summary: dict[str, Any] = {
        "head_accuracy": mean_and_spread([r["head"]["accuracy"] for r in per_seed]),
        "head_macro_f1": mean_and_spread([r["head"]["macro_f1"] for r in per_seed]),
    }
    for variant in ("full", "topk"):
        for metric in METRIC_NAMES:
            values = [(r[f"clusters_{variant}"] or {}).get(metric, math.nan) for r in per_seed]
            summary[f"sparse_{variant}_{metric}"] = mean_and_spread(values)
    for metric in METRIC_NAMES:  # the old names, kept for readers of earlier reports (not logged)
        summary[f"sparse_{metric}"] = summary[f"sparse_full_{metric}"]
    for cat in CLASS_NAMES[1:]:
        summary[f"sas_cosine_with_caa/{cat}"] = mean_and_spread(
            [r["sas"]["cosine_with_caa"][cat] for r in per_seed]
        )
        summary[f"head_f1/{cat}"] = mean_and_spread([r["head"]["per_class_f1"][cat] for r in per_seed])
    stability = consensus.to_dict(CLASS_NAMES)
    return {"summary": summary, "consensus": stability, "consensus_source": config.consensus_source}
