"""Decoder-layer discovery, model width and layer-index validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

from sae_refusal.llm import d_model, decoder_layers, num_layers, validate_layers
from sae_refusal.testing import TINY_ARCHITECTURES, build_tiny_model


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_decoder_layers_tiny(arch: str) -> None:
    model = build_tiny_model(arch, num_layers=3, hidden_size=32)
    layers = decoder_layers(model)
    assert isinstance(layers, nn.ModuleList)
    assert len(layers) == 3 == num_layers(model)
    assert layers is model.model.layers
    assert d_model(model) == 32
    # The base model works too.
    assert decoder_layers(model.model) is layers


def test_decoder_layers_gpt2_and_neox() -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    assert decoder_layers(gpt2) is gpt2.transformer.h
    assert d_model(gpt2) == 16
    neox = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32, vocab_size=50
        )
    )
    assert decoder_layers(neox) is neox.gpt_neox.layers


def test_decoder_layers_unknown_model() -> None:
    with pytest.raises(TypeError, match="decoder layers of Linear"):
        decoder_layers(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="hidden size"):
        d_model(nn.Linear(2, 2))


def test_validate_layers_sorts_dedups_and_wraps_negatives() -> None:
    assert validate_layers([3, 1, 1, -1], 6) == [1, 3, 5]
    assert validate_layers(2, 6) == [2]
    assert validate_layers(range(3), 3) == [0, 1, 2]
    assert validate_layers([-6], 6) == [0]


@pytest.mark.parametrize("bad", [6, -7, 100])
def test_validate_layers_out_of_range_names_key_layer_and_range(bad: int) -> None:
    with pytest.raises(ValueError, match=rf"^layers: layer {bad} is out of range.*0\.\.5"):
        validate_layers([0, bad], 6)


def test_validate_layers_custom_key_empty_and_non_int() -> None:
    with pytest.raises(ValueError, match=r"^cache\.layers: no layers"):
        validate_layers([], 4, key="cache.layers")
    with pytest.raises(ValueError, match="not an integer"):
        validate_layers([1.0], 4)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="not an integer"):
        validate_layers([True], 4)
    with pytest.raises(ValueError, match="not an integer"):
        validate_layers([torch.tensor(1)], 4)  # type: ignore[list-item]
