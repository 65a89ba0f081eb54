"""Every eval YAML parses into an EvalJobConfig; the SAS-SAE fit fragment parses on top of default.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sae_refusal.eval.interventions import INTERVENTION_KINDS

REPO = Path(__file__).resolve().parents[1]
EVAL = REPO / "lightning_configs" / "eval"
BASE = EVAL / "refuse_smollm2.yaml"
COLUMNS = sorted((EVAL / "columns").glob("*.yaml"))


def parse(*configs: Path) -> Any:
    from sae_refusal.cli import eval_parser, job_config
    from sae_refusal.eval.job import EvalJobConfig

    args = [arg for config in configs for arg in ("--config", str(config))]
    return job_config(eval_parser(), args, EvalJobConfig)


@pytest.mark.parametrize("column", COLUMNS, ids=lambda p: p.stem)
def test_every_column_parses_on_the_quickstart_config(column: Path) -> None:
    cfg = parse(BASE, column)
    assert cfg.intervention.kind in INTERVENTION_KINDS
    assert cfg.out_dir.startswith("runs/eval/refuse_smollm2/")
    assert cfg.sets.max_per_set == 16  # the quickstart caps each test set
    full = parse(BASE, column, EVAL / "full_sets.yaml")
    assert full.sets.max_per_set is None and full.intervention == cfg.intervention


def test_columns_write_to_distinct_folders() -> None:
    folders = [parse(BASE, c).out_dir for c in COLUMNS]
    assert len(set(folders)) == len(folders)


def test_the_sas_sae_fragment_parses_on_top_of_default() -> None:
    from tests.test_cli import parse as fit_parse

    cfg = fit_parse(
        [
            "--config",
            str(REPO / "lightning_configs" / "default.yaml"),
            "--config",
            str(EVAL / "sae_layer21.yaml"),
        ]
    )
    assert cfg.data.layer == 21 and cfg.data.cache.layers == [21]
    # the fine-tuning run's split, so SAS vectors come from its train split only
    assert (cfg.data.split.test_fraction, cfg.data.split.val_fraction, cfg.data.split.seed) == (0.2, 0.05, 0)


SETS = sorted((EVAL / "sets").glob("*.yaml"))


@pytest.mark.parametrize("overlay", SETS, ids=lambda p: p.stem)
def test_every_sets_overlay_parses_and_its_files_load(overlay: Path, tmp_path: Path) -> None:
    import dataclasses

    from sae_refusal.steer.sets import build_steer_sets

    cfg = parse(BASE, overlay)
    users = [e for e in cfg.sets.external if e.preset is None]
    assert users, "a sets overlay shows a user's own set"
    for entry in users:  # the files a sets overlay names ship with the repository (run from its root)
        assert entry.path is not None and (REPO / entry.path).is_file(), entry.path
    if not (REPO.parent / "shared" / "data").is_dir():
        pytest.skip("../shared/data is absent: the overlay's preset sets cannot load")
    root = tmp_path / "splits"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        sets = build_steer_sets(dataclasses.replace(cfg.sets, manifest_root=str(root)))
    for entry in users:
        assert sets.manifest()["test"][entry.name]["n"] > 0


def test_every_yaml_under_lightning_configs_is_parsed_by_a_test() -> None:
    """A new YAML folder needs a parse test (add it here once it has one)."""
    covered = {
        "",
        "data",
        "sae",
        "trainer",
        "sweeps",
        "steer",
        "finetune",
        "eval",
        "eval/columns",
        "eval/sets",
    }
    covered |= {"transfer"}  # tests/test_transfer_job.py
    covered |= {"experiments/sae_compare"}  # tests/test_experiment_configs.py
    root = REPO / "lightning_configs"
    folders = {p.parent.relative_to(root).as_posix().replace(".", "") for p in root.rglob("*.yaml")}
    assert folders <= covered, f"YAML folders without a parse test: {sorted(folders - covered)}"
