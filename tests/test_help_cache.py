"""``--help`` of the heavy subcommands is kept per environment: the second call imports nothing heavy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sae_refusal.cli import main
from sae_refusal.help_cache import cached_help, help_key


@pytest.mark.parametrize("command", ["fit", "validate", "steer", "eval", "transfer"])
def test_the_kept_help_equals_the_parser_help_and_imports_nothing_heavy(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SAE_REFUSAL_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as exit_:  # the parser itself: what the user saw before the cache existed
        _parser_help(command)
    assert exit_.value.code == 0
    live = capsys.readouterr().out
    try:
        main([command, "--help"])  # computes and keeps it (fit), or parses light classes at once (steer)
    except SystemExit as exit_:
        assert exit_.code == 0
    assert capsys.readouterr().out == live
    code = (
        "import sys\n"
        "from sae_refusal.cli import main\n"
        "try:\n"
        f"    main([{command!r}, '--help'])\n"
        "except SystemExit as exit_:\n"
        "    assert exit_.code == 0\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'torch', 'transformers'})\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "SAE_REFUSAL_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == live


def _parser_help(command: str) -> None:
    from sae_refusal.cli import help_producer

    help_producer(command, ["--help"])()


def test_the_key_follows_config_content_and_width(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "a.yaml"
    config.write_text("trainer: {max_epochs: 1}\n")
    key = help_key("fit", ["--config", str(config), "--help"])
    assert help_key("fit", ["--config", str(config), "--help"]) == key
    config.write_text("trainer: {max_epochs: 2}\n")
    assert help_key("fit", ["--config", str(config), "--help"]) != key
    wide = help_key("fit", ["--help"])
    monkeypatch.setenv("COLUMNS", "200")
    assert help_key("fit", ["--help"]) != wide
    assert help_key("validate", ["--help"]) != help_key("test", ["--help"])


def test_an_unwritable_cache_folder_still_gives_the_help(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("SAE_REFUSAL_CACHE_DIR", str(blocker / "cache"))  # under a file: never writable
    calls: list[int] = []

    def produce() -> None:
        calls.append(1)
        print("usage: x")
        raise SystemExit(0)

    assert cached_help("fit", ["--help"], produce) == "usage: x\n"
    assert cached_help("fit", ["--help"], produce) == "usage: x\n"
    assert len(calls) == 2


def test_a_kept_text_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAE_REFUSAL_CACHE_DIR", str(tmp_path))
    calls: list[int] = []

    def produce() -> None:
        calls.append(1)
        print("usage: y")

    first = cached_help("steer", ["--help"], produce)
    assert first == cached_help("steer", ["--help"], produce) == "usage: y\n"
    assert calls == [1]
    with pytest.raises(SystemExit):  # a failing producer is not kept
        cached_help("eval", ["--help"], lambda: sys.exit(2))
    assert not list((tmp_path / "help").glob("eval-*"))
