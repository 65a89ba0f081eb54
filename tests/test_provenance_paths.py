"""Paths in provenance: written relative to the artifact's folder, read back resolved, compared by target.

An export copied to another folder (another machine) must load, name no path of the place it was made, and
still point at the model, adapter and source export that travelled with it; a model recorded under one
spelling of a path is the same model under another, and another folder is still refused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from sae_refusal.cli import main
from sae_refusal.errors import ArtifactError
from sae_refusal.llm.config import SMOLLM2_ALIAS
from sae_refusal.provenance import (
    MODEL_ALIASES,
    provenance_mismatches,
    relative_paths,
    resolve_paths,
    same_name_or_path,
)
from sae_refusal.sae.formats import sae_metadata
from sae_refusal.sae.loading import load_sae
from sae_refusal.sae.provenance import DATA_KEYS, check_exports_match_data
from sae_refusal.sae.topk import TopKSAE


def _strings(value: Any) -> list[str]:
    """Every string in a JSON value, keys included."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def test_local_paths_go_relative_and_come_back_names_stay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, adapter = tmp_path / "models" / "tiny", tmp_path / "finetune" / "artifact"
    model.mkdir(parents=True)
    folder = tmp_path / "run" / "sae" / "seed0"  # need not exist yet
    record = {
        "model": str(model),
        "adapter_path": str(adapter),  # absolute: a path even where it does not exist
        "model_fingerprint": {"model": str(model), "weights_hash": "ab" * 32},
        "sae_paths": {"seed0": str(folder), "hub": "owner/repo/layers.2"},
        "sae": {"path": str(folder / "inner"), "name": "seed0"},
        "layer": 2,
        "note": "/not/a/path/key",  # only the path keys are touched
    }
    written = relative_paths(record, folder)
    assert written == {
        **record,
        "model": "../../../models/tiny",
        "adapter_path": "../../../finetune/artifact",
        "model_fingerprint": {"model": "../../../models/tiny", "weights_hash": "ab" * 32},
        "sae_paths": {"seed0": ".", "hub": "owner/repo/layers.2"},
        "sae": {"path": "./inner", "name": "seed0"},
    }
    assert resolve_paths(written, folder) == record
    names = {"model": "smollm2", "adapter_path": None, "exported_from": "hf://owner/repo/layers.2"}
    assert relative_paths(names, folder) == names == resolve_paths(names, folder)  # alias, hub ids kept
    (tmp_path / SMOLLM2_ALIAS).mkdir()  # the loader reads the alias before any folder of that name
    monkeypatch.chdir(tmp_path)
    assert relative_paths({"model": SMOLLM2_ALIAS}, folder) == {"model": SMOLLM2_ALIAS}
    assert SMOLLM2_ALIAS in MODEL_ALIASES
    older = {"model": "/old/machine/model", "model_fingerprint": {"model": "org/name"}}
    assert resolve_paths(older, folder) == older  # an older artifact's absolute path is read as it is


def test_names_are_compared_by_the_folder_they_resolve_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, other = tmp_path / "models" / "tiny", tmp_path / "models" / "other"
    model.mkdir(parents=True)
    other.mkdir()
    (tmp_path / "link").symlink_to(model)
    monkeypatch.chdir(tmp_path)
    assert same_name_or_path(str(model), "models/tiny")
    assert same_name_or_path(str(model), "./link")
    assert not same_name_or_path(str(model), "models/other")
    assert not same_name_or_path("smollm2", "org/smollm2")
    keys = DATA_KEYS
    assert provenance_mismatches({"model": str(model)}, {"model": "models/tiny"}, keys) == []
    assert provenance_mismatches({"model": str(model)}, {"model": str(other)}, keys) == [
        f"made on {str(model)!r}, data.llm is {str(other)!r}"
    ]


def test_an_export_checked_against_the_data_compares_the_folder_not_the_spelling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, other = tmp_path / "models" / "tiny", tmp_path / "models" / "other"
    model.mkdir(parents=True)
    other.mkdir()
    sae = TopKSAE(16, 64, k=4, generator=torch.Generator().manual_seed(0))
    folder = sae.save(tmp_path / "run" / "sae" / "seed0", metadata={"layer": 2, "model": str(model)})
    assert json.loads((folder / "cfg.json").read_text())["metadata"]["model"] == "../../../models/tiny"
    meta = {"seed0": sae_metadata(folder)}
    assert meta["seed0"]["model"] == str(model)
    monkeypatch.chdir(tmp_path)

    def data(name: str) -> Any:
        return SimpleNamespace(served_layer=2, llm=SimpleNamespace(name_or_path=name))

    check_exports_match_data(meta, data("models/tiny"))  # the same folder, spelt from the working dir
    with pytest.raises(
        ArtifactError, match=r"seed0 was trained on '.*/models/tiny', data\.llm is 'models/other'"
    ):
        check_exports_match_data(meta, data("models/other"))


def test_an_export_copied_elsewhere_loads_and_names_no_path_of_where_it_was_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = tmp_path / "first"
    model, adapter = first / "models" / "tiny", first / "finetune" / "artifact"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"_name_or_path": "org/tiny-base"}))
    adapter.mkdir(parents=True)
    sae = TopKSAE(16, 64, k=4, generator=torch.Generator().manual_seed(0))
    sae.set_input_scale(0.5)
    fingerprint = {"model": str(model), "source": "folder", "weights_hash": "ab" * 32, "adapter": "cd" * 32}
    metadata = {
        "layer": 2,
        "model": str(model),
        "adapter_path": str(adapter),
        "model_fingerprint": fingerprint,
    }
    sae.save(first / "run" / "sae" / "seed0", metadata=metadata)
    for fmt in ("sparsify", "saelens"):
        main(["export", "--sae_dir", str(first / "run" / "sae"), "--format", fmt, "--out", str(first / fmt)])
    capsys.readouterr()

    second = tmp_path / "second"
    shutil.copytree(first, second)
    shutil.rmtree(first)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1)) * 4
    exports = {
        "project": second / "run" / "sae" / "seed0",
        "sparsify": second / "sparsify" / "seed0" / "layers.2",
        "saelens": second / "saelens" / "seed0" / "blocks.2.hook_resid_post",
    }
    for fmt, folder in exports.items():
        files = sorted(folder.glob("*.json"))
        assert files, fmt
        for path in files:
            written = _strings(json.loads(path.read_text()))
            assert [s for s in written if os.path.isabs(s) or str(tmp_path) in s] == [], path
        with torch.no_grad():
            torch.testing.assert_close(load_sae(folder)(x).recon_BD, sae(x).recon_BD, atol=1e-5, rtol=1e-5)
        meta = sae_metadata(folder)
        assert meta["model"] == meta["model_fingerprint"]["model"] == str(second / "models" / "tiny"), fmt
        assert meta["adapter_path"] == str(second / "finetune" / "artifact"), fmt
        if fmt != "project":
            assert meta["exported_from"] == str(exports["project"]), fmt
    saelens = json.loads((exports["saelens"] / "cfg.json").read_text())["metadata"]
    assert saelens["model_name"] == "org/tiny-base"  # the hub id the local folder's config.json records
    assert saelens["model_adapter"] == "../../../finetune/artifact"
