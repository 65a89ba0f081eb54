"""Checkpoints reused in eval jobs: ``validate|test --ckpt_path`` and resume rebuild the trained architecture.

Each architecture (TopK with a non-default k, L1, Contrastive) is fitted once by ``sae-refusal fit`` on a tiny
random model; ``validate --ckpt_path`` must then report the training run's own final validation metrics,
``--ckpt_path last`` must find the run's checkpoint (or fail), a command-line setting the checkpoint would
override is refused, and an eval job logs into a folder of its own.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml

from sae_refusal.ckpt_reuse import checkpoint_conflicts, find_last_checkpoint
from sae_refusal.cli import SAERefusalCLI, _lightning_cli, activation_datamodule, main
from sae_refusal.errors import ArtifactError
from sae_refusal.sae import SAEModule, load_sae
from sae_refusal.sae.architectures import L1, Contrastive, TopK, architecture_from_config
from sae_refusal.sae.provenance import CHECKPOINT_KEY, check_checkpoint_matches_data
from sae_refusal.testing import save_tiny_model
from test_cache_identity import copy_with_new_weights
from test_cli import tiny_config

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "topk": {"class_path": "sae_refusal.sae.TopK", "init_args": {"k": 3, "aux_k": 8, "dead_after_steps": 2}},
    "l1": {"class_path": "sae_refusal.sae.L1", "init_args": {"l1_coef": 0.3}},
    "contrastive": {
        "class_path": "sae_refusal.sae.Contrastive",
        "init_args": {
            "base": {"class_path": "sae_refusal.sae.TopK", "init_args": {"k": 5}},
            "supcon_weight": 0.5,
            "separation_weight": 0.2,
        },
    },
}


@dataclasses.dataclass
class Run:
    config: Path
    log_dir: Path
    val: dict[str, float]


def _config(tmp_path: Path, model_dir: Path, prompt_root: Path, architecture: dict[str, Any]) -> Path:
    path = tiny_config(tmp_path, model_dir, prompt_root)
    config = yaml.safe_load(path.read_text())
    config["trainer"]["callbacks"] = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"save_last": True, "save_top_k": -1},
        }
    ]
    config["trainer"]["max_epochs"] = 2
    config["model"]["init_args"]["architecture"] = architecture
    path.write_text(yaml.safe_dump(config))
    return path


def _val_metrics(cli: SAERefusalCLI) -> dict[str, float]:
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}


def _fit(
    tmp_path: Path, model_dir: Path, prompt_root: Path, architecture: dict[str, Any], *extra: str
) -> Run:
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = _config(tmp_path, model_dir, prompt_root, architecture)
    cli = _lightning_cli(["fit", "--config", str(config), *extra])
    assert cli.trainer.log_dir is not None
    return Run(config, Path(cli.trainer.log_dir), _val_metrics(cli))


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_validate_from_checkpoint_rebuilds_the_trained_architecture(
    name: str, tmp_path: Path, tiny_model_dir: Path, prompt_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _fit(tmp_path, tiny_model_dir, prompt_file, ARCHITECTURES[name])
    ckpt = run.log_dir / "checkpoints" / "last.ckpt"
    hparams = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    assert architecture_from_config(hparams["architecture"]) == architecture_from_config(ARCHITECTURES[name])
    # the eval job uses the *default* architecture config: the checkpoint's must win, not TopK(k=32)
    plain = yaml.safe_load(run.config.read_text())
    del plain["model"]["init_args"]["architecture"]
    eval_config = tmp_path / "eval.yaml"
    eval_config.write_text(yaml.safe_dump(plain))
    cli = _lightning_cli(["validate", "--config", str(eval_config), "--ckpt_path", str(ckpt)])
    model = cli.model
    assert isinstance(model, SAEModule)
    assert model.architecture == architecture_from_config(ARCHITECTURES[name])
    val = _val_metrics(cli)
    assert val.keys() == run.val.keys()
    for key, value in run.val.items():
        assert val[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    if name != "l1":
        k = (
            ARCHITECTURES[name]["init_args"].get("k")
            or ARCHITECTURES[name]["init_args"]["base"]["init_args"]["k"]
        )
        assert val["val/seed0/l0"] == pytest.approx(k)
    # the eval job logged into a folder of its own, named after it, beside the run (no version_1)
    runs = sorted(p.name for p in run.log_dir.parent.iterdir())
    assert runs == ["validate-version_0-last", "version_0"]


def test_resume_with_ckpt_path_last_equals_an_uninterrupted_fit(
    tmp_path: Path, tiny_model_dir: Path, prompt_file: Path
) -> None:
    arch = ARCHITECTURES["contrastive"]
    whole = _fit(tmp_path / "whole", tiny_model_dir, prompt_file, arch)
    first = _fit(tmp_path / "parts", tiny_model_dir, prompt_file, arch, "--trainer.max_epochs", "1")
    resumed = _lightning_cli(["fit", "--config", str(first.config), "--ckpt_path", "last"])
    assert isinstance(resumed.model, SAEModule) and resumed.model.architecture == architecture_from_config(
        arch
    )
    assert resumed.trainer.current_epoch == 2
    assert resumed.trainer.log_dir is not None
    for seed in (0, 1):
        a = load_sae(whole.log_dir / "sae" / f"seed{seed}").state_dict()
        b = load_sae(Path(resumed.trainer.log_dir) / "sae" / f"seed{seed}").state_dict()
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (seed, key)


def test_ckpt_path_last_without_a_checkpoint_fails(
    tmp_path: Path, tiny_model_dir: Path, prompt_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, tiny_model_dir, prompt_file, ARCHITECTURES["topk"])
    with pytest.raises(SystemExit) as exit_:
        main(["validate", "--config", str(config), "--ckpt_path", "last"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--ckpt_path last: no checkpoint under" in err and str(tmp_path / "run") in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "tb").exists()  # nothing trained, nothing written


def test_a_setting_the_checkpoint_overrides_is_refused(
    tmp_path: Path, tiny_model_dir: Path, prompt_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _fit(tmp_path, tiny_model_dir, prompt_file, ARCHITECTURES["topk"])
    ckpt = str(run.log_dir / "checkpoints" / "last.ckpt")
    validate = ["validate", "--config", str(run.config), "--ckpt_path", ckpt]
    with pytest.raises(SystemExit) as exit_:
        main([*validate, "--model.init_args.expansion_factor", "4"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "model.init_args.expansion_factor: config 4, checkpoint 2" in err
    other_k = {"class_path": "sae_refusal.sae.TopK", "init_args": {"k": 7}}
    with pytest.raises(SystemExit):
        main([*validate, "--model.init_args.architecture", str(other_k)])
    assert "model.init_args.architecture" in capsys.readouterr().err


def test_a_checkpoint_is_refused_on_another_layer_model_or_width(
    tmp_path: Path,
    tiny_model_dir: Path,
    prompt_file: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A layer-2 SAE must not be validated on layer-1 activations (it "works": val FVU near 2)."""
    run = _fit(tmp_path, tiny_model_dir, prompt_file, ARCHITECTURES["topk"], "--trainer.max_epochs", "1")
    ckpt = run.log_dir / "checkpoints" / "last.ckpt"
    record = torch.load(ckpt, weights_only=True)[CHECKPOINT_KEY]
    assert (record["layer"], record["d_model"], record["model"]) == (2, 32, str(tiny_model_dir))
    assert record["model_fingerprint"]["weights_hash"]
    validate = ["validate", "--config", str(run.config), "--ckpt_path", str(ckpt)]
    runs_before = sorted(p.name for p in run.log_dir.parent.iterdir())
    other = copy_with_new_weights(tiny_model_dir, tmp_path / "other-weights")
    wide = save_tiny_model(tmp_path / "wide", "llama", hidden_size=48)
    cases = {
        "1": (["--data.layer", "1"], "were trained at layer 2, data.layer serves 1"),
        "other": (
            ["--data.llm.name_or_path", str(other)],
            f"were trained on model {str(tiny_model_dir)!r} whose weights differ from data.llm "
            f"{str(other)!r}",
        ),
        "wide": (["--data.llm.name_or_path", str(wide)], "were trained on width 32, data.llm has width 48"),
    }
    for extra, message in cases.values():
        with pytest.raises(SystemExit) as exit_:
            main([*validate, *extra])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.splitlines()
        errors = [line for line in err if line.startswith("sae-refusal: error")]
        expected = f"sae-refusal: error: --ckpt_path {ckpt}: the checkpoint's SAEs {message}"
        assert errors[0].startswith(expected)
    assert sorted(p.name for p in run.log_dir.parent.iterdir()) == runs_before  # refused before any work

    # through the Python API too: the trainer refuses it when it restores the checkpoint
    datamodule = activation_datamodule(["--config", str(run.config), "--data.layer", "1"])
    model = SAEModule.load_from_checkpoint(ckpt, weights_only=True)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    with pytest.raises(ArtifactError, match=r"trained at layer 2, data\.layer serves 1"):
        trainer.validate(model, datamodule=datamodule, ckpt_path=str(ckpt))

    # a checkpoint written before the record: its width is still checked, and a warning says the rest is not
    old = torch.load(ckpt, weights_only=True)
    del old[CHECKPOINT_KEY]
    wide_data = activation_datamodule(["--config", str(run.config), *cases["wide"][0]])
    with pytest.raises(ArtifactError, match=r"old\.ckpt: .* trained on width 32, data\.llm has width 48"):
        check_checkpoint_matches_data(old, wide_data, "old.ckpt")
    with caplog.at_level("WARNING", logger="sae_refusal"):
        check_checkpoint_matches_data(old, datamodule, "old.ckpt")  # data.layer 1: unknowable, warned
    assert "old.ckpt: the checkpoint records no layer or model (written before they were kept)" in caplog.text


