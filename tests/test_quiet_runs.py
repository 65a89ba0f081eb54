"""What a run prints is about the run: known third-party noise silenced at its source, progress where slow."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning  # noqa: F401  (imported before any capsys test: its log handler keeps the session's stderr)
import pytest

from sae_refusal.cli import main

#: Messages that said nothing about the user's run (issue 23).
NOISE = ("is_gradient_checkpointing", "gradient_checkpointing_enable", "treespec", "💡 Tip", "litlogger")


def test_a_fit_prints_no_known_noise_and_shows_splice_progress(
    tmp_path: Path,
    tiny_model_dir: Path,
    prompt_file: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from tests.test_cli import tiny_config

    config = tiny_config(tmp_path, tiny_model_dir, prompt_file)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        main(["fit", "--config", str(config)])
    shown = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    err = capsys.readouterr().err
    for text in NOISE:
        assert not any(text in line for line in shown), (text, [s for s in shown if text in s])
        assert text not in err
    messages = [r.getMessage() for r in caplog.records]
    # the first splice pass (model load + the clean run) says what it does before it does it, then its rate
    load = next(i for i, m in enumerate(messages) if m.startswith("splice metrics: loading"))
    assert any(m.startswith(f"loading model {tiny_model_dir}") for m in messages[load:])
    assert any("splice metrics: 3/3 prompts" in m and "prompts/s" in m for m in messages[load:])


def test_loading_a_lora_artifact_raises_no_deprecation_warning(tmp_path: Path, tiny_model_dir: Path) -> None:
    from sae_refusal.llm.loading import LLMConfig, load_model_and_tokenizer
    from tests.test_cache_identity import make_artifact

    artifact = make_artifact(tiny_model_dir, tmp_path / "artifact")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model_and_tokenizer(LLMConfig(name_or_path=str(tiny_model_dir), adapter_path=str(artifact)))
    noisy = [str(w.message) for w in caught if any(text in str(w.message) for text in NOISE)]
    assert not noisy, noisy


def test_gradient_checkpointing_uses_the_current_name(tiny_model_dir: Path) -> None:
    from sae_refusal.llm.compat import enable_activation_checkpointing
    from sae_refusal.llm.loading import LLMConfig, load_model

    model = load_model(LLMConfig(name_or_path=str(tiny_model_dir)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        enable_activation_checkpointing(model)
    assert model.is_activation_checkpointing if hasattr(model, "is_activation_checkpointing") else True
    assert not [w for w in caught if "deprecated" in str(w.message)], [str(w.message) for w in caught]
