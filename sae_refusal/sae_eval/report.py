"""The readable forms of an SAE evaluation report: ``report.md`` tables and the ``density.png`` histogram."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["render_markdown", "write_density_plot"]


def _fmt(value: Any, spec: str = "{:.3f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return spec.format(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
    ]


#: Core columns: (title, key, format).
CORE_COLUMNS = (
    ("FVU", "fvu", "{:.3f}"),
    ("expl. var.", "explained_variance", "{:.3f}"),
    ("L0", "l0", "{:.1f}"),
    ("dead", "dead_share", "{:.1%}"),
    ("dense", "dense_share", "{:.1%}"),
    ("shrinkage", "shrinkage", "{:.3f}"),
    ("shrinkage (sums)", "shrinkage_of_sums", "{:.3f}"),
    ("max dec. cos (mean)", "max_cosine_mean", "{:.3f}"),
    ("max dec. cos > 0.9", "max_cosine_share_above", "{:.1%}"),
)


def render_markdown(report: Mapping[str, Any]) -> str:
    """``report.md``: core metrics, probing, absorption, heads and stability as tables."""
    meta = report.get("metadata", {})
    config = report.get("config", {})
    seeds: Mapping[str, Any] = report.get("seeds", {})
    lines = [
        "# SAE evaluation",
        "",
        f"Model `{meta.get('model')}`, layer {meta.get('layer')}; probes, rankings and heads fitted on the "
        f"`{config.get('fit_split')}` split, everything scored on the `{config.get('eval_split')}` split "
        f"({meta.get('n_eval_rows')} rows, {meta.get('n_eval_labelled')} benign or harmful). Definitions: "
        "`sae_refusal.sae_eval`.",
        "",
        "## Core",
        "",
    ]
    lines += _table(
        ["seed", *(title for title, _, _ in CORE_COLUMNS)],
        [
            [name, *(_fmt(s["core"].get(key), spec) for _, key, spec in CORE_COLUMNS)]
            for name, s in seeds.items()
        ],
    )
    dense = report.get("dense_probe", {}).get("summary", {}).get("accuracy", {})
    ks = [str(k) for k in config.get("k", [])]
    lines += [
        "## k-sparse probing (held-out accuracy)",
        "",
        f"Dense probe on the residual: harmful vs benign {_fmt(dense.get('harmful_vs_benign'))}, "
        f"category one-vs-rest mean {_fmt(dense.get('category_mean'))}.",
        "",
    ]
    rows = []
    for name, s in seeds.items():
        acc = s["probing"]["summary"]["accuracy"]
        for task in ("harmful_vs_benign", "category_mean"):
            rows.append([name, task, *(_fmt(acc[k][task]) for k in ks)])
    lines += _table(["seed", "task", *(f"k={k}" for k in ks)], rows)
    lines += ["## Absorption (held-out, per category)", ""]
    rows = []
    for name, s in seeds.items():
        for cat, v in s["absorption"]["categories"].items():
            if "skipped" in v:
                rows.append([name, cat, "-", "-", "-", "-", "-"])
                continue
            rows.append(
                [
                    name,
                    cat,
                    str(v["n_rows"]),
                    str(v["k_main"]),
                    _fmt(v["main_miss_rate"]),
                    _fmt(v["full_absorption_rate"]),
                    _fmt(v["absorption_fraction"]),
                ]
            )
        mean = s["absorption"]["mean"]
        rows.append(
            [
                name,
                "**mean**",
                "",
                "",
                _fmt(mean["main_miss_rate"]),
                _fmt(mean["full_absorption_rate"]),
                _fmt(mean["absorption_fraction"]),
            ]
        )
    lines += _table(
        ["seed", "category", "rows", "main latents", "main miss", "full abs.", "abs. fraction"], rows
    )
    lines += ["## L1 heads", ""]
    lines += _table(
        ["seed", "test accuracy", "macro F1"],
        [[name, _fmt(s["head"]["accuracy"]), _fmt(s["head"]["macro_f1"])] for name, s in seeds.items()],
    )
    stability = report.get("stability", {})
    lines += ["## Cross-seed stability", ""]
    if "skipped" in stability:
        lines += [f"Skipped: {stability['skipped']}.", ""]
    else:
        rows = []
        for pair, entry in stability["pairs"].items():
            for t in (str(c) for c in config.get("match_cosines", [])):
                v = entry[t]
                rows.append(
                    [pair, t, _fmt(v["matched_share"]), _fmt(v["head_matched"]), _fmt(v["head_shared"])]
                )
        for t, v in stability["mean"].items():
            rows.append(
                ["**mean**", t, _fmt(v["matched_share"]), _fmt(v["head_matched"]), _fmt(v["head_shared"])]
            )
        lines += _table(
            ["pair", "cosine >=", "latents matched", f"head top-{config.get('top_k')} matched", "shared"],
            rows,
        )
    return "\n".join(lines)


def write_density_plot(histograms: Mapping[str, Mapping[str, Any]], path: Path, title: str) -> Path:
    """``density.png``: per seed, the latents by ``log10`` firing density (dead latents in the legend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)  # a plain Agg canvas: no pyplot state, no backend switch
    ax = fig.add_subplot()
    for name, hist in histograms.items():
        ax.stairs(hist["counts"], hist["edges"], label=f"{name} ({hist['dead']} dead)")
    ax.set_xlabel("log10 firing density (share of rows a latent fires on)")
    ax.set_ylabel("latents")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