def test_checkpoint_conflicts_ignore_defaults_and_equal_values() -> None:
    hparams = {
        "_class_path": "x",
        "d_model": 8,
        "expansion_factor": 2,
        "lr": 0.01,
        "architecture": TopK(4).config(),
    }
    same = {"init_args": {"expansion_factor": 2, "lr": 0.01, "architecture": TopK(4).config(), "d_model": 9}}
    assert checkpoint_conflicts(same, hparams, SAEModule) == []
    defaults = {"init_args": {"expansion_factor": 8, "lr": 1e-3, "architecture": None}}
    assert checkpoint_conflicts(defaults, hparams, SAEModule) == []
    asked = {"init_args": {"expansion_factor": 8, "lr": 0.5, "architecture": L1().config()}}
    conflicts = checkpoint_conflicts(asked, hparams, SAEModule)
    assert [c.split(":")[0] for c in conflicts] == ["model.init_args.lr", "model.init_args.architecture"]


def test_architecture_config_round_trips() -> None:
    for arch in (TopK(k=3, aux_k=0), L1(l1_coef=2.0), Contrastive(base=L1(0.1), supcon_weight=0.3)):
        rebuilt = architecture_from_config(arch.config())
        assert rebuilt == arch and type(rebuilt) is type(arch)
    assert TopK(k=3) != TopK(k=4)
    with pytest.raises(ValueError, match=r"model\.architecture: unknown class_path 'sae_refusal\.sae\.TopQ'"):
        architecture_from_config({"class_path": "sae_refusal.sae.TopQ"})
    with pytest.raises(ValueError, match="is not an SAE architecture"):
        architecture_from_config({"class_path": "sae_refusal.sae.SAEModule"})


def test_find_last_checkpoint_prefers_the_newest_run(tmp_path: Path) -> None:
    from jsonargparse import Namespace

    root = tmp_path / "logs" / "tb"
    for version, names in (("version_2", ["epoch=0.ckpt"]), ("version_10", ["epoch=3.ckpt", "last.ckpt"])):
        (root / version / "checkpoints").mkdir(parents=True)
        for name in names:
            (root / version / "checkpoints" / name).write_bytes(b"x")
    (root / "version_11").mkdir()  # a newer run that saved nothing
    trainer = Namespace(
        default_root_dir=str(tmp_path / "elsewhere"),
        logger=Namespace(
            class_path="TensorBoardLogger", init_args=Namespace(save_dir=str(tmp_path / "logs"), name="tb")
        ),
    )
    assert find_last_checkpoint(trainer) == root / "version_10" / "checkpoints" / "last.ckpt"
