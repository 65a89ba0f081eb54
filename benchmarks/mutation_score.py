"""Mutation score of the modules whose bugs matter most, with mutmut 3 (a benchmark, not a CI step).

Each module is mutated in its own throw-away copy of the repository, and each of its mutants is checked by
the test files mapped to it (:data:`TESTS_OF`; mutmut then runs only the tests that call the mutated
function). A mutant is *killed* when a test fails, *timeout* when the tests run far longer than on the clean
code, *survived* when every test passes, *no tests* when no selected test calls the mutated function.

    python benchmarks/mutation_score.py                                   # working tree, every module
    python benchmarks/mutation_score.py --rev 927077e --jobs 16           # a commit, 16 workers
    python benchmarks/mutation_score.py -m features/vectors.py -m sae/topk.py --jobs 1 --json out.json

Issue 23's steer/ and transfer/ rows: the modules whose tests need no LLM (a few load a tiny one) on a small
machine, the LLM-heavy ones (their tests load tiny models per mutant) on a many-core one:

    python benchmarks/mutation_score.py --jobs 1 -m steer/tuning.py -m steer/gates/policy.py \
        -m steer/gates/metrics.py -m transfer/compare.py -m transfer/linear_map.py -m transfer/mapped_sae.py
    python benchmarks/mutation_score.py --jobs 14 -m steer/interventions.py -m steer/scoring.py \
        -m steer/gates/steering.py -m steer/gates/distance.py -m steer/gates/probe.py -m steer/gates/head.py \
        -m steer/gates/residual.py -m steer/gates/refusal_token.py -m steer/gates/guard.py -m steer/sets.py \
        -m steer/patching.py -m steer/generate.py -m steer/study.py -m steer/job.py -m transfer/features.py \
        -m transfer/config.py -m transfer/columns.py -m transfer/report.py -m transfer/job.py

Prints progress on stderr and one JSON document on stdout (and to ``--json``): per module ``killed``,
``survived``, ``timeout``, ``no_tests``, ``suspicious``, ``total``, ``score`` (``(killed + timeout) / total``,
``total`` excluding mutants mutmut skipped), wall ``seconds``, ``mutants_per_s``, and the survivor names
(``mutmut show NAME`` in the kept copy prints each one's diff; ``--show-survivors`` puts the diffs in the
JSON). Needs only the repository and the installed packages (``pip install mutmut``); no network.

Notes: functions under a decorator other than ``@staticmethod`` / ``@classmethod`` (e.g. ``@torch.no_grad()``,
``@property``) are not mutated by mutmut 3; every worker runs with one intra-op thread (``--jobs`` is the
parallelism), and mutants are forked from a warm process with the test modules already imported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "sae_refusal"


def source_root(copy: Path) -> str:
    """Folder that holds the package in ``copy``: ``src`` (revisions before the flat layout) or ``.``."""
    return "src" if (copy / "src" / PACKAGE).is_dir() else "."


def package_dir(copy: Path) -> Path:
    return copy / source_root(copy) / PACKAGE


#: Module (relative to the package folder) or ``dir/*`` -> test-file globs (relative to the repository).
TESTS_OF: dict[str, list[str]] = {
    "sae/*": ["tests/test_sae_*.py"],
    "features/vectors.py": ["tests/test_features_vectors.py"],
    "features/heads.py": ["tests/test_features_heads.py"],
    "activations/build.py": [
        "tests/test_activation_cache.py",
        "tests/test_activation_datamodule.py",
        "tests/test_cache_identity.py",
    ],
    "finetune/module.py": ["tests/test_finetune_*.py"],
    # steer/ (issue 23): the unit tests of each module; the job and study run through the steer job's tests
    "steer/tuning.py": ["tests/test_steer_tuning.py"],
    "steer/gates/*": ["tests/test_steer_gates.py", "tests/test_steer_tuning.py"],
    "steer/interventions.py": ["tests/test_steer_interventions.py"],
    "steer/scoring.py": ["tests/test_steer_scoring.py", "tests/test_steer_gates.py"],
    "steer/sets.py": ["tests/test_steer_sets.py"],
    "steer/patching.py": ["tests/test_steer_patching.py"],
    "steer/generate.py": ["tests/test_steer_generate.py"],
    "steer/job.py": ["tests/test_steer_job.py"],
    "steer/config.py": ["tests/test_steer_job.py", "tests/test_user_errors.py"],
    "steer/positions.py": ["tests/test_steer_interventions.py", "tests/test_eval_interventions.py"],
    "steer/study.py": ["tests/test_steer_job.py"],
    # transfer/ (issue 23): pure pieces first, then everything the transfer job composes
    "transfer/compare.py": ["tests/test_transfer_compare.py"],
    "transfer/linear_map.py": ["tests/test_transfer_linear_map.py", "tests/test_transfer_compare.py"],
    "transfer/mapped_sae.py": ["tests/test_transfer_compare.py"],
    "transfer/features.py": ["tests/test_transfer_compare.py", "tests/test_transfer_job.py"],
    "transfer/*": ["tests/test_transfer_job.py"],
}

#: The modules of issue 11, in the order a time-boxed run should take them.
DEFAULT_MODULES = [
    "features/vectors.py",
    "features/heads.py",
    "activations/build.py",
    "finetune/module.py",
    "sae/contrastive.py",
    "sae/relu.py",
    "sae/base.py",
    "sae/topk.py",
    "sae/architectures.py",
    "sae/module.py",
    "sae/splice.py",
]

#: Folders beside ``src`` and ``tests`` that tests read (preset configs, benchmark scripts).
ALSO_COPY = ["lightning_configs", "benchmarks", "checkpoints"]

STATUSES = ("killed", "survived", "timeout", "no_tests", "suspicious", "skipped", "not_checked")


def log(message: str) -> None:
    print(f"[mutation_score {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def tests_for(module: str, root: Path) -> list[str]:
    """The existing test files mapped to ``module`` (relative to ``root``)."""
    for key, globs in TESTS_OF.items():
        if key == module or (key.endswith("/*") and module.startswith(key[:-1])):
            found = sorted({str(p.relative_to(root)) for g in globs for p in root.glob(g)})
            if not found:
                raise SystemExit(f"--module {module}: none of the mapped test files {globs} exists")
            return found
    raise SystemExit(f"--module {module}: no test files are mapped to it (known: {sorted(TESTS_OF)})")


def export_tree(rev: str | None, dest: Path) -> str:
    """Copy ``rev`` (``git archive``) or the working tree (tracked + untracked, not ignored) to ``dest``."""
    dest.mkdir(parents=True)
    if rev is not None:
        sha = subprocess.run(
            ["git", "rev-parse", "--verify", f"{rev}^{{commit}}"],
            cwd=REPO,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        archive = subprocess.run(["git", "archive", sha], cwd=REPO, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return sha
    if not (REPO / ".git").exists():  # a copy without git (e.g. on a GPU machine): everything but caches
        skip = shutil.ignore_patterns(
            ".git", ".venv*", ".device", "runs", "__pycache__", "*.egg-info", "mutants"
        )
        shutil.copytree(REPO, dest, ignore=skip, dirs_exist_ok=True)
        return "working-tree"
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in listed:
        rel = raw.decode()
        src = REPO / rel
        if rel and src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return "working-tree"


def write_config(copy: Path, module: str, tests: list[str], timeout_multiplier: float) -> None:
    """mutmut 3 reads ``[mutmut]`` from ``setup.cfg`` when ``pyproject.toml`` has no ``[tool.mutmut]``."""
    import tomllib

    if "mutmut" in tomllib.loads((copy / "pyproject.toml").read_text()).get("tool", {}):
        raise SystemExit("pyproject.toml has a [tool.mutmut] table; this script keeps its settings here")
    root = source_root(copy)
    pattern = f"{PACKAGE}/{module}" if root == "." else f"{root}/{PACKAGE}/{module}"
    lines = [
        "[mutmut]",
        f"source_paths = {root if root != '.' else PACKAGE}",
        f"only_mutate = {pattern}",
        "also_copy =\n" + "".join(f"    {d}\n" for d in ALSO_COPY if (copy / d).exists()),
        "pytest_add_cli_args_test_selection =\n" + "".join(f"    {t}\n" for t in tests),
        # no cache files in the copy; keep pyproject's addopts (-m 'not slow')
        "pytest_add_cli_args =\n    -p\n    no:cacheprovider\n",
        f"timeout_multiplier = {timeout_multiplier}",
        "process_isolation = fork",
        "use_git_change_detection = false",
        "use_setproctitle = false",
    ]
    (copy / "setup.cfg").write_text("\n".join(lines) + "\n")


def read_results(copy: Path) -> dict[str, str]:
    """Mutant name -> status from mutmut's ``.meta`` files."""
    from mutmut.stats import status_by_exit_code

    out: dict[str, str] = {}
    for meta in (copy / "mutants").rglob("*.py.meta"):
        data = json.loads(meta.read_text())
        for name, code in data.get("exit_code_by_key", {}).items():
            out[name] = status_by_exit_code[code].replace(" ", "_")
    return out


