"""What a newcomer reads matches what the run does (issue 23).

Three kinds of checks, all reading the docs as they are (README.md, docs/*.md, the comments of
lightning_configs/**/*.yaml):

* **Counts.** Every split count the docs state is read out of its sentence (``COUNT_PHRASES``: a template
  with ``{field}`` holes) and compared with the split the code makes of the named config: the same parser,
  data module and split manifest as the job (no LLM is loaded). A count sentence that no template covers
  fails too (``COUNT_PATTERNS``), so a new number cannot drift unchecked. Statements of one fact made in
  several places (``SAME_STATEMENTS``: the eval quickstart's time per column, ...) must read the same.
* **Commands.** Every command of a ``bash`` block, every inline ``sae-refusal ...`` span (and the README's
  ``<subcommand> --config ...`` bullets) and every command block of a YAML comment is expanded as a shell
  would (continuation lines, ``VAR=...``, ``for`` loops, ``$VAR``, ``{a,b}``; ``a|b`` and ``{a,b}`` in an
  option value are alternatives: one command each) and checked: the subcommand exists; every option parses
  with the parser ``sae-refusal`` itself builds (the LightningCLI parsers for fit / validate / test /
  predict, for the fit config of ``cache`` / ``features`` / ``generate`` and for ``finetune``, nothing
  instantiated but the data module, whose ``__init__`` checks ``data.layer`` against ``data.cache.layers``;
  ``sae_refusal.cli.{steer,eval,transfer}_parser`` + ``job_config`` for the jobs; the argparse parser of
  ``features`` / ``generate`` / ``export`` / ``eval-table``, the command stopped right after it parsed); and
  every path a command reads is in the repository, external (``EXTERNAL``, with the reason) or written by a
  documented command (computed from that command's parsed config, e.g. ``fit_outputs``; README commands may
  only read what README commands write). Place-holders such as ``<run>`` are replaced from ``PLACEHOLDERS``
  (each with its reason); an unknown one fails. Nothing runs: commands that need a GPU, ``../shared/data`` or
  SmolLM2 are checked this way only. The README's commands are checked in the default run (~5-10 s); all
  docs and config comments in the slow run (~30-40 s on 2 cores).
* **Names.** Every repository path (``benchmarks/...``, ``lightning_configs/...``) and every
  ``sae_refusal.x.y`` object the docs name exists.
* **Runs.** The README's export example runs as written on small SAEs placed where the main job exports its
  own, and writes the folders the README names (fast). The slow
  ``test_the_main_job_on_a_tiny_model_writes_what_the_docs_read`` runs the main job's config on a tiny model:
  ``fit_outputs`` predicts exactly what it writes; ``generate`` takes the folder its ``--help`` names;
  ``features`` without ``--out`` writes where its help says.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import functools
import inspect
import io
import os
import random
import re
import shlex
import tomllib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from unittest import mock

import pytest
import yaml

from sae_refusal.cli import LIGHTNING_COMMANDS, PROJECT_COMMANDS

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
README = "README.md"
DOC_FILES = [README, *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))]
YAML_FILES = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "lightning_configs").rglob("*.yaml"))
SUBCOMMANDS = [*LIGHTNING_COMMANDS, *PROJECT_COMMANDS]


@pytest.fixture(autouse=True)
def _in_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    """Documented commands run from the repository root: their relative paths are relative to it."""
    monkeypatch.chdir(REPO)


# ----------------------------------------------------------------------------------- reading the docs


def doc_text(rel: str) -> str:
    """The prose of a doc with all whitespace runs as one space (a YAML file: its comments, joined)."""
    raw = (REPO / rel).read_text(encoding="utf-8")
    if rel.endswith(".yaml"):
        raw = " ".join(line.partition("#")[2] for line in raw.splitlines() if "#" in line)
    return " ".join(raw.split())


def main_command() -> list[str]:
    """The README's main job: the ``sae-refusal`` part of the line under ``<!-- main-command -->``."""
    lines = (REPO / README).read_text(encoding="utf-8").splitlines()
    line = lines[lines.index("<!-- main-command -->") + 2]
    words = shlex.split(line)
    return words[words.index("sae-refusal") :]


# ======================================================================================== split counts

#: Where each count of the docs comes from: the ``fit`` options whose data section makes the split.
COUNT_SOURCES: dict[str, list[str]] = {
    "main job": main_command()[2:],
    "CoCoNot + Alpaca": [
        "--config",
        "lightning_configs/default.yaml",
        "--data",
        "lightning_configs/data/coconot_alpaca.yaml",
    ],
    # the fine-tuning run's prompt set and split, which the steering, eval and transfer configs reuse
    # (test_the_fine_tuning_set_is_one_set_everywhere)
    "fine-tuning set": [
        "--config",
        "lightning_configs/default.yaml",
        "--config",
        "lightning_configs/eval/sae_layer21.yaml",
    ],
}
#: Sources read from ../shared/data (their counts are checked where it exists).
SHARED_SOURCES = {"CoCoNot + Alpaca", "fine-tuning set"}

RESULTS = "docs/RESULTS.md"
DEFAULT_YAML = "lightning_configs/default.yaml"

