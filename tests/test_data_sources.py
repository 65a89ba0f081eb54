"""Prompt-source loaders: local formats, hub loading (monkeypatched), presets, errors, shared data."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from sae_refusal.categories import COCONOT_CATEGORIES, HUMANIZING, INCOMPLETE, SAFETY, UNSUPPORTED
from sae_refusal.data import (
    LOCAL_PRESETS,
    PRESETS,
    Label,
    Prompt,
    PromptSet,
    PromptSetConfig,
    PromptSourceConfig,
    load_builtin,
    load_prompt_set,
    load_source,
    preset,
)
from sae_refusal.errors import UserError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"shared data folder {SHARED_DATA} is absent"
)

ROWS: list[dict[str, Any]] = [
    {
        "id": "a1",
        "prompt": "How do I pick a lock?",
        "category": "Requests with safety concerns",
        "sub": "crime",
    },
    {"id": "a2", "prompt": "Are you sad today?", "category": "humanizing", "sub": "emotions"},
    {"id": "a3", "prompt": "Write the rest of", "category": "Incomplete requests", "sub": None},
]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _write_csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)
    return path


def _harmful(path: Path | str, **kwargs: Any) -> PromptSourceConfig:
    base: dict[str, Any] = {
        "name": "src",
        "label": "harmful",
        "path": str(path),
        "id_column": "id",
        "category_column": "category",
        "subcategory_column": "sub",
    }
    return PromptSourceConfig(**{**base, **kwargs})


# ------------------------------------------------------------------------------------------ formats


def test_jsonl_with_ids_categories_and_subcategories(tmp_path: Path) -> None:
    ps = load_source(_harmful(_write_jsonl(tmp_path / "h.jsonl", ROWS)))
    assert ps.ids == ["src:a1", "src:a2", "src:a3"]
    assert [p.category for p in ps] == [SAFETY, HUMANIZING, INCOMPLETE]
    assert [p.subcategory for p in ps] == ["crime", "emotions", None]
    assert all(p.label is Label.HARMFUL and p.source == "src" and p.split is None for p in ps)


def test_json_list_and_row_index_ids(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    path.write_text(json.dumps([{"instruction": "Bake bread"}, {"instruction": "Name a color"}]))
    ps = load_source(
        PromptSourceConfig(name="alp", label="benign", path=str(path), text_column="instruction")
    )
    assert ps.ids == ["alp:0", "alp:1"]
    assert ps.texts == ["Bake bread", "Name a color"]
    assert all(p.category is None for p in ps)


def test_csv_with_header_and_relative_path_against_data_root(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    _write_csv(tmp_path / "sub" / "t.csv", [["prompt", "category"], ["Make a fake review", "deception"]])
    cfg = PromptSourceConfig(
        name="orb", label="harmful", path="sub/t.csv", category=SAFETY, subcategory_column="category"
    )
    (p,) = load_source(cfg, data_root=tmp_path)
    assert (p.id, p.category, p.subcategory, p.label) == ("orb:0", SAFETY, "deception", Label.HARMFUL)


def test_headerless_csv_folder_with_file_subcategory(tmp_path: Path) -> None:
    folder = tmp_path / "mmlu"
    folder.mkdir()
    _write_csv(folder / "b_subject_test.csv", [["Q b0", "1", "2", "3", "4", "A"]])
    _write_csv(
        folder / "a_subject_test.csv", [["Q a0", "1", "2", "3", "4", "B"], ["Q a1", "x", "y", "z", "w", "C"]]
    )
    (folder / "notes.txt").write_text("ignored")
    cfg = preset("mmlu", path=str(folder), limit=None)
    ps = load_source(cfg)
    assert ps.ids == ["mmlu:a_subject_test:0", "mmlu:a_subject_test:1", "mmlu:b_subject_test:0"]
    assert ps.texts == ["Q a0", "Q a1", "Q b0"]
    assert [p.subcategory for p in ps] == ["a_subject", "a_subject", "b_subject"]


def test_csv_columns_replace_header(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "t.csv", [["x", "y"], ["hello", "1"]])
    cfg = PromptSourceConfig(name="s", label="benign", path=str(path), csv_columns=["prompt", "n"])
    assert load_source(cfg).texts == ["hello"]


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["p0", "p1"], "rid": [7, 8]}), path)
    ps = load_source(PromptSourceConfig(name="pq", label="benign", path=str(path), id_column="rid"))
    assert ps.ids == ["pq:7", "pq:8"]
    assert ps.texts == ["p0", "p1"]


def test_nested_response_column(tmp_path: Path) -> None:
    rows = [
        {
            "prompt": "Hi there",
            "prompt_id": "x",
            "messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}],
        },
        {"prompt": "Only user", "prompt_id": "y", "messages": [{"role": "user", "content": "Only user"}]},
    ]
    path = tmp_path / "u.json"
    path.write_text(json.dumps(rows))
    ps = load_source(preset("ultrachat", path=str(path)))
    assert ps.ids == ["ultrachat:x", "ultrachat:y"]
    assert [p.response for p in ps] == ["Hello!", None]


def test_folder_of_mixed_files_sorted(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "b.jsonl", [{"prompt": "from b"}])
    _write_csv(tmp_path / "a.csv", [["prompt"], ["from a"]])
    ps = load_source(PromptSourceConfig(name="f", label="benign", path=str(tmp_path)))
    assert ps.texts == ["from a", "from b"]
    assert ps.ids == ["f:a:0", "f:b:0"]


# ------------------------------------------------------------------------------------------ filters


def test_category_map_fixed_category_and_benign_none(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "w.jsonl", [{"prompt": "p0", "c": "cyber"}, {"prompt": "p1", "c": "toxic"}]
    )
    mapped = PromptSourceConfig(
        name="w",
        label="harmful",
        path=str(path),
        category_column="c",
        category_map={"cyber": "safety", "toxic": "Unsupported requests"},
    )
    assert [p.category for p in load_source(mapped)] == [SAFETY, UNSUPPORTED]
    fixed = PromptSourceConfig(name="w", label="ambiguous", path=str(path), category="incomplete")
    assert {p.category for p in load_source(fixed)} == {INCOMPLETE}
    benign = PromptSourceConfig(name="w", label="benign", path=str(path))
    assert {p.category for p in load_source(benign)} == {None}


def test_categories_filter_where_and_limit(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "h.jsonl", ROWS)
    ps = load_source(_harmful(path, categories=["safety", "Incomplete requests"]))
    assert ps.ids == ["src:a1", "src:a3"]
    assert load_source(_harmful(path, where={"sub": "emotions"})).ids == ["src:a2"]
    limited = load_source(_harmful(path, categories=["incomplete", "humanizing"], limit=1))
    assert limited.ids == ["src:a2"]  # ids keep the file row id after filtering


def test_hub_loading_monkeypatched(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    calls: list[tuple[Any, ...]] = []

    def fake_load_dataset(hub_id: str, config: str | None, split: str) -> Any:
        calls.append((hub_id, config, split))
        return datasets.Dataset.from_list(
            [
                {
                    "id": "h1",
                    "category": "Humanizing requests",
                    "subcategory": "s",
                    "prompt": "Do you love me?",
                },
                {"id": "h2", "category": "Unsupported requests", "subcategory": "t", "prompt": "Draw a cat"},
            ]
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ps = load_source(preset("coconot"))
    assert calls == [("allenai/coconot", "original", "test")]
    assert ps.ids == ["coconot:h1", "coconot:h2"]
    assert [p.category for p in ps] == [HUMANIZING, UNSUPPORTED]


def test_hub_where_filter_monkeypatched(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    rows = [
        {"prompt": "bad", "prompt_harm_label": "harmful", "subcategory": "cyberattack"},
        {"prompt": "fine", "prompt_harm_label": "unharmful", "subcategory": "benign"},
    ]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: rows)  # a plain list of rows works too
    harmful = load_source(preset("wildguardtest_harmful"))
    assert (harmful.texts, harmful[0].subcategory, harmful[0].category) == (["bad"], "cyberattack", SAFETY)
    assert harmful.ids == ["wildguardtest_harmful:0"]
    assert load_source(preset("wildguardtest_unharmful")).ids == ["wildguardtest_unharmful:1"]


def test_hub_failure_names_hub_id(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("no network\nsecond line of the library's explanation")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match=r"allenai/coconot.*ConnectionError: no network\).*data_root") as err:
        load_source(preset("coconot"))
    # one line, and no chained traceback under it (the CLI prints it as `sae-refusal: error: ...`)
    assert "\n" not in str(err.value) and err.value.__cause__ is None and err.value.__suppress_context__


def test_an_empty_file_says_it_has_no_rows(tmp_path: Path) -> None:
    for name in ("empty.jsonl", "empty.json", "empty.csv"):
        (tmp_path / name).write_text("[]" if name.endswith(".json") else "id,prompt\n" * name.endswith("csv"))
        cfg = PromptSourceConfig(name="mine", label="benign", path=str(tmp_path / name))
        with pytest.raises(ValueError, match=rf"source 'mine': .*{name} has no rows"):
            load_source(cfg)


# ------------------------------------------------------------------------------------------ errors


def test_missing_file_names_path_key(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"`path` not found: .*nope\.jsonl"):
        load_source(PromptSourceConfig(name="s", label="benign", path=str(tmp_path / "nope.jsonl")))


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"`path` folder .* has no"):
        load_source(PromptSourceConfig(name="s", label="benign", path=str(tmp_path)))


@pytest.mark.parametrize(
    ("key", "column"),
    [
        ("text_column", "question"),
        ("id_column", "uid"),
        ("category_column", "cat"),
        ("subcategory_column", "subcat"),
        ("response_column", "answer.0"),
    ],
)
def test_unknown_column_names_key_file_and_columns(tmp_path: Path, key: str, column: str) -> None:
    path = _write_jsonl(tmp_path / "h.jsonl", ROWS)
    kwargs: dict[str, Any] = {"name": "s", "label": "harmful", "path": str(path), key: column}
    cfg = PromptSourceConfig(**kwargs)
    with pytest.raises(
        ValueError, match=rf"`{key}` column '{column}' not found in .*h\.jsonl.*available.*'prompt'"
    ):
        load_source(cfg)


def test_unknown_where_column(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "h.jsonl", ROWS)
    with pytest.raises(ValueError, match=r"`where\['nope'\]` column 'nope' not found"):
        load_source(_harmful(path, where={"nope": "x"}))


def test_empty_text_names_file_and_row(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "h.jsonl", [{"prompt": "ok"}, {"prompt": "  "}])
    with pytest.raises(ValueError, match=r"empty text in .*h\.jsonl row 1 \(`text_column` 'prompt'\)"):
        load_source(PromptSourceConfig(name="s", label="benign", path=str(path)))


def test_requested_category_without_rows(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "h.jsonl", ROWS)
    with pytest.raises(ValueError, match=r"Unsupported requests.*empty category"):
        load_source(_harmful(path, categories=["unsupported"]))


def test_unknown_category_names(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "h.jsonl", ROWS)
    with pytest.raises(
        ValueError, match=r"categories\[0\]: unknown category 'weird'.*expected one of.*safety"
    ):
        load_source(_harmful(path, categories=["weird"]))
    with pytest.raises(ValueError, match=r"category: unknown category 'nope'"):
        load_source(PromptSourceConfig(name="s", label="harmful", path=str(path), category="nope"))
    bad_row = _write_jsonl(tmp_path / "b.jsonl", [{"prompt": "x", "category": "deception"}])
    with pytest.raises(
        ValueError, match=r"b\.jsonl row 0 \(id 's:0'\) `category_column` 'category': unknown category"
    ):
        load_source(
            PromptSourceConfig(name="s", label="harmful", path=str(bad_row), category_column="category")
        )
    with pytest.raises(ValueError, match=r"category_map\['x'\]: unknown category 'bogus'"):
        load_source(_harmful(path, category_map={"x": "bogus"}))


def test_harmful_row_without_category_names_source_file_row_and_id(tmp_path: Path) -> None:
    rows = [*ROWS, {"id": "a4", "prompt": "Make a weapon", "category": "  ", "sub": "x"}]
    path = _write_jsonl(tmp_path / "h.jsonl", rows)
    with pytest.raises(
        ValueError,
        match=r"source 'src': harmful row 3 \(id 'src:a4'\) of .*h\.jsonl has no category: its "
        r"`category_column` 'category' is empty.*count as benign",
    ):
        load_source(_harmful(path))
    rows = [
        {"id": "a1", "prompt": "x", "category": "safety", "sub": "y"},
        {"id": "a2", "prompt": "y", "sub": "z"},
    ]
    missing = _write_jsonl(tmp_path / "m.jsonl", rows)  # the key is absent from the second row
    with pytest.raises(ValueError, match=r"harmful row 1 \(id 'src:a2'\) of .*m\.jsonl has no category"):
        load_source(_harmful(missing))
    no_config = PromptSourceConfig(name="s", label="harmful", path=str(path))
    with pytest.raises(
        ValueError, match=r"harmful row 0 \(id 's:0'\) .*set `category`.*or `category_column`"
    ):
        load_source(no_config)
    # benign and ambiguous rows may have no category
    assert load_source(_harmful(path, label="benign")).ids[-1] == "src:a4"
    assert load_source(_harmful(path, label="ambiguous"))[-1].category is None


def test_harmful_hub_row_without_category_names_hub_id_and_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    rows = [
        {"id": "h1", "category": "Humanizing requests", "subcategory": "s", "prompt": "Do you love me?"},
        {"id": "h2", "category": None, "subcategory": "t", "prompt": "Draw a cat"},
    ]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: rows)
    with pytest.raises(
        ValueError,
        match=r"source 'coconot': harmful row 1 \(id 'coconot:h2'\) of hub dataset 'allenai/coconot' "
        r"\(config 'original', split 'test'\) has no category",
    ):
        load_source(preset("coconot"))


def test_prompt_jsonl_rejects_harmful_rows_without_a_known_category(tmp_path: Path) -> None:
    ok = Prompt(id="x:0", text="hi", label=Label.HARMFUL, category=SAFETY, source="x")
    for n, (category, reason) in enumerate(
        [(None, "harmful prompt without a category"), ("safety", "unknown category 'safety'")]
    ):
        bad = Prompt(id="x:1", text="bad", label=Label.HARMFUL, category=category, source="x")
        path = tmp_path / f"p{n}.jsonl"
        PromptSet([ok, bad]).to_jsonl(path)
        with pytest.raises(ValueError, match=rf"p{n}\.jsonl:2: prompt 'x:1': {reason}"):
            PromptSet.from_jsonl(path)
        with pytest.raises(ValueError, match=rf"here: 1 prompts .* row 1 id 'x:1' \(source 'x'\): {reason}"):
            PromptSet([ok, bad]).check_categories("here")
    PromptSet([ok, Prompt(id="b", text="b", label=Label.BENIGN)]).check_categories()


def test_dotted_path_that_resolves_in_no_row_names_key_and_what_is_there(tmp_path: Path) -> None:
    rows = [
        {
            "prompt": "Hi",
            "prompt_id": "x",
            "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}],
        },
        {"prompt": "Yo", "prompt_id": "y", "messages": [{"role": "user", "content": "Yo"}]},
    ]
    path = tmp_path / "u.json"
    path.write_text(json.dumps(rows))
    present_but_none = load_source(preset("ultrachat", path=str(path)))
    assert [p.response for p in present_but_none] == [None, None]
    with pytest.raises(
        ValueError,
        match=r"source 'ultrachat': `response_column` path 'messages\.1\.contnet' resolves in no row of "
        r".*u\.json \(e\.g\. row 0: 'messages\.1' has keys \['content', 'role'\], no 'contnet'\); "
        r"available columns: \['prompt', 'prompt_id', 'messages', '_file'\]",
    ):
        load_source(preset("ultrachat", path=str(path), response_column="messages.1.contnet"))
    with pytest.raises(ValueError, match=r"'messages' is a list of 2 items, no index '5'"):
        load_source(preset("ultrachat", path=str(path), response_column="messages.5.content"))
    with pytest.raises(ValueError, match=r"`text_column` path 'prompt_id\.0'.*'prompt_id' is a str"):
        load_source(preset("ultrachat", path=str(path), text_column="prompt_id.0"))


def test_csv_cut_inside_a_quoted_last_field_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text('prompt,category\n"fine, quoted",a\n"second\nline",b\nlast,"cut inside the quote\nmore')
    cfg = PromptSourceConfig(name="s", label="benign", path=str(path))
    with pytest.raises(
        ValueError, match=r"source 's': .*t\.csv:5: a quoted field .* not closed .*end of the file"
    ):
        load_source(cfg)
    path.write_text(path.read_text() + '"\n')  # close the quote: four complete rows load
    assert load_source(cfg).texts == ["fine, quoted", "second\nline", "last"]
    odd = _write_csv(tmp_path / "o.csv", [["prompt"], ["ok"]])
    odd.write_text(odd.read_text() + '"a"b\n')
    with pytest.raises(ValueError, match=r"o\.csv:3: malformed CSV"):
        load_source(PromptSourceConfig(name="s", label="benign", path=str(odd)))


@pytest.mark.parametrize("both", [True, False])
def test_exactly_one_of_path_and_hub_id(both: bool) -> None:
    kwargs: dict[str, Any] = {"path": "a.jsonl", "hub_id": "org/ds"} if both else {}
    with pytest.raises(ValueError, match=r"exactly one of `path` and `hub_id`"):
        PromptSourceConfig(name="s", label="benign", **kwargs)


def test_unknown_label() -> None:
    with pytest.raises(
        ValueError, match=r"label: unknown label 'evil'; expected one of harmful, benign, ambiguous"
    ):
        PromptSourceConfig(name="s", label="evil", path="a.jsonl")


def test_other_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="csv_header: false` needs `csv_columns`"):
        PromptSourceConfig(name="s", label="benign", path="a.csv", csv_header=False)
    with pytest.raises(ValueError, match="`category` or `category_column`"):
        PromptSourceConfig(name="s", label="benign", path="a.csv", category="safety", category_column="c")
    path = _write_csv(tmp_path / "t.csv", [["a", "b"], ["1"]])
    with pytest.raises(ValueError, match=r"t\.csv row 0 \(line 2\) has 1 fields, expected 2"):
        load_source(PromptSourceConfig(name="s", label="benign", path=str(path), text_column="a"))
    dup = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x", "id": 1}, {"prompt": "y", "id": 1}])
    with pytest.raises(ValueError, match=r"duplicate id 's:1'.*`id_column`"):
        load_source(PromptSourceConfig(name="s", label="benign", path=str(dup), id_column="id"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        load_source(PromptSourceConfig(name="s", label="benign", path=str(bad)))


# ------------------------------------------------------------------------------------------ presets


def test_preset_variants_and_overrides() -> None:
    assert set(PRESETS) == set(LOCAL_PRESETS)
    hub = preset("coconot")
    assert (hub.hub_id, hub.hub_config, hub.hub_split, hub.path) == (
        "allenai/coconot",
        "original",
        "test",
        None,
    )
    local = preset("coconot", local=True, limit=5)
    assert (local.path, local.hub_id, local.limit) == ("coconot/coconot_eval.jsonl", None, 5)
    assert PRESETS["coconot"].limit is None  # presets are copied, never mutated
    own = preset("or_bench_toxic", path="/x/toxic.csv")
    assert (own.path, own.hub_id, own.category, own.subcategory_column) == (
        "/x/toxic.csv",
        None,
        SAFETY,
        "category",
    )
    switched = preset("gsm8k", local=True, hub_id="my/gsm8k")
    assert (switched.path, switched.hub_id) == (None, "my/gsm8k")
    with pytest.raises(ValueError, match=r"unknown preset 'nope'; expected one of .*coconot"):
        preset("nope")
    with pytest.raises(ValueError, match=r"unknown config keys \['colour'\]"):
        preset("coconot", colour="red")


def test_prompt_set_config_concatenates_sources(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "h.jsonl", ROWS)
    _write_jsonl(tmp_path / "b.jsonl", [{"prompt": "Bake bread"}])
    cfg = PromptSetConfig(
        sources=[
            _harmful("h.jsonl"),
            PromptSourceConfig(name="ben", label="benign", path="b.jsonl"),
        ],
        data_root=str(tmp_path),
    )
    ps = load_prompt_set(cfg)
    assert ps.ids == ["src:a1", "src:a2", "src:a3", "ben:0"]
    with pytest.raises(ValueError, match=r"source names must be unique.*\['src'\]"):
        load_prompt_set(
            PromptSetConfig(sources=[_harmful("h.jsonl"), _harmful("h.jsonl")], data_root=str(tmp_path))
        )
    with pytest.raises(ValueError, match="at least one entry in `sources` or `presets`"):
        load_prompt_set(PromptSetConfig())


def test_prompt_set_config_presets_use_local_files_with_data_root(tmp_path: Path) -> None:
    (tmp_path / "gsm8k").mkdir()
    _write_jsonl(tmp_path / "gsm8k" / "test.jsonl", [{"question": "1+1?", "answer": "#### 2"}])
    ps = load_prompt_set(PromptSetConfig(presets=["gsm8k"], data_root=str(tmp_path)))
    assert (ps.ids, ps[0].response) == (["gsm8k:0"], "#### 2")
    hub_cfg = PromptSetConfig(presets=["gsm8k"]).resolved_sources()[0]
    assert (hub_cfg.hub_id, hub_cfg.path) == ("openai/gsm8k", None)


def test_jsonargparse_parses_prompt_set_config(tmp_path: Path) -> None:
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--data", type=PromptSetConfig)
    value = {
        "presets": ["coconot"],
        "data_root": str(tmp_path),
        "sources": [{"name": "x", "label": "benign", "path": "a.jsonl", "where": {"k": "v"}}],
    }
    parsed = parser.instantiate(parser.parse_args(["--data", json.dumps(value)]))
    assert isinstance(parsed.data, PromptSetConfig)
    assert isinstance(parsed.data.sources[0], PromptSourceConfig)
    assert parsed.data.sources[0].where == {"k": "v"}


# ------------------------------------------------------------------------------------------ builtin


def test_builtin_prompt_set() -> None:
    try:
        ps = load_builtin()
    except FileNotFoundError:
        pytest.skip("data/builtin/default_prompts.jsonl is not written yet")
    assert len(ps) > 0
    assert {p.label for p in ps} >= {Label.HARMFUL, Label.BENIGN}
    harmful_categories = {p.category for p in ps if p.label is Label.HARMFUL}
    assert harmful_categories <= set(COCONOT_CATEGORIES)


def test_prompt_set_jsonl_round_trip_matches_builtin_schema(tmp_path: Path) -> None:
    ps = PromptSet([Prompt(id="x:0", text="hi", label=Label.BENIGN, source="x")])
    ps.to_jsonl(tmp_path / "p.jsonl")
    assert PromptSet.from_jsonl(tmp_path / "p.jsonl").content_hash() == ps.content_hash()


# ------------------------------------------------------------------------------------------ shared data

EXPECTED_ROWS = {
    "coconot": 1001,
    "coconot_contrast": 379,
    "coconot_pref": 927,
    "alpaca_train": 18793,
    "alpaca_val": 6264,
    "alpaca_test": 6266,
    "ultrachat": 20,
    "mmlu": 14079,
    "gsm8k": 1319,
    "truthfulqa": 817,
    "or_bench_hard": 1319,
    "or_bench_toxic": 655,
    "wildguardtest_harmful": 754,
    "wildguardtest_unharmful": 945,
}


def test_expected_rows_cover_every_preset() -> None:
    assert set(EXPECTED_ROWS) == set(PRESETS)


@pytest.mark.shared_data
@needs_shared
@pytest.mark.parametrize("name", sorted(EXPECTED_ROWS))
def test_every_preset_loads_from_shared_data(name: str) -> None:
    ps = load_source(preset(name, local=True), data_root=SHARED_DATA)
    assert len(ps) == EXPECTED_ROWS[name]
    assert all(p.source == name and p.id.startswith(f"{name}:") for p in ps)
    label = PRESETS[name].parsed_label
    assert {p.label for p in ps} == {label}
    if label is Label.BENIGN:
        assert {p.category for p in ps} == {None}
    else:
        assert {p.category for p in ps} <= set(COCONOT_CATEGORIES)


@pytest.mark.shared_data
@needs_shared
def test_shared_coconot_category_counts() -> None:
    ps = load_source(preset("coconot", local=True), data_root=SHARED_DATA)
    counts = {c: sum(p.category == c for p in ps) for c in COCONOT_CATEGORIES}
    assert counts == {
        "Requests with safety concerns": 395,
        "Incomplete requests": 225,
        "Unsupported requests": 157,
        "Indeterminate requests": 142,
        "Humanizing requests": 82,
    }
    assert len({p.subcategory for p in ps}) == 17
    humanizing = load_source(preset("coconot", local=True, categories=["humanizing"]), data_root=SHARED_DATA)
    assert len(humanizing) == 82


@pytest.mark.shared_data
@needs_shared
def test_shared_details() -> None:
    mmlu = load_source(preset("mmlu", local=True), data_root=SHARED_DATA)
    assert len({p.subcategory for p in mmlu}) == 57
    assert "abstract_algebra" in {p.subcategory for p in mmlu}
    ultrachat = load_source(preset("ultrachat", local=True), data_root=SHARED_DATA)
    assert all(p.response for p in ultrachat)
    pref = load_source(preset("coconot_pref", local=True), data_root=SHARED_DATA)
    assert all(p.response for p in pref)
    toxic = load_source(preset("or_bench_toxic", local=True), data_root=SHARED_DATA)
    assert len({p.subcategory for p in toxic}) == 10
    assert {p.category for p in toxic} == {SAFETY}


def test_strip_quotes_removes_one_wrapping_pair_only(tmp_path: Path) -> None:
    rows = [
        {"prompt": '"What did you dream about last night?"'},
        {"prompt": 'He said "hi" to me. Why?'},
        {"prompt": '  "Nested "quotes" stay."  '},
    ]
    path = _write_jsonl(tmp_path / "q.jsonl", rows)
    kept = load_source(PromptSourceConfig(name="q", label="benign", path=str(path)))
    assert kept.texts[0] == '"What did you dream about last night?"'
    stripped = load_source(PromptSourceConfig(name="q", label="benign", path=str(path), strip_quotes=True))
    assert stripped.texts == [
        "What did you dream about last night?",
        'He said "hi" to me. Why?',
        'Nested "quotes" stay.',
    ]
    empty = _write_jsonl(tmp_path / "e.jsonl", [{"prompt": "ok"}, {"prompt": '""'}])
    with pytest.raises(ValueError, match=r"source 'e': empty text in .* row 1"):
        load_source(PromptSourceConfig(name="e", label="benign", path=str(empty), strip_quotes=True))


@pytest.mark.shared_data
@needs_shared
def test_coconot_preset_drops_the_humanizing_quote_cue() -> None:
    ps = load_source(preset("coconot", local=True), data_root=SHARED_DATA)
    assert not any(p.text.startswith('"') for p in ps if p.category == "Humanizing requests")
    raw = load_source(preset("coconot", local=True, strip_quotes=False), data_root=SHARED_DATA)
    quoted = [p for p in raw if p.text.startswith('"')]
    assert len(quoted) >= 82 and {p.category for p in quoted} >= {"Humanizing requests"}
