"""How long ``sae-refusal`` takes to answer ``--help`` and to report a config error, per subcommand.

Each row is the median wall time of ``--repeats`` fresh processes (``python -m sae_refusal ...``), beside
the baseline measured in the same run: a process that only imports the heavy stack a command used to import
before parsing (``import lightning, transformers``). ``--help`` of the LightningCLI subcommands is timed
twice: ``cold`` (an empty help cache: a first call without ``docker/install.sh``'s warm-up) and ``kept``.
A config error is a bad value in a valid config (e.g. ``model.lr: -1``); each row checks that the command
exits 2 with a one-line ``sae-refusal ...: error:`` message.

    python benchmarks/cli_latency.py                  # 3 repeats
    python benchmarks/cli_latency.py --repeats 5 --json out.json

Needs only the installed package (no model is loaded: every command stops at its parse).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "lightning_configs"


def timed(args: list[str], env: dict[str, str], expect: int) -> tuple[float, str]:
    """Seconds of one ``python -m sae_refusal ARGS`` run, and its first stderr line (checked exit code)."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "sae_refusal", *args], capture_output=True, text=True, env=env, cwd=REPO
    )
    seconds = time.perf_counter() - start
    if done.returncode != expect:
        raise SystemExit(f"{args}: exit {done.returncode}, expected {expect}\n{done.stderr[-2000:]}")
    first = next((line for line in done.stderr.splitlines() if "error:" in line), "")
    return seconds, first


def median_of(args: list[str], env: dict[str, str], expect: int, repeats: int) -> tuple[float, str]:
    runs = [timed(args, env, expect) for _ in range(repeats)]
    return statistics.median(s for s, _ in runs), runs[-1][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    default = str(CONFIGS / "default.yaml")
    steer = str(CONFIGS / "steer" / "refuse_smollm2.yaml")
    evals = str(CONFIGS / "eval" / "refuse_smollm2.yaml")
    transfer = str(CONFIGS / "transfer" / "refuse_to_base.yaml")
    finetune = str(CONFIGS / "finetune" / "smollm2_lora.yaml")
    errors = {
        "fit": ["fit", "--config", default, "--model.init_args.lr", "-1"],
        "validate": ["validate", "--config", default, "--data.layer", "3"],
        "cache": ["cache", "--config", default, "--data.cache.dtype", "float8"],
        "finetune": ["finetune", "--config", finetune, "--model.lr", "-1"],
        "steer": ["steer", "--config", steer, "--study.gates", "[x]"],
        "eval": ["eval", "--config", evals, "--intervention.kind", "x"],
        "transfer": ["transfer", "--config", transfer, "--map.kind", "x"],
    }
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "SAE_REFUSAL_CACHE_DIR": cache, "TOKENIZERS_PARALLELISM": "false"}
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import lightning, transformers"], check=True, env=env)
        baseline = time.perf_counter() - start
        print(f"baseline: import lightning, transformers in a fresh process: {baseline:.2f} s", flush=True)
        commands = [
            "fit",
            "validate",
            "test",
            "predict",
            "finetune",
            "cache",
            "features",
            "generate",
            "steer",
        ]
        commands += ["eval", "eval-table", "export", "transfer"]
        heavy = {"fit", "validate", "test", "predict", "finetune"}
        for command in commands:
            if command in heavy:  # the first call fills the cache: time it once, alone
                cold, _ = timed([command, "--help"], env, 0)
                rows.append({"what": f"{command} --help (cold)", "seconds": round(cold, 3)})
                print(f"  {command + ' --help (cold)':<28} {cold:6.2f} s", flush=True)
            seconds, _ = median_of([command, "--help"], env, 0, args.repeats)
            label = f"{command} --help" + (" (kept)" if command in heavy else "")
            rows.append({"what": label, "seconds": round(seconds, 3)})
            print(f"  {label:<28} {seconds:6.2f} s", flush=True)
        for command, argv in errors.items():
            seconds, first = median_of(argv, env, 2, args.repeats)
            rows.append(
                {"what": f"{command} config error", "seconds": round(seconds, 3), "first_line": first}
            )
            print(f"  {command + ' config error':<28} {seconds:6.2f} s   {first[:90]}", flush=True)
    worst = max(float(r["seconds"]) for r in rows if "(cold)" not in str(r["what"]))  # type: ignore[arg-type]
    summary = {"baseline_heavy_import_s": round(baseline, 3), "worst_s": round(worst, 3), "rows": rows}
    print(f"worst --help / config error (help kept): {worst:.2f} s; heavy-import baseline {baseline:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