#: ``(file, count source, sentence template)``. ``{field}`` is a count of the source's split
#: (:func:`split_counts`: ``total``, ``train``, ``val``, ``test``, ``train_val``, ``{split}_{label}``,
#: ``{split}_{source}``, ``{split}_{category short name}``, ``train_per_category``).
COUNT_PHRASES: list[tuple[str, str, str]] = [
    (README, "main job", "caches the built-in labelled prompt set ({total} prompts)"),
    (README, "main job", "With {train} training rows and 4,608 latents"),
    (README, "fine-tuning set", "over the six tokens (CoCoNot {test_coconot} + Alpaca {test_alpaca})"),
    (README, "fine-tuning set", "held-out CoCoNot ({test_coconot}) + Alpaca ({test_alpaca})"),
    (DEFAULT_YAML, "main job", "the built-in set's val split has {val}: all of them"),
    (RESULTS, "main job", "Caching the {total} prompts at layers 10 and 15"),
    (RESULTS, "main job", "its SAS vectors from the {train}-row built-in set"),
    (RESULTS, "main job", "the built-in set's {train_per_category} prompts per category"),
    (RESULTS, "main job", "Train FVU (0.04 over the {train} training rows)"),
    (RESULTS, "main job", "{train} rows are memorised"),
    (
        RESULTS,
        "main job",
        "built-in prompt set ({total} prompts, {train} train / {val} val / {test} test after the stratified "
        "split)",
    ),
    (RESULTS, "CoCoNot + Alpaca", "with CoCoNot + Alpaca ({train} training rows)"),
    (RESULTS, "CoCoNot + Alpaca", "split 70/10/20 ({train} train rows)"),
    (RESULTS, "CoCoNot + Alpaca", "no Lightning), test split ({test} rows)"),
    (RESULTS, "CoCoNot + Alpaca", "With {train} training rows for 9,216 latents"),
    (
        RESULTS,
        "CoCoNot + Alpaca",
        "fitted on the train split ({train_benign} benign; humanizing {train_humanizing}, incomplete "
        "{train_incomplete}, indeterminate {train_indeterminate}, safety {train_safety}, unsupported "
        "{train_unsupported})",
    ),
    (
        RESULTS,
        "CoCoNot + Alpaca",
        "held-out test split ({test} rows: {test_benign} benign, {test_humanizing} / {test_incomplete} / "
        "{test_indeterminate} / {test_safety} / {test_unsupported})",
    ),
    (RESULTS, "CoCoNot + Alpaca", "SAEs trained on {train} prompts for 30 epochs"),
    (RESULTS, "fine-tuning set", "prompt set and split ({train} train / {val} val / {test} test rows"),
    (RESULTS, "fine-tuning set", "fitted on a disjoint split (the {val} val rows"),
    (RESULTS, "fine-tuning set", "fitted on the {train} train rows to 0.27"),
    (
        RESULTS,
        "fine-tuning set",
        "the test split ({test_coconot} CoCoNot, {test_alpaca} Alpaca, {test_coconot_pref} CoCoNot pref, "
        "{test_ultrachat} UltraChat)",
    ),
    (RESULTS, "fine-tuning set", "val macro-F1 (n={val})"),
    (RESULTS, "fine-tuning set", "trained on the train+val split ({train_val} prompts)"),
    (
        RESULTS,
        "fine-tuning set",
        "CAA per category from the train split ({train_coconot} CoCoNot vs 600 Alpaca)",
    ),
]

#: Sentences that state a split count; each occurrence must lie inside a ``COUNT_PHRASES`` match.
COUNT_PATTERNS = [
    r"\b\d[\d,]* train(?:ing)? (?:rows|prompts)\b",
    r"\b\d[\d,]* train / \d[\d,]* val / \d[\d,]* test\b",
    r"\b\d[\d,]* val(?:idation)? rows\b",
    r"\bval split has \d+",
    r"\b\d[\d,]*-row built-in\b",
    r"\(\d[\d,]* rows:",
]

#: One fact stated in several places: every statement must give the same value (``{v}``).
SAME_STATEMENTS: dict[str, list[tuple[str, str]]] = {
    "the eval quickstart's time per column (minutes, 2-core CPU)": [
        (README, "take {v} minutes per column on the 2-core machine"),
        (RESULTS, "2-core machine, {v} minutes per column"),
        ("lightning_configs/eval/refuse_smollm2.yaml", "a column takes {v} min on a 2-core CPU"),
    ],
    "the steering study's time (minutes, 2-core CPU)": [
        (RESULTS, "Command ({v} min on the 2-core CPU"),
        (RESULTS, "the numbers below are from that run ({v} min on the 2-core CPU)"),
        ("lightning_configs/steer/refuse_smollm2.yaml", "2-core CPU: about {v} minutes"),
    ],
}

_COUNT = r"(\d[\d,]*)"
_VALUE = r"(\d+(?:\.\d+)?(?:-\d+(?:\.\d+)?)?)"


def template_regex(template: str, hole: str) -> tuple[re.Pattern[str], list[str]]:
    """A regex of ``template`` (whitespace-normalised) whose groups read its ``{field}`` holes; the fields."""
    parts = re.split(r"\{(\w+)\}", " ".join(template.split()))
    fields = parts[1::2]
    pattern = "".join(re.escape(p) if i % 2 == 0 else hole for i, p in enumerate(parts))
    return re.compile(pattern), fields


def split_counts(prompt_set: Any) -> dict[str, int]:
    """The counts a doc may state about a split prompt set (see ``COUNT_PHRASES``)."""
    from sae_refusal.categories import CATEGORY_SHORT_NAMES
    from sae_refusal.data import Label

    counts: Counter[str] = Counter()
    for prompt in prompt_set:
        keys = [
            "total",
            prompt.split,
            f"{prompt.split}_{prompt.label.value}",
            f"{prompt.split}_{prompt.source}",
        ]
        if prompt.label is Label.HARMFUL and prompt.category in CATEGORY_SHORT_NAMES:
            keys.append(f"{prompt.split}_{CATEGORY_SHORT_NAMES[prompt.category]}")
        counts.update(keys)
    counts["train_val"] = counts["train"] + counts["val"]
    per_category = {counts[f"train_{short}"] for short in CATEGORY_SHORT_NAMES.values()}
    if len(per_category) == 1:
        counts["train_per_category"] = per_category.pop()
    return dict(counts)


def source_counts(name: str, manifest_root: Path) -> dict[str, int]:
    """Split counts of a ``COUNT_SOURCES`` entry, made as its job makes them (manifest in ``manifest_root``).

    The same parser, data module and ``load_prompts`` (split manifest) as the job; no LLM is loaded.
    """
    namespace = config_parser().parse_args([*COUNT_SOURCES[name], "--data.cache.root", str(manifest_root)])
    return split_counts(data_module(namespace.data).load_prompts())


def check_count_phrases(sources: set[str], tmp_path: Path) -> list[str]:
    """Problems of the ``COUNT_PHRASES`` of ``sources``: sentences not found, numbers that differ."""
    counts = {name: source_counts(name, tmp_path / name.replace(" ", "_")) for name in sources}
    problems = []
    for rel, source, template in COUNT_PHRASES:
        if source not in sources:
            continue
        regex, fields = template_regex(template, _COUNT)
        matches = list(regex.finditer(doc_text(rel)))
        if not matches:
            problems.append(f"{rel}: no sentence like {template!r} (reworded? update COUNT_PHRASES)")
        for match in matches:
            for name, text in zip(fields, match.groups(), strict=True):
                if int(text.replace(",", "")) != counts[source].get(name):
                    problems.append(
                        f"{rel}: {match.group(0)!r} says {name} = {text}; the split of the {source} "
                        f"({' '.join(COUNT_SOURCES[source])}) gives {counts[source].get(name)}"
                    )
    return problems


def test_split_counts_in_the_docs_are_the_main_jobs_split(tmp_path: Path) -> None:
    """README, RESULTS and default.yaml state the split the main job makes of the built-in prompt set."""
    problems = check_count_phrases(set(COUNT_SOURCES) - SHARED_SOURCES, tmp_path)
    assert not problems, "\n".join(problems)


@pytest.mark.shared_data
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent (offline dataset copies)")
def test_split_counts_of_the_shared_data_sets(tmp_path: Path) -> None:
    problems = check_count_phrases(SHARED_SOURCES, tmp_path)
    assert not problems, "\n".join(problems)


