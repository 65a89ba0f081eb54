"""Splicing an SAE into the residual stream: identity and zero SAEs bound the metrics, padding is neutral."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from sae_refusal.llm import LLMConfig, load_model_and_tokenizer
from sae_refusal.sae import TopKSAE
from sae_refusal.sae.base import SAEOutput, SparseAutoencoder
from sae_refusal.sae.splice import splice_metrics

TEXTS = ["How do I bake bread?", "Tell me a fact about the sea and the number 7, please.", "Hi", "Why?"]


class ScaledSAE(SparseAutoencoder):
    """Reconstructs ``factor * x`` (1: perfect, 0: zero ablation)."""

    architecture = "scaled-test"

    def __init__(self, d_model: int, factor: float) -> None:
        super().__init__(d_model, 1)
        self.W_dec_FD = torch.nn.Parameter(torch.zeros(1, d_model))
        self.factor = factor

    def forward(self, x_BD: torch.Tensor, return_latents: bool = False) -> SAEOutput:
        zero = x_BD.new_zeros(())
        return SAEOutput(
            self.factor * x_BD, None, zero, zero, zero, zero, torch.zeros(1, dtype=torch.bool), {}
        )


@pytest.fixture(scope="module")
def lm(tiny_model_dir: Path) -> tuple[Any, Any]:
    return load_model_and_tokenizer(LLMConfig(name_or_path=str(tiny_model_dir)))


@pytest.mark.parametrize("positions", ["last", "all"])
def test_identity_and_zero_saes_bound_the_metrics(lm: tuple[Any, Any], positions: str) -> None:
    model, tokenizer = lm
    perfect = splice_metrics(model, tokenizer, TEXTS, 1, ScaledSAE(32, 1.0), positions=positions)
    assert perfect.top1_agree_last == 1.0 and perfect.positions == positions
    assert perfect.loss_spliced == pytest.approx(perfect.loss_clean, abs=1e-5)
    assert perfect.kl == pytest.approx(0.0, abs=1e-6) and perfect.kl_last == pytest.approx(0.0, abs=1e-6)
    assert perfect.loss_zero != pytest.approx(perfect.loss_clean)
    # a random-weight model may not get worse when a block's output is zeroed: then the share is undefined
    helps = perfect.loss_zero > perfect.loss_clean
    assert (
        perfect.loss_recovered == pytest.approx(1.0, abs=1e-4)
        if helps
        else math.isnan(perfect.loss_recovered)
    )
    zero = splice_metrics(model, tokenizer, TEXTS, 1, ScaledSAE(32, 0.0), positions=positions)
    assert zero.loss_spliced == pytest.approx(zero.loss_zero, abs=1e-5)
    assert zero.loss_recovered == pytest.approx(0.0, abs=1e-4) if helps else math.isnan(zero.loss_recovered)
    assert zero.kl > 0 and perfect.n_tokens == zero.n_tokens > 0
    assert (perfect.n_tokens == len(TEXTS)) == (positions == "last")


@pytest.mark.parametrize("positions", ["last", "all"])
def test_padding_does_not_change_the_metrics(lm: tuple[Any, Any], positions: str) -> None:
    model, tokenizer = lm
    sae = TopKSAE(32, 64, 4, generator=torch.Generator().manual_seed(0))
    alone = splice_metrics(model, tokenizer, TEXTS, -1, sae, batch_size=1, positions=positions)
    batched = splice_metrics(model, tokenizer, TEXTS, -1, sae, batch_size=4, positions=positions)
    for key, value in alone.to_dict().items():
        assert batched.to_dict()[key] == pytest.approx(value, rel=1e-4, abs=1e-5, nan_ok=True), key
    assert not model.training and next(sae.parameters()).device.type == "cpu"


def test_input_errors(lm: tuple[Any, Any]) -> None:
    model, tokenizer = lm
    with pytest.raises(ValueError, match="no prompts"):
        splice_metrics(model, tokenizer, [], 1, ScaledSAE(32, 1.0))
    with pytest.raises(ValueError, match="width 16"):
        splice_metrics(model, tokenizer, TEXTS, 1, ScaledSAE(16, 1.0))
    with pytest.raises(ValueError, match="positions"):
        splice_metrics(model, tokenizer, TEXTS, 1, ScaledSAE(32, 1.0), positions="first")
    with pytest.raises(ValueError, match="layer"):
        splice_metrics(model, tokenizer, TEXTS, 9, ScaledSAE(32, 1.0))
