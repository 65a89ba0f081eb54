"""Fill an activation cache: prompts -> chat template -> early-exit last-token residuals -> shards.

:func:`cached_activations` is the one entry point: it computes the :class:`CacheIdentity` of the request
without loading the model weights (tokenizer, config and a weights fingerprint only), reuses a cache under
``CacheConfig.root`` that covers it, and otherwise loads the model and writes a new cache atomically.

Every process of a multi-process run takes part (:mod:`sae_refusal.activations.coordinator`: Lightning's DDP,
``sae-refusal cache --trainer.devices N``, ``torchrun``; one process alone is the same code with a world of
one). The work units are the cache's final shards (:mod:`sae_refusal.activations.shards`): rank 0 claims the
cache folder, keeps the shards an earlier stopped run finished (:mod:`sae_refusal.activations.staging`) and
shares out the rest by token count; each rank extracts its shards on its own device; once all succeeded,
rank 0 writes the manifest and renames the staging folder into place (see :func:`compute_cache`).

The identity holds every input that changes the numbers (see :class:`CacheIdentity`): a fine-tuned model
(``llm.adapter_path``) never shares a cache with its base, nor do two system prompts, chat templates,
tokenizers, compute dtypes or attention kernels. Config keys in errors are those of the ``data`` section of a
fit config (``data.cache.*``, ``data.llm.*``); :class:`CacheConfig` checks run when it is built.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sae_refusal.activations.cache import (
    ActivationCache,
    CacheIdentity,
    CacheMismatchError,
    CacheNotFoundError,
    NonFiniteActivationsError,
    find_cache,
    first_non_finite,
)
from sae_refusal.activations.config import KEY, CacheConfig
from sae_refusal.activations.coordinator import Coordinator, RankStatus, current_coordinator
from sae_refusal.activations.shards import ShardSpec, assign_longest_first, shard_plan
from sae_refusal.activations.staging import Staging, claim_cache_folder
from sae_refusal.atomic import FolderClaim, remove_stale_temporaries
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
    encode_prompts,
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


@dataclass(frozen=True)
class _Plan:
    """Rank 0's decision, shared with every rank: a cache found meanwhile, or who extracts which shards."""

    found: str | None = None
    done: tuple[int, ...] = ()
    shares: tuple[tuple[int, ...], ...] = ()


def _rank_llm(llm: LLMConfig, coordinator: Coordinator) -> LLMConfig:
    """``llm`` as this rank loads it: under a multi-process run with CUDA, ``auto``/``cuda`` mean this rank's
    own GPU (``auto`` would spread one model over all of them); anything else is kept."""
    if coordinator.world_size == 1 or llm.device not in ("auto", "cuda") or not torch.cuda.is_available():
        return llm
    device = coordinator.device
    if device is None or device.type != "cuda":
        device = torch.device("cuda", coordinator.local_rank)
    return dataclasses.replace(llm, device=str(device))


