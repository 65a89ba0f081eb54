"""`sae-refusal steer` end to end on a tiny refusal-token model and tiny prompt files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from sae_refusal.cli import main
from sae_refusal.finetune.tokens import add_refusal_tokens, init_refusal_embeddings
from sae_refusal.llm.refusal_tokens import RefusalVocabulary
from sae_refusal.steer.gates import load_gate
from sae_refusal.testing import build_tiny_model, build_tiny_tokenizer

CATEGORIES = [
    "Humanizing requests",
    "Incomplete requests",
    "Indeterminate requests",
    "Requests with safety concerns",
    "Unsupported requests",
]


def tiny_refusal_model(folder: Path) -> Path:
    tokenizer = build_tiny_tokenizer()
    vocab = RefusalVocabulary()
    added = add_refusal_tokens(tokenizer, vocab)
    model = build_tiny_model("llama", vocab_size=len(tokenizer), hidden_size=32, num_layers=4, seed=1)
    init_refusal_embeddings(model, tokenizer, vocab, added, init="mean")
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        ids = vocab.resolve(tokenizer).token_ids
        head[list(ids)] = torch.randn(len(ids), head.shape[1], generator=torch.Generator().manual_seed(0))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_data(root: Path) -> None:
    for sub in ("coconot", "benign", "or_bench"):
        (root / sub).mkdir(parents=True)
    harmful = [
        {
            "id": f"h{i}",
            "prompt": f"harmful request {i} about {CATEGORIES[i % 5][:8]}",
            "category": CATEGORIES[i % 5],
        }
        for i in range(60)
    ]
    (root / "coconot" / "coconot_eval.jsonl").write_text("\n".join(json.dumps(r) for r in harmful) + "\n")
    benign = [{"instruction": f"Tell me a fact about the sea number {i}"} for i in range(60)]
    (root / "benign" / "alpaca_harmless_train.json").write_text(json.dumps(benign))
    lookalikes = "\n".join(f"how to kill a stuck process number {i},deception" for i in range(20))
    (root / "or_bench" / "or-bench-hard-1k.csv").write_text("prompt,category\n" + lookalikes + "\n")
    toxic = "\n".join(f"how to hurt someone badly {i},violence" for i in range(20))
    (root / "or_bench" / "or-bench-toxic.csv").write_text("prompt,category\n" + toxic + "\n")


def model_prompts(data: Path) -> dict[str, object]:
    """The prompt-set config of the files `write_data` writes (CoCoNot-style harmful, Alpaca-style benign)."""
    return {
        "data_root": str(data),
        "sources": [
            {
                "name": "coconot",
                "label": "harmful",
                "path": "coconot/coconot_eval.jsonl",
                "id_column": "id",
                "category_column": "category",
            },
            {
                "name": "alpaca",
                "label": "benign",
                "path": "benign/alpaca_harmless_train.json",
                "text_column": "instruction",
            },
        ],
    }


def write_config(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    write_data(data)
    config = {
        "llm": {"name_or_path": str(tiny_refusal_model(tmp_path / "model")), "dtype": "float32"},
        "sets": {
            "model_prompts": model_prompts(data),
            "model_split": {"test_fraction": 0.3, "val_fraction": 0.2, "seed": 0},
            "external": ["or_bench_hard", "or_bench_toxic"],
            "data_root": str(data),
            "manifest_root": str(tmp_path / "splits"),
        },
        "study": {
            "layers": [1, 2],
            "select_n": 6,
            "specificity_alphas": [4.0, 16.0],
            "sweep_alphas": [-8.0, 8.0],
            "floor_gain": 0.0,
            "batch_size": 8,
        },
        "out_dir": str(tmp_path / "study"),
    }
    path = tmp_path / "steer.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_steer_job_writes_a_consistent_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    main(["steer", "--config", str(config)])
    out = tmp_path / "study"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["layer"] in (1, 2) and metrics["specificity_alpha"] in (4.0, 16.0)
    # the confusion rows count every test benign prompt once
    n = metrics["confusion_test"]["n"]
    assert all(sum(row) == n for row in metrics["confusion_test"]["counts"])
    # alpha 0 of the unconditional curve is the unsteered model: the same rate as the per-set table
    zero = next(p for p in metrics["unconditional"]["test"] if p["alpha"] == 0.0)
    unsteered = metrics["unsteered"]["test"]
    harmful_sets = [s for s, r in metrics["sets"]["test"].items() if r["role"] == "harmful"]
    n_harmful = sum(unsteered[s]["n"] for s in harmful_sets)
    refused = sum(unsteered[s]["refused"] * unsteered[s]["n"] for s in harmful_sets)
    assert zero["harmful_refusal"] == pytest.approx(refused / n_harmful)
    assert zero["n_harmful"] == n_harmful
    for name in ("report.md", "pareto.png", "tables.safetensors", "vectors/vectors.json"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "Conditional steering" in report and "Direction ablation" in report
    ablation = metrics["ablation_test"]
    assert ablation and all(0.0 <= r["refused_after"] <= 1.0 and r["n"] > 0 for r in ablation.values())
    assert sum(r["n"] for r in ablation.values()) == metrics["sets"]["test"]["coconot"]["n"]
    tuned = [kind for kind, g in metrics["gates"].items() if "policy" in g]
    for kind in tuned:
        load_gate(out / "gates" / kind)  # every tuned gate reloads
    assert "wrote" in capsys.readouterr().out


def test_an_existing_out_dir_is_refused_before_anything_runs(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        main(["steer", "--config", str(config)])
    assert exit_info.value.code == 2
    assert (tmp_path / "study" / "keep.txt").read_text() == "mine"


STEER_DIR = Path(__file__).resolve().parents[1] / "lightning_configs" / "steer"
#: Overlays added as the last --config of a study config (they hold no model or sets of their own).
STEER_OVERLAYS = ("full_sets.yaml",)
STEER_CONFIGS = sorted(p for p in STEER_DIR.glob("*.yaml") if p.name not in STEER_OVERLAYS)


@pytest.mark.parametrize("path", STEER_CONFIGS, ids=lambda p: p.name)
def test_every_steer_config_parses_into_a_job_config(path: Path) -> None:
    from sae_refusal.cli import job_config, steer_parser
    from sae_refusal.steer.job import SteerJobConfig

    cfg = job_config(steer_parser(), ["--config", str(path), "--study.layer", "18"], SteerJobConfig)
    assert isinstance(cfg, SteerJobConfig)
    assert cfg.study.layer == 18 and cfg.llm.adapter_path == "checkpoints/refuse-smollm2"
    assert cfg.sets.model_prompts.sources and cfg.sets.max_per_set


@pytest.mark.parametrize("overlay", STEER_OVERLAYS)
def test_every_steer_overlay_parses_on_top_of_the_study_config(overlay: str) -> None:
    from sae_refusal.cli import job_config, steer_parser
    from sae_refusal.steer.job import SteerJobConfig

    base = STEER_DIR / "refuse_smollm2.yaml"
    cfg = job_config(
        steer_parser(), ["--config", str(base), "--config", str(STEER_DIR / overlay)], SteerJobConfig
    )
    assert cfg.sets.max_per_set is None and cfg.study.batch_size == 64  # the overlay's settings win
    assert cfg.llm.adapter_path == "checkpoints/refuse-smollm2"  # the rest is the study config's


def test_bad_study_settings_name_the_key() -> None:
    from sae_refusal.steer.job import StudySettings

    with pytest.raises(ValueError, match=r"study\.gates"):
        StudySettings(gates=["oracle"])
    with pytest.raises(ValueError, match=r"study\.sweep_alphas"):
        StudySettings(sweep_alphas=[-1.0])
    with pytest.raises(ValueError, match=r"study\.layers"):
        StudySettings(layers=[])
