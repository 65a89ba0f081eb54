"""Offline stand-ins for tests, examples and benchmarks: tiny tokenizers and random-weight models."""

from sae_refusal.testing.tiny import (
    TINY_ARCHITECTURES,
    build_llama3_8b_shape,
    build_tiny_model,
    build_tiny_tokenizer,
    save_tiny_model,
)

__all__ = [
    "TINY_ARCHITECTURES",
    "build_llama3_8b_shape",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "save_tiny_model",
]
