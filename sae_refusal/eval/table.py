"""The results table across eval jobs: one column per job folder, rows grouped by block.

``sae-refusal eval-table runs/eval/unsteered runs/eval/caa ... [--out table.md]`` reads each folder's
``metrics.json`` (one command per column wrote them) and prints a Markdown table: the over-refusal block
(every over-refusal / benign set with its tag slices, then the block average), the harmful-refusal block
(every harmful set, CoCoNot's categories and its tag slices, then the block average) and the capability
block. A cell is the value, its 95% CI and the item count; ``-`` where a job did not measure that row.
Columns must agree on the model's prompt sets (same set names and item hashes) unless ``allow_mixed``;
otherwise the rows would compare different items.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sae_refusal.eval.report import cell

__all__ = ["load_metrics", "results_table", "table_command"]


def load_metrics(folder: str | Path) -> dict[str, Any]:
    """One job's ``metrics.json``.

    Raises:
        FileNotFoundError: Naming the folder when it holds no ``metrics.json``.
    """
    path = Path(folder) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder}: no metrics.json (not an eval job folder, or the job did not finish)"
        )
    return json.loads(path.read_text())


def _short(row: dict[str, Any] | None) -> str:
    text = cell(row, 3)
    return text.replace(" n=", "<br>n=")


def results_table(
    runs: Sequence[dict[str, Any]], *, labels: Sequence[str] | None = None, allow_mixed: bool = False
) -> str:
    """Markdown table of several jobs' metrics (one column each).

    Raises:
        ValueError: When two jobs evaluated different items of a set (and not ``allow_mixed``), or
            ``labels`` has the wrong length.
    """
    if not runs:
        raise ValueError("give at least one eval job folder")
    if labels is not None and len(labels) != len(runs):
        raise ValueError(f"labels: {len(labels)} labels for {len(runs)} columns")
    names = list(labels) if labels is not None else [r["intervention"]["name"] for r in runs]
    if not allow_mixed:
        first = runs[0]["sets"]
        for name, run in zip(names[1:], runs[1:], strict=True):
            for set_name, info in run["sets"].items():
                if set_name in first and first[set_name]["ids_sha256"] != info["ids_sha256"]:
                    raise ValueError(
                        f"column {name!r}: set {set_name!r} holds other items than the first column's "
                        "(different sets config); pass --allow-mixed to tabulate anyway"
                    )
    header = "| | " + " | ".join(names) + " |"
    lines = [header, "|---|" + "---|" * len(runs)]

    def add(title: str, rows: list[dict[str, Any] | None]) -> None:
        lines.append(f"| {title} | " + " | ".join(_short(r) for r in rows) + " |")

    def block(role_set: tuple[str, ...], role: str, title: str) -> None:
        lines.append(f"| **{title}** |" + " |" * len(runs))
        set_names = list(
            dict.fromkeys(n for r in runs for n, s in r["refusal"]["sets"].items() if s["role"] in role_set)
        )
        for set_name in set_names:
            add(set_name, [r["refusal"]["sets"].get(set_name) for r in runs])
            cats = list(dict.fromkeys(c for r in runs for c in r["refusal"]["categories"].get(set_name, {})))
            if len([c for c in cats if c != "macro average"]) < 2:
                cats = []  # one category (e.g. an external harmful set): its row would repeat the set's
            for category in cats:
                add(
                    f"&nbsp;&nbsp;{set_name} / {category}",
                    [r["refusal"]["categories"].get(set_name, {}).get(category) for r in runs],
                )
            slices = [r["refusal"].get("slices", {}).get(set_name, {}) for r in runs]
            for column in dict.fromkeys(c for s in slices for c in s):
                for value in dict.fromkeys(v for s in slices for v in s.get(column, {})):
                    add(
                        f"&nbsp;&nbsp;{set_name} / {column}={value}",
                        [s.get(column, {}).get(value) for s in slices],
                    )
        add(f"*{title.split(' (')[0]} average*", [r["refusal"]["blocks"].get(role) for r in runs])

    block(("over_refusal", "benign"), "over_refusal", "over-refusal (lower is better)")
    block(("harmful",), "harmful", "harmful refusal (higher is better)")
    measures = list(dict.fromkeys(m for r in runs for m in r.get("capability", {})))
    if measures:
        lines.append("| **capability** |" + " |" * len(runs))
        for measure in measures:
            add(measure, [r.get("capability", {}).get(measure) for r in runs])
    judges = {r["judges"]["primary"] for r in runs}
    lines.append("")
    lines.append(f"Cells: value [95% bootstrap CI] and n items; refusal judge: {', '.join(sorted(judges))}.")
    return "\n".join(lines) + "\n"


def table_command(args: Sequence[str]) -> None:
    """``sae-refusal eval-table DIR [DIR ...] [--labels A B ...] [--out FILE]``."""
    parser = argparse.ArgumentParser(
        prog="sae-refusal eval-table",
        description="The results table across eval job folders (one column per folder).",
    )
    parser.add_argument("folders", nargs="+", help="eval job output folders (each with metrics.json)")
    parser.add_argument(
        "--labels", nargs="+", default=None, help="column labels (default: intervention names)"
    )
    parser.add_argument("--out", default=None, help="also write the table to this Markdown file")
    parser.add_argument(
        "--allow-mixed", action="store_true", help="tabulate jobs that evaluated different items"
    )
    ns = parser.parse_args(list(args))
    table = results_table([load_metrics(f) for f in ns.folders], labels=ns.labels, allow_mixed=ns.allow_mixed)
    print(table, end="")
    if ns.out:
        from sae_refusal.atomic import atomic_write_text

        atomic_write_text(Path(ns.out), table)
        print(f"[eval-table] wrote {ns.out}")
