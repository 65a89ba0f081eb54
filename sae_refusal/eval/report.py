"""What an eval job writes: ``report.md`` with tables and figures, per-item JSONL, TensorBoard, a headline.

Every number in ``report.md`` comes from ``metrics.json``, and every rate there from the per-item lines of
``generations.jsonl`` / ``capability.jsonl``; cells show the value, its bootstrap 95% CI and the item count.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["cell", "headline", "report_markdown", "write_outputs"]

BLOCK_ORDER = (
    ("over_refusal", "Over-refusal (share refused; lower is better)"),
    ("harmful", "Harmful refusal (share refused; higher is better)"),
)


def cell(row: dict[str, Any] | None, digits: int = 3) -> str:
    """``0.412 [0.351, 0.470] n=120`` (plus failed judgements when there were some); ``-`` when missing."""
    if not row:
        return "-"
    value = row.get("value")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"- n={row.get('n', 0)}"
    text = f"{value:.{digits}f} [{row['low']:.{digits}f}, {row['high']:.{digits}f}] n={row['n']}"
    if row.get("n_failed"):
        text += f" ({row['n_failed']} failed)"
    return text


def _set_rows(refusal: dict[str, Any], role: str) -> list[tuple[str, dict[str, Any]]]:
    rows: list[tuple[str, dict[str, Any]]] = []
    roles = ("over_refusal", "benign") if role == "over_refusal" else (role,)
    for name, row in refusal["sets"].items():
        if row["role"] not in roles:
            continue
        rows.append((name, row))
        categories = refusal["categories"].get(name, {})
        if len([c for c in categories if c != "macro average"]) < 2:
            continue  # one category (e.g. an external harmful set): its row would repeat the set's
        for category, c_row in categories.items():
            rows.append((f"{name} / {category}", c_row))
    return rows


def report_markdown(metrics: dict[str, Any]) -> str:
    """The ``report.md`` text."""
    refusal, inter = metrics["refusal"], metrics["intervention"]
    judges = metrics["judges"]
    lines = [
        f"# Eval: {inter['name']}",
        "",
        f"- model: `{metrics['model']['llm'].get('name_or_path')}` adapter "
        f"`{metrics['model']['llm'].get('adapter_path')}` (weights "
        f"{str(metrics['model']['fingerprint'].get('weights_hash', ''))[:12]})",
        f"- intervention: `{json.dumps(inter['config'])}`",
        f"- judges: {', '.join(judges['names'])}; rates below by **{judges['primary']}**; failed judgements "
        "are left out of a rate and counted, never read as 'not refused'",
        "- held-out test splits only; 95% bootstrap CIs; n = items judged",
        "",
    ]
    other = [j for j in judges["names"] if j != judges["primary"]]
    for role, title in BLOCK_ORDER:
        lines += [
            f"## {title}",
            "",
            "| set | rate [95% CI] n | " + " | ".join(other) + " |" if other else "| set | rate [95% CI] n |",
        ]
        lines.append("|---|---|" + "---|" * len(other))
        for name, row in _set_rows(refusal, role):
            extra = [
                f"{refusal['by_judge'][j].get(name, {}).get('value', float('nan')):.3f}"
                if name in refusal["by_judge"].get(j, {})
                else ""
                for j in other
            ]
            lines.append(f"| {name} | {cell(row)} | " + " | ".join(extra) + (" |" if extra else ""))
        block = refusal["blocks"].get(role)
        if block:
            lines.append(f"| **average over sets** | {cell(block)} |" + " |" * len(other))
        lines.append("")
    if refusal.get("slices"):
        lines += [
            "## Slices (refusal per tag value; lower is better for over-refusal sets, higher for harmful)",
            "",
            "| set | tag | value | rate [95% CI] n |",
            "|---|---|---|---|",
        ]
        for name, by_column in refusal["slices"].items():
            for column, by_value in by_column.items():
                for value, row in by_value.items():
                    lines.append(
                        f"| {name} ({refusal['sets'][name]['role']}) | {column} | {value} | {cell(row)} |"
                    )
        lines.append("")
    if metrics.get("capability"):
        lines += [
            "## Capability (intervention applied at every position)",
            "",
            "| measure | value [95% CI] n |",
            "|---|---|",
        ]
        for name, row in metrics["capability"].items():
            lines.append(f"| {name} | {cell(row, 4)} |")
        lines.append("")
    if refusal.get("agreement"):
        lines += [
            "## Judge agreement",
            "",
            "| judges | Cohen's kappa | n | disagreements (first ids) |",
            "|---|---|---|---|",
        ]
        for a in refusal["agreement"]:
            ids = ", ".join(a["disagreements"][:8])
            lines.append(
                f"| {' vs '.join(a['judges'])} | {a['kappa']:.3f} | {a['n']} | {a['n_disagree']}: {ids} |"
            )
        lines.append("")
    if metrics.get("sweep"):
        lines += [
            "## Alpha sweep",
            "",
            "| category | alpha | over-refusal | harmful refusal | next-token KL | reference ppl |",
            "|---|---|---|---|---|---|",
        ]
        for p in metrics["sweep"]:
            lines.append(
                f"| {p['category']} | {p['alpha']:+g} | {cell(p.get('over_refusal'))} | "
                f"{cell(p.get('harmful'))} | {_num(p.get('next_token_kl'))} | "
                f"{_num(p.get('reference_ppl'))} |"
            )
        lines += ["", "![sweep](sweep.png)", "", "![pareto](pareto.png)", ""]
    lines += ["![refusal rates](refusal_rates.png)", ""]
    lines += ["Per-item records: `generations.jsonl` (refusal sets), `capability.jsonl`."]
    return "\n".join(lines) + "\n"


def _num(row: dict[str, Any] | None) -> str:
    if not row or row.get("value") is None:
        return "-"
    return f"{row['value']:.4f}"


def _plot_rates(metrics: dict[str, Any], path: Path) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refusal = metrics["refusal"]
    names = list(refusal["sets"])
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(names) + 1.5))
    values = [refusal["sets"][n]["value"] for n in names]
    lows = [v - refusal["sets"][n]["low"] for v, n in zip(values, names, strict=True)]
    highs = [refusal["sets"][n]["high"] - v for v, n in zip(values, names, strict=True)]
    colors = ["tab:red" if refusal["sets"][n]["role"] == "harmful" else "tab:blue" for n in names]
    ax.barh(names, values, xerr=[lows, highs], color=colors, capsize=3)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"share refused ({metrics['judges']['primary']} judge); red: harmful, blue: benign-looking")
    ax.set_title(metrics["intervention"]["name"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def _plot_sweep(sweep: Sequence[dict[str, Any]], folder: Path) -> list[tuple[str, Any]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    categories = list(dict.fromkeys(p["category"] for p in sweep))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for category in categories:
        points = sorted((p for p in sweep if p["category"] == category), key=lambda p: p["alpha"])
        alphas = [p["alpha"] for p in points]
        axes[0].plot(alphas, [p["harmful"]["value"] for p in points], "o-", label=category)
        axes[1].plot(alphas, [p["over_refusal"]["value"] for p in points], "o-", label=category)
        if all(p.get("next_token_kl") for p in points):
            axes[2].plot(alphas, [p["next_token_kl"]["value"] for p in points], "o-", label=category)
    for ax, title in zip(axes, ("harmful refusal", "over-refusal", "next-token KL (benign)"), strict=True):
        ax.set_xlabel("alpha")
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "sweep.png", dpi=110)
    figures.append(("sweep", fig))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for category in categories:
        points = sorted((p for p in sweep if p["category"] == category), key=lambda p: p["alpha"])
        xs = [p["over_refusal"]["value"] for p in points]
        ys = [p["harmful"]["value"] for p in points]
        ax.plot(xs, ys, "o-", label=category)
        for p, x, y in zip(points, xs, ys, strict=True):
            ax.annotate(f"{p['alpha']:+g}", (x, y), fontsize=6)
    ax.set_xlabel("over-refusal (lower is better)")
    ax.set_ylabel("harmful refusal (higher is better)")
    ax.set_title("alpha sweep: refusal vs over-refusal")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "pareto.png", dpi=110)
    figures.append(("pareto", fig))
    return figures


def _tensorboard(metrics: dict[str, Any], folder: Path, figures: list[tuple[str, Any]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    refusal = metrics["refusal"]
    for name, row in refusal["sets"].items():
        writer.add_scalar(f"refusal/{name}", row["value"])
    for role, row in refusal["blocks"].items():
        writer.add_scalar(f"block/{role}", row["value"])
    for name, row in metrics.get("capability", {}).items():
        writer.add_scalar(f"capability/{name}", row["value"])
    for step, p in enumerate(metrics.get("sweep", [])):
        writer.add_scalar(f"sweep/{p['category']}/harmful", p["harmful"]["value"], step)
        writer.add_scalar(f"sweep/{p['category']}/over_refusal", p["over_refusal"]["value"], step)
    for name, fig in figures:
        writer.add_figure(name, fig)
    writer.close()


def write_outputs(
    folder: Path,
    metrics: dict[str, Any],
    records: Sequence[Any],
    capability_records: Sequence[dict[str, Any]],
) -> None:
    """Write ``report.md``, the figures, ``generations.jsonl``, ``capability.jsonl`` and ``tensorboard/``."""
    import matplotlib.pyplot as plt

    with (folder / "generations.jsonl").open("w") as handle:
        for record in records:
            handle.write(json.dumps(record.to_json()) + "\n")
    with (folder / "capability.jsonl").open("w") as handle:
        for row in capability_records:
            handle.write(json.dumps(row) + "\n")
    figures = [("refusal_rates", _plot_rates(metrics, folder / "refusal_rates.png"))]
    if metrics.get("sweep"):
        figures += _plot_sweep(metrics["sweep"], folder)
    (folder / "report.md").write_text(report_markdown(metrics))
    _tensorboard(metrics, folder / "tensorboard", figures)
    for _, fig in figures:
        plt.close(fig)


def headline(metrics: dict[str, Any], out_dir: Path) -> str:
    """The closing lines: what was written where, and the headline numbers."""
    blocks = metrics["refusal"]["blocks"]
    lines = [
        f"[eval] wrote {out_dir}/ (metrics.json, report.md, generations.jsonl, capability.jsonl, PNGs, "
        "tensorboard/)",
        f"  intervention: {metrics['intervention']['name']}  (judge: {metrics['judges']['primary']})",
    ]
    for role, title in (("over_refusal", "over-refusal"), ("harmful", "harmful refusal")):
        if role in blocks:
            lines.append(f"  {title:16s} {cell(blocks[role])}")
    for name, row in metrics.get("capability", {}).items():
        lines.append(f"  {name:16s} {cell(row, 4)}")
    failed = metrics["refusal"].get("n_failed", {})
    lines.append(f"  failed judgements (left out of the rates): {failed}")
    return "\n".join(lines)