def _token_lengths(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[int]:
    """Token count of each formatted prompt as extraction runs it (left-truncated to ``max_length``)."""
    return [len(ids) for ids in encode_prompts(tokenizer, texts, max_length=max_length).input_ids]


def _extract_shard(
    model: Any,
    tokenizer: Any,
    formatted: Sequence[str],
    shard: ShardSpec,
    prompt_set: PromptSet,
    llm: LLMConfig,
    cfg: CacheConfig,
    identity: CacheIdentity,
    progress: Callable[[int], object],
) -> tuple[dict[int, torch.Tensor], int]:
    """One shard's activations ``{layer: (rows, d_model)}`` in the storage dtype, and its truncated prompts.

    Raises:
        NonFiniteActivationsError: Naming the model, the layer and the first non-finite prompt.
    """
    storage = getattr(torch, identity.dtype)
    parts: dict[int, list[torch.Tensor]] = {}
    n_truncated = 0
    for batch in iter_last_token_residuals(
        model,
        tokenizer,
        formatted[shard.first_row : shard.stop],
        list(identity.layers),
        batch_size=cfg.batch_size,
        token_budget=cfg.token_budget,
        sort_window=cfg.sort_window,
        max_length=identity.max_length,
        overflow=identity.overflow,
        progress=progress,
        pack_length=cfg.pack_length,
    ):
        stored = {layer: acts_BD.float().to("cpu", storage) for layer, acts_BD in batch.acts.items()}
        for layer, acts_BD in stored.items():
            bad = first_non_finite(acts_BD)
            if bad is not None:
                raise _non_finite_error(
                    llm,
                    identity,
                    layer,
                    prompt_set[shard.first_row + batch.indices[bad]].id,
                    in_model=first_non_finite(batch.acts[layer]) is not None,
                )
            parts.setdefault(layer, []).append(acts_BD)
        n_truncated += batch.n_truncated
    return {layer: torch.cat(chunks) for layer, chunks in parts.items()}, n_truncated


def _extract_share(
    mine: Sequence[ShardSpec],
    formatted: Sequence[str],
    prompt_set: PromptSet,
    llm: LLMConfig,
    cfg: CacheConfig,
    identity: CacheIdentity,
    staging: Staging,
    coordinator: Coordinator,
) -> dict[str, float]:
    """Extract this rank's shards into the staging folder; returns ``{"rows", "seconds"}`` of extraction."""
    if not mine:
        return {"rows": 0, "seconds": 0.0}
    tokenizer = load_tokenizer(llm)
    model = load_model(_rank_llm(llm, coordinator))
    rows = sum(shard.rows for shard in mine)
    desc = "caching activations"
    if coordinator.world_size > 1:
        desc += f" [rank {coordinator.rank}/{coordinator.world_size}]"
    # stderr: prompts/s and ETA, fed after every forward pass; into a log file (not a terminal) a line
    # every 30 s rather than ten a second. The summary line is logged by rank 0 either way.
    tty = sys.stderr.isatty()
    start = time.perf_counter()
    with tqdm(
        total=rows,
        desc=desc,
        unit="prompt",
        mininterval=0.1 if tty else 30.0,
        position=coordinator.local_rank if tty and coordinator.world_size > 1 else None,
    ) as bar:
        for shard in mine:
            acts, n_truncated = _extract_shard(
                model, tokenizer, formatted, shard, prompt_set, llm, cfg, identity, bar.update
            )
            staging.write(shard, acts, n_truncated)
    return {"rows": rows, "seconds": time.perf_counter() - start}


def _summary(statuses: Sequence[RankStatus], seconds: float) -> str:
    """``(R prompts/s)`` of the summary line, with each rank's own rate when there are several."""
    rows = sum(int(s.info["rows"]) for s in statuses)
    text = f"{rows / max(seconds, 1e-9):.1f} prompts/s"
    if len(statuses) > 1:
        rates = [
            f"{int(s.info['rows']) / s.info['seconds']:.1f}" if s.info["seconds"] > 0 else "-"
            for s in statuses
        ]
        text += f"; per rank: {', '.join(rates)}"
    return text


def compute_cache(
    prompt_set: PromptSet,
    llm: LLMConfig,
    cfg: CacheConfig,
    identity: CacheIdentity,
    folder: Path,
    *,
    coordinator: Coordinator | None = None,
) -> ActivationCache:
    """Run the model over ``prompt_set`` and write a cache for ``identity`` at ``folder``, with every rank.

    Every process of ``coordinator`` must call it (one process alone by default). The work units are the
    cache's final shards (:func:`~sae_refusal.activations.shards.shard_plan`): rank 0 claims ``folder``
    (waiting while another job computes the same cache), keeps the shards a stopped earlier run finished in
    the staging folder (:class:`~sae_refusal.activations.staging.Staging`) and shares the others out by
    token count; each rank loads the model on its own device and writes its shards; once every rank
    succeeded, rank 0 writes the manifest and renames the staging folder into place, and every rank opens
    the cache. The result is the same bytes whatever the number of ranks (each shard is extracted alone).

    Raises:
        NonFiniteActivationsError: If the model produces ``inf`` or ``nan`` for any prompt (the message
            names the model, the layer and the first such prompt's id); no cache is written, finished
            shards stay staged for the next run.
        RankFailedError: On the other ranks when one rank failed (naming it and its error).
    """
    if len(prompt_set) == 0:
        raise ValueError("the prompt set is empty: nothing to cache (check the prompt sources and split)")
    coordinator = coordinator or Coordinator()
    start = time.perf_counter()
    tokenizer = load_tokenizer(llm)
    formatted = format_prompts(
        tokenizer,
        prompt_set.texts,
        chat_template=cfg.chat_template,
        system_prompt=cfg.system_prompt,
        key=f"{KEY}.chat_template",
    )
    shards = shard_plan(len(prompt_set), cfg.shard_rows)
    staging = Staging(folder.parent, identity, cfg.shard_rows)
    claims: list[FolderClaim] = []  # rank 0's claim on the folder, held until the end

    def plan() -> _Plan:
        claims.append(claim_cache_folder(folder))
        found = find_cache(folder.parent, identity)
        if found is not None:  # another job finished it while this one waited for its claim
            return _Plan(found=str(found))
        remove_stale_temporaries(folder.parent)  # what a killed run (any identity) left under the cache root
        done = staging.resume(shards)
        todo = [shard for shard in shards if shard.index not in frozenset(done)]
        if done:
            log.info(
                "resuming activation cache %s: %d of %d shards already done in %s",
                folder,
                len(done),
                len(shards),
                staging.folder,
            )
        if coordinator.world_size == 1:
            shares = [[shard.index for shard in todo]]
        else:
            texts = [text for shard in todo for text in formatted[shard.first_row : shard.stop]]
            lengths = iter(_token_lengths(tokenizer, texts, identity.max_length))
            costs = {shard.index: sum(next(lengths) for _ in range(shard.rows)) for shard in todo}
            shares = assign_longest_first(costs, coordinator.world_size)
        return _Plan(done=tuple(done), shares=tuple(tuple(share) for share in shares))

    try:
        shared = coordinator.on_rank0(plan, "planning the activation cache", share=True)
        if not isinstance(shared, _Plan):
            raise RuntimeError(f"rank 0 shared no plan for the activation cache ({shared!r})")
        if shared.found is not None:
            return _open_on_every_rank(Path(shared.found), coordinator, expect=identity, verify=cfg.verify)
        mine = [shards[i] for i in shared.shares[coordinator.rank]]
        error: Exception | None = None
        info: dict[str, float] = {}
        try:
            info = _extract_share(mine, formatted, prompt_set, llm, cfg, identity, staging, coordinator)
        except Exception as err:  # every rank hears of it before anyone raises
            error = err
        try:
            statuses = coordinator.all_succeeded(error, "extracting activations", info)
        except BaseException:
            if coordinator.rank == 0:
                staging.discard_if_empty()
            raise
        batching = {
            "batch_size": cfg.batch_size,
            "token_budget": cfg.token_budget,
            "sort_window": cfg.sort_window,
            "pack_length": cfg.pack_length,
        }
        extra = {"n_prompts": len(prompt_set), "batching": batching, "world_size": coordinator.world_size}
        rows = [_prompt_row(prompt_set, i) for i in range(len(prompt_set))]
        coordinator.on_rank0(
            lambda: staging.commit(folder, shards, rows, extra), "writing the activation cache manifest"
        )
    finally:
        for claim in claims:
            claim.release()
    # a shared filesystem may show another node the renamed folder a little late
    cache = _open_on_every_rank(folder, coordinator, expect=identity, verify="none", retry_s=OPEN_RETRY_S)
    if coordinator.rank == 0:
        n_truncated = int(cache.manifest["extra"]["n_truncated"])
        if n_truncated:
            log.warning(
                "%d of %d prompts were longer than %d tokens and truncated from the left",
                n_truncated,
                len(prompt_set),
                identity.max_length,
            )
        seconds = time.perf_counter() - start
        log.info(
            "cached %d prompts at layers %s in %.1f s (%s) -> %s",
            len(prompt_set),
            list(identity.layers),
            seconds,
            _summary(statuses, seconds),
            cache.folder,
        )
    return cache


#: How long a rank other than 0 looks for a cache rank 0 just committed.
OPEN_RETRY_S = 60.0


def _open_on_every_rank(
    folder: Path, coordinator: Coordinator, *, expect: CacheIdentity, verify: str, retry_s: float = 0.0
) -> ActivationCache:
    """Open the cache at ``folder`` on every rank; if it fails on one, every rank raises.

    Ranks other than 0 look again for ``retry_s`` seconds while ``folder`` holds no cache yet.
    """
    deadline = time.monotonic() + (retry_s if coordinator.rank else 0.0)
    cache: ActivationCache | None = None
    error: Exception | None = None
    while cache is None and error is None:
        try:
            cache = ActivationCache.open(folder, expect=expect, verify=verify)
        except CacheNotFoundError as err:
            if time.monotonic() >= deadline:
                error = err
            else:
                time.sleep(0.5)
        except Exception as err:
            error = err
    coordinator.all_succeeded(error, f"opening activation cache {folder}")
    if cache is None:
        raise RuntimeError(f"activation cache {folder} did not open")
    return cache


def cached_activations(
    prompt_set: PromptSet, llm: LLMConfig, cfg: CacheConfig, *, coordinator: Coordinator | None = None
) -> ActivationCache:
    """Return a cache covering this request, reusing a matching one under ``cfg.root`` or computing it.

    Args:
        prompt_set: The prompts, in row order.
        llm: The model.
        cfg: Cache settings.
        coordinator: The processes that build it together; every one must call this. Default: the ranks
            of an initialised ``torch.distributed`` group (:func:`current_coordinator`), else this process.

    Raises:
        CacheMismatchError: If the ranks compute different identities (nodes that see different files).
        RankFailedError: On every other rank when one rank failed (naming it and its error).
    """
    if coordinator is None:
        with current_coordinator() as own:
            return cached_activations(prompt_set, llm, cfg, coordinator=own)
    identity: CacheIdentity | None = None
    error: Exception | None = None
    try:
        identity = request_identity(prompt_set, llm, cfg)
    except Exception as err:
        error = err
    statuses = coordinator.all_succeeded(
        error, "computing the cache identity", {"key": identity.key() if identity else ""}
    )
    if identity is None:
        raise RuntimeError("request_identity returned nothing")
    keys = {s.rank: s.info["key"] for s in statuses}
    if len(set(keys.values())) > 1:
        raise CacheMismatchError(
            "the processes of this run disagree on the activation cache identity (rank: key): "
            + ", ".join(f"{rank}: {key}" for rank, key in keys.items())
            + "; every node must see the same model files, prompts and data.cache settings"
        )
    found = coordinator.on_rank0(
        lambda: find_cache(cfg.root, identity), "looking for an activation cache", share=True
    )
    if found is not None:
        if coordinator.rank == 0:
            log.info("reusing activation cache %s", found)
        return _open_on_every_rank(found, coordinator, expect=identity, verify=cfg.verify)
    folder = Path(cfg.root) / identity.key()
    if coordinator.rank == 0:
        log.info(
            "computing activation cache %s (%d prompts, layers %s, %d process(es))",
            folder,
            len(prompt_set),
            list(identity.layers),
            coordinator.world_size,
        )
    with torch.inference_mode():
        return compute_cache(prompt_set, llm, cfg, identity, folder, coordinator=coordinator)
