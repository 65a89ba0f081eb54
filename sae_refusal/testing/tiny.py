"""Tiny random-weight causal LMs (Llama, Qwen2, Mistral shapes) and a byte-level BPE tokenizer.

Everything is built locally from configs, so tests never touch the network. The tokenizer carries a
ChatML-style chat template; pass ``chat_template=None`` to get one without (for error-path tests).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "How do I bake bread at home? Tell me a story about a dragon.",
    "Please explain photosynthesis, the water cycle and gravity in simple words.",
    "What is the capital of France? Write a poem about the sea and the stars.",
    "Give me step by step instructions, a list of ideas, and a short summary.",
    "You are a helpful assistant. The user asks a question and you answer it.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()[]{}<>-_/\\@#$%^&*+=~`|",
]

TINY_ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2", "mistral")


def build_tiny_tokenizer(
    chat_template: str | None = CHATML_TEMPLATE, vocab_size: int = 400
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in memory on a few sentences (covers any text)."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = chat_template
    tokenizer.model_max_length = 256
    return tokenizer


def _config(arch: str, vocab_size: int, num_layers: int, hidden_size: int) -> PretrainedConfig:
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {TINY_ARCHITECTURES}")


def build_tiny_model(
    arch: str = "llama",
    vocab_size: int = 400,
    num_layers: int = 4,
    hidden_size: int = 32,
    seed: int = 0,
) -> PreTrainedModel:
    """A random-weight causal LM of the given architecture, fp32, eval mode, eager attention."""
    config = _config(arch, vocab_size, num_layers, hidden_size)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()


def save_tiny_model(folder: str | Path, arch: str = "llama", **kwargs: int) -> Path:
    """Save a tiny model and its tokenizer as a standard HF folder; returns the folder."""
    folder = Path(folder)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(arch, vocab_size=len(tokenizer), **kwargs)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_llama3_8b_shape(
    device: str | torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> PreTrainedModel:
    """A Llama-3-8B-shaped causal LM with random weights, built directly on ``device`` (eval mode, no
    gradients), for throughput benchmarks: throughput does not depend on weight values.

    The global RNG is seeded with ``seed`` (Hugging Face's initialisers draw from it).
    """
    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    return model
