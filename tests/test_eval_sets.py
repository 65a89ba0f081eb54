"""Prompt sets from anywhere: a user's file or a hub dataset as a set of a study, its checks, its slices."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sae_refusal.data.prompt_set import Label
from sae_refusal.eval.refusal_sets import ItemRecord, summarise
from sae_refusal.eval.report import report_markdown
from sae_refusal.eval.table import results_table
from sae_refusal.steer.sets import EXTERNAL_SETS, EvalSetConfig, SetsConfig, build_steer_sets
from tests.test_steer_sets import config, write_data


def write_redteam(path: Path, n: int = 12) -> Path:
    rows = [f"attack prompt {i},{'en' if i % 3 else 'fr'},{i % 2}" for i in range(n)]
    path.write_text("prompt,language,adversarial\n" + "\n".join(rows) + "\n")
    return path


def test_a_users_csv_is_a_set_with_its_role_and_every_row_in_test(tmp_path: Path) -> None:
    write_data(tmp_path)
    csv = write_redteam(tmp_path / "redteam.csv")
    entry = {"name": "redteam", "role": "harmful", "path": str(csv), "tag_columns": ["language"]}
    sets = build_steer_sets(config(tmp_path, external=["or_bench_hard", entry]))
    test = sets.get("test", "redteam")
    assert [p.text for p in test] == [f"attack prompt {i}" for i in range(12)]
    assert sets.get("train", "redteam") == [] and sets.get("val", "redteam") == []
    assert sets.roles["redteam"] == "harmful" and sets.names("harmful") == ["coconot", "redteam"]
    # a harmful set without a category counts as "safety concerns", never as benign
    assert {p.label for p in test} == {Label.HARMFUL}
    assert {p.category for p in test} == {"Requests with safety concerns"}
    assert [p.tag_dict["language"] for p in test[:3]] == ["fr", "en", "en"]
    origin = sets.manifest()["test"]["redteam"]["origin"]
    assert origin["path"] == str(csv) and origin["eval_only"] is True


def test_a_split_users_set_gives_disjoint_train_val_test(tmp_path: Path) -> None:
    write_data(tmp_path)
    csv = write_redteam(tmp_path / "redteam.csv", n=40)
    entry = EvalSetConfig(name="redteam", role="over_refusal", path=str(csv), eval_only=False)
    sets = build_steer_sets(config(tmp_path, external=[entry]))
    ids = [{p.id for p in sets.get(s, "redteam")} for s in ("train", "val", "test")]
    assert sum(map(len, ids)) == 40 and len(set().union(*ids)) == 40
    assert len(ids[2]) == 20 and len(ids[1]) == 8  # test 0.5, val 0.2 of 40 (external_split)
    assert {p.label for p in sets.get("test", "redteam")} == {Label.AMBIGUOUS}


def test_the_default_sets_are_entries_of_the_same_mechanism(tmp_path: Path) -> None:
    write_data(tmp_path)
    by_name = build_steer_sets(config(tmp_path, external=["or_bench_hard"]))
    entry = {"name": "or_bench_hard", "role": "over_refusal", "preset": "or_bench_hard", "eval_only": False}
    by_entry = build_steer_sets(config(tmp_path, external=[entry]))
    assert by_name.manifest() == by_entry.manifest()
    assert EXTERNAL_SETS["or_bench_hard"].preset == "or_bench_hard"
    # a preset entry may add tag columns without changing which prompts it holds
    tagged = build_steer_sets(config(tmp_path, external=[{**entry, "tag_columns": ["category"]}]))
    assert [p.id for p in tagged.get("test", "or_bench_hard")] == [
        p.id for p in by_name.get("test", "or_bench_hard")
    ]
    assert {p.tag_dict["category"] for p in tagged.get("test", "or_bench_hard")} == {"deception"}


def test_a_hub_dataset_is_a_set_the_same_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls: list[tuple[Any, ...]] = []

    def fake_load_dataset(hub_id: str, config_name: str | None = None, *, split: str) -> Any:
        calls.append((hub_id, config_name, split))
        return datasets.Dataset.from_list(
            [{"question": f"hub prompt {i}", "lang": "de" if i % 2 else "en"} for i in range(6)]
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    write_data(tmp_path)
    entry = {
        "name": "hubset",
        "role": "over_refusal",
        "hub_id": "someone/benchmark",
        "hub_config": "v2",
        "hub_split": "test",
        "text_column": "question",
        "tag_columns": ["lang"],
    }
    sets = build_steer_sets(config(tmp_path, external=[entry]))
    assert calls == [("someone/benchmark", "v2", "test")]
    assert [p.text for p in sets.get("test", "hubset")] == [f"hub prompt {i}" for i in range(6)]
    assert sets.manifest()["test"]["hubset"]["origin"]["hub_id"] == "someone/benchmark"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "mine", "role": "harmful", "path": "nowhere.csv"}, r"sets\.external\[0\] \('mine'\).*path"),
        ({"name": "mine", "role": "harmful", "path": "CSV", "text_column": "text"}, r"'mine'.*text_column"),
        ({"name": "mine", "role": "hostile", "path": "CSV"}, r"sets\.external\[0\]: set 'mine': role"),
        (
            {"name": "mine", "role": "harmful", "path": "CSV", "where": {"language": "de"}},
            r"'mine'.*zero rows",
        ),
        ({"name": "mine", "role": "harmful", "path": "CSV", "hub_id": "a/b"}, r"'mine'.*exactly one of"),
        ({"name": "mine", "role": "harmful", "path": "CSV", "colour": "red"}, r"sets\.external\[0\].*colour"),
        ({"role": "harmful", "path": "CSV"}, r"sets\.external\[0\].*name"),
        ({"name": "mine", "role": "benign", "preset": "or_bench_hardd"}, r"'mine'.*preset"),
        ({"name": "coconot", "role": "harmful", "path": "CSV"}, r"sets\.external\[0\].*'coconot'"),
        ({"name": "mine", "role": "harmful", "path": "CSV", "tag_columns": ["lang"]}, r"'mine'.*tag_columns"),
        ("imaginary", r"sets\.external\[0\]: unknown set 'imaginary'"),
    ],
)
def test_every_bad_set_is_one_line_naming_the_set_and_key(tmp_path: Path, entry: Any, message: str) -> None:
    write_data(tmp_path)
    csv = write_redteam(tmp_path / "redteam.csv")
    if isinstance(entry, dict):
        entry = {k: (str(csv) if v == "CSV" else v) for k, v in entry.items()}
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        build_steer_sets(config(tmp_path, external=[entry]))
    text = str(info.value)
    assert "\n" not in text
    assert pytest.importorskip("re").search(message, text), text


def test_repeated_set_names_are_refused(tmp_path: Path) -> None:
    csv = write_redteam(tmp_path / "redteam.csv")
    entry = {"name": "mine", "role": "harmful", "path": str(csv)}
    with pytest.raises(ValueError, match=r"sets\.external: .*repeated: \['mine'\]"):
        SetsConfig(model_prompts=None, model_split=None, external=[entry, entry])  # type: ignore[arg-type]


def _record(i: int, tags: dict[str, str], refused: bool) -> ItemRecord:
    verdict = "refused" if refused else "complied"
    return ItemRecord(
        id=f"redteam:{i}",
        set="redteam",
        role="harmful",
        category=None,
        intervention="unsteered",
        prompt="p",
        output="o",
        first_token=None,
        judges={"phrase": {"verdict": verdict, "detail": None}},
        tags=tags,
    )


def test_slices_give_refusal_per_tag_value_with_a_ci() -> None:
    records = [_record(i, {"language": "en"}, refused=i < 6) for i in range(8)]
    records += [_record(8 + i, {"language": "fr"}, refused=i == 0) for i in range(4)]
    records.append(_record(12, {}, refused=True))
    summary = summarise(records, "phrase", n_boot=200, seed=0)
    rows = summary["slices"]["redteam"]["language"]
    assert set(rows) == {"en", "fr", "(missing)"}
    assert rows["en"]["value"] == pytest.approx(6 / 8) and rows["en"]["n"] == 8
    assert rows["fr"]["value"] == pytest.approx(1 / 4) and rows["fr"]["n"] == 4
    assert rows["(missing)"]["n"] == 1
    assert rows["en"]["low"] <= rows["en"]["value"] <= rows["en"]["high"] and rows["en"]["low"] < 0.75
    assert summary["sets"]["redteam"]["value"] == pytest.approx(8 / 13)
    metrics = {
        "refusal": summary,
        "intervention": {"name": "unsteered", "config": {}},
        "judges": {"names": ["phrase"], "primary": "phrase"},
        "model": {"llm": {"name_or_path": "m"}, "fingerprint": {}},
        "sets": {"redteam": {"ids_sha256": "x"}},
    }
    report = report_markdown(metrics)
    assert "## Slices" in report and "| redteam (harmful) | language | fr | 0.250" in report
    table = results_table([metrics, json.loads(json.dumps(metrics))], labels=["a", "b"])
    assert "redteam / language=fr" in table and "redteam / language=en | 0.750" in table


def test_prompts_round_trip_their_tags(tmp_path: Path) -> None:
    from sae_refusal.data.prompt_set import Prompt, PromptSet

    prompt = Prompt(id="a:0", text="t", label=Label.BENIGN, tags=(("language", "fr"),))
    plain = Prompt(id="a:1", text="u", label=Label.BENIGN)
    PromptSet([prompt, plain]).to_jsonl(tmp_path / "p.jsonl")
    back = PromptSet.from_jsonl(tmp_path / "p.jsonl")
    assert list(back) == [prompt, plain]
    assert "tags" not in plain.to_json()  # files of untagged prompts are unchanged
    assert PromptSet([prompt]).content_hash() == PromptSet([Prompt("a:0", "t", Label.BENIGN)]).content_hash()
    assert back[0].tag_dict == {"language": "fr"}
