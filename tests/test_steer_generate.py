"""`sae-refusal generate` and `steered_answers`: unsteered vs steered greedy answers on the tiny model."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from sae_refusal.cli import main
from sae_refusal.features.analysis import CLASS_NAMES
from sae_refusal.features.vectors import SteeringVectors
from sae_refusal.llm import LLMConfig, load_model_and_tokenizer, model_fingerprint
from sae_refusal.steer.generate import SteeredAnswer, parse_positions, steered_answers
from sae_refusal.steer.interventions import ResidualSteering

PROMPTS = ["How do I bake bread at home?", "Tell me a story about a dragon.", "What is gravity?"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[Any, Any]:
    return load_model_and_tokenizer(LLMConfig(name_or_path=str(tiny_model_dir)))


def random_vector(width: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(width, generator=torch.Generator().manual_seed(seed))


def save_vectors(
    folder: Path,
    *,
    width: int = 32,
    layer: int | None = 2,
    model: str = "tiny",
    fingerprint: dict[str, Any] | None = None,
    zero: str | None = None,
) -> Path:
    caa_CD = torch.randn(len(CLASS_NAMES) - 1, width, generator=torch.Generator().manual_seed(1))
    if zero is not None:
        caa_CD[CLASS_NAMES.index(zero) - 1] = 0.0  # a category without training rows
    metadata: dict[str, Any] = {"model": model} | ({} if layer is None else {"layer": layer})
    if fingerprint is not None:
        metadata["model_fingerprint"] = fingerprint
    return SteeringVectors(CLASS_NAMES, caa_CD, metadata=metadata).save(folder)


def write_config(tmp_path: Path, model_dir: Path) -> Path:
    """A fit config around the tiny model (only its data.llm matters to `generate`)."""
    config = {
        "trainer": {"accelerator": "cpu", "default_root_dir": str(tmp_path / "run")},
        "model": {"class_path": "sae_refusal.sae.SAEModule"},
        "data": {
            "llm": {"name_or_path": str(model_dir)},
            "cache": {"root": str(tmp_path / "cache"), "layers": [1, 2]},
            "layer": 2,
        },
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# ------------------------------------------------------------------------------------------ steered_answers


def test_alpha_zero_is_the_unsteered_model(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    edit = ResidualSteering(random_vector(), alpha=0.0)
    answers = steered_answers(model, tokenizer, PROMPTS, {2: edit}, max_new_tokens=8)
    assert [a.prompt for a in answers] == PROMPTS
    for answer in answers:
        assert answer.steered == answer.unsteered and not answer.changed
        assert answer.unsteered.first_id is not None and answer.unsteered.first_token


def test_steering_changes_the_answers(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    edit = ResidualSteering(random_vector(), alpha=8.0)
    answers = steered_answers(model, tokenizer, PROMPTS, {2: edit}, max_new_tokens=8)
    assert all(a.changed for a in answers)
    # the steered run is the same as steering alone: the unsteered run leaves no hook behind
    again = steered_answers(model, tokenizer, PROMPTS, {2: edit}, max_new_tokens=8)
    assert again == answers


def test_generated_positions_steer_every_decode_step_but_not_the_prefill(tiny: tuple[Any, Any]) -> None:
    """With the KV cache on, positions='generated' leaves the first token alone and changes the rest."""
    model, tokenizer = tiny
    edit = ResidualSteering(random_vector(), alpha=8.0, positions="generated")
    answers = steered_answers(model, tokenizer, PROMPTS, {2: edit}, max_new_tokens=8, stop_ids=[])
    for answer in answers:
        assert answer.steered.first_id == answer.unsteered.first_id
        assert answer.steered.text != answer.unsteered.text


def test_per_row_edits_steer_only_their_rows(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    alpha_N = torch.tensor([0.0, 8.0, 0.0])

    def edits(indices: list[int]) -> dict[int, ResidualSteering]:
        return {2: ResidualSteering(random_vector(), alpha=alpha_N[indices])}

    answers = steered_answers(model, tokenizer, PROMPTS, edits, max_new_tokens=6, batch_size=2)
    assert [a.changed for a in answers] == [False, True, False]


def test_steered_answers_checks_its_arguments(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    edit = ResidualSteering(random_vector(), alpha=1.0)
    assert steered_answers(model, tokenizer, [], {2: edit}) == []
    with pytest.raises(ValueError, match="layer"):
        steered_answers(model, tokenizer, PROMPTS, {9: edit})
    with pytest.raises(ValueError, match="max_new_tokens"):
        steered_answers(model, tokenizer, PROMPTS, {2: edit}, max_new_tokens=0)


def test_parse_positions() -> None:
    assert [parse_positions(p) for p in ("all", "prompt", "generated", "3")] == [
        "all",
        "prompt",
        "generated",
        3,
    ]
    for bad in ("-1", "last", "1.5", ""):
        with pytest.raises(ValueError, match="--positions"):
            parse_positions(bad)


# ------------------------------------------------------------------------------------------ the command


def parse_report(out: str) -> tuple[str, list[tuple[str, str]]]:
    """The header line and, per prompt, the unsteered and steered (first token + answer) blocks."""
    blocks = re.findall(r"  unsteered: (.*?\n.*?)\n  steered:   (.*?\n.*?)(?:\n|$)", out)
    return out.splitlines()[0], blocks


def test_generate_command_alpha_zero_prints_identical_answers(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, tiny_model_dir)
    vectors = save_vectors(tmp_path / "vectors")
    args = ["generate", "--config", str(config), "--vectors", str(vectors), "--category", "safety"]
    prompts = ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--max_new_tokens", "6"]
    main([*args, "--alpha", "0", *prompts])
    out = capsys.readouterr().out
    header, blocks = parse_report(out)
    assert header.startswith("steering: category 'safety' (caa vector, norm ")
    assert "x alpha 0 at layer 2, positions all" in header
    assert len(blocks) == 2 and all(before == after for before, after in blocks)
    assert "changed the first token of 0 and the answer of 0 of 2 prompt(s)" in out

    # a strong vector changes them; the canonical category name works too; --layer may repeat the layer
    main([*args[:-1], "Requests with safety concerns", "--alpha", "8", "--layer", "2", *prompts])
    header, blocks = parse_report(capsys.readouterr().out)
    assert "category 'safety'" in header and "x alpha 8 at layer 2" in header
    assert len(blocks) == 2 and all(before != after for before, after in blocks)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--category", "nonsense"], "--category: unknown category 'nonsense'"),
        (["--category", "benign"], "--category: unknown category 'benign'"),
        (["--vectors", "{tmp}/missing"], "--vectors: folder {tmp}/missing does not exist"),
        (["--vectors", "{tmp}/empty"], "--vectors: {tmp}/empty/vectors.json does not exist"),
        (["--vectors", "{tmp}/narrow"], "--vectors {tmp}/narrow: vector width 16 != the model's width 32"),
        (
            ["--layer", "1"],
            "--layer 1 does not match the layer the vectors in {tmp}/vectors were computed at (2)",
        ),
        (["--vectors", "{tmp}/no-layer"], "--layer: the vectors in {tmp}/no-layer record no layer"),
        (["--vectors", "{tmp}/no-layer", "--layer", "7"], "--layer: layer 7 is out of range"),
        (["--space", "sas_decoded"], "--space sas_decoded: {tmp}/vectors holds no 'sas_decoded' vectors"),
        (["--positions", "end"], "--positions: expected all, prompt, generated"),
        (["--alpha", "nan"], "--alpha: must be finite"),
        (["--max_new_tokens", "0"], "--max_new_tokens: must be a positive integer"),
        (
            ["--vectors", "{tmp}/other"],
            "--vectors {tmp}/other: the vectors were made on model 'tiny' whose weights differ from data.llm",
        ),
        (
            ["--vectors", "{tmp}/zero"],
            "--vectors {tmp}/zero: the caa vector of category 'safety' is all zeros (a category without "
            "training rows gets one), so steering with it changes nothing; choose another category or "
            "artifact, or set --allow_zero_vector",
        ),
        (
            ["--vectors", "{tmp}/nan"],
            "--vectors: {tmp}/nan/vectors.safetensors: tensor 'caa_CD' holds inf/nan",
        ),
    ],
)
def test_generate_command_bad_inputs_are_one_line_naming_the_flag(
    change: list[str],
    message: str,
    tmp_path: Path,
    tiny_model_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_config(tmp_path, tiny_model_dir)
    save_vectors(tmp_path / "vectors")
    save_vectors(tmp_path / "narrow", width=16)
    save_vectors(tmp_path / "no-layer", layer=None)
    save_vectors(tmp_path / "other", fingerprint={"model": "tiny", "weights_hash": "other weights"})
    save_vectors(tmp_path / "zero", zero="safety")
    nan = save_vectors(tmp_path / "nan")
    tensors = load_file(str(nan / "vectors.safetensors"))
    tensors["caa_CD"][0, 0] = float("nan")
    save_file(tensors, str(nan / "vectors.safetensors"))
    (tmp_path / "empty").mkdir()
    options = {
        "--config": str(config),
        "--vectors": str(tmp_path / "vectors"),
        "--category": "safety",
        "--alpha": "1",
        "--prompt": "hello",
    }
    for flag, value in zip(change[::2], change[1::2], strict=True):
        options[flag] = value.format(tmp=tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["generate", *(item for pair in options.items() for item in pair)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("sae-refusal: error: ")]
    assert len(errors) == 1 and "Traceback" not in err
    assert message.format(tmp=tmp_path) in errors[0]


def test_generate_command_takes_vectors_of_its_model_and_zero_vectors_when_allowed(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    config = write_config(tmp_path, tiny_model_dir)
    own = model_fingerprint(LLMConfig(name_or_path=str(tiny_model_dir)))
    staged = {**own, "model": "/elsewhere/the-same-weights"}  # the same weights by another name
    base = [
        "generate",
        "--config",
        str(config),
        "--category",
        "safety",
        "--prompt",
        "hi",
        "--max_new_tokens",
        "2",
    ]
    with caplog.at_level("WARNING", logger="sae_refusal"):
        main([*base, "--vectors", str(save_vectors(tmp_path / "own", fingerprint=staged)), "--alpha", "4"])
    assert "records no model fingerprint" not in caplog.text
    capsys.readouterr()
    zero = save_vectors(tmp_path / "zero", zero="safety", fingerprint=own)
    main([*base, "--vectors", str(zero), "--alpha", "4", "--allow_zero_vector"])
    header, blocks = parse_report(capsys.readouterr().out)
    assert "(caa vector, norm 0)" in header and blocks and all(before == after for before, after in blocks)
    other = save_vectors(tmp_path / "other", fingerprint={**own, "adapter": "some adapter"})
    main([*base, "--vectors", str(other), "--alpha", "1", "--allow_other_model"])
    with caplog.at_level("WARNING", logger="sae_refusal"):
        main([*base, "--vectors", str(save_vectors(tmp_path / "old")), "--alpha", "1"])
    assert f"--vectors {tmp_path / 'old'} records no model fingerprint (made on 'tiny'" in caplog.text


def test_generate_command_needs_its_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "x.yaml"
    config.write_text("data: {layer: 1}\n")
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--config", str(config), "--vectors", "v", "--category", "safety", "--alpha", "1"])
    assert exit_.value.code == 2
    assert "the following arguments are required: --prompt" in capsys.readouterr().err


def test_generate_help_imports_neither_lightning_nor_torch() -> None:
    code = (
        "import sys\n"
        "from sae_refusal.cli import main\n"
        "try:\n"
        "    main(['generate', '--help'])\n"
        "except SystemExit as exit_:\n"
        "    assert exit_.code in (0, None), exit_.code\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'torch', 'transformers'})\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: sae-refusal generate" in done.stdout and "--vectors DIR" in done.stdout


def test_steered_answer_changed_compares_tokens() -> None:
    from sae_refusal.steer.generate import Answer

    same = Answer(" [respond]", 5, "hi", stopped=True, decision="respond")
    assert not SteeredAnswer("p", same, same).changed
    other = Answer(" [Requests with safety concerns]", 7, "hi", stopped=True, decision="safety")
    assert SteeredAnswer("p", same, other).changed


def test_generate_command_engine_flag(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--engine`` reaches the dispatcher for both runs; hf and fast print the same answers."""
    from sae_refusal.llm import engine as engine_module

    seen: list[str] = []
    real = engine_module.generate

    def recording(*args: Any, engine: str = "auto", **kwargs: Any) -> Any:
        seen.append(engine)
        return real(*args, engine=engine, **kwargs)

    monkeypatch.setattr(engine_module, "generate", recording)
    config = write_config(tmp_path, tiny_model_dir)
    vectors = save_vectors(tmp_path / "vectors")
    args = ["generate", "--config", str(config), "--vectors", str(vectors), "--category", "safety"]
    args += ["--alpha", "8", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--max_new_tokens", "6"]
    reports = {}
    for engine in ("hf", "fast", None):
        main([*args, *(["--engine", engine] if engine else [])])
        reports[engine] = capsys.readouterr().out
    assert seen == ["hf", "hf", "fast", "fast", "auto", "auto"]  # unsteered and steered runs
    assert reports["fast"] == reports["hf"] == reports[None]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--engine", "turbo"])
    assert exit_.value.code == 2
    assert "--engine" in capsys.readouterr().err