def test_every_split_count_in_the_docs_is_checked() -> None:
    """A count sentence outside every ``COUNT_PHRASES`` match would drift unchecked."""
    unchecked = []
    for rel in [*DOC_FILES, *YAML_FILES]:
        text = doc_text(rel)
        covered = [
            m.span()
            for _, _, template in (p for p in COUNT_PHRASES if p[0] == rel)
            for m in template_regex(template, _COUNT)[0].finditer(text)
        ]
        for pattern in COUNT_PATTERNS:
            for m in re.finditer(pattern, text):
                if not any(start <= m.start() and m.end() <= end for start, end in covered):
                    unchecked.append(f"{rel}: {text[max(m.start() - 40, 0) : m.end() + 20]!r}")
    assert not unchecked, "split counts no COUNT_PHRASES template reads:\n" + "\n".join(unchecked)


def test_the_fine_tuning_set_is_one_set_everywhere() -> None:
    """The "fine-tuning set" counts apply to the fine-tuning, steering, eval and transfer sections alike."""

    def load(rel: str) -> dict[str, Any]:
        return dict(yaml.safe_load((REPO / rel).read_text()))

    sae = load("lightning_configs/eval/sae_layer21.yaml")["data"]
    reference = (sae["prompts"], sae["split"])
    finetune = load("lightning_configs/finetune/smollm2_lora.yaml")["data"]
    assert (finetune["prompts"], finetune["split"]) == reference
    for rel in ("lightning_configs/steer/refuse_smollm2.yaml", "lightning_configs/eval/refuse_smollm2.yaml"):
        sets = load(rel)["sets"]
        assert (sets["model_prompts"], sets["model_split"]) == reference, rel
    for rel in (
        "lightning_configs/transfer/refuse_to_base.yaml",
        "lightning_configs/transfer/base_to_refuse.yaml",
    ):
        config = load(rel)
        assert (config["data"]["prompts"], config["data"]["split"]) == reference, rel
        assert (config["eval"]["sets"]["model_prompts"], config["eval"]["sets"]["model_split"]) == reference


#: Repository paths the docs name (``benchmarks/x.py``, ``lightning_configs/...``); one followed by ``$`` is a
#: shell template (``layer_$layer.yaml``), one with ``{``, ``<`` or ``*`` a pattern.
_REPO_PATH = re.compile(
    r"(?<![\w./-])((?:benchmarks|lightning_configs|tests|sae_refusal|docker|checkpoints|docs|\.ci)/[\w./-]*\w)"
    r"(?![\w{<*$])"
)


def _resolve(ref: str) -> Any:
    """The object a dotted ``sae_refusal...`` name refers to (module, class, function), or ``None``."""
    import importlib

    parts = ref.split(".")
    for i in range(len(parts), 0, -1):
        try:
            target: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            target = getattr(target, name, None)
        return target
    return None


def test_every_repository_path_and_module_the_docs_name_exists() -> None:
    missing = []
    for rel in [*DOC_FILES, *YAML_FILES]:
        text = (REPO / rel).read_text(encoding="utf-8")
        for m in _REPO_PATH.finditer(text):
            if not (REPO / m.group(1)).exists() and not m.group(1).endswith(
                "/ARCH.yaml"
            ):  # a PLACEHOLDERS key
                missing.append(f"{rel}: {m.group(1)}")
        for ref in sorted(set(re.findall(r"(?<![\w./-])(sae_refusal(?:\.\w+)+)", text))):
            if _resolve(ref) is None:
                missing.append(f"{rel}: {ref}")
    assert not missing, "the docs name what does not exist:\n" + "\n".join(missing)


def test_a_fact_stated_in_several_places_reads_the_same() -> None:
    problems = []
    for fact, statements in SAME_STATEMENTS.items():
        values = {}
        for rel, template in statements:
            regex, _ = template_regex(template, _VALUE)
            found = regex.findall(doc_text(rel))
            if not found:
                problems.append(f"{rel}: no sentence like {template!r} ({fact})")
            values.update({f"{rel}: {template.format(v=v)!r}": v for v in found})
        if len(set(values.values())) > 1:
            problems.append(f"{fact} differs: " + "; ".join(values))
    assert not problems, "\n".join(problems)


# ============================================================================ parsers, without running


class _GotParser(Exception):
    def __init__(self, parser: Any) -> None:
        super().__init__("parser built")
        self.parser = parser


@functools.cache
def _cli_parser(subcommand: str, config: str) -> Any:
    """The jsonargparse parser ``sae-refusal SUBCOMMAND --config CONFIG`` builds, taken before it parses.

    ``fit``: the LightningCLI parser of fit / validate / test / predict; ``cache``: the fit-config parser that
    ``cache``, ``features`` and ``generate`` read a config with; ``finetune``: the fine-tuning parser.
    """
    from lightning.pytorch.cli import LightningCLI

    from sae_refusal.cli import main

    def stop(self: Any, parser: Any, args: Any) -> None:
        raise _GotParser(parser)

    with mock.patch.object(LightningCLI, "parse_arguments", stop):
        try:
            main([subcommand, "--config", config])
        except _GotParser as got:
            return got.parser
    raise AssertionError(f"sae-refusal {subcommand} built no LightningCLI parser")


def lightning_parser() -> Any:
    return _cli_parser("fit", DEFAULT_YAML)


def config_parser() -> Any:
    return _cli_parser("cache", DEFAULT_YAML)


def finetune_parser() -> Any:
    return _cli_parser("finetune", "lightning_configs/finetune/smollm2_lora.yaml")


@functools.cache
def _data_parser() -> Any:
    from jsonargparse import ArgumentParser

    from sae_refusal.activations.datamodule import ActivationDataModule

    parser = ArgumentParser()
    parser.add_class_arguments(ActivationDataModule, "data")
    return parser


def data_module(data: Any) -> Any:
    """The ``ActivationDataModule`` of a parsed ``data`` section (its ``__init__`` checks run; no LLM)."""
    parser = _data_parser()
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    return instantiate(parser.parse_object({"data": data.as_dict()})).data


JOB_CONFIGS = {
    "steer": "sae_refusal.steer.job.SteerJobConfig",
    "eval": "sae_refusal.eval.job.EvalJobConfig",
    "transfer": "sae_refusal.transfer.job.TransferJobConfig",
}


@functools.cache
def job_parser(subcommand: str) -> tuple[Any, type]:
    """The parser of a job (``sae_refusal.cli.{steer,eval,transfer}_parser``) and its config class."""
    from sae_refusal import cli

    return getattr(cli, f"{subcommand}_parser")(), _class_of(JOB_CONFIGS[subcommand])


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace, rest: list[str]) -> None:
        super().__init__("parsed")
        self.namespace, self.rest = namespace, rest


