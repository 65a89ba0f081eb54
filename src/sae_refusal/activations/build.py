"""Fill an activation cache: prompts -> chat template -> early-exit last-token residuals -> shards.

:func:`cached_activations` is the one entry point: it computes the :class:`CacheIdentity` of the request
without loading the model weights (tokenizer, config and a weights fingerprint only), reuses a cache under
``CacheConfig.root`` that covers it, and otherwise loads the model once and writes a new cache atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sae_refusal.activations.cache import (
    VERIFY_MODES,
    ActivationCache,
    ActivationCacheWriter,
    CacheIdentity,
    find_cache,
)
from sae_refusal.data.chat import chat_template_hash, format_prompts
from sae_refusal.data.prompt_set import PromptSet
from sae_refusal.llm.extraction import iter_last_token_residuals
from sae_refusal.llm.layers import validate_layers
from sae_refusal.llm.loading import (
    LLMConfig,
    load_model,
    load_model_config,
    load_tokenizer,
    model_fingerprint,
)
from sae_refusal.llm.tokenize import OVERFLOW_POLICIES

log = logging.getLogger(__name__)

_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class CacheConfig:
    """Where and how activations are cached.

    Args:
        root: Folder holding one sub-folder per cache (named by the identity hash).
        layers: Layers to cache (residual stream after decoder block ``l``, 0-based; negative indices
            count from the end).
        dtype: Storage dtype of the activations (``float32``, ``bfloat16`` or ``float16``).
        batch_size: Prompts per forward pass.
        max_length: Token budget per prompt; ``None`` uses the model's context (capped).
        overflow: ``truncate_left`` (keep the last ``max_length`` tokens and count them) or ``error``.
        shard_rows: Rows per safetensors shard.
        verify: Check on open: ``size`` (shard byte sizes), ``hash`` (sha256) or ``none``.
        chat_template: Jinja chat template overriding the tokenizer's own (needed when it has none).
        system_prompt: Optional system message prepended to every prompt.
    """

    root: str = "runs/activation_cache"
    layers: Sequence[int] = (10, 15)
    dtype: str = "float32"
    batch_size: int = 16
    max_length: int | None = None
    overflow: str = "truncate_left"
    shard_rows: int = 4096
    verify: str = "size"
    chat_template: str | None = None
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"cache.dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"cache.overflow must be one of {OVERFLOW_POLICIES}, got {self.overflow!r}")
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"cache.verify must be one of {VERIFY_MODES}, got {self.verify!r}")
        if self.batch_size < 1:
            raise ValueError(f"cache.batch_size must be >= 1, got {self.batch_size}")
        if not self.layers:
            raise ValueError("cache.layers must name at least one layer")


def _prompt_row(prompt_set: PromptSet, index: int) -> dict[str, object]:
    p = prompt_set[index]
    return {
        "id": p.id,
        "label": str(p.label),
        "category": p.category,
        "subcategory": p.subcategory,
        "source": p.source,
    }


def _max_length(cfg: CacheConfig, model_max: int) -> int:
    if cfg.max_length is None:
        return min(model_max, 4096)
    if cfg.max_length < 1:
        raise ValueError(f"cache.max_length must be >= 1, got {cfg.max_length}")
    return cfg.max_length


def request_identity(prompt_set: PromptSet, llm: LLMConfig, cfg: CacheConfig) -> CacheIdentity:
    """The identity a cache for this request must have; loads tokenizer and config, not weights."""
    tokenizer = load_tokenizer(llm)
    model_config = load_model_config(llm)
    n_layers = int(model_config.num_hidden_layers)
    layers = validate_layers(cfg.layers, n_layers, key="cache.layers")
    fingerprint = model_fingerprint(llm)
    model_max = int(getattr(model_config, "max_position_embeddings", 4096) or 4096)
    return CacheIdentity(
        model=fingerprint["model"] + (f"#{fingerprint['gguf_file']}" if fingerprint["gguf_file"] else ""),
        revision=fingerprint["revision"] or "local",
        weights_hash=fingerprint["weights_hash"],
        model_dtype=llm.dtype,
        quantization=fingerprint["quantization"],
        layers=tuple(layers),
        chat_template_hash=chat_template_hash(tokenizer, cfg.chat_template, cfg.system_prompt),
        prompt_set_hash=prompt_set.content_hash(),
        dtype=cfg.dtype,
        max_length=_max_length(cfg, model_max),
        overflow=cfg.overflow,
    )


def compute_cache(
    prompt_set: PromptSet, llm: LLMConfig, cfg: CacheConfig, identity: CacheIdentity, folder: Path
) -> ActivationCache:
    """Run the model over ``prompt_set`` and write a cache for ``identity`` at ``folder`` (atomically)."""
    if len(prompt_set) == 0:
        raise ValueError("the prompt set is empty: nothing to cache (check the prompt sources and split)")
    tokenizer = load_tokenizer(llm)
    formatted = format_prompts(
        tokenizer, prompt_set.texts, chat_template=cfg.chat_template, system_prompt=cfg.system_prompt
    )
    model = load_model(llm)
    d_model = int(model.config.hidden_size)
    n_truncated = 0
    with ActivationCacheWriter(folder, identity, d_model=d_model, shard_rows=cfg.shard_rows) as writer:
        for batch in iter_last_token_residuals(
            model,
            tokenizer,
            formatted,
            list(identity.layers),
            batch_size=cfg.batch_size,
            max_length=identity.max_length,
            overflow=identity.overflow,
        ):
            writer.add({layer: acts_BD.float() for layer, acts_BD in batch.acts.items()})
            n_truncated += batch.n_truncated
        if n_truncated:
            log.warning(
                "%d of %d prompts were longer than %d tokens and truncated from the left",
                n_truncated,
                len(prompt_set),
                identity.max_length,
            )
        rows = [_prompt_row(prompt_set, i) for i in range(len(prompt_set))]
        return writer.commit(rows, extra={"n_truncated": n_truncated, "n_prompts": len(prompt_set)})


def cached_activations(prompt_set: PromptSet, llm: LLMConfig, cfg: CacheConfig) -> ActivationCache:
    """Return a cache covering this request, reusing a matching one under ``cfg.root`` or computing it."""
    identity = request_identity(prompt_set, llm, cfg)
    found = find_cache(cfg.root, identity)
    if found is not None:
        log.info("reusing activation cache %s", found)
        return ActivationCache.open(found, expect=identity, verify=cfg.verify)
    folder = Path(cfg.root) / identity.key()
    log.info(
        "computing activation cache %s (%d prompts, layers %s)",
        folder,
        len(prompt_set),
        list(identity.layers),
    )
    with torch.inference_mode():
        return compute_cache(prompt_set, llm, cfg, identity, folder)
