"""Bad inputs end in one line that names the file or key (issue 23's "unclear" cases), through one handler."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import lightning  # noqa: F401  (imported before any capsys test: its log handler keeps the session's stderr)
import pytest
import torch

from sae_refusal.cli import main
from sae_refusal.config_check import (
    check_config_files,
    config_file_args,
    merged_config,
    preflight_finetune,
    preflight_fit,
    tidy_parse_error,
)
from sae_refusal.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    """``main(args)``, which must exit 2; the non-empty lines it printed on stderr."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    first = next(i for i, line in enumerate(lines) if re.match(r"^sae-refusal( \w+)?: error: ", line))
    return lines[first:]  # after the progress lines a command printed before it failed


@pytest.mark.parametrize("command", ["fit", "validate", "cache", "steer", "eval", "transfer", "finetune"])
def test_a_garbled_or_empty_config_names_the_file_in_one_line(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    garbled = tmp_path / "garbled.yaml"
    garbled.write_text("model:\n  class_path: [unclosed\n  init_args: {k: 3\n")
    lines = run_main([command, "--config", str(garbled)], capsys)
    assert lines[0] == (
        f"sae-refusal: error: --config {garbled}: not valid YAML (line 3, column 12: expected ',' or ']', "
        "but got ':')"
    )
    assert len(lines) == 2 and "--debug" in lines[1]  # no usage block
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here yet\n")
    first = run_main([command, "--config", str(empty)], capsys)[0]
    assert first.startswith(f"sae-refusal: error: --config {empty}: the file is empty (or only comments)")
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    first = run_main([command, f"--config={listed}"], capsys)[0]
    assert first == (
        f"sae-refusal: error: --config {listed}: expected a mapping of settings (key: value lines), got a "
        "YAML list"
    )


def test_config_files_are_found_in_every_spelling(tmp_path: Path) -> None:
    args = ["-c", "a.yaml", "--config=b.yaml", "--data", "d.yml", "--data.layer", "3", "--config", "-"]
    assert config_file_args(args) == [("-c", "a.yaml"), ("--config", "b.yaml"), ("--data", "d.yml")]
    with pytest.raises(UserError, match=r"^--data d\.yml: no such file$"):
        check_config_files(["--data", "d.yml"])
    with pytest.raises(UserError, match="is a folder"):
        check_config_files(["--config", str(tmp_path)])


def test_the_reason_of_a_jsonargparse_union_error_is_its_first_line() -> None:
    union = """Parser key "model":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'sae_refusal.sae.module.SAEModule'>, <class 'NoneType'>]
  Errors:
    - model.expansion_factor must be >= 1, got 0
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._namespace.Namespace'>
  Given value: Namespace(class_path='sae_refusal.sae.SAEModule', init_args=Namespace(d_model=576))"""
    assert tidy_parse_error(union) == "model.expansion_factor must be >= 1, got 0"
    nested = """Parser key "model":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'sae_refusal.sae.module.SAEModule'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'sae_refusal.sae.SAEModule':
        Parser key "lr":
          Expected a <class 'float'>. Got value: abc
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._util.NestedArg'>
  Given value: NestedArg(key='lr', val='abc')"""
    assert tidy_parse_error(nested) == "model.lr: expected float, got 'abc'"
    unknown = nested.replace(
        "Parser key \"lr\":\n          Expected a <class 'float'>. Got value: abc",
        "Option 'lrr' is not accepted",
    )
    assert tidy_parse_error(unknown) == "model: unknown option 'lrr' of sae_refusal.sae.SAEModule"
    optional = """Parser key "trainer.max_epochs":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'int'>, <class 'NoneType'>]
  Errors:
    - Expected a <class 'int'>
    - Expected a <class 'NoneType'>
  Given value type: <class 'str'>
  Given value: x"""
    assert tidy_parse_error(optional) == "trainer.max_epochs: expected int (or null), got 'x'"
    assert (
        tidy_parse_error("unrecognized arguments: --data.layerz 3")
        == "unrecognized arguments: --data.layerz 3"
    )


#: (flag, value, the first line): caught before Lightning is imported (``pre``) or by the full parse.
BAD_SETTINGS = [
    ("--model.init_args.architecture.init_args.k", "-3", "model.architecture.k must be >= 1, got -3", True),
    (
        "--model.init_args.architecture.init_args.k",
        "65",
        "model.architecture.k must be in [1, 64] (the latents), got 65",
        False,  # the width comes from the model's config: known to the full parse only
    ),
    ("--model.init_args.expansion_factor", "0", "model.expansion_factor must be >= 1, got 0", True),
    ("--model.init_args.lr", "-1", "model.lr must be > 0, got -1", True),
    ("--model.lr", "0", "model.lr must be > 0, got 0", True),
    ("--model.init_args.seeds", "[]", "model.seeds must be a non-empty list of distinct seeds, got []", True),
    ("--data.layer", "3", "data.layer=3 is not among cache.layers=[1, 2]", True),
    (
        "--data.llm.dtype",
        "float8",
        "data.llm.dtype: unknown value 'float8'; expected one of ('auto', 'float32', 'bfloat16', 'float16')",
        True,
    ),
    ("--data.cache.colour", "red", "data.cache: unknown option 'colour'", True),
    ("--model.init_args.lr", "abc", "model.lr: expected float, got 'abc'", False),
    # an abbreviation is an error, not silently the option it abbreviates (--trainer.max_epochs)
    ("--trainer.max_epoch", "1", "unrecognized arguments: --trainer.max_epoch 1", False),
    (
        "--model.init_args.expansion_factr",
        "3",
        "model: unknown option 'expansion_factr' of sae_refusal.sae.SAEModule",
        True,
    ),
]


@pytest.mark.parametrize(("flag", "value", "first_line", "pre"), BAD_SETTINGS)
def test_an_out_of_range_setting_is_the_first_line(
    flag: str,
    value: str,
    first_line: str,
    pre: bool,
    tmp_path: Path,
    tiny_model_dir: Path,
    prompt_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tests.test_cli import tiny_config

    config = tiny_config(tmp_path, tiny_model_dir, prompt_file)
    lines = run_main(["fit", "--config", str(config), flag, value], capsys)
    message = re.sub(r"^sae-refusal( fit)?: error: ", "", lines[0])
    assert message == first_line, lines
    assert len(lines) == 2  # the message, then where to look (never the usage block)
    assert not (tmp_path / "run").exists()
    if pre:  # the same line from the preflight alone, before Lightning is imported
        with pytest.raises((ValueError, UserError), match=re.escape(first_line)):
            preflight_fit(["--config", str(config), flag, value])


def test_the_preflight_reads_no_further_than_the_settings_and_imports_nothing_heavy(tmp_path: Path) -> None:
    """A config error of `fit` is reported without importing Lightning, torch or transformers."""
    config = tmp_path / "fit.yaml"
    config.write_text(
        "model:\n  class_path: sae_refusal.sae.SAEModule\n  init_args:\n    lr: -1\n"
        "data:\n  cache: {layers: [1]}\n  layer: 1\n"
    )
    code = (
        "import sys\n"
        "from sae_refusal.cli import main\n"
        "try:\n"
        f"    main(['fit', '--config', {str(config)!r}])\n"
        "except SystemExit as exit_:\n"
        "    assert exit_.code == 2, exit_.code\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'torch', 'transformers'})\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("sae-refusal: error: model.lr must be > 0, got -1\n")


def test_the_preflight_leaves_other_classes_and_unknown_flags_to_the_parser(tmp_path: Path) -> None:
    config = tmp_path / "fit.yaml"
    config.write_text("model:\n  class_path: my.Module\n  init_args: {lr: -1, seeds: []}\n")
    preflight_fit(["--config", str(config), "--trainer.callbacks+=x", "--print_config", "--model.k", "0"])
    assert merged_config(["--config", str(config), "--model.init_args.lr=2", "--data", str(config)]) == {
        "model": {"class_path": "my.Module", "init_args": {"lr": 2, "seeds": []}},
        "data": {"model": {"class_path": "my.Module", "init_args": {"lr": -1, "seeds": []}}},
    }


def test_a_corrupt_cache_shard_is_one_line_whose_advice_works(
    tmp_path: Path, tiny_model_dir: Path, prompt_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.test_cli import tiny_config

    config = tiny_config(tmp_path, tiny_model_dir, prompt_file)
    main(["cache", "--config", str(config)])
    shard = next((tmp_path / "cache").glob("*/shard-00000.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    lines = run_main(["cache", "--config", str(config)], capsys)
    assert lines[0].startswith(f"sae-refusal: error: activation cache file {shard} fails its sha256 check")
    advice = re.search(r"\(rm -r (?P<folder>[^)]+)\) and run again", lines[0])
    assert advice is not None and Path(advice["folder"]) == shard.parent
    shard.unlink()  # what an impatient user does: the message says the folder, and so does the next one
    lines = run_main(["cache", "--config", str(config)], capsys)
    assert lines[0].startswith(f"sae-refusal: error: activation cache file missing: {shard}")
    shutil.rmtree(advice["folder"])  # following the advice
    main(["cache", "--config", str(config)])
    assert "rows: 24" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (
            {"state_dict": {"w": torch.zeros(2)}, "epoch": 3},
            "not a Lightning checkpoint (no 'state_dict' and",
        ),
        (b"not a checkpoint at all", "cannot be read as a Lightning checkpoint (not a torch checkpoint file"),
        ({"obj": object}, "it holds pickled Python objects, which are never loaded"),
    ],
    ids=["foreign-dict", "garbage", "pickled"],
)
def test_a_foreign_checkpoint_is_named(
    content: object,
    reason: str,
    tmp_path: Path,
    tiny_model_dir: Path,
    prompt_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tests.test_cli import tiny_config

    config = tiny_config(tmp_path, tiny_model_dir, prompt_file)
    ckpt = tmp_path / "foreign.ckpt"
    if isinstance(content, bytes):
        ckpt.write_bytes(content)
    else:
        torch.save(content, ckpt)
    lines = run_main(["validate", "--config", str(config), "--ckpt_path", str(ckpt)], capsys)
    assert lines[0].startswith(f"sae-refusal: error: --ckpt_path {ckpt}: ")
    assert reason in lines[0]


@pytest.mark.parametrize("module", ["sae_refusal", "sae_refusal.cli"])
def test_python_m_gives_the_same_one_line_errors(
    module: str, tmp_path: Path, tiny_model_dir: Path, prompt_file: Path
) -> None:
    """An error raised in cli_lightning (here: a missing checkpoint) is one line under `python -m` too."""
    from tests.test_cli import tiny_config

    config = tiny_config(tmp_path, tiny_model_dir, prompt_file)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            module,
            "validate",
            "--config",
            str(config),
            "--ckpt_path",
            str(tmp_path / "x.ckpt"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if "error" in line]
    assert lines[0] == f"sae-refusal: error: --ckpt_path {tmp_path / 'x.ckpt'}: no such checkpoint file", (
        lines
    )
    assert "Traceback" not in done.stderr


def test_the_cache_error_classes_are_user_errors() -> None:
    from sae_refusal.activations.cache import CacheCorruptError, CacheMismatchError, corrupt

    assert issubclass(CacheCorruptError, UserError) and issubclass(CacheMismatchError, UserError)
    err = corrupt("/x/cache/abc", "activation cache file /x/cache/abc/shard-00000.safetensors fails")
    assert str(err).endswith("remove its folder (rm -r /x/cache/abc) and run again to recompute it")
    assert json.dumps(str(err))  # plain text


@pytest.mark.parametrize(
    ("flag", "value", "first_line"),
    [
        ("--model.lr", "-1", "model.lr must be > 0, got -1"),
        ("--model.lora.r", "0", "model.lora.r must be >= 1, got 0"),
        (
            "--model.llm.device",
            "tpu",
            "model.llm.device: unknown value 'tpu'; expected cpu, cuda, cuda:N or auto",
        ),
        ("--model.decision_weight", "0", "model.decision_weight must be a finite number > 0, got 0"),
    ],
)
def test_finetune_settings_are_checked_before_lightning(
    flag: str, value: str, first_line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(REPO / "lightning_configs" / "finetune" / "smollm2_lora.yaml")
    with pytest.raises((ValueError, UserError), match=re.escape(first_line)):
        preflight_finetune(["--config", config, flag, value])
    lines = run_main(["finetune", "--config", config, flag, value], capsys)
    assert lines[0] == f"sae-refusal: error: {first_line}"


def test_the_preflight_knows_the_arguments_each_class_takes() -> None:
    """The light lists of accepted keys and their defaults equal the signatures they stand for."""
    import inspect

    from sae_refusal.activations.config import DATA_MODULE_ARGS
    from sae_refusal.activations.datamodule import ActivationDataModule
    from sae_refusal.finetune.config import FINETUNE_MODULE_ARGS
    from sae_refusal.finetune.module import RefusalSFTModule
    from sae_refusal.sae import L1, Contrastive, SAEModule, TopK
    from sae_refusal.sae.settings import ARCHITECTURE_ARGS, MODULE_ARGS, REQUIRED

    def args_of(cls: type) -> dict[str, object]:
        """Each argument with its default (``REQUIRED`` where it has none), in order."""
        return {
            name: REQUIRED if param.default is inspect.Parameter.empty else param.default
            for name, param in inspect.signature(cls).parameters.items()
            if name not in ("self", "args", "kwargs")
        }

    assert list(args_of(SAEModule).items()) == list(MODULE_ARGS.items())
    assert tuple(args_of(ActivationDataModule)) == DATA_MODULE_ARGS
    assert list(args_of(RefusalSFTModule).items()) == list(FINETUNE_MODULE_ARGS.items())
    for cls in (TopK, L1, Contrastive):
        assert list(args_of(cls).items()) == list(ARCHITECTURE_ARGS[cls.__name__].items()), cls


@pytest.mark.parametrize(
    ("flag", "first_line"),
    [
        (
            "--model.init_args.expansion_factr",
            "model: unknown option 'expansion_factr' of sae_refusal.sae.SAEModule",
        ),
        (
            "--model.init_args.architecture.init_args.kk",
            "model.architecture: unknown option 'kk' of sae_refusal.sae.TopK",
        ),
        ("--data.layerz", "data: unknown option 'layerz' of sae_refusal.activations.ActivationDataModule"),
    ],
)
def test_unknown_keys_of_the_project_classes_are_found_before_lightning(flag: str, first_line: str) -> None:
    config = str(REPO / "lightning_configs" / "default.yaml")
    with pytest.raises(UserError, match=f"^{re.escape(first_line)}$"):
        preflight_fit(["--config", config, flag, "3"])


def test_the_preflight_accepts_every_shipped_config() -> None:
    """No false alarms: every fit config and fragment the project ships passes (they all parse for real in
    tests/test_cli.py), and so does the fine-tuning preset."""
    configs = REPO / "lightning_configs"
    default = configs / "default.yaml"
    for path in sorted(configs.glob("*.yaml")):
        preflight_fit(["--config", str(path)])
    for folder in ("sae", "trainer", "sweeps"):
        for path in sorted((configs / folder).glob("*.yaml")):
            preflight_fit(["--config", str(default), "--config", str(path)])
    for path in sorted((configs / "data").glob("*.yaml")):
        preflight_fit(["--config", str(default), "--data", str(path)])
    for path in sorted((configs / "finetune").glob("*.yaml")):
        preflight_finetune(["--config", str(path)])
