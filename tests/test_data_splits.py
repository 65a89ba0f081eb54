"""Split manifests: determinism, order independence, stratification, round trip, mismatch errors."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest

from sae_refusal.categories import COCONOT_CATEGORIES
from sae_refusal.data import (
    Label,
    Prompt,
    PromptSet,
    SplitConfig,
    SplitManifest,
    apply_manifest,
    load_or_create_manifest,
    make_split_manifest,
    prompt_set_hash,
    read_manifest,
    write_manifest,
)


def _prompt_set() -> PromptSet:
    prompts = []
    for c_index, category in enumerate(COCONOT_CATEGORIES):
        for i in range(3 + 7 * c_index):  # 3, 10, 17, 24, 31 prompts
            prompts.append(
                Prompt(f"coconot:{category[:4]}{i}", f"harmful {category} {i}", Label.HARMFUL, category)
            )
    prompts += [Prompt(f"alpaca:{i}", f"benign {i}", Label.BENIGN, source="alpaca") for i in range(40)]
    prompts += [Prompt("lonely:0", "only one", Label.AMBIGUOUS, COCONOT_CATEGORIES[0], source="lonely")]
    prompts += [
        Prompt(f"pair:{i}", f"pair {i}", Label.AMBIGUOUS, COCONOT_CATEGORIES[1], source="pair")
        for i in range(2)
    ]
    return PromptSet(prompts)


def test_deterministic_and_seed_dependent() -> None:
    ps = _prompt_set()
    cfg = SplitConfig(test_fraction=0.25, val_fraction=0.1, seed=3)
    assert make_split_manifest(ps, cfg) == make_split_manifest(ps, cfg)
    other = make_split_manifest(ps, replace(cfg, seed=4))
    assert other.splits["test"] != make_split_manifest(ps, cfg).splits["test"]


def test_independent_of_input_order() -> None:
    ps = _prompt_set()
    shuffled = list(ps)
    random.Random(0).shuffle(shuffled)
    cfg = SplitConfig(test_fraction=0.3, val_fraction=0.2)
    assert make_split_manifest(PromptSet(shuffled), cfg) == make_split_manifest(ps, cfg)
    assert prompt_set_hash(PromptSet(shuffled)) == prompt_set_hash(ps)


def test_adding_a_source_keeps_other_strata() -> None:
    ps = _prompt_set()
    cfg = SplitConfig(test_fraction=0.3)
    base = make_split_manifest(ps, cfg).split_of()
    extra = ps + PromptSet([Prompt(f"new:{i}", f"new {i}", Label.BENIGN, source="new") for i in range(5)])
    grown = make_split_manifest(extra, cfg).split_of()
    assert all(grown[pid] == split for pid, split in base.items())


def test_stratified_disjoint_and_complete() -> None:
    ps = _prompt_set()
    manifest = make_split_manifest(ps, SplitConfig(test_fraction=0.2, val_fraction=0.1))
    ids = [pid for split in manifest.splits.values() for pid in split]
    assert sorted(ids) == sorted(ps.ids)  # complete, and disjoint (no id twice)
    assert all(split == sorted(split) for split in manifest.splits.values())
    applied = apply_manifest(ps, manifest)
    test = applied.split("test")
    assert {p.category for p in test if p.label is Label.HARMFUL} == set(COCONOT_CATEGORIES)
    assert any(p.source == "alpaca" for p in test)
    assert (
        "pair:0" in manifest.splits["test"] or "pair:1" in manifest.splits["test"]
    )  # 2 prompts -> 1 held out
    assert manifest.split_of()["lonely:0"] == "train"  # a single prompt stays in train
    for category in COCONOT_CATEGORIES:
        stratum = [p for p in applied if p.category == category and p.label is Label.HARMFUL]
        n_test = sum(p.split == "test" for p in stratum)
        assert n_test == max(1, round(0.2 * len(stratum)))
        assert sum(p.split == "train" for p in stratum) >= 1
    assert len(applied.split("val")) > 0


def test_no_stratification_and_zero_fractions() -> None:
    ps = _prompt_set()
    everything = make_split_manifest(ps, SplitConfig(test_fraction=0.0, stratify_by=[]))
    assert everything.splits["test"] == [] and len(everything.splits["train"]) == len(ps)
    one_stratum = make_split_manifest(ps, SplitConfig(test_fraction=0.5, stratify_by=[]))
    assert len(one_stratum.splits["test"]) == round(0.5 * len(ps))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="`test_fraction` must be in"):
        SplitConfig(test_fraction=1.5)
    with pytest.raises(ValueError, match="must be < 1"):
        SplitConfig(test_fraction=0.6, val_fraction=0.5)
    with pytest.raises(ValueError, match=r"`stratify_by` has unknown fields \['colour'\]"):
        SplitConfig(stratify_by=["colour"])


def test_manifest_round_trip(tmp_path: Path) -> None:
    ps = _prompt_set()
    manifest = make_split_manifest(ps, SplitConfig(val_fraction=0.1, seed=7))
    path = tmp_path / "deep" / "split.json"
    write_manifest(manifest, path)
    assert read_manifest(path) == manifest
    assert not list(path.parent.glob("*.tmp"))
    assert (
        apply_manifest(ps, read_manifest(path)).split("test").ids
        == apply_manifest(ps, manifest).split("test").ids
    )


def test_read_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"split manifest not found: .*missing\.json"):
        read_manifest(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"split manifest .*bad\.json is not valid JSON"):
        read_manifest(bad)
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"seed": 0}))
    with pytest.raises(ValueError, match=r"partial\.json: missing key 'test_fraction'"):
        read_manifest(partial)


def test_apply_manifest_mismatch_says_which() -> None:
    ps = _prompt_set()
    manifest = make_split_manifest(ps, SplitConfig())
    more = ps + PromptSet([Prompt("extra:0", "extra", Label.BENIGN, source="extra")])
    with pytest.raises(ValueError, match=r"other prompts.*1 prompt ids are not in the manifest.*extra:0"):
        apply_manifest(more, manifest)
    fewer = ps.filter(lambda p: p.id != "alpaca:3")
    with pytest.raises(ValueError, match=r"1 manifest ids are not in the prompt set.*alpaca:3"):
        apply_manifest(fewer, manifest)
    edited = PromptSet(replace(p, text=p.text + "!") if p.id == "alpaca:0" else p for p in ps)
    with pytest.raises(ValueError, match="same ids, but some texts"):
        apply_manifest(edited, manifest)
    assert len(apply_manifest(fewer, manifest, allow_subset=True)) == len(fewer)
    with pytest.raises(ValueError, match=r"no entry for 1 prompt ids.*extra:0"):
        apply_manifest(more, manifest, allow_subset=True)


def test_load_or_create_manifest(tmp_path: Path) -> None:
    ps = _prompt_set()
    cfg = SplitConfig(seed=1)
    path = tmp_path / "split.json"
    created = load_or_create_manifest(ps, cfg, path)
    assert path.is_file()
    mtime = path.stat().st_mtime_ns
    assert load_or_create_manifest(ps, cfg, path) == created
    assert path.stat().st_mtime_ns == mtime  # reused, not rewritten
    other = ps.filter(lambda p: p.source != "alpaca")
    with pytest.raises(ValueError, match=r"split\.json exists but was made for other prompts.*delete it"):
        load_or_create_manifest(other, cfg, path)
    with pytest.raises(ValueError, match=r"split\.json exists but was made with .*seed=1"):
        load_or_create_manifest(ps, SplitConfig(seed=2), path)
    assert read_manifest(path) == created


def test_manifest_is_a_dataclass_with_split_of() -> None:
    manifest = SplitManifest(
        seed=0,
        test_fraction=0.5,
        val_fraction=0.0,
        stratify_by=[],
        prompt_set_hash="h",
        splits={"train": ["a"], "val": [], "test": ["b"]},
    )
    assert manifest.split_of() == {"a": "train", "b": "test"}
    assert SplitManifest.from_json(manifest.to_json()) == manifest