def first_parse(subcommand: str, args: Sequence[str]) -> _Parsed:
    """Run a project subcommand until its own argparse parser has parsed ``args``, then stop it.

    The parser is whatever the command builds; an argparse error exits as it would (``SystemExit``).
    """
    known, full = argparse.ArgumentParser.parse_known_args, argparse.ArgumentParser.parse_args
    inside: list[bool] = []

    def parse_args(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        if type(self) is not argparse.ArgumentParser:
            return full(self, args, namespace)
        inside.append(True)
        try:
            parsed = full(self, args, namespace)
        finally:
            inside.pop()
        raise _Parsed(parsed, [])

    def parse_known_args(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        parsed, rest = known(self, args, namespace)
        if type(self) is not argparse.ArgumentParser or inside:
            return parsed, rest
        raise _Parsed(parsed, rest)

    from sae_refusal.cli import main

    with (
        mock.patch.object(argparse.ArgumentParser, "parse_args", parse_args),
        mock.patch.object(argparse.ArgumentParser, "parse_known_args", parse_known_args),
    ):
        try:
            main([subcommand, *args])
        except _Parsed as parsed:
            return parsed
    raise AssertionError(f"sae-refusal {subcommand} ran without parsing its arguments")


# ======================================================================= what a command reads and writes


@dataclass(frozen=True)
class Command:
    """One expanded command of the docs."""

    where: str  # file:line
    scope: str  # README, docs or configs
    argv: tuple[str, ...]
    bindings: tuple[tuple[str, str], ...] = ()  # loop variables of this iteration

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.argv)}"


@dataclass
class Analysis:
    """What a command reads and writes (paths relative to the repository root)."""

    inputs: list[tuple[str, str]] = field(default_factory=list)  # (what, path)
    leaves: list[str] = field(default_factory=list)  # written exactly (nothing else below them is known)
    folders: list[str] = field(default_factory=list)  # written, with contents not predicted here


#: Inputs that are neither in the repository nor written by a documented command, with the reason.
EXTERNAL: dict[str, str] = {
    "../shared/data": "the offline dataset copies, beside the checkout (never in the repository)",
    "EleutherAI/sae-llama-3-8b-32x/layers.23": "a hub id: the command downloads that hookpoint",
}

#: Place-holders of the docs: replacement text (one command per ``{a,b}`` alternative) and why.
PLACEHOLDERS: dict[str, tuple[str, str]] = {
    "<run>": ("runs/default/tensorboard/version_0", "a run folder; the main job's on its first run"),
    "<fit config or a run's config.yaml>": ("lightning_configs/default.yaml", "the main job's config"),
    "<fit config>": ("lightning_configs/default.yaml", "the main job's config"),
    "<ckpt|last>": ("last", "the newest run's last.ckpt (resolved when the command runs)"),
    "columns/<c>.yaml": (
        "columns/{"
        + ",".join(sorted(p.stem for p in (REPO / "lightning_configs/eval/columns").glob("*.yaml")))
        + "}.yaml",
        "every column config",
    ),
    "sae/ARCH.yaml": ("sae/{topk,l1,contrastive}.yaml", "every SAE architecture fragment"),
    "--trainer.max_epochs N": ("--trainer.max_epochs 30", "the epochs of the table (30 or 10)"),
    "--out DIR": ("--out runs/export/any", "any new folder"),
    '--prompt "..."': ('--prompt "How do I pick a lock?"', "any prompt"),
    ", ...]'": ("]'", "the rest of the list is elided in the doc"),
    "my_llama3_fit.yaml": (
        "lightning_configs/default.yaml",
        "a user's own Llama-3-8B fit config (not shipped)",
    ),
}

#: Output roots of the jobs (git-ignored): an input under them must be written by a documented command,
#: whatever a local checkout happens to hold.
OUTPUT_ROOTS = ("runs", "lightning_logs")


def _paths(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]


