"""Issue 26's comparison table and figure from the ``sae-refusal sae-eval`` reports of
``benchmarks/sae_compare.sh`` (``<root>/layer<L>/<arch>/sae_eval/report.json``).

Prints one markdown table (mean over the seeds; +- the spread where it matters) and writes one figure:
cross-seed sharing of the heads' top-10 features against head accuracy, k-sparse probing accuracy against k,
FVU against L0, and absorption, one colour per architecture, one marker per layer.

    python benchmarks/sae_compare_table.py --root runs/sae_compare --out docs/figures/sae_compare.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

ORDER = (
    "topk",
    "batchtopk",
    "matryoshka",
    "jumprelu",
    "l1",
    "contrastive",
    "topk_k8",
    "batchtopk_k8",
    "matryoshka_k8",
)
NAMES = {
    "topk": "TopK",
    "batchtopk": "BatchTopK",
    "matryoshka": "Matryoshka",
    "jumprelu": "JumpReLU",
    "l1": "ReLU-L1",
    "contrastive": "Contrastive",
    "topk_k8": "TopK k 8",
    "batchtopk_k8": "BatchTopK k 8",
    "matryoshka_k8": "Matryoshka k 8",
}


def load_reports(root: Path) -> dict[tuple[int, str], dict[str, Any]]:
    """``(layer, arch) -> report`` for every finished run under ``root`` (fit seconds added when known)."""
    found: dict[tuple[int, str], dict[str, Any]] = {}
    for path in sorted(root.glob("layer*/*/sae_eval/report.json")):
        layer, arch = int(path.parents[2].name.removeprefix("layer")), path.parents[1].name
        report = json.loads(path.read_text())
        seconds = path.parents[1] / "fit_seconds.txt"
        report["fit_seconds"] = float(seconds.read_text()) if seconds.is_file() else None
        found[(layer, arch)] = report
    if not found:
        raise SystemExit(f"--root: no <layer>/<arch>/sae_eval/report.json under {root}")
    return found


def mean(summary: dict[str, Any], key: str) -> float:
    value = summary.get(key)
    if isinstance(value, dict):
        value = value.get("mean")
    return math.nan if value is None else float(value)


def spread(summary: dict[str, Any], key: str) -> float:
    value = summary.get(key)
    return float(value.get("std", math.nan)) if isinstance(value, dict) else math.nan


def _rank(arch: str) -> int:
    """Position of ``arch`` in :data:`ORDER` (unknown names last)."""
    return ORDER.index(arch) if arch in ORDER else len(ORDER)


def table(reports: dict[tuple[int, str], dict[str, Any]]) -> str:
    head = (
        "| layer | architecture | test FVU | L0 | dead | dense | shrinkage | max dec cos | "
        "probe H/B k=1 / 5 / 20 (dense) | probe cat k=1 / 5 / 20 (dense) | full absorption | head acc | "
        "latents matched >=0.7 | head top-10 shared >=0.7 / >=0.5 | fit s |"
    )
    lines = [head, "|" + "---|" * 15]
    for (layer, arch), report in sorted(reports.items(), key=lambda kv: (-kv[0][0], _rank(kv[0][1]))):
        s = report["summary"]

        def probe(task: str, s: dict[str, Any] = s) -> str:
            ks = " / ".join(f"{mean(s, f'sparse_probe_k{k}/{task}'):.3f}" for k in (1, 5, 20))
            return f"{ks} ({mean(s, f'dense_probe/{task}'):.3f})"

        lines.append(
            f"| {layer} | {NAMES.get(arch, arch)} | {mean(s, 'fvu'):.3f} | {mean(s, 'l0'):.1f} | "
            f"{mean(s, 'dead_share'):.1%} | {mean(s, 'dense_share'):.1%} | {mean(s, 'shrinkage'):.3f} | "
            f"{mean(s, 'max_cosine_mean'):.3f} | {probe('harmful_vs_benign')} | {probe('category_mean')} | "
            f"{mean(s, 'absorption/full_absorption_rate'):.3f} | "
            f"{mean(s, 'head_accuracy'):.3f} +- {spread(s, 'head_accuracy'):.3f} | "
            f"{mean(s, 'stability/matched_share@0.7'):.3f} | "
            f"{mean(s, 'stability/head_shared@0.7'):.3f} / {mean(s, 'stability/head_shared@0.5'):.3f} | "
            f"{report['fit_seconds'] or math.nan:.0f} |"
        )
    return "\n".join(lines)


def figure(reports: dict[tuple[int, str], dict[str, Any]], out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 9))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    colours = dict(zip(ORDER, (f"C{i}" for i in range(len(ORDER))), strict=False))
    markers = {21: "o", 12: "s"}
    for (layer, arch), report in sorted(reports.items()):
        s, colour, marker = report["summary"], colours.get(arch, "k"), markers.get(layer, "^")
        label = f"{NAMES.get(arch, arch)}, layer {layer}"
        axes[0, 0].scatter(
            mean(s, "head_accuracy"), mean(s, "stability/head_shared@0.7"), c=colour, marker=marker, s=60
        )
        ks = [int(k) for k in report["config"]["k"]]
        axes[0, 1].plot(
            ks,
            [mean(s, f"sparse_probe_k{k}/category_mean") for k in ks],
            color=colour,
            marker=marker,
            linestyle="-" if layer == 21 else "--",
            label=label,
        )
        axes[1, 0].scatter(mean(s, "l0"), mean(s, "fvu"), c=colour, marker=marker, s=60)
        axes[1, 1].scatter(
            mean(s, "absorption/main_miss_rate"),
            mean(s, "absorption/full_absorption_rate"),
            c=colour,
            marker=marker,
            s=60,
        )
    axes[0, 0].axhline(0.5, color="grey", linestyle=":", linewidth=1)
    axes[0, 0].set(xlabel="held-out L1 head accuracy", ylabel="head top-10 shared across seeds (cos >= 0.7)")
    axes[0, 1].set(xscale="log", xlabel="k latents", ylabel="k-sparse probe accuracy, category mean (test)")
    axes[0, 1].legend(fontsize=7, ncol=2)
    axes[1, 0].set(xscale="log", xlabel="L0 (test)", ylabel="FVU (test)")
    axes[1, 1].set(xlabel="main-latent miss rate", ylabel="full absorption rate")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle("SAE architectures on the refusal-token SmolLM2 (o layer 21, s layer 12; 3 seeds, means)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=Path("runs/sae_compare"))
    parser.add_argument("--out", type=Path, default=None, help="PNG for the figure")
    args = parser.parse_args()
    reports = load_reports(args.root)
    print(table(reports))
    if args.out is not None:
        figure(reports, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
