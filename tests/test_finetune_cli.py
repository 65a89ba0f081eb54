"""`sae-refusal finetune` end to end on a tiny model: train, held-out report, export, reload the artifact."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from sae_refusal.cli import main
from sae_refusal.llm import LLMConfig, load_model_and_tokenizer
from sae_refusal.llm.refusal_tokens import RefusalVocabulary

CONFIGS = Path(__file__).resolve().parents[1] / "lightning_configs"


def test_finetune_trains_reports_and_exports(tmp_path: Path, tiny_model_dir: Path, prompt_file: Path) -> None:
    benign = [
        {"instruction": f"Name a colour, number {i}.", "answer": f"Blue is colour {i}."} for i in range(12)
    ]
    (prompt_file / "benign.json").write_text(json.dumps(benign))
    sources = [
        {
            "name": "h",
            "label": "harmful",
            "path": "harmful.jsonl",
            "id_column": "id",
            "category_column": "category",
        },
        {
            "name": "b",
            "label": "benign",
            "path": "benign.json",
            "text_column": "instruction",
            "response_column": "answer",
        },
    ]
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 2,
            "default_root_dir": str(tmp_path / "run"),
            "enable_progress_bar": False,
            "log_every_n_steps": 1,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path / "run"), "name": "tb"},
            },
            "callbacks": [
                {
                    "class_path": "sae_refusal.finetune.callbacks.RefusalReportCallback",
                    "init_args": {"batch_size": 8, "n_samples": 2, "subsets": {"bar": ["h"]}},
                },
            ],
        },
        "model": {
            "llm": {"name_or_path": str(tiny_model_dir)},
            "lora": {"r": 4, "alpha": 8},
            "lr": 0.005,
            "decision_weight": 5.0,
        },
        "data": {
            "prompts": {"data_root": str(prompt_file), "sources": sources},
            "split": {"test_fraction": 0.25, "val_fraction": 0.0},
            "root": str(tmp_path / "data"),
            "max_length": 96,
            "batch_size": 4,
            "class_balance": 0.5,
        },
    }
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["finetune", "--config", str(path)])

    log_dir = tmp_path / "run" / "tb" / "version_0"
    report = json.loads((log_dir / "refusal_report" / "report.json").read_text())
    assert report["n"] > 0 and 0.0 <= report["accuracy"] <= 1.0
    assert len(report["confusion"]) == 6
    assert json.loads((log_dir / "refusal_report" / "samples.json").read_text())
    bar = json.loads((log_dir / "refusal_report" / "bar" / "report.json").read_text())
    assert bar["n"] == report["per_source"]["h"]["n"] and set(bar["per_source"]) == {"h"}
    # The exported HF folder and the small artifact both load and agree.
    artifact = log_dir / "export" / "artifact"
    assert sum(f.stat().st_size for f in artifact.rglob("*") if f.is_file()) < 16 * 2**20
    merged, tokenizer = load_model_and_tokenizer(LLMConfig(name_or_path=str(log_dir / "export" / "model")))
    applied, tokenizer2 = load_model_and_tokenizer(
        LLMConfig(name_or_path=str(tiny_model_dir), adapter_path=str(artifact))
    )
    RefusalVocabulary().resolve(tokenizer)
    ids = tokenizer("<|im_start|>user\nhello<|im_end|>\n", return_tensors="pt").input_ids
    assert tokenizer2("<|im_start|>user\nhello<|im_end|>\n").input_ids == ids[0].tolist()
    torch.testing.assert_close(applied(ids).logits, merged(ids).logits, atol=2e-2, rtol=0)


def test_finetune_preset_parses() -> None:
    from sae_refusal.cli import FinetuneCLI
    from sae_refusal.finetune.datamodule import SFTDataModule
    from sae_refusal.finetune.module import RefusalSFTModule

    class _ParseOnly(FinetuneCLI):
        def instantiate_classes(self) -> None:
            pass

    for config in sorted((CONFIGS / "finetune").glob("*.yaml")):
        cli = _ParseOnly(RefusalSFTModule, SFTDataModule, args=["--config", str(config)], run=False)
        assert cli.config.model.lora.r > 0
        data_llm = cli.config.data.llm
        data_llm = data_llm.get("init_args", data_llm)
        assert data_llm.name_or_path == cli.config.model.llm.name_or_path  # linked


def test_report_subsets_are_checked_before_training() -> None:
    from types import SimpleNamespace

    import pytest

    from sae_refusal.data.sources import PromptSetConfig, PromptSourceConfig
    from sae_refusal.finetune.callbacks import RefusalReportCallback

    prompts = PromptSetConfig(sources=[PromptSourceConfig(name="h", label="harmful", path="h.jsonl")])
    extra = PromptSetConfig(sources=[PromptSourceConfig(name="c", label="ambiguous", path="c.jsonl")])
    trainer = SimpleNamespace(datamodule=SimpleNamespace(prompts=prompts))
    ok = RefusalReportCallback(extra_prompts=extra, subsets={"bar": ["h"], "contrast": ["c"]})
    ok.setup(trainer, None, "fit")  # type: ignore[arg-type]
    typo = RefusalReportCallback(extra_prompts=extra, subsets={"bar": ["h", "alpacca"]})
    with pytest.raises(
        ValueError, match=r"subsets\.bar: unknown prompt sources \['alpacca'\]; .*\['c', 'h'\]"
    ):
        typo.setup(trainer, None, "fit")  # type: ignore[arg-type]
    builtin = SimpleNamespace(datamodule=SimpleNamespace(prompts=None))
    RefusalReportCallback(subsets={"all": ["builtin"]}).setup(builtin, None, "fit")  # type: ignore[arg-type]