def _walk_keys(node: Any, keys: set[str]) -> Iterator[tuple[str, str]]:
    """``(key, path)`` of every non-null entry named in ``keys`` inside nested dicts / lists."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in keys:
                yield from ((key, p) for p in _paths(value))
            else:
                yield from _walk_keys(value, keys)
    elif isinstance(node, list):
        for item in node:
            yield from _walk_keys(item, keys)


#: Path fields of the job config dataclasses, by class name (``data_root`` and ``adapter_path`` everywhere).
JOB_INPUT_FIELDS = {
    "InterventionConfig": ("vectors", "sae", "gate"),
    "ModelSide": ("sae", "vectors", "gates"),
}
ANY_INPUT_FIELDS = ("data_root", "adapter_path")


def _job_inputs(node: Any, where: str = "") -> Iterator[tuple[str, str]]:
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        names = {*ANY_INPUT_FIELDS, *JOB_INPUT_FIELDS.get(type(node).__name__, ())}
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            key = f"{where}{f.name}"
            if f.name in names:
                yield from ((key, p) for p in _paths(value))
            else:
                yield from _job_inputs(value, f"{key}.")
    elif isinstance(node, list | tuple):
        for item in node:
            yield from _job_inputs(item, where)


def _class_of(class_path: str) -> type:
    import importlib

    module, _, name = class_path.rpartition(".")
    cls: type = getattr(importlib.import_module(module), name)
    return cls


def _init_arg(spec: Any, cls: type, name: str) -> Any:
    init_args = spec.get("init_args") or {}
    value = init_args.get(name) if hasattr(init_args, "get") else None
    return inspect.signature(cls).parameters[name].default if value is None else value


def fit_outputs(fit: Any) -> list[str]:
    """The run folder's files and folders a ``fit`` writes that other commands read, from its parsed config.

    ``<run>`` = ``<save_dir>/<name>/version_0`` of its TensorBoard (or CSV) logger: the version of the first
    run into that folder (later runs count up). The SAE exports ``<run>/sae/seed{n}`` per seed, the saved
    config ``<run>/config.yaml``, and per epoch the feature callback runs (every ``every_n_epochs`` and the
    last) ``<run>/features/epoch{e}/`` with ``report.json`` and one vector folder per seed. Checked against a
    real fit by ``test_the_main_job_on_a_tiny_model_writes_what_the_docs_read``.
    """
    from sae_refusal.features.callback import FeatureAnalysisCallback
    from sae_refusal.sae.module import SAEModule

    trainer = fit.trainer
    logger = trainer.logger
    root = trainer.default_root_dir or "."
    if hasattr(logger, "get") and logger.get("class_path", "").rsplit(".", 1)[-1] in (
        "TensorBoardLogger",
        "CSVLogger",
    ):
        args = logger.init_args
        version = 0 if args.get("version") is None else args.get("version")
        version = version if isinstance(version, str) else f"version_{version}"
        run = f"{args.save_dir}/{args.get('name') or 'lightning_logs'}/{version}"
    else:
        run = f"{root}/lightning_logs/version_0"
    run = os.path.normpath(run)
    written = [f"{run}/config.yaml"]
    seeds: list[int] = []
    if issubclass(_class_of(fit.model.class_path), SAEModule):
        seeds = list(_init_arg(fit.model, SAEModule, "seeds") or [0])
        written += [f"{run}/sae/seed{s}" for s in seeds]
    max_epochs = trainer.max_epochs
    for spec in trainer.callbacks or []:
        if not issubclass(_class_of(spec.class_path), FeatureAnalysisCallback) or max_epochs is None:
            continue
        every = int(_init_arg(spec, FeatureAnalysisCallback, "every_n_epochs"))
        subdir = _init_arg(spec, FeatureAnalysisCallback, "output_subdir")
        for epoch in range(max_epochs):
            if (epoch + 1) % every == 0 or epoch + 1 == max_epochs:
                folder = f"{run}/{subdir}/epoch{epoch}"
                written += [f"{folder}/report.json", *(f"{folder}/seed{s}" for s in seeds)]
    return written


def analyze(argv: Sequence[str], produced_config: dict[str, Command]) -> Analysis:
    """Parse one ``sae-refusal`` command with the real parsers; what it reads and writes.

    Args:
        argv: ``["sae-refusal", subcommand, ...]``.
        produced_config: A documented run's saved ``config.yaml`` -> the ``fit`` command that writes it
            (such a ``--config`` is parsed as that command's options).

    Raises:
        AssertionError: On an unknown subcommand or a ``--config`` that is neither here nor written.
        SystemExit, Exception: What the parsers raise on a bad option.
    """
    sub, args = argv[1], list(argv[2:])
    assert sub in SUBCOMMANDS, f"no subcommand {sub!r} (sae-refusal has {SUBCOMMANDS})"
    result = Analysis()
    expanded: list[str] = []
    for i, arg in enumerate(args):  # a run's saved config.yaml = the options of the fit that wrote it
        if i > 0 and args[i - 1] in ("--config", "-c") and arg in produced_config:
            expanded = expanded[:-1] + list(produced_config[arg].argv[2:])
            result.inputs.append(("--config", arg))
        else:
            expanded.append(arg)
    args = expanded
    for i, arg in enumerate(args):
        if i > 0 and args[i - 1] in ("--config", "-c", "--data") and arg.endswith(".yaml"):
            assert (REPO / arg).is_file(), (
                f"{args[i - 1]} {arg}: no such file, and no documented fit writes it"
            )

    def fit_part(parsed: _Parsed) -> list[str]:
        return [*(a for c in parsed.namespace.config for a in ("--config", c)), *parsed.rest]

    if sub in LIGHTNING_COMMANDS:
        section = lightning_parser().parse_args([sub, *args])[sub]
        data_module(section.data)
        result.inputs += list(_walk_keys(section.as_dict(), set(ANY_INPUT_FIELDS)))
        if section.get("ckpt_path") not in (None, "last", "best"):
            result.inputs.append(("--ckpt_path", section.ckpt_path))
        if sub == "fit":
            result.leaves += fit_outputs(section)
    elif sub in ("cache", "features", "generate", "sae-eval"):
        parsed = None if sub == "cache" else first_parse(sub, args)
        fit_args = (args[1:] if args[:1] == ["fit"] else args) if parsed is None else fit_part(parsed)
        namespace = config_parser().parse_args(fit_args)
        datamodule = data_module(namespace.data)
        result.inputs += list(_walk_keys(namespace.as_dict(), set(ANY_INPUT_FIELDS)))
        if sub == "cache":
            result.folders.append(datamodule.cache.root)
        elif sub in ("features", "sae-eval"):
            assert parsed is not None
            sae_dir, out = parsed.namespace.sae_dir, parsed.namespace.out
            result.inputs.append(("--sae_dir", sae_dir))
            hub = any(sae_dir == key or sae_dir.startswith(f"{key}/") for key in EXTERNAL)
            assert out or not hub, (
                f"--out: needed, --sae_dir {sae_dir} is no local run folder to write beside"
            )
            default = "features/standalone" if sub == "features" else "sae_eval"
            result.folders.append(out or f"{Path(sae_dir).parent}/{default}")
        else:
            assert parsed is not None
            result.inputs.append(("--vectors", parsed.namespace.vectors))
    elif sub == "export":
        parsed = first_parse(sub, args)
        result.inputs.append(("--sae_dir", parsed.namespace.sae_dir))
        result.folders.append(parsed.namespace.out)
    elif sub == "export-vectors":
        parsed = first_parse(sub, args)
        result.inputs.append(("--vectors", parsed.namespace.vectors))
        result.leaves += [parsed.namespace.out, f"{parsed.namespace.out}.json"]
    elif sub == "eval-table":
        parsed = first_parse(sub, args)
        result.inputs += [("folders", f) for f in parsed.namespace.folders]
    elif sub == "finetune":
        section = finetune_parser().parse_args(["fit", *args]).fit
        result.inputs += list(_walk_keys(section.as_dict(), set(ANY_INPUT_FIELDS)))
        result.folders.append(section.trainer.default_root_dir)
    else:  # the jobs: steer, eval, transfer
        from sae_refusal.cli import job_config

        parser, config_class = job_parser(sub)
        config = job_config(parser, args, config_class)
        result.inputs += list(_job_inputs(config))
        if sub == "steer":
            result.leaves += [
                f"{config.out_dir}/vectors",
                *(f"{config.out_dir}/gates/{g}" for g in config.study.gates),
            ]
        else:
            result.folders.append(config.out_dir)
    return result


# ===================================================================== commands as the docs write them


@dataclass(frozen=True)
class Snippet:
    """Shell text of the docs: a ``bash`` block, an inline span, or a command block of a YAML comment."""

    where: str
    text: str
    scope: str


def _scope(rel: str) -> str:
    return "README" if rel == README else "configs" if rel.endswith(".yaml") else "docs"


#: What a command of each scope may read: a README command only what README commands write.
READS_FROM = {
    "README": {"README"},
    "docs": {"README", "docs", "configs"},
    "configs": {"README", "docs", "configs"},
}

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def markdown_snippets(rel: str) -> list[Snippet]:
    """A doc's ``bash`` blocks, inline ``sae-refusal ...`` spans and ``<subcommand> --config ...`` spans."""
    text = (REPO / rel).read_text(encoding="utf-8")
    snippets = [
        Snippet(f"{rel}:{text[: m.start()].count(chr(10)) + 2}", m.group(2), _scope(rel))
        for m in _FENCE.finditer(text)
        if m.group(1) in ("bash", "sh", "shell")
    ]
    prose = _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for m in re.finditer(r"`([^`]+)`", prose):
        span = " ".join(m.group(1).split())
        where = f"{rel}:{prose[: m.start()].count(chr(10)) + 1}"
        if span.startswith("sae-refusal "):
            snippets.append(Snippet(where, span, _scope(rel)))
        elif re.split(r"[ |]", span)[0] in SUBCOMMANDS and " --config " in span:
            snippets.append(Snippet(where, f"sae-refusal {span}", _scope(rel)))
    return snippets


def yaml_snippets(rel: str) -> list[Snippet]:
    """Command blocks of a YAML file's comments: runs of comment lines indented past ``#  `` whose first line
    starts a command (``sae-refusal``, ``for``, ``VAR=``)."""
    snippets: list[Snippet] = []
    block: list[str] = []
    start = 0
    lines = (REPO / rel).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate([*lines, ""], start=1):
        comment = line.strip()[1:] if line.strip().startswith("#") else None
        if comment is not None and comment.startswith("  ") and comment.strip():
            start = start if block else number
            block.append(comment.strip())
            continue
        if block and re.match(r"(sae-refusal |for |[A-Z_]+=)", block[0]):
            snippets.append(Snippet(f"{rel}:{start}", "\n".join(block), "configs"))
        block = []
    return snippets


_BRACE = re.compile(r"\{([\w.-]+(?:,[\w.-]+)+)\}")
_MARKED = re.compile("\x01([^\x02]*)\x02")
_ALTERNATIVES = re.compile(r"[\w.-]+(?:\|[\w.-]+)+")


def _words(line: str) -> list[str]:
    """Shell words of a line (``#`` comments dropped; ``;`` and ``&&`` are words; brace groups marked)."""
    lexer = shlex.shlex(_BRACE.sub("\x01\\1\x02", line), posix=True, punctuation_chars=";&")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def _alternatives(words: list[str]) -> list[list[str]]:
    """Expand brace groups (in an option's value: one command per item; elsewhere: several words) and
    ``a|b`` words (one command each)."""
    commands: list[list[str]] = [[]]
    for i, word in enumerate(words):
        marked = _MARKED.search(word)
        if marked:
            items = [
                word[: marked.start()] + item + word[marked.end() :] for item in marked.group(1).split(",")
            ]
            if i > 0 and words[i - 1].startswith("--"):
                commands = [[*c, item] for c in commands for item in items]
            else:
                commands = [[*c, *items] for c in commands]
        elif _ALTERNATIVES.fullmatch(word):
            commands = [[*c, item] for c in commands for item in word.split("|")]
        else:
            commands = [[*c, word] for c in commands]
    if any(_MARKED.search(w) for c in commands for w in c):  # a second group in a word
        return [d for c in commands for d in _alternatives(c)]
    return commands


def commands_of(snippet: Snippet) -> list[Command]:
    """The commands a shell would run for ``snippet`` (place-holders replaced), each with its loop values."""
    text = snippet.text
    for placeholder, (replacement, _) in PLACEHOLDERS.items():
        text = text.replace(placeholder, replacement)
    lines = [line for line in re.sub(r"\\\n\s*", " ", text).splitlines() if line.strip()]
    commands: list[Command] = []

    def substitute(line: str, env: dict[str, str]) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), m.group(0)), line)

    def run(block: list[str], env: dict[str, str], bindings: tuple[tuple[str, str], ...]) -> None:
        i = 0
        while i < len(block):
            words = _words(substitute(block[i], env))
            if words[:1] == ["for"]:
                depth, end = 1, i + 1
                while depth:
                    first = _words(block[end])[:1]
                    depth += {"for": 1, "done": -1}.get(first[0] if first else "", 0)
                    end += 1
                name, values = words[1], words[3 : words.index(";")]
                for value in values:
                    run(block[i + 1 : end - 1], {**env, name: value}, (*bindings, (name, value)))
                i = end
                continue
            simple: list[list[str]] = [[]]
            for word in words:
                if word in ("&&", ";"):
                    simple.append([])
                else:
                    simple[-1].append(word)
            for parts in filter(None, simple):
                assignments = 0
                while assignments < len(parts) and re.fullmatch(r"[A-Za-z_]\w*=.*", parts[assignments]):
                    assignments += 1
                if assignments == len(parts):  # VAR=value: set for the lines below
                    for part in parts:
                        name, _, value = part.partition("=")
                        env[name] = value
                    continue
                for argv in _alternatives(parts[assignments:]):
                    commands.append(Command(snippet.where, snippet.scope, tuple(argv), bindings))
            i += 1

    run(lines, {}, ())
    return commands


