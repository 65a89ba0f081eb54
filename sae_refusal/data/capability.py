"""Capability benchmarks read from local copies: MMLU, GSM8K and TruthfulQA items.

The eval job measures what an intervention costs in general ability on these items
(:mod:`sae_refusal.eval.capability` scores them). This module only reads the files; it knows nothing of
models or torch.

Design notes:

* **Local files under a data root.** ``data_root`` (default ``../shared/data``) holds the layout of the
  public releases: ``mmlu/data/<split>/<subject>_<split>.csv`` (no header: question, A, B, C, D, answer
  letter), ``gsm8k/<split>.jsonl`` (``question``, ``answer`` ending in ``#### N``) and
  ``truthfulqa/TruthfulQA.csv``. A missing file is a :class:`FileNotFoundError` naming the file and the
  ``data_root`` it was looked up under; a malformed row is a :class:`ValueError` naming file and line.
* **Stable ids.** ``mmlu:<split>:<subject>:<row>``, ``gsm8k:<split>:<row>``, ``truthfulqa:<row>`` (rows
  counted from 0 in their file), so per-item records can be joined across runs and subsample sizes.
* **Seeded subsamples.** ``limit`` keeps ``limit`` items chosen by ``np.random.default_rng(seed)`` without
  replacement, returned in file order (sorted indices), so a run is reproducible and a larger ``limit`` with
  the same seed is not a reshuffle of the order.
* **MMLU k-shot examples** come from the ``dev`` split (5 per subject): load it with ``split="dev"`` and
  group it with :func:`group_by_subject`.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

__all__ = [
    "DEFAULT_DATA_ROOT",
    "MMLU_LETTERS",
    "MMLU_SPLITS",
    "GSM8KItem",
    "MCItem",
    "TruthfulQAItem",
    "extract_final_number",
    "group_by_subject",
    "load_gsm8k",
    "load_mmlu",
    "load_truthfulqa",
    "mmlu_subjects",
    "subsample",
]

#: Where the shared offline copies live, relative to the repository root.
DEFAULT_DATA_ROOT = "../shared/data"
#: Answer letters of the four MMLU choices, in column order.
MMLU_LETTERS: tuple[str, ...] = ("A", "B", "C", "D")
#: Splits of the MMLU release.
MMLU_SPLITS: tuple[str, ...] = ("dev", "val", "test")

_T = TypeVar("_T")


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question (MMLU).

    Args:
        id: ``mmlu:<split>:<subject>:<row>``.
        question: The question text.
        choices: The answer options, in letter order (four for MMLU).
        answer: Index of the correct choice in ``choices``.
        subject: MMLU subject (file stem, e.g. ``"abstract_algebra"``), ``None`` when unknown.
    """

    id: str
    question: str
    choices: list[str]
    answer: int
    subject: str | None


@dataclass(frozen=True)
class GSM8KItem:
    """One GSM8K word problem.

    Args:
        id: ``gsm8k:<split>:<row>``.
        question: The problem.
        answer_text: The full reference solution, ending in ``#### N``.
        answer: The final number ``N`` normalised as :func:`extract_final_number` does (commas removed).
    """

    id: str
    question: str
    answer_text: str
    answer: str


@dataclass(frozen=True)
class TruthfulQAItem:
    """One TruthfulQA question with its multiple-choice answer sets.

    Args:
        id: ``truthfulqa:<row>``.
        question: The question.
        best: The best answer; always one of ``correct``.
        correct: True answers (MC2 numerator set), without repeats.
        incorrect: False answers (the distractors of MC1 and MC2), without repeats; never empty.
    """

    id: str
    question: str
    best: str
    correct: list[str]
    incorrect: list[str]


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit: must be None or an integer >= 0, got {limit!r}")


def subsample(items: Sequence[_T], limit: int | None, seed: int = 0) -> list[_T]:
    """A seeded subsample of ``items`` in their original order.

    Args:
        items: The full list.
        limit: Most items kept; ``None`` (or a limit >= ``len(items)``) keeps all of them.
        seed: Seed of ``np.random.default_rng``.

    Returns:
        ``limit`` items chosen without replacement, sorted by their position in ``items``.

    Raises:
        ValueError: If ``limit`` is negative or not an integer.
    """
    _check_limit(limit)
    if limit is None or limit >= len(items):
        return list(items)
    keep = np.sort(np.random.default_rng(seed).choice(len(items), size=limit, replace=False))
    return [items[int(i)] for i in keep]


