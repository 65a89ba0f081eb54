"""Prompts of a fine-tuning YAML, loaded without the CLI: those the fine-tune trains and reports on."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sae_refusal.finetune.config_prompts import finetune_prompts

CONFIGS = Path(__file__).resolve().parents[1] / "lightning_configs" / "finetune"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _write(tmp_path: Path, cfg: dict[str, object]) -> Path:
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_split_and_extra_prompts(tmp_path: Path) -> None:
    (tmp_path / "h.jsonl").write_text(
        "".join(f'{{"id": "{i}", "prompt": "harm {i}", "category": "safety"}}\n' for i in range(20))
    )
    (tmp_path / "c.jsonl").write_text('{"id": "x", "prompt": "kill a process", "category": "safety"}\n')
    cfg = {
        "data": {
            "prompts": {
                "sources": [
                    {
                        "name": "h",
                        "label": "harmful",
                        "path": "h.jsonl",
                        "id_column": "id",
                        "category_column": "category",
                    }
                ]
            },
            "split": {"test_fraction": 0.25, "val_fraction": 0.0},
        },
        "trainer": {
            "callbacks": [
                {
                    "class_path": "sae_refusal.eval.callbacks.RefusalReportCallback",
                    "init_args": {
                        "extra_prompts": {
                            "sources": [
                                {
                                    "name": "c",
                                    "label": "ambiguous",
                                    "path": "c.jsonl",
                                    "id_column": "id",
                                    "category_column": "category",
                                }
                            ]
                        }
                    },
                }
            ]
        },
    }
    loaded = finetune_prompts(_write(tmp_path, cfg), data_root=str(tmp_path), root=str(tmp_path / "runs"))
    assert len(loaded.prompts) == 20 and loaded.extra.ids == ["c:x"]
    assert len(loaded.prompts.split("test")) == 5
    assert loaded.held_out.ids == [*loaded.prompts.split("test").ids, "c:x"]
    again = finetune_prompts(_write(tmp_path, cfg), data_root=str(tmp_path), root=str(tmp_path / "runs"))
    assert again.held_out.ids == loaded.held_out.ids  # the manifest is reused


def test_errors_name_the_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no `data\.prompts` mapping"):
        finetune_prompts(_write(tmp_path, {"model": {}}))
    bad = {
        "data": {"prompts": {"sources": [{"name": "h", "label": "harmful", "path": "h.jsonl", "colour": 1}]}}
    }
    with pytest.raises(ValueError, match=r"prompts.sources\[0\] \('h'\): .*colour"):
        finetune_prompts(_write(tmp_path, bad))


@pytest.mark.shared_data
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data (real datasets) is not present")
def test_smollm2_config_held_out_set(tmp_path: Path) -> None:
    loaded = finetune_prompts(CONFIGS / "smollm2_lora.yaml", str(SHARED_DATA), root=str(tmp_path))
    held = loaded.held_out
    by_source = {s: sum(p.source == s for p in held) for s in {p.source for p in held}}
    assert by_source == {
        "coconot": 199,
        "alpaca": 300,
        "coconot_pref": 185,
        "ultrachat": 4,
        "coconot_contrast": 379,
    }