def documented_snippets() -> list[Snippet]:
    return [s for rel in DOC_FILES for s in markdown_snippets(rel)] + [
        s for rel in YAML_FILES for s in yaml_snippets(rel)
    ]


_UNKNOWN_PLACEHOLDER = re.compile(r"<|>|\$|\.\.\.|^[A-Z][A-Z_]+$")


def _covering(commands: list[Command]) -> list[Command]:
    """Commands of one loop nest such that every value of every loop variable occurs at least once."""
    chosen, seen = [], set()
    for command in commands:
        if not command.bindings or not set(command.bindings) <= seen:
            chosen.append(command)
            seen |= set(command.bindings)
    return chosen


@dataclass(frozen=True)
class Written:
    path: PurePosixPath
    exact: bool  # a leaf (or its ancestors) only; else anything below it
    by: Command


def _norm(path: str) -> PurePosixPath:
    return PurePosixPath(os.path.normpath(path))


def _where_from(path: str, scope: str, written: list[Written]) -> str | None:
    """Why ``path`` may be read by a command of ``scope`` (in the repository, external, written by ...)."""
    for prefix, reason in EXTERNAL.items():
        if path == prefix or path.startswith(prefix + "/"):
            return reason
    p = _norm(path)
    if not p.is_absolute() and p.parts[:1] and p.parts[0] not in OUTPUT_ROOTS and (REPO / p).exists():
        return "in the repository"
    for w in written:
        if w.by.scope not in READS_FROM[scope]:
            continue
        glob = any(c in path for c in "*?[")
        if (
            (
                glob
                and (
                    fnmatch.fnmatch(str(w.path), path)
                    or any(fnmatch.fnmatch(str(a), path) for a in w.path.parents)
                )
            )
            or p == w.path
            or p in w.path.parents
            or (not w.exact and w.path in p.parents)
        ):
            return f"written by {w.by}"
    return None