def _missing(path: Path, data_root: str | Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what}: {path} does not exist; data_root={str(data_root)!r} must hold the offline dataset copies "
        f"(e.g. {DEFAULT_DATA_ROOT}); pass data_root= to point at the folder"
    )


# --------------------------------------------------------------------------------------------- MMLU


def _mmlu_folder(data_root: str | Path, split: str) -> Path:
    if split not in MMLU_SPLITS:
        raise ValueError(f"split: MMLU has splits {MMLU_SPLITS}, got {split!r}")
    folder = Path(data_root) / "mmlu" / "data" / split
    if not folder.is_dir():
        raise _missing(folder, data_root, "MMLU")
    return folder


def mmlu_subjects(data_root: str | Path = DEFAULT_DATA_ROOT, split: str = "test") -> list[str]:
    """The MMLU subjects that have a file in ``split``, sorted.

    Raises:
        FileNotFoundError: If the split folder is missing.
        ValueError: On an unknown ``split``.
    """
    suffix = f"_{split}.csv"
    folder = _mmlu_folder(data_root, split)
    return sorted(p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}"))


def _read_mmlu_file(path: Path, subject: str, split: str) -> list[MCItem]:
    items: list[MCItem] = []
    with path.open(newline="", encoding="utf-8") as handle:
        for row_index, row in enumerate(csv.reader(handle)):
            where = f"{path} row {row_index + 1}"
            if len(row) != 6:
                raise ValueError(
                    f"{where}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}"
                )
            letter = row[5].strip().upper()
            if letter not in MMLU_LETTERS:
                raise ValueError(f"{where}: answer must be one of {MMLU_LETTERS}, got {row[5]!r}")
            items.append(
                MCItem(
                    id=f"mmlu:{split}:{subject}:{row_index}",
                    question=row[0],
                    choices=list(row[1:5]),
                    answer=MMLU_LETTERS.index(letter),
                    subject=subject,
                )
            )
    return items


