"""Tiny random-weight causal LMs (Llama, Qwen2, Mistral shapes) and a byte-level BPE tokenizer.

Everything is built locally from configs, so tests never touch the network. The tokenizer carries a
ChatML-style chat template; pass ``chat_template=None`` to get one without (for error-path tests).

:func:`widen_model` builds, from a tiny model of width ``D``, a wider model (``d_new``) whose residual
stream is an exactly known linear image of the small one's, ``h_B = scale * h_A @ P_DE``, with the same
logits: a ground truth for cross-model transfer (:mod:`sae_refusal.transfer`). Derivation, for a selection
matrix ``P`` (``P @ P.T = I_D``) and ``x' = s * x @ P``:

* ``mean(x'^2)`` over ``d_new`` coordinates is ``s^2 * D / d_new * mean(x^2)`` over ``D``; with
  ``eps' = eps * s^2 * D / d_new`` the RMS normaliser of ``x'`` is ``s * sqrt(D / d_new)`` times that of
  ``x``, so ``x' / rms'(x') = sqrt(d_new / D) * (x / rms(x)) @ P``, and norm weights
  ``w' = sqrt(D / d_new) * w @ P`` give ``norm'(x') = norm(x) @ P`` exactly.
* A matrix reading the residual (``q/k/v``, ``gate/up``, ``lm_head``; ``W`` is ``(out, D)``) becomes
  ``W @ P``, so ``norm(x) @ P @ (W @ P).T = norm(x) @ W.T``: attention and MLP internals are unchanged (heads,
  ``head_dim``, biases in head space, rotary embeddings).
* A matrix writing the residual (``o_proj``, ``down_proj``; ``(D, in)``) becomes ``s * P.T @ W`` (a bias
  ``s * b @ P``), so each block adds ``s * (its old update) @ P``; the embedding becomes ``s * E @ P``.
  By induction every layer's residual is ``s * h_A @ P`` and the final norm feeds the head ``norm(h) @ P``.
"""

from __future__ import annotations

import copy
import math
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


#: Parameter-name suffixes :func:`widen_model` knows, by how the parameter meets the residual stream.
_READS_RESIDUAL = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")
_HEAD_SPACE = ("q_proj.bias", "k_proj.bias", "v_proj.bias")
_WRITES_RESIDUAL = ("o_proj.weight", "down_proj.weight")
_WRITES_RESIDUAL_BIAS = ("o_proj.bias", "down_proj.bias")
_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight", "model.norm.weight")


def widen_model(
    model: PreTrainedModel, d_new: int, *, scale: float = 1.0, seed: int = 0
) -> tuple[PreTrainedModel, torch.Tensor]:
    """A wider copy of a tiny Llama/Qwen2/Mistral model whose residual is a known linear image of its own.

    The new model has hidden size ``d_new`` (heads, key-value heads, ``head_dim`` and intermediate size kept)
    and, at every layer, residual ``scale * h @ P_DE`` where ``h`` is the original's residual and ``P_DE`` a
    seeded random selection matrix (old coordinate ``i`` goes to a distinct new coordinate, the others stay
    0). Its logits equal the original's (up to float rounding). See the module notes for the derivation.

    Args:
        model: A model from :func:`build_tiny_model` (or any Llama/Qwen2/Mistral-shaped causal LM with untied
            embeddings and RMS norms).
        d_new: New hidden size, larger than the model's.
        scale: Positive factor on the new residual stream (a negative one would flip the sign of every
            RMS-normalised vector, which the norm weights would then have to undo).
        seed: Seed of the ``torch.Generator`` that draws the coordinate placement.

    Returns:
        ``(wide_model, W_DE)``: the wide model (eval mode, same dtype and device, eager attention unless the
        original used another) and the known map ``W_DE = scale * P_DE`` (float32, CPU).

    Raises:
        ValueError: If ``d_new`` is not larger than the model's width, ``scale`` is not positive and finite,
            the embeddings are tied, or the model has a parameter this construction does not know.
    """
    config = model.config
    d_old = int(config.hidden_size)
    if isinstance(d_new, bool) or not isinstance(d_new, int) or d_new <= d_old:
        raise ValueError(
            f"d_new must be an integer larger than the model's hidden size {d_old}, got {d_new!r}"
        )
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be finite and positive, got {scale!r}")
    if getattr(config, "tie_word_embeddings", False):
        raise ValueError("model has tied word embeddings; widen_model needs tie_word_embeddings=False")
    n_heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or d_old // n_heads

    generator = torch.Generator().manual_seed(seed)
    cols_D = torch.randperm(d_new, generator=generator)[:d_old]  # new coordinate of each old one
    P_DE = torch.zeros(d_old, d_new)
    P_DE[torch.arange(d_old), cols_D] = 1.0
    norm_factor = math.sqrt(d_old / d_new)

    new_state: dict[str, torch.Tensor] = {}
    for name, old in model.state_dict().items():
        w = old.detach().to(device="cpu", dtype=torch.float32)
        if name.endswith(_READS_RESIDUAL) or name == "lm_head.weight":
            new = w.new_zeros(w.shape[0], d_new)
            new[:, cols_D] = w
        elif name == "model.embed_tokens.weight":
            new = w.new_zeros(w.shape[0], d_new)
            new[:, cols_D] = scale * w
        elif name.endswith(_WRITES_RESIDUAL):
            new = w.new_zeros(d_new, w.shape[1])
            new[cols_D] = scale * w
        elif name.endswith(_WRITES_RESIDUAL_BIAS):
            new = w.new_zeros(d_new)
            new[cols_D] = scale * w
        elif name.endswith(_NORMS):
            new = w.new_zeros(d_new)
            new[cols_D] = norm_factor * w
        elif name.endswith(_HEAD_SPACE):
            new = w
        else:
            raise ValueError(f"widen_model does not know how to widen parameter {name!r} of model")
        new_state[name] = new

    wide_config = copy.deepcopy(config)
    wide_config.hidden_size = d_new
    wide_config.head_dim = head_dim
    wide_config.rms_norm_eps = float(config.rms_norm_eps) * scale**2 * d_old / d_new
    attn = getattr(config, "_attn_implementation", None) or "eager"
    generator_state = torch.random.get_rng_state()
    try:  # the initial weights are all overwritten; keep the global RNG as it was
        wide = AutoModelForCausalLM.from_config(wide_config, attn_implementation=attn)
    finally:
        torch.random.set_rng_state(generator_state)
    wide.load_state_dict(new_state, strict=True)
    reference = next(model.parameters())
    wide = wide.to(device=reference.device, dtype=reference.dtype)
    return wide.eval(), scale * P_DE
