"""`sae-refusal finetune` end to end on a tiny model: train, held-out report, export, reload the artifact."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from sae_refusal.cli import main
from sae_refusal.llm import LLMConfig, load_model_and_tokenizer
from sae_refusal.llm.refusal_tokens import RefusalVocabulary

CONFIGS = Path(__file__).resolve().parents[1] / "lightning_configs"


def _training_loss(model: Any, dm: Any, decision_weight: float) -> float:
    """Mean weighted SFT loss of ``model`` over every training batch of the data module."""
    from sae_refusal.finetune.module import sft_loss

    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in dm.train_dataloader():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            total += float(sft_loss(logits, batch["labels"], batch["target_pos"], decision_weight))
            n += 1
    return total / n


def test_finetune_trains_reports_and_exports(tmp_path: Path, tiny_model_dir: Path, prompt_file: Path) -> None:
    """Fit on a tiny model, then check what it produced against independent recomputations: the training
    loss fell, only the new token rows (and LoRA-targeted layers) changed, the report's numbers are those of
    its own per-prompt records on exactly the held-out prompts, and both exports load and agree."""
    from sae_refusal.categories import CATEGORY_SHORT_NAMES
    from sae_refusal.data.sources import PromptSetConfig, PromptSourceConfig
    from sae_refusal.data.splits import SplitConfig
    from sae_refusal.finetune.datamodule import SFTDataModule
    from sae_refusal.finetune.lora import DEFAULT_LORA_TARGETS
    from sae_refusal.finetune.module import RefusalSFTModule

    benign = [
        {"instruction": f"Name a colour, number {i}.", "answer": f"Blue is colour {i}."} for i in range(12)
    ]
    (prompt_file / "benign.json").write_text(json.dumps(benign))
    sources: list[dict[str, Any]] = [
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
    decision_weight = 5.0
    data = {
        "prompts": {"data_root": str(prompt_file), "sources": sources},
        "split": {"test_fraction": 0.25, "val_fraction": 0.0},
        "root": str(tmp_path / "data"),
        "max_length": 96,
        "batch_size": 4,
        "class_balance": 0.5,
    }
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 2,
            "limit_val_batches": 0,  # no validation split (val_fraction 0): fit without validation
            "default_root_dir": str(tmp_path / "run"),
            "enable_progress_bar": False,
            "log_every_n_steps": 1,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp_path / "run"), "name": "csv"},
            },
            "callbacks": [
                {
                    "class_path": "sae_refusal.eval.callbacks.RefusalReportCallback",
                    "init_args": {"batch_size": 8, "n_samples": 2, "subsets": {"bar": ["h"]}},
                },
            ],
        },
        "model": {
            "llm": {"name_or_path": str(tiny_model_dir)},
            "lora": {"r": 4, "alpha": 8},
            "lr": 0.02,
            "warmup_steps": 2,
            "decision_weight": decision_weight,
        },
        "data": data,
    }
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["finetune", "--config", str(path)])
    log_dir = tmp_path / "run" / "csv" / "version_0"

    # The data as the job saw it (same manifest and answer cache), and the model before the first step.
    llm = LLMConfig(name_or_path=str(tiny_model_dir))
    dm = SFTDataModule(
        llm=llm,
        prompts=PromptSetConfig(
            data_root=str(prompt_file), sources=[PromptSourceConfig(**s) for s in sources]
        ),
        split=SplitConfig(test_fraction=0.25, val_fraction=0.0),
        root=str(tmp_path / "data"),
        max_length=96,
        batch_size=4,
    )
    dm.setup("fit")
    start = RefusalSFTModule(llm=llm)
    start.configure_model()
    merged, tokenizer = load_model_and_tokenizer(LLMConfig(name_or_path=str(log_dir / "export" / "model")))
    added_ids = [int(tokenizer.convert_tokens_to_ids(t)) for t in start.added_tokens]
    assert added_ids == [int(dm.tokenizer.convert_tokens_to_ids(t)) for t in start.added_tokens]
    old_rows = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    assert len(added_ids) == 6 and min(added_ids) >= old_rows

    # Training lowered the (decision-weighted) loss on the training data.
    before = _training_loss(start.model, dm, decision_weight)
    after = _training_loss(merged, dm, decision_weight)
    assert after < before - 0.3, (before, after)  # 6.02 -> 5.39 here
    logged = [row for row in csv.DictReader((log_dir / "metrics.csv").open()) if row.get("train/loss")]
    assert len(logged) >= 4 and all(math.isfinite(float(r["train/loss"])) for r in logged)

    # Only the refusal-token rows and the LoRA-targeted layers changed; everything else is frozen.
    used_ids = sorted(
        {
            int(b["input_ids"][i, b["target_pos"][i]])
            for b in dm.train_dataloader()
            for i in range(len(b["target_pos"]))
        }
    )
    assert len(used_ids) == 3 and set(used_ids) <= set(added_ids)  # respond, safety, humanizing
    initial, trained = start.model.state_dict(), merged.state_dict()
    assert set(initial) == set(trained)
    changed = set()
    for key, value in initial.items():
        new = trained[key]
        assert new.shape == value.shape, key
        if key.endswith(("embed_tokens.weight", "lm_head.weight")):
            torch.testing.assert_close(new[:old_rows], value[:old_rows], rtol=0, atol=0, msg=key)
            # an input row learns only when its token occurs; every output row gets the softmax gradient
            rows = used_ids if key.endswith("embed_tokens.weight") else added_ids
            moved = (new[rows] - value[rows]).abs().amax(dim=1)
            assert (moved > 0).all(), f"{key}: a refusal-token row did not train: {moved.tolist()}"
            changed.add(key)
        elif any(f"{target}." in key for target in DEFAULT_LORA_TARGETS):
            if not torch.equal(new, value):
                changed.add(key)
        else:
            torch.testing.assert_close(new, value, rtol=0, atol=0, msg=f"{key} should be frozen")
    assert len(changed) > 2  # the embeddings and at least one LoRA-merged layer

    # The report is exactly its per-prompt records, on exactly the held-out (test) prompts.
    report = json.loads((log_dir / "refusal_report" / "report.json").read_text())
    records = report["predictions"]
    test_ids = {p.id for p in dm.held_out_prompts("test")}
    manifest = json.loads(next((tmp_path / "data").glob("splits-*.json")).read_text())
    assert test_ids == set(manifest["splits"]["test"]) and not test_ids & set(manifest["splits"]["train"])
    assert sorted(r["id"] for r in records) == sorted(test_ids) and report["n"] == len(test_ids)
    respond = report["class_names"][0]
    for r in records:
        truth = CATEGORY_SHORT_NAMES[r["category"]] if r["label"] == "harmful" else respond
        assert r["expected"] == truth, r
        assert r["correct"] == (r["predicted"] == truth), r
        assert r["top_is_refusal_token"] == (r["predicted"] != "other"), r
    assert report["accuracy"] == pytest.approx(sum(r["correct"] for r in records) / len(records))
    columns = report["confusion_columns"]
    for i, name in enumerate(report["class_names"]):
        for j, column in enumerate(columns):
            count = sum(r["expected"] == name and r["predicted"] == column for r in records)
            assert report["confusion"][i][j] == count, (name, column)
    for source in {r["source"] for r in records}:
        mine = [r for r in records if r["source"] == source]
        assert report["per_source"][source]["n"] == len(mine)
        assert report["per_source"][source]["accuracy"] == pytest.approx(
            sum(r["correct"] for r in mine) / len(mine)
        )
    benign = [r for r in records if r["label"] == "benign"]
    assert report["false_refusal_rate"] == pytest.approx(
        sum(r["predicted"] not in (respond, "other") for r in benign) / len(benign)
    )
    metrics = [
        row for row in csv.DictReader((log_dir / "metrics.csv").open()) if row.get("report/all/accuracy")
    ]
    assert float(metrics[-1]["report/all/accuracy"]) == pytest.approx(report["accuracy"])
    assert len(report["confusion"]) == 6
    samples = json.loads((log_dir / "refusal_report" / "samples.json").read_text())
    assert len(samples) == 2
    bar = json.loads((log_dir / "refusal_report" / "bar" / "report.json").read_text())
    assert sorted(r["id"] for r in bar["predictions"]) == sorted(
        r["id"] for r in records if r["source"] == "h"
    )
    assert bar["n"] == report["per_source"]["h"]["n"] and set(bar["per_source"]) == {"h"}

    # The exported HF folder and the small artifact both load and agree.
    artifact = log_dir / "export" / "artifact"
    assert sum(f.stat().st_size for f in artifact.rglob("*") if f.is_file()) < 16 * 2**20
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
    from sae_refusal.eval.callbacks import RefusalReportCallback

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
