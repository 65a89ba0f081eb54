"""The steering study's prompt sets: the fine-tuning split reproduced, external splits, caps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sae_refusal.data.sources import PromptSetConfig, PromptSourceConfig, load_prompt_set
from sae_refusal.data.splits import SplitConfig, split_prompt_set
from sae_refusal.steer.sets import SetsConfig, build_steer_sets

CATEGORIES = ["Requests with safety concerns", "Humanizing requests"]


def write_data(root: Path) -> None:
    (root / "coconot").mkdir(parents=True)
    (root / "or_bench").mkdir()
    (root / "benign").mkdir()
    harmful = [
        {"id": f"h{i}", "prompt": f"harmful request {i}", "category": CATEGORIES[i % 2], "subcategory": "x"}
        for i in range(40)
    ]
    (root / "coconot" / "coconot_eval.jsonl").write_text("\n".join(json.dumps(r) for r in harmful) + "\n")
    contrast = [dict(r, id=f"c{i}", prompt=f"contrast {i}") for i, r in enumerate(harmful)]
    (root / "coconot" / "coconot_contrast_eval.jsonl").write_text("\n".join(json.dumps(r) for r in contrast))
    (root / "benign" / "alpaca_harmless_train.json").write_text(
        json.dumps([{"instruction": f"benign task {i}"} for i in range(50)])
    )
    rows = "\n".join(f"lookalike prompt {i},deception" for i in range(30))
    (root / "or_bench" / "or-bench-hard-1k.csv").write_text("prompt,category\n" + rows + "\n")


def config(root: Path, **overrides: object) -> SetsConfig:
    prompts = PromptSetConfig(
        sources=[
            PromptSourceConfig(
                name="coconot",
                label="harmful",
                path="coconot/coconot_eval.jsonl",
                id_column="id",
                category_column="category",
            ),
            PromptSourceConfig(
                name="alpaca",
                label="benign",
                path="benign/alpaca_harmless_train.json",
                text_column="instruction",
            ),
        ],
        data_root=str(root),
    )
    split = SplitConfig(test_fraction=0.2, val_fraction=0.1, seed=0)
    base: dict[str, object] = dict(
        model_prompts=prompts,
        model_split=split,
        external=["coconot_contrast", "or_bench_hard"],
        data_root=str(root),
        manifest_root=str(root / "splits"),
    )
    base.update(overrides)
    return SetsConfig(**base)  # type: ignore[arg-type]


def test_the_model_sources_keep_the_fine_tuning_split(tmp_path: Path) -> None:
    write_data(tmp_path)
    cfg = config(tmp_path)
    sets = build_steer_sets(cfg)
    reference = split_prompt_set(
        load_prompt_set(cfg.model_prompts), cfg.model_split, None, tmp_path / "other"
    )
    for split in ("train", "val", "test"):
        expected = sorted(p.id for p in reference if p.split == split and p.source == "coconot")
        assert sorted(p.id for p in sets.get(split, "coconot")) == expected
    assert sets.roles == {
        "coconot": "harmful",
        "alpaca": "benign",
        "coconot_contrast": "over_refusal",
        "or_bench_hard": "over_refusal",
    }
    assert sets.names("over_refusal") == ["coconot_contrast", "or_bench_hard"]


def test_external_splits_are_disjoint_and_cover_the_set(tmp_path: Path) -> None:
    write_data(tmp_path)
    sets = build_steer_sets(config(tmp_path))
    ids = [{p.id for p in sets.get(split, "or_bench_hard")} for split in ("train", "val", "test")]
    assert sum(len(s) for s in ids) == 30 and len(set().union(*ids)) == 30
    assert len(ids[2]) == 15 and len(ids[1]) == 6  # test 0.5, val 0.2 of 30


def test_caps_are_seeded_draws_and_recorded(tmp_path: Path) -> None:
    write_data(tmp_path)
    capped = build_steer_sets(config(tmp_path, max_per_set=5))
    again = build_steer_sets(config(tmp_path, max_per_set=5))
    other_seed = build_steer_sets(config(tmp_path, max_per_set=5, seed=1))
    assert len(capped.get("test", "or_bench_hard")) == 5
    assert [p.id for p in capped.get("test", "or_bench_hard")] == [
        p.id for p in again.get("test", "or_bench_hard")
    ]
    assert capped.manifest() == again.manifest()
    assert capped.manifest() != other_seed.manifest()
    assert capped.manifest()["test"]["or_bench_hard"]["n"] == 5
    assert len(capped.get("train", "coconot")) == len(
        build_steer_sets(config(tmp_path)).get("train", "coconot")
    )


def test_bad_settings_name_the_key(tmp_path: Path) -> None:
    write_data(tmp_path)
    with pytest.raises(ValueError, match="harmful_source"):
        build_steer_sets(config(tmp_path, harmful_source="nowhere"))
    with pytest.raises(ValueError, match="external"):
        build_steer_sets(config(tmp_path, external=["imaginary"]))
    with pytest.raises(KeyError, match="known"):
        build_steer_sets(config(tmp_path)).get("test", "imaginary")