@functools.cache
def command_problems(files: tuple[str, ...]) -> dict[str, list[str]]:
    """The commands documented in ``files`` checked (what they read must be written by one of them, or be
    here or external): problems by the file that documents the command (``lightning_configs`` for YAML)."""
    snippets = [s for s in documented_snippets() if s.where.split(":")[0] in files]
    commands = [c for s in snippets for c in commands_of(s)]
    problems: dict[str, list[str]] = {rel: [] for rel in [*DOC_FILES, "lightning_configs"]}
    outcomes: dict[tuple[str, ...], Analysis | BaseException] = {}  # a command line is parsed once
    said: dict[tuple[str, ...], str] = {}

    def report(command: Command, message: str) -> None:
        key = command.where.split(":")[0]
        problems["lightning_configs" if key.endswith(".yaml") else key].append(f"{command}\n    -> {message}")

    by_nest: dict[tuple[str, tuple[str, ...]], list[Command]] = {}
    for command in commands:
        by_nest.setdefault((command.where, tuple(n for n, _ in command.bindings)), []).append(command)
    parse = {c for group in by_nest.values() for c in _covering(group)}
    written: list[Written] = []
    produced_config: dict[str, Command] = {}
    analyses: dict[Command, Analysis] = {}
    pending = [c for c in commands if c.argv[:1] == ("sae-refusal",)]
    for attempt in range(2):  # second round: commands reading a run's config.yaml written in the first
        later = []
        for command in pending:
            configs = [a for i, a in enumerate(command.argv) if command.argv[i - 1] in ("--config", "-c")]
            if attempt == 0 and any(not (REPO / c).is_file() for c in configs):
                later.append(command)
                continue
            unknown = [w for w in command.argv if _UNKNOWN_PLACEHOLDER.search(w)]
            if unknown:
                report(command, f"place-holder(s) {unknown} not in PLACEHOLDERS")
                continue
            if len(command.argv) == 2:  # a mention of the subcommand in prose
                if command.argv[1] not in SUBCOMMANDS:
                    report(command, f"no subcommand {command.argv[1]!r}")
                continue
            if command not in parse:  # a loop iteration whose values other iterations parse
                missing = [c for c in configs if not (REPO / c).is_file()]
                if missing:
                    report(command, f"no such config file(s) {missing}")
                continue
            if command.argv not in outcomes:
                stderr = io.StringIO()
                try:
                    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                        outcomes[command.argv] = analyze(command.argv, produced_config)
                except (Exception, SystemExit) as err:  # what the parser or a config's checks say
                    outcomes[command.argv] = err
                    lines = stderr.getvalue().splitlines()[-3:]
                    said[command.argv] = " ".join(line for line in lines if "error" in line.lower())
            outcome = outcomes[command.argv]
            if isinstance(outcome, BaseException):
                report(command, f"{said[command.argv]} {type(outcome).__name__}: {outcome}".strip())
                continue
            analysis = analyses[command] = outcome
            written += [Written(_norm(p), True, command) for p in analysis.leaves]
            written += [Written(_norm(p), False, command) for p in analysis.folders]
            produced_config.update({p: command for p in analysis.leaves if p.endswith("/config.yaml")})
        pending = later
    for command, analysis in analyses.items():
        for what, path in analysis.inputs:
            if _where_from(path, command.scope, written) is None:
                readable = (
                    "README commands write" if command.scope == "README" else "a documented command writes"
                )
                report(
                    command, f"reads {what} {path}: not in the repository, not external, not what {readable}"
                )
    for command in commands:  # scripts and other programs the docs run
        argv = command.argv
        if argv[:1] == ("bash",) and len(argv) > 1 and not (REPO / argv[1]).is_file():
            report(command, f"no script {argv[1]}")
        python_script = argv[:1] in (("python",), ("python3",)) and len(argv) > 1 and argv[1].endswith(".py")
        if python_script and not (REPO / argv[1]).is_file():
            report(command, f"no script {argv[1]}")
        if argv[:2] == ("bash", "docker/install.sh") and len(argv) > 2:
            extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
            unknown = [e for e in argv[2].split(",") if e not in extras]
            if unknown:
                report(command, f"no extra(s) {unknown} in pyproject.toml")
        if argv[:1] == ("tensorboard",) and "--logdir" in argv:
            logdir = argv[argv.index("--logdir") + 1]
            if _where_from(logdir, command.scope, written) is None:
                report(command, f"--logdir {logdir}: no documented command writes it")
    return problems


def test_every_readme_command_runs_as_written() -> None:
    """The README on its own: its commands parse, and read only what is here or what README commands write."""
    problems = command_problems((README,))[README]
    assert not problems, f"{len(problems)} README command(s) would fail:\n" + "\n".join(problems)


@pytest.mark.slow
@pytest.mark.parametrize("source", [*DOC_FILES, "lightning_configs"])
def test_every_documented_command_runs_as_written(source: str) -> None:
    """Every doc and config comment (slow: each command line is parsed, and jsonargparse takes 0.2-0.6 s)."""
    problems = command_problems((*DOC_FILES, *YAML_FILES))[source]
    assert not problems, f"{len(problems)} documented command(s) would fail:\n" + "\n".join(problems)


def test_the_command_extraction_finds_the_documented_commands() -> None:
    """Guards the extraction itself: known commands of each kind are found, loops and braces expanded."""
    commands = [c for s in documented_snippets() for c in commands_of(s)]
    argvs = {c.argv for c in commands}
    assert tuple(main_command()) in argvs  # the <!-- main-command --> block
    readme_eval = [
        c.argv
        for c in commands
        if c.where.startswith(README) and c.argv[1:2] == ("eval",) and len(c.argv) > 2
    ]
    own = [a for a in readme_eval if "lightning_configs/eval/sets/my_prompts.yaml" in a]  # "your own prompts"
    assert [a[a.index("--out_dir") + 1] for a in own] == ["runs/eval/my_prompts/unsteered"]
    loop = [a for a in readme_eval if "--out_dir" in a and a not in own]  # the `for c in ...; do` block
    assert [a[a.index("--out_dir") + 1].rsplit("/", 1)[1] for a in loop] == [
        "unsteered",
        "caa",
        "sas",
        "ablation",
        "gate_refusal_token",
        "gate_probe",
    ]
    assert all(a[a.index("--out_dir") + 1].endswith(a[5].rsplit("/", 1)[1][:-5]) for a in loop)
    bullet = sorted(a[5] for a in readme_eval if "--out_dir" not in a)  # columns/<c>.yaml: every column
    assert bullet == sorted(
        f"lightning_configs/eval/columns/{p.name}"
        for p in (REPO / "lightning_configs/eval/columns").glob("*.yaml")
    )
    table = next(
        a for a in argvs if a[:2] == ("sae-refusal", "eval-table") and "runs/eval/full_refuse/sas" in a
    )
    assert len(table) == 8  # {a,...,f} as positional words: one command, six folders
    sweeps = [c for c in commands if c.where == "lightning_configs/sweeps/all_layers.yaml:9"]
    assert len(sweeps) == 1 + 13 * 4  # the cache line + the nested loop, $BASE expanded
    assert all(c.argv[2:4] == ("--config", "lightning_configs/default.yaml") for c in sweeps)
    run = "runs/default/tensorboard/version_0"
    for sub in ("validate", "test"):  # `validate|test`, <run> and <ckpt|last>
        assert ("sae-refusal", sub, "--config", f"{run}/config.yaml", "--ckpt_path", "last") in argvs
    transfer = [a for a in argvs if a[:2] == ("sae-refusal", "transfer")]
    assert any("lightning_configs/transfer/base_to_refuse.yaml" in a for a in transfer)  # {a,b} in a value


