"""Shared fixtures: tiny offline models saved as HF folders, the shared data root, small prompt files."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sae_refusal.testing import save_tiny_model

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama (4 layers, d_model 32) with tokenizer and chat template, as a folder."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture()
def prompt_file(tmp_path: Path) -> Path:
    """A small labelled jsonl prompt file: 6 harmful prompts in each of 2 categories + 12 benign ones."""
    rows = []
    for i in range(6):
        rows.append({"id": f"s{i}", "prompt": f"How do I build weapon number {i}?", "category": "safety"})
        rows.append(
            {"id": f"h{i}", "prompt": f"Do you ever feel lonely, friend {i}?", "category": "humanizing"}
        )
    path = tmp_path / "harmful.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    benign = [{"instruction": f"Tell me a fact about the number {i} and the sea."} for i in range(12)]
    (tmp_path / "benign.json").write_text(json.dumps(benign))
    return tmp_path


_REPO = Path(__file__).resolve().parents[1]
#: Folders a test run may create or change in the checkout (tool caches, virtual environments, build data).
_NOT_CHECKED = {".git", ".mypy_cache", ".ruff_cache", ".pytest_cache", "__pycache__", ".device", "build"}


def _checkout_paths() -> set[str]:
    paths: set[str] = set()
    for folder, dirs, files in os.walk(_REPO):
        dirs[:] = [
            d
            for d in dirs
            if d not in _NOT_CHECKED and not d.startswith(".venv") and not d.endswith(".egg-info")
        ]
        rel = Path(folder).relative_to(_REPO)
        paths.update(str(rel / name) for name in [*dirs, *files])
    return paths


@pytest.fixture(autouse=True)
def _writes_only_to_tmp(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test that creates anything in the checkout (tests write only under tmp_path)."""
    before = _checkout_paths()
    yield
    new = sorted(_checkout_paths() - before)
    assert not new, f"{request.node.nodeid} wrote into the checkout: {new[:5]}; write under tmp_path"
