"""The feature side of a transfer job: both models' feature analyses in A's SAE latent space, compared.

:func:`compare_features` runs :func:`~sae_refusal.features.analysis.analyze_features` on A's rows with A's SAE
and on B's rows with A's SAE (through the maps when there are some), then compares per seed: CAA and decoded
SAS cosines (A's vectors carried into B's space by the map's linear part), Jaccard overlap of SAS features and
of the L1 heads' top-K features, A's head scored on B's codes beside each model's own head, and cluster
metrics of B's codes on all latents and on A's selected latents (with the permutation baseline).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sae_refusal.transfer.config import TransferJobConfig

__all__ = ["compare_features"]


def _compare_features(
    a_report: dict[str, Any],
    b_report: dict[str, Any],
    a_vectors: Any,
    b_vectors: Any,
    a_to_b: Any,
) -> dict[str, Any]:
    """Cosines of A's vectors (carried to B's space when mapped) with B's, and feature-set overlaps."""
    from sae_refusal.steer.gates import global_vector
    from sae_refusal.transfer.compare import jaccard, row_cosines

    categories = list(a_vectors.class_names[1:])

    def to_b(v: torch.Tensor) -> torch.Tensor:
        return v.float() if a_to_b is None else a_to_b.direction(v.float())

    caa_a, caa_b = to_b(a_vectors.caa_CD), b_vectors.caa_CD.float()
    out: dict[str, Any] = {
        "caa_cosine": dict(zip(categories, row_cosines(caa_a, caa_b), strict=True)),
    }
    out["caa_cosine"]["global"] = row_cosines(
        global_vector(caa_a).unsqueeze(0), global_vector(caa_b).unsqueeze(0)
    )[0]
    if a_vectors.sas_decoded_CD is not None:
        sas_a = to_b(a_vectors.sas_decoded_CD)
        out["a_sas_decoded_vs_b_caa"] = dict(zip(categories, row_cosines(sas_a, caa_b), strict=True))
        if b_vectors.sas_decoded_CD is not None:
            out["sas_decoded_cosine"] = dict(
                zip(categories, row_cosines(sas_a, b_vectors.sas_decoded_CD.float()), strict=True)
            )
    if a_vectors.sas_CF is not None and b_vectors.sas_CF is not None:
        out["sas_feature_jaccard"] = {
            cat: jaccard(
                a_vectors.sas_CF[c].nonzero().flatten().tolist(),
                b_vectors.sas_CF[c].nonzero().flatten().tolist(),
            )
            for c, cat in enumerate(categories)
        }
    heads_a, heads_b = a_report.get("head", {}), b_report.get("head", {})
    if heads_a and heads_b:
        out["head_topk_jaccard"] = {
            name: jaccard(
                [int(f) for f, _ in heads_a["top_features"][name]],
                [int(f) for f, _ in heads_b["top_features"][name]],
            )
            for name in heads_a["top_features"]
        }
    return out


def compare_features(
    cfg: TransferJobConfig,
    a: Any,
    b: Any,
    saes_a: dict[str, Any],
    saes_on_b: dict[str, Any],
    a_to_b: Any,
    folders: dict[str, Path],
    out: Path,
) -> tuple[dict[str, Any], Any, Any]:
    from sae_refusal.features.analysis import (
        analyze_features,
        encode_rows,
        fit_head,
        labelled_rows,
        selected_cluster_report,
    )

    fc = cfg.features
    sae_paths = {name: str(folder) for name, folder in folders.items()}
    analysis_a = analyze_features(
        a.splits,
        saes_a,
        fc,
        out_dir=out / "features" / "source",
        metadata={
            "model": a.spec.llm.name_or_path,
            "layer": a.layer,
            "d_model": a.d_model,
            "model_fingerprint": a.fingerprint,
            "sae_paths": sae_paths,
            "transfer_role": "source",
        },
    )
    analysis_b = analyze_features(
        b.splits,
        saes_on_b,
        fc,
        out_dir=out / "features" / "target",
        metadata={
            "model": b.spec.llm.name_or_path,
            "layer": b.layer,
            "d_model": b.d_model,
            "model_fingerprint": b.fingerprint,
            "sae_paths": sae_paths,
            "sae_model_fingerprint": a.fingerprint,
            "transfer_role": "target",
            "linear_map": None if a_to_b is None else "maps/b_to_a (in), maps/a_to_b (out)",
        },
    )
    X_a_fit, y_a_fit = labelled_rows(a.splits, fc.fit_split, "fit_split")
    X_b_eval, y_b_eval = labelled_rows(b.splits, fc.eval_split, "eval_split")
    per_seed: dict[str, Any] = {}
    for name, sae in saes_a.items():
        rep_a, rep_b = analysis_a.report["seeds"][name], analysis_b.report["seeds"][name]
        Z_a_fit = encode_rows(sae, X_a_fit)
        Z_b_eval = encode_rows(saes_on_b[name], X_b_eval)
        head_ab = fit_head(fc, Z_a_fit, y_a_fit, Z_b_eval, y_b_eval)  # A's head scored on B's codes
        clusters_on_a_features, skipped = selected_cluster_report(
            Z_b_eval[:, list(rep_a["topk_features"])], y_b_eval, fc
        )
        per_seed[name] = {
            "head": {
                "a_on_a": {k: rep_a["head"][k] for k in ("accuracy", "macro_f1", "per_class_f1")},
                "a_on_b": {k: getattr(head_ab, k) for k in ("accuracy", "macro_f1", "per_class_f1")},
                "b_on_b": {k: rep_b["head"][k] for k in ("accuracy", "macro_f1", "per_class_f1")},
            },
            "clusters": {
                "a_full": rep_a["clusters_full"],
                "b_full": rep_b["clusters_full"],
                "a_topk": rep_a["clusters_topk"],
                "b_on_a_topk": clusters_on_a_features,
                **({"b_on_a_topk_skipped": skipped} if skipped else {}),
            },
            "compare": _compare_features(
                rep_a, rep_b, analysis_a.vectors[name], analysis_b.vectors[name], a_to_b
            ),
        }
    residual = {
        "a": analysis_a.report["residual"]["clusters"],
        "b": analysis_b.report["residual"]["clusters"],
    }
    return {"per_seed": per_seed, "residual_clusters": residual}, analysis_a, analysis_b