def load_mmlu(
    data_root: str | Path = DEFAULT_DATA_ROOT,
    split: str = "test",
    subjects: Iterable[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[MCItem]:
    """MMLU questions of one split, subject files in sorted order, rows in file order.

    Args:
        data_root: Folder holding ``mmlu/data/<split>/<subject>_<split>.csv``.
        split: ``"dev"`` (5 per subject, the k-shot examples), ``"val"`` or ``"test"``.
        subjects: Subjects to read (file stems such as ``"anatomy"``); ``None`` reads every subject.
        limit: Keep a seeded subsample of this many items across all subjects (see :func:`subsample`).
        seed: Seed of the subsample.

    Raises:
        FileNotFoundError: If the split folder or a requested subject's file is missing.
        ValueError: On an unknown ``split``, a bad ``limit``, or a malformed row (naming file and row).
    """
    _check_limit(limit)
    folder = _mmlu_folder(data_root, split)
    names = mmlu_subjects(data_root, split) if subjects is None else sorted(set(subjects))
    items: list[MCItem] = []
    for subject in names:
        path = folder / f"{subject}_{split}.csv"
        if not path.is_file():
            raise _missing(path, data_root, f"MMLU subject {subject!r}")
        items.extend(_read_mmlu_file(path, subject, split))
    return subsample(items, limit, seed)


def group_by_subject(items: Iterable[MCItem]) -> dict[str | None, list[MCItem]]:
    """MMLU items keyed by subject, each list in input order (the k-shot examples of that subject)."""
    grouped: dict[str | None, list[MCItem]] = {}
    for item in items:
        grouped.setdefault(item.subject, []).append(item)
    return grouped


# -------------------------------------------------------------------------------------------- GSM8K

# A number: optional minus, digits with optional thousands commas, optional decimals.
_NUMBER = re.compile(r"-?\d(?:[\d,]*\d)?(?:\.\d+)?")


def _normalise_number(text: str) -> str:
    number = text.replace(",", "")
    if "." in number:
        whole, frac = number.split(".", 1)
        number = whole if not frac.strip("0") else f"{whole}.{frac.rstrip('0')}"
    return "0" if number in ("-0", "") else number


def extract_final_number(text: str) -> str | None:
    """The final numeric answer of a GSM8K solution or generation, normalised for exact match.

    The first number after ``####`` when the text has one and a number follows it, else the last number
    in the text. ``$`` signs and thousands commas are removed and a zero fraction is dropped, so ``"$1,200"``,
    ``"1200."`` and ``"1200.00"`` all give ``"1200"``; ``"0.50"`` gives ``"0.5"``.

    Args:
        text: A reference answer (``... #### 18``) or a model's output.

    Returns:
        The number as a string, or ``None`` if the text holds no number.
    """
    cleaned = text.replace("$", "")
    if "####" in cleaned:
        tail = _NUMBER.search(cleaned.split("####", 1)[1])
        if tail is not None:
            return _normalise_number(tail.group(0))
    numbers = _NUMBER.findall(cleaned)
    return _normalise_number(numbers[-1]) if numbers else None


def load_gsm8k(
    data_root: str | Path = DEFAULT_DATA_ROOT, split: str = "test", limit: int | None = None, seed: int = 0
) -> list[GSM8KItem]:
    """GSM8K problems of one split (``gsm8k/<split>.jsonl``), in file order.

    Args:
        data_root: Folder holding ``gsm8k/train.jsonl`` and ``gsm8k/test.jsonl``.
        split: ``"train"`` (few-shot examples) or ``"test"``.
        limit: Keep a seeded subsample of this many items (see :func:`subsample`).
        seed: Seed of the subsample.

    Raises:
        FileNotFoundError: If the file is missing.
        ValueError: On a bad ``limit`` or a row without ``question`` / ``answer`` or a ``#### N`` final
            number (naming file and line).
    """
    _check_limit(limit)
    path = Path(data_root) / "gsm8k" / f"{split}.jsonl"
    if not path.is_file():
        raise _missing(path, data_root, f"GSM8K split {split!r}")
    items: list[GSM8KItem] = []
    with path.open(encoding="utf-8") as handle:
        lines = [line for line in handle if line.strip()]
    for row_index, line in enumerate(lines):
        where = f"{path} line {row_index + 1}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err})") from err
        question, answer_text = row.get("question"), row.get("answer")
        if not isinstance(question, str) or not isinstance(answer_text, str):
            raise ValueError(f"{where}: expected string fields 'question' and 'answer'")
        answer = extract_final_number(answer_text) if "####" in answer_text else None
        if answer is None:
            raise ValueError(f"{where}: the answer has no '#### N' final number")
        items.append(GSM8KItem(f"gsm8k:{split}:{row_index}", question, answer_text, answer))
    return subsample(items, limit, seed)


# --------------------------------------------------------------------------------------- TruthfulQA

_TRUTHFULQA_COLUMNS = ("Question", "Best Answer", "Correct Answers", "Incorrect Answers")


def _split_answers(cell: str) -> list[str]:
    return list(dict.fromkeys(a.strip() for a in cell.split(";") if a.strip()))


def load_truthfulqa(
    data_root: str | Path = DEFAULT_DATA_ROOT, limit: int | None = None, seed: int = 0
) -> list[TruthfulQAItem]:
    """TruthfulQA questions (``truthfulqa/TruthfulQA.csv``) with their MC answer sets, in file order.

    ``Correct Answers`` and ``Incorrect Answers`` are ``;``-separated; answers are stripped, empty ones
    dropped and repeats removed. The best answer is put first among the correct ones if the file omits it.

    Args:
        data_root: Folder holding ``truthfulqa/TruthfulQA.csv``.
        limit: Keep a seeded subsample of this many items (see :func:`subsample`).
        seed: Seed of the subsample.

    Raises:
        FileNotFoundError: If the file is missing.
        ValueError: On a bad ``limit``, a missing column, or a row without question, best answer or
            incorrect answers (naming file and row).
    """
    _check_limit(limit)
    path = Path(data_root) / "truthfulqa" / "TruthfulQA.csv"
    if not path.is_file():
        raise _missing(path, data_root, "TruthfulQA")
    items: list[TruthfulQAItem] = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in _TRUTHFULQA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; found {reader.fieldnames}")
        for row_index, row in enumerate(reader):
            where = f"{path} row {row_index + 1}"
            question, best = (row["Question"] or "").strip(), (row["Best Answer"] or "").strip()
            correct = _split_answers(row["Correct Answers"] or "")
            incorrect = _split_answers(row["Incorrect Answers"] or "")
            if not question or not best:
                raise ValueError(f"{where}: empty question or best answer")
            if not incorrect:
                raise ValueError(f"{where}: no incorrect answers (MC1/MC2 need at least one)")
            if best not in correct:
                correct.insert(0, best)
            items.append(TruthfulQAItem(f"truthfulqa:{row_index}", question, best, correct, incorrect))
    return subsample(items, limit, seed)
