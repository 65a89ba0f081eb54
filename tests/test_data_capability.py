"""Capability loaders: MMLU, GSM8K, TruthfulQA parsing, seeded subsamples, errors, final numbers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from sae_refusal.data.capability import (
    extract_final_number,
    group_by_subject,
    load_gsm8k,
    load_mmlu,
    load_truthfulqa,
    mmlu_subjects,
    subsample,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"shared data folder {SHARED_DATA} is absent (offline dataset copies)"
)


def _write_csv(path: Path, rows: list[list[str]], header: list[str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        if header:
            writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    mmlu = tmp_path / "mmlu" / "data"
    _write_csv(
        mmlu / "test" / "anatomy_test.csv",
        [["Which bone, if any, is longest?", "Femur", "Tibia", "Ulna, maybe", "None", "A"]]
        + [[f"anatomy q{i}", "a", "b", "c", "d", "BCD"[i % 3]] for i in range(1, 4)],
    )
    _write_csv(
        mmlu / "test" / "abstract_algebra_test.csv", [["Is Z_3 a field?", "Yes", "No", "Maybe", "?", "D"]]
    )
    _write_csv(mmlu / "dev" / "anatomy_dev.csv", [[f"dev q{i}", "a", "b", "c", "d", "C"] for i in range(5)])
    gsm = tmp_path / "gsm8k"
    gsm.mkdir()
    rows = [
        {"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i:,}"}
        for i in range(10)
    ]
    rows[3]["answer"] = "Big.\n#### 1,234"
    (gsm / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _write_csv(
        tmp_path / "truthfulqa" / "TruthfulQA.csv",
        [
            [
                "Adversarial",
                "Misc",
                "Q one?",
                "Best one",
                "Other true; Best one;  ; Other true",
                "Wrong; Bad",
                "s",
            ],
            ["Adversarial", "Misc", "Q two?", "Not listed", "True two", "False two", "s"],
        ],
        header=[
            "Type",
            "Category",
            "Question",
            "Best Answer",
            "Correct Answers",
            "Incorrect Answers",
            "Source",
        ],
    )
    return tmp_path


# --------------------------------------------------------------------------------------------- MMLU


def test_load_mmlu_parses_rows_ids_and_letters(root: Path) -> None:
    items = load_mmlu(root, split="test")
    assert [i.subject for i in items] == ["abstract_algebra"] + ["anatomy"] * 4  # subjects sorted
    first = items[1]
    assert first.id == "mmlu:test:anatomy:0"
    assert first.question == "Which bone, if any, is longest?"
    assert first.choices == ["Femur", "Tibia", "Ulna, maybe", "None"]  # quoted comma kept in one choice
    assert first.answer == 0
    assert [i.answer for i in items] == [3, 0, 2, 3, 1]
    assert mmlu_subjects(root, "test") == ["abstract_algebra", "anatomy"]


def test_load_mmlu_subjects_dev_and_grouping(root: Path) -> None:
    assert {i.subject for i in load_mmlu(root, subjects=["anatomy"])} == {"anatomy"}
    dev = load_mmlu(root, split="dev")
    grouped = group_by_subject(dev)
    assert list(grouped) == ["anatomy"]
    assert [i.question for i in grouped["anatomy"]] == [f"dev q{i}" for i in range(5)]


def test_load_mmlu_errors_name_file_and_data_root(root: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"virology_test\.csv.*data_root"):
        load_mmlu(root, subjects=["virology"])
    with pytest.raises(FileNotFoundError, match=r"mmlu/data/val.*data_root"):
        load_mmlu(root, split="val")
    with pytest.raises(ValueError, match="split"):
        load_mmlu(root, split="train")
    _write_csv(root / "mmlu" / "data" / "test" / "bad_test.csv", [["q", "a", "b", "c", "d", "E"]])
    with pytest.raises(ValueError, match=r"bad_test\.csv row 1: answer"):
        load_mmlu(root, subjects=["bad"])


# -------------------------------------------------------------------------------------- subsampling


def test_subsample_is_seeded_sorted_and_bounded(root: Path) -> None:
    full = load_gsm8k(root)
    a, b = load_gsm8k(root, limit=4, seed=1), load_gsm8k(root, limit=4, seed=1)
    assert a == b and len(a) == 4
    rows = [int(i.id.rsplit(":", 1)[1]) for i in a]
    assert rows == sorted(rows)  # file order
    assert {i.id for i in a} <= {i.id for i in full}
    assert [i.id for i in load_gsm8k(root, limit=4, seed=2)] != [i.id for i in a]
    assert load_gsm8k(root, limit=100) == full
    assert load_gsm8k(root, limit=0) == []
    assert subsample([1, 2, 3], None) == [1, 2, 3]
    with pytest.raises(ValueError, match="limit"):
        load_gsm8k(root, limit=-1)
    assert len(load_mmlu(root, limit=2, seed=0)) == 2


# -------------------------------------------------------------------------------------------- GSM8K


def test_load_gsm8k_parses_final_number(root: Path) -> None:
    items = load_gsm8k(root, split="test")
    assert len(items) == 10
    assert items[2].id == "gsm8k:test:2"
    assert items[2].question == "What is 2 + 2?"
    assert items[2].answer == "4"
    assert items[3].answer == "1234"  # commas removed
    assert items[3].answer_text.endswith("#### 1,234")


def test_load_gsm8k_errors(root: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"train\.jsonl.*data_root"):
        load_gsm8k(root, split="train")
    (root / "gsm8k" / "bad.jsonl").write_text(json.dumps({"question": "q", "answer": "no final 12"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl line 1.*####"):
        load_gsm8k(root, split="bad")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
        ("#### 1,234", "1234"),
        ("The answer is $1,200.", "1200"),
        ("so 3 then 4 and finally 12.0", "12"),
        ("It is 12.50 dollars", "12.5"),
        ("Result: -7 degrees", "-7"),
        ("a loss of -$5", "-5"),
        ("first 5 #### 42 then 7", "42"),  # after #### wins over the last number
        ("3 apples\n\n#### ", "3"),  # nothing after ####: the last number
        ("no digits here", None),
        ("value 0.0", "0"),
    ],
)
def test_extract_final_number(text: str, expected: str | None) -> None:
    assert extract_final_number(text) == expected


# --------------------------------------------------------------------------------------- TruthfulQA


def test_load_truthfulqa_sets(root: Path) -> None:
    first, second = load_truthfulqa(root)
    assert first.id == "truthfulqa:0" and first.question == "Q one?"
    assert first.best == "Best one"
    assert first.correct == ["Other true", "Best one"]  # stripped, empty dropped, repeats removed
    assert first.incorrect == ["Wrong", "Bad"]
    assert second.correct == ["Not listed", "True two"]  # best answer added when missing
    assert load_truthfulqa(root, limit=1, seed=0)[0] in (first, second)


def test_load_truthfulqa_errors(root: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"TruthfulQA\.csv.*data_root"):
        load_truthfulqa(tmp_path / "nowhere")
    _write_csv(
        root / "truthfulqa" / "TruthfulQA.csv",
        [["Q?", "Best", "Best", " ; "]],
        header=["Question", "Best Answer", "Correct Answers", "Incorrect Answers"],
    )
    with pytest.raises(ValueError, match="row 1: no incorrect answers"):
        load_truthfulqa(root)


# ------------------------------------------------------------------------------- shared data copies


@pytest.mark.shared_data
@needs_shared
def test_shared_mmlu() -> None:
    assert len(load_mmlu(SHARED_DATA, split="test")) == 14079
    dev = load_mmlu(SHARED_DATA, split="dev")
    assert len(dev) == 285
    grouped = group_by_subject(dev)
    assert len(grouped) == 57 and all(len(v) == 5 for v in grouped.values())
    assert len(load_mmlu(SHARED_DATA, split="val", limit=50, seed=3)) == 50


@pytest.mark.shared_data
@needs_shared
def test_shared_gsm8k() -> None:
    test = load_gsm8k(SHARED_DATA, split="test")
    assert len(test) == 1319 and test[0].answer == "18"
    assert len(load_gsm8k(SHARED_DATA, split="train")) == 7473


@pytest.mark.shared_data
@needs_shared
def test_shared_truthfulqa() -> None:
    items = load_truthfulqa(SHARED_DATA)
    assert len(items) == 817
    assert all(i.best in i.correct and i.incorrect for i in items)
