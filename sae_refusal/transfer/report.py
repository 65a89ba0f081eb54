"""What a transfer job writes besides ``metrics.json``: ``report.md``, TensorBoard scalars and a headline.

Every number in ``report.md`` is read from the metrics dict the job also saves; cells with a confidence
interval show ``value [low, high] n=...`` (:func:`sae_refusal.eval.report.cell`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from sae_refusal.eval.report import cell

__all__ = ["headline", "report_markdown", "scalars", "write_report"]


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _signed(row: Mapping[str, Any] | None) -> str:
    if not row or row.get("value") is None or math.isnan(row["value"]):
        return "-"
    return f"{row['value']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}] n={row['n']}"


def _cluster_row(name: str, clusters: Mapping[str, Any] | None) -> str:
    if not clusters:
        return f"| {name} | - | - | - |"
    parts = []
    for metric in ("silhouette", "davies_bouldin", "calinski_harabasz"):
        value, base = clusters.get(metric), clusters.get(f"{metric}_perm_mean")
        parts.append(f"{_f(value)} (perm {_f(base)})" if base is not None else _f(value))
    return f"| {name} | " + " | ".join(parts) + " |"


def report_markdown(metrics: Mapping[str, Any]) -> str:
    """The Markdown report of one transfer job."""
    a, b = metrics["source"], metrics["target"]
    la, lb = a["label"], b["label"]
    lines = [
        f"# Transfer: {la} -> {lb}",
        "",
        f"- **A ({la})**: `{a['llm']['name_or_path']}` adapter `{a['llm'].get('adapter_path')}`, layer "
        f"{a['layer']}, width {a['d_model']}, weights `{str(a['fingerprint'].get('weights_hash', ''))[:12]}`",
        f"- **B ({lb})**: `{b['llm']['name_or_path']}` adapter `{b['llm'].get('adapter_path')}`, layer "
        f"{b['layer']}, width {b['d_model']}, weights `{str(b['fingerprint'].get('weights_hash', ''))[:12]}`",
        f"- A's SAE: {', '.join(f'`{p}`' for p in metrics['sae']['paths'].values())}",
        f"- rows: {metrics['n_rows']} (same prompts and split for both models)",
        "",
    ]
    m = metrics["map"]
    if m.get("kind") == "least_squares":
        lines += [
            "## Linear maps (least squares on paired rows)",
            "",
            "| map | test R^2 | mean cosine | n |",
            "|---|---|---|---|",
        ]
        for key in ("a_to_b", "b_to_a"):
            t = m[key]["test"]
            lines.append(
                f"| {m[key]['direction']} | {_f(t['r2'], 4)} | {_f(t['mean_cosine'], 4)} | {int(t['n'])} |"
            )
        lines.append("")
    else:
        lines += ["No linear map: A's SAE and vectors read B's residual stream as they are.", ""]
    lines += [
        "## SAE quality (held-out test rows)",
        "",
        "| SAE / rows | FVU | L0 | dead share | splice loss clean | spliced | KL | top-1 agreement (last) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    splice = metrics.get("splice", {})
    titles = {
        "a_on_a": f"A's SAE on {la}",
        "a_on_b": f"A's SAE on {lb}",
        "b_own_on_b": f"{lb}'s own SAE on {lb}",
    }
    for seed, q in metrics["sae_quality"].items():
        for key, title in titles.items():
            if key not in q:
                continue
            s = splice.get(key, {}).get(seed, {})
            lines.append(
                f"| {title} ({seed}) | {_f(q[key]['fvu'])} | {_f(q[key]['l0'], 1)} "
                f"| {_f(q[key]['dead_fraction'])} "
                f"| {_f(s.get('loss_clean'))} | {_f(s.get('loss_spliced'))} | {_f(s.get('kl'))} "
                f"| {_f(s.get('top1_agree_last'))} |"
            )
    lines.append("")
    for seed, rep in metrics["features"]["per_seed"].items():
        comp = rep["compare"]
        cats = [c for c in comp["caa_cosine"] if c != "global"]
        lines += [f"## Vectors and features ({seed})", ""]
        header = "| | " + " | ".join(cats) + " | global |"
        lines += [header, "|---|" + "---|" * (len(cats) + 1)]
        lines.append(
            f"| cos(CAA {la}, CAA {lb}) | "
            + " | ".join(_f(comp["caa_cosine"][c]) for c in cats)
            + f" | {_f(comp['caa_cosine']['global'])} |"
        )
        for key, title in (
            ("a_sas_decoded_vs_b_caa", f"cos(decoded SAS {la}, CAA {lb})"),
            ("sas_decoded_cosine", f"cos(decoded SAS {la}, decoded SAS {lb})"),
            ("sas_feature_jaccard", "Jaccard of SAS features"),
        ):
            if key in comp:
                lines.append(f"| {title} | " + " | ".join(_f(comp[key][c]) for c in cats) + " | - |")
        if "head_topk_jaccard" in comp:
            lines.append(
                "| Jaccard of head top-K | "
                + " | ".join(_f(comp["head_topk_jaccard"].get(c)) for c in cats)
                + f" | benign {_f(comp['head_topk_jaccard'].get('benign'))} |"
            )
        head = rep["head"]
        lines += [
            "",
            "| L1 head | accuracy | macro F1 |",
            "|---|---|---|",
            *(
                f"| {title} | {_f(head[key]['accuracy'])} | {_f(head[key]['macro_f1'])} |"
                for key, title in (
                    ("a_on_a", f"A's head on {la}'s codes"),
                    ("a_on_b", f"A's head on {lb}'s codes"),
                    ("b_on_b", f"{lb}'s own head on its codes"),
                )
            ),
            "",
            "| cluster metrics (test rows) | silhouette | Davies-Bouldin | Calinski-Harabasz |",
            "|---|---|---|---|",
        ]
        cl = rep["clusters"]
        lines.append(_cluster_row(f"{la} codes, all latents", cl["a_full"]))
        lines.append(_cluster_row(f"{lb} codes in A's latent space, all latents", cl["b_full"]))
        lines.append(_cluster_row(f"{la} codes, A's selected latents", cl["a_topk"]))
        lines.append(_cluster_row(f"{lb} codes, A's selected latents", cl["b_on_a_topk"]))
        lines.append("")
    residual = metrics["features"]["residual_clusters"]
    lines += ["| residual stream | silhouette | Davies-Bouldin | Calinski-Harabasz |", "|---|---|---|---|"]
    lines.append(_cluster_row(la, residual["a"]))
    lines.append(_cluster_row(lb, residual["b"]))
    lines.append("")
    columns = metrics.get("eval") or []
    if columns:
        judge = next((c["judge"] for c in columns if "judge" in c), "?")
        lines += [
            f"## Interventions on {lb} (eval jobs; refusal judge: {judge})",
            "",
            "Rates: share refused with 95% bootstrap CI. Deltas: paired over the same items against the "
            "unsteered "
            "column (positive = more refusal).",
            "",
            "| column | owner | over-refusal | harmful refusal | delta over-refusal | delta harmful | "
            "delta MMLU | delta GSM8K | delta TruthfulQA MC1 |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for col in columns:
            owner = la if col["owner"] == "source" else lb
            if "skipped" in col:
                lines.append(f"| {col['name']} | {owner} | skipped: {col['skipped']} | | | | | | |")
                continue
            blocks = col["refusal"].get("blocks", {})
            delta = col.get("delta", {})
            cap = delta.get("capability", {})
            lines.append(
                f"| {col['name']} | {owner} | {cell(blocks.get('over_refusal'))} "
                f"| {cell(blocks.get('harmful'))} "
                f"| {_signed(delta.get('refusal', {}).get('blocks', {}).get('over_refusal'))} "
                f"| {_signed(delta.get('refusal', {}).get('blocks', {}).get('harmful'))} "
                f"| {_signed(cap.get('mmlu'))} | {_signed(cap.get('gsm8k'))} "
                f"| {_signed(cap.get('truthfulqa'))} |"
            )
        lines += [
            "",
            "Per-set rows, categories and per-item records: each column's folder under `eval/`.",
            "",
        ]
    return "\n".join(lines) + "\n"


def scalars(metrics: Mapping[str, Any]) -> Iterator[tuple[str, float]]:
    """``(tag, value)`` pairs for TensorBoard: SAE quality, cosines, heads, map quality, eval deltas."""
    for seed, q in metrics["sae_quality"].items():
        for key, row in q.items():
            for name in ("fvu", "l0", "dead_fraction"):
                yield f"sae_quality/{seed}/{key}/{name}", float(row[name])
    for key, per_seed in metrics.get("splice", {}).items():
        for seed, row in per_seed.items():
            for name in ("loss_spliced", "kl", "loss_recovered"):
                if name in row:
                    yield f"splice/{seed}/{key}/{name}", float(row[name])
    for seed, rep in metrics["features"]["per_seed"].items():
        for group, values in rep["compare"].items():
            for cat, value in values.items():
                yield f"compare/{seed}/{group}/{cat}", float(value)
        for who, head in rep["head"].items():
            yield f"head/{seed}/{who}/accuracy", float(head["accuracy"])
            yield f"head/{seed}/{who}/macro_f1", float(head["macro_f1"])
    m = metrics["map"]
    for key in ("a_to_b", "b_to_a"):
        if key in m:
            yield f"map/{key}/test_r2", float(m[key]["test"]["r2"])
    for col in metrics.get("eval") or []:
        for block, row in col.get("delta", {}).get("refusal", {}).get("blocks", {}).items():
            yield f"eval_delta/{col['name']}/{block}", float(row["value"])
        for task, row in col.get("delta", {}).get("capability", {}).items():
            yield f"eval_delta/{col['name']}/{task}", float(row["value"])


def write_report(folder: Path, metrics: Mapping[str, Any]) -> None:
    """``report.md`` and ``tensorboard/`` (finite scalars only) into ``folder``."""
    from torch.utils.tensorboard import SummaryWriter

    (folder / "report.md").write_text(report_markdown(metrics))
    writer = SummaryWriter(str(folder / "tensorboard"))
    try:
        for tag, value in scalars(metrics):
            if math.isfinite(value):
                writer.add_scalar(tag.replace(" ", "_"), value, 0)
        writer.add_text("report", report_markdown(metrics), 0)
    finally:
        writer.close()


def headline(metrics: Mapping[str, Any], out_dir: Path) -> str:
    """The lines printed at the end of a job: where it wrote and the headline numbers."""
    a, b = metrics["source"]["label"], metrics["target"]["label"]
    lines = [
        f"[transfer] wrote {out_dir}/ (report.md, metrics.json, tensorboard/, features/, vectors/, eval/)"
    ]
    for seed, q in metrics["sae_quality"].items():
        lines.append(
            f"  {seed}: FVU of A's SAE on {a} {q['a_on_a']['fvu']:.3f}, on {b} {q['a_on_b']['fvu']:.3f}"
        )
        comp = metrics["features"]["per_seed"][seed]["compare"]
        lines.append(f"  cos(CAA {a}, CAA {b}) global {comp['caa_cosine']['global']:.3f}")
    for col in metrics.get("eval") or []:
        row = col.get("delta", {}).get("refusal", {}).get("blocks", {}).get("harmful")
        if row:
            lines.append(
                f"  {col['name']}: harmful refusal {row['value']:+.3f} "
                f"[{row['low']:+.3f}, {row['high']:+.3f}]"
            )
    return "\n".join(lines)
