"""Fill an activation cache: prompts -> chat template -> early-exit last-token residuals -> shards.

:func:`cached_activations` is the one entry point: it computes the :class:`CacheIdentity` of the request
without loading the model weights (tokenizer, config and a weights fingerprint only), reuses a cache under
``CacheConfig.root`` that covers it, and otherwise loads the model once and writes a new cache atomically.

The identity holds every input that changes the numbers (see :class:`CacheIdentity`): a fine-tuned model
(``llm.adapter_path``) never shares a cache with its base, nor do two system prompts, chat templates,
tokenizers, compute dtypes or attention kernels. Config keys in errors are those of the ``data`` section of a
fit config (``data.cache.*``, ``data.llm.*``); :class:`CacheConfig` checks run when it is built.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from sae_refusal.activations.cache import (
    ActivationCache,
    ActivationCacheWriter,
    CacheIdentity,
    NonFiniteActivationsError,
    find_cache,
    first_non_finite,
)
from sae_refusal.activations.config import KEY, CacheConfig
from sae_refusal.atomic import remove_stale_temporaries
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
from sae_refusal.llm.tokenize import (
    DEFAULT_MAX_LENGTH_CAP,
    check_max_length,
    context_length,
    tokenizer_fingerprint,
)

log = logging.getLogger(__name__)


def _prompt_row(prompt_set: PromptSet, index: int) -> dict[str, object]:
    p = prompt_set[index]
    return {
        "id": p.id,
        "label": str(p.label),
        "category": p.category,
        "subcategory": p.subcategory,
        "source": p.source,
    }


def _max_length(cfg: CacheConfig, llm: LLMConfig, context: int | None) -> int:
    if cfg.max_length is None:
        return DEFAULT_MAX_LENGTH_CAP if context is None else min(context, DEFAULT_MAX_LENGTH_CAP)
    check_max_length(cfg.max_length, context, key=f"{KEY}.max_length", model=llm.name_or_path)
    return cfg.max_length


def _text_hash(text: str | None) -> str:
    return hashlib.sha256(json.dumps(text or None).encode()).hexdigest()


def request_identity(prompt_set: PromptSet, llm: LLMConfig, cfg: CacheConfig) -> CacheIdentity:
    """The identity a cache for this request must have; loads tokenizer and config, not weights.

    The first call in a process reads every local weight file once (whole-file sha256, memoised).

    Raises:
        ValueError: On a bad layer (``data.cache.layers``), a ``data.cache.max_length`` beyond the model's
            context, or a chat template that does not exist or ignores the prompt
            (``data.cache.chat_template``; a ``ChatTemplateError``, or also a ``FileNotFoundError`` for a
            missing template file).
    """
    tokenizer = load_tokenizer(llm)
    model_config = load_model_config(llm)
    n_layers = int(model_config.num_hidden_layers)
    layers = validate_layers(cfg.layers, n_layers, key=f"{KEY}.layers")
    max_length = _max_length(cfg, llm, context_length(model_config, tokenizer))
    template_key = f"{KEY}.chat_template"
    # The template is checked with the system prompt in place (it must render it and use the content).
    chat_template_hash(tokenizer, cfg.chat_template, cfg.system_prompt, key=template_key)
    fingerprint = model_fingerprint(llm)
    return CacheIdentity(
        model=fingerprint["model"] + (f"#{fingerprint['gguf_file']}" if fingerprint["gguf_file"] else ""),
        revision=fingerprint["revision"] or "local",
        weights_hash=fingerprint["weights_hash"],
        adapter_hash=fingerprint.get("adapter", ""),
        model_dtype=llm.dtype,
        quantization=fingerprint["quantization"],
        attn_implementation=llm.attn_implementation or "",
        trust_remote_code=bool(llm.trust_remote_code),
        tokenizer_hash=tokenizer_fingerprint(tokenizer),
        chat_template_hash=chat_template_hash(tokenizer, cfg.chat_template, key=template_key),
        system_prompt_hash=_text_hash(cfg.system_prompt),
        layers=tuple(layers),
        prompt_set_hash=prompt_set.content_hash(),
        dtype=cfg.dtype,
        max_length=max_length,
        overflow=cfg.overflow,
    )


def _non_finite_error(
    llm: LLMConfig, identity: CacheIdentity, layer: int, prompt_id: str, *, in_model: bool
) -> NonFiniteActivationsError:
    adapter = f" with adapter {llm.adapter_path!r}" if llm.adapter_path else ""
    if in_model:
        cause = (
            f"model {llm.name_or_path!r}{adapter} (data.llm.dtype={llm.dtype!r}) produced non-finite "
            "activations"
        )
        hint = "check its weights for inf/nan, or load it in float32 (data.llm.dtype)"
    else:
        cause = (
            f"activations of model {llm.name_or_path!r}{adapter} overflow the storage dtype "
            f"{identity.dtype!r}"
        )
        hint = f"store them as float32 ({KEY}.dtype)"
    return NonFiniteActivationsError(
        f"{cause} at layer {layer} for prompt {prompt_id!r} (the first such prompt); no cache was written: "
        f"{hint}"
    )


def compute_cache(
    prompt_set: PromptSet, llm: LLMConfig, cfg: CacheConfig, identity: CacheIdentity, folder: Path
) -> ActivationCache:
    """Run the model over ``prompt_set`` and write a cache for ``identity`` at ``folder`` (atomically).

    Raises:
        NonFiniteActivationsError: If the model produces ``inf`` or ``nan`` for any prompt (the message
            names the model, the layer and the first such prompt's id); nothing is written.
    """
    if len(prompt_set) == 0:
        raise ValueError("the prompt set is empty: nothing to cache (check the prompt sources and split)")
    tokenizer = load_tokenizer(llm)
    formatted = format_prompts(
        tokenizer,
        prompt_set.texts,
        chat_template=cfg.chat_template,
        system_prompt=cfg.system_prompt,
        key=f"{KEY}.chat_template",
    )
    model = load_model(llm)
    d_model = int(model.config.hidden_size)
    n_truncated = 0
    start = time.perf_counter()
    storage = getattr(torch, identity.dtype)
    remove_stale_temporaries(folder.parent)  # what a killed run (any identity) left under the cache root
    with ActivationCacheWriter(folder, identity, d_model=d_model, shard_rows=cfg.shard_rows) as writer:
        # stderr: prompts/s and ETA, fed after every forward pass; into a log file (not a terminal) a line
        # every 30 s rather than ten a second. The summary line below is logged either way.
        interval = 0.1 if sys.stderr.isatty() else 30.0
        with tqdm(
            total=len(prompt_set), desc="caching activations", unit="prompt", mininterval=interval
        ) as bar:
            for batch in iter_last_token_residuals(
                model,
                tokenizer,
                formatted,
                list(identity.layers),
                batch_size=cfg.batch_size,
                token_budget=cfg.token_budget,
                sort_window=cfg.sort_window,
                max_length=identity.max_length,
                overflow=identity.overflow,
                progress=bar.update,
            ):
                stored = {layer: acts_BD.float().to("cpu", storage) for layer, acts_BD in batch.acts.items()}
                for layer, acts_BD in stored.items():
                    bad = first_non_finite(acts_BD)
                    if bad is not None:
                        raise _non_finite_error(
                            llm,
                            identity,
                            layer,
                            prompt_set[batch.indices[bad]].id,
                            in_model=first_non_finite(batch.acts[layer]) is not None,
                        )
                writer.add(stored)
                n_truncated += batch.n_truncated
        if n_truncated:
            log.warning(
                "%d of %d prompts were longer than %d tokens and truncated from the left",
                n_truncated,
                len(prompt_set),
                identity.max_length,
            )
        rows = [_prompt_row(prompt_set, i) for i in range(len(prompt_set))]
        batching = {
            "batch_size": cfg.batch_size,
            "token_budget": cfg.token_budget,
            "sort_window": cfg.sort_window,
        }
        cache = writer.commit(
            rows, extra={"n_truncated": n_truncated, "n_prompts": len(prompt_set), "batching": batching}
        )
    seconds = time.perf_counter() - start
    log.info(
        "cached %d prompts at layers %s in %.1f s (%.1f prompts/s) -> %s",
        len(prompt_set),
        list(identity.layers),
        seconds,
        len(prompt_set) / max(seconds, 1e-9),
        cache.folder,
    )
    return cache


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