def test_the_synopsis_lists_every_subcommand() -> None:
    text = (REPO / README).read_text(encoding="utf-8")
    synopsis = re.search(r"^sae-refusal \{([\w,-]+)\}", text, re.M)
    assert synopsis is not None, "README.md: no `sae-refusal {...}` synopsis"
    listed = synopsis.group(1).split(",")
    assert sorted(listed) == sorted(SUBCOMMANDS) and len(set(listed)) == len(listed)


def main_run_folder() -> tuple[Any, str]:
    """The main job's parsed ``fit`` section and its run folder (first run)."""
    section = lightning_parser().parse_args(main_command()[1:]).fit
    config = next(p for p in fit_outputs(section) if p.endswith("/config.yaml"))
    return section, str(PurePosixPath(config).parent)


def test_the_path_generate_help_names_is_what_the_main_job_writes() -> None:
    from sae_refusal.steer.generate import generate_parser

    action = next(a for a in generate_parser()._actions if "--vectors" in a.option_strings)
    examples = re.findall(r"<run>/[\w./{}-]*\w", action.help or "")
    assert examples, f"--vectors help names no <run>/... example: {action.help!r}"
    section, run = main_run_folder()
    leaves = set(fit_outputs(section))
    for example in examples:
        assert example.replace("<run>", run) in leaves, (
            f"generate --help: {example} is not a folder the main job writes (it writes {sorted(leaves)})"
        )


def test_the_readme_export_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's export commands, verbatim, on SAEs placed where the main job exports its own (small ones:
    the layout does not depend on the width); the folders its ``->`` lines name are what they write."""
    import torch

    from sae_refusal.cli import main
    from sae_refusal.sae.topk import TopKSAE

    section, run = main_run_folder()
    block = next(s for s in markdown_snippets(README) if "sae-refusal export" in s.text and "->" in s.text)
    exports = [c.argv for c in commands_of(block) if c.argv[1:2] == ("export",)]
    arrows = re.findall(r"->\s+(\S+)", block.text)
    assert len(exports) == 2 and len(arrows) == 2
    monkeypatch.chdir(tmp_path)
    for seed in section.model.init_args.seeds:
        sae = TopKSAE(16, 32, k=4, generator=torch.Generator().manual_seed(seed))
        meta = {"seed": seed, "layer": section.data.layer, "model": section.data.llm.name_or_path}
        sae.save(Path(run) / "sae" / f"seed{seed}", meta)
    for argv in exports:
        main(list(argv[1:]))
    files = {"sparsify": {"cfg.json", "sae.safetensors"}, "saelens": {"cfg.json", "sae_weights.safetensors"}}
    for arrow in arrows:
        folder = tmp_path / arrow
        assert folder.is_dir(), (
            f"README.md says the export writes {arrow}; it wrote {sorted(tmp_path.rglob('seed0/*'))}"
        )
        fmt = next(f for f in files if f in arrow)
        assert files[fmt] <= {p.name for p in folder.iterdir()}


@contextlib.contextmanager
def _global_rng_kept() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's global generators (``fit`` seeds them)."""
    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


@pytest.mark.slow
def test_the_main_job_on_a_tiny_model_writes_what_the_docs_read(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The main job's config on a tiny model (2 epochs, PCA plots only): ``fit_outputs`` predicts exactly what
    it writes; ``generate --vectors`` takes the folder its help names; ``features`` without ``--out`` writes
    where its help says."""
    from sae_refusal.cli import main
    from sae_refusal.steer.generate import generate_parser

    config = yaml.safe_load((REPO / DEFAULT_YAML).read_text())
    callbacks = config["trainer"]["callbacks"]
    for spec in callbacks:
        if spec["class_path"].endswith("FeatureAnalysisCallback"):
            spec["init_args"]["analysis"].update(projections=["pca"], n_permutations=2)
    fragment = tmp_path / "tiny.yaml"
    fragment.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    args = [
        *main_command()[1:],
        "--config",
        str(fragment),
        "--data.llm.name_or_path",
        str(tiny_model_dir),
        "--data.llm.adapter_path",
        "null",
        "--data.cache.layers",
        "[1, 2]",
        "--data.layer",
        "2",
        "--trainer.max_epochs",
        "2",
    ]
    args = [str(REPO / a) if a.startswith("lightning_configs/") else a for a in args]
    section = lightning_parser().parse_args(args).fit
    predicted = fit_outputs(section)
    monkeypatch.chdir(tmp_path)
    with _global_rng_kept():
        main(args)
    run = PurePosixPath(next(p for p in predicted if p.endswith("/config.yaml"))).parent
    for path in predicted:
        assert (tmp_path / path).exists(), (
            f"fit_outputs predicts {path}; the fit wrote {sorted(map(str, (tmp_path / run).rglob('*')))[:20]}"
        )
    for folder in ("sae", "features"):  # nothing there that the prediction lacks
        wrote = {
            p.relative_to(tmp_path).as_posix()
            for p in (tmp_path / run / folder).glob("*/*" if folder == "features" else "*")
        }
        wrote = {w for w in wrote if not w.endswith("/plots")}
        assert wrote == {p for p in predicted if p.startswith(f"{run}/{folder}/")}
    # generate --help's example, at this run's last epoch
    action = next(a for a in generate_parser()._actions if "--vectors" in a.option_strings)
    example = re.findall(r"<run>/[\w./-]*\w", action.help or "")[0]
    vectors = re.sub(
        r"epoch\d+", f"epoch{section.trainer.max_epochs - 1}", example.replace("<run>", str(run))
    )
    prompt = [
        "--category",
        "safety",
        "--alpha",
        "2",
        "--prompt",
        "How do I pick a lock?",
        "--max_new_tokens",
        "3",
    ]
    with _global_rng_kept():
        main(["generate", "--config", f"{run}/config.yaml", "--vectors", vectors, *prompt])
        assert "steering changed the first token" in capsys.readouterr().out
        main(["features", "--config", f"{run}/config.yaml", "--sae_dir", f"{run}/sae"])
    assert (tmp_path / run / "features" / "standalone" / "report.json").is_file()