def run_module(
    module: str, rev: str | None, work: Path, jobs: int, timeout_multiplier: float, show: bool
) -> dict[str, Any]:
    copy = work / module.replace("/", "__").removesuffix(".py")
    sha = export_tree(rev, copy)
    if not (package_dir(copy) / module).is_file():
        raise SystemExit(f"--module {module}: {PACKAGE}/{module} does not exist at {sha}")
    tests = tests_for(module, copy)
    write_config(copy, module, tests, timeout_multiplier)
    # exists before Python starts, so the PYTHONPATH entry below is not cached as missing
    mutated_root = copy / "mutants" / source_root(copy)
    mutated_root.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # subprocesses started by tests (spawned DDP workers, CLI runs) import the mutated copy too
        "PYTHONPATH": os.pathsep.join([str(mutated_root), os.environ.get("PYTHONPATH", "")]),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    log(f"{module}: tests {' '.join(tests)}; mutmut run --max-children {jobs} in {copy}")
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs)],
        cwd=copy,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    assert proc.stdout is not None
    tail: list[str] = []
    last = 0.0
    for line in proc.stdout:  # mutmut redraws one status line with "\r"; print it every 30 s
        for part in line.replace("\r", "\n").splitlines():
            part = part.strip()
            if not part:
                continue
            tail = [*tail[-40:], part]
            if time.perf_counter() - last > 30 or "done" in part or "mutations/second" in part:
                log(f"{module}: {part[:160]}")
                last = time.perf_counter()
    rc = proc.wait()
    seconds = time.perf_counter() - start
    results = read_results(copy)
    if rc != 0 or not results:
        log(f"{module}: mutmut exited {rc}; last output:\n" + "\n".join(tail))
    counts = {s: sum(1 for v in results.values() if v == s) for s in STATUSES}
    counts["other"] = len(results) - sum(counts.values())
    total = len(results) - counts["skipped"] - counts["not_checked"]
    survivors = sorted(n for n, s in results.items() if s in ("survived", "no_tests", "suspicious"))
    record: dict[str, Any] = {
        "module": module,
        "commit": sha,
        "tests": tests,
        "mutmut_exit_code": rc,
        **counts,
        "total": total,
        "score": round((counts["killed"] + counts["timeout"]) / total, 4) if total else None,
        "seconds": round(seconds, 1),
        "mutants_per_s": round(len(results) / seconds, 3) if seconds else None,
        "survivors": survivors,
        "copy": str(copy),
    }
    if show and survivors:
        diffs = {}
        for name in survivors:
            shown = subprocess.run(
                [sys.executable, "-m", "mutmut", "show", name],
                cwd=copy,
                env=env,
                capture_output=True,
                text=True,
            )
            diffs[name] = shown.stdout
        record["survivor_diffs"] = diffs
    log(
        f"{module}: {record['killed']} killed, {record['survived']} survived, {record['timeout']} timeout, "
        f"{record['no_tests']} no tests / {total} -> score {record['score']} in {seconds:.0f} s"
    )
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rev", help="git revision to test (default: the working tree, uncommitted included)"
    )
    parser.add_argument(
        "-m",
        "--module",
        action="append",
        dest="modules",
        help=f"module under {PACKAGE} (repeatable; default: {' '.join(DEFAULT_MODULES)})",
    )
    parser.add_argument("--jobs", type=int, default=1, help="mutants checked in parallel (default 1)")
    parser.add_argument("--timeout-multiplier", type=float, default=15.0, help="mutmut's timeout_multiplier")
    parser.add_argument("--workdir", type=Path, help="where the copies go (default: a new temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the copies (to `mutmut show` survivors)")
    parser.add_argument("--show-survivors", action="store_true", help="put each survivor's diff in the JSON")
    parser.add_argument("--json", type=Path, help="also write the JSON here (rewritten after each module)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    try:
        import mutmut
    except ImportError:
        parser.error("mutmut is not installed: pip install 'mutmut>=3.3'")
    modules = args.modules or DEFAULT_MODULES
    for module in modules:
        if not module.endswith(".py"):
            parser.error(f"--module {module}: name a .py file under {PACKAGE}")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mutation-score-"))
    work.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "tool": f"mutmut {getattr(mutmut, '__version__', '?')}",
        "rev": args.rev or "working-tree",
        "jobs": args.jobs,
        "modules": {},
    }
    try:
        for i, module in enumerate(modules, 1):
            log(f"module {i}/{len(modules)}: {module}")
            summary["modules"][module] = run_module(
                module, args.rev, work, args.jobs, args.timeout_multiplier, args.show_survivors
            )
            if args.json:
                args.json.write_text(json.dumps(summary, indent=2) + "\n")
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    done = list(summary["modules"].values())
    killed = sum(r["killed"] + r["timeout"] for r in done)
    total = sum(r["total"] for r in done)
    score = round(killed / total, 4) if total else None
    summary["overall"] = {"killed_or_timeout": killed, "total": total, "score": score}
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
