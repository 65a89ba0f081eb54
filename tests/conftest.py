"""Shared fixtures: tiny offline models saved as HF folders, the shared data root, small prompt files."""

from __future__ import annotations

import json
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
