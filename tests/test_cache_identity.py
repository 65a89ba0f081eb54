"""Every input that changes the cached numbers is part of the cache identity: change it, get a new cache.

One module-scoped base cache is computed on a tiny model; each parametrized case changes one input
(weights, refusal-token adapter, tokenizer, compute dtype, quantization, attention kernel, remote code,
chat template, system prompt, token budget, overflow policy, storage dtype, layers, prompt set) and must
compute a new cache in a new folder, whose identity differs from the base in exactly the expected fields.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import sae_refusal.activations.build as build
from sae_refusal.activations.build import CacheConfig, cached_activations, request_identity
from sae_refusal.activations.cache import ActivationCache, CacheMismatchError
from sae_refusal.data.chat import chat_template_hash, format_prompts
from sae_refusal.data.prompt_set import Label, Prompt, PromptSet
from sae_refusal.finetune.artifact import save_refusal_artifact
from sae_refusal.finetune.lora import LoraSettings, wrap_with_lora
from sae_refusal.finetune.tokens import add_refusal_tokens, init_refusal_embeddings
from sae_refusal.llm import (
    LLMConfig,
    RefusalVocabulary,
    iter_last_token_residuals,
    load_model_and_tokenizer,
    load_tokenizer,
    model_fingerprint,
    tokenizer_fingerprint,
)
from sae_refusal.llm.artifact import RefusalArtifactError
from sae_refusal.testing import save_tiny_model

PLAIN = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)
PROMPTS = PromptSet(
    [
        Prompt(id="p0", text="How do I bake bread at home?", label=Label.BENIGN),
        Prompt(id="p1", text="Tell me a story about a dragon.", label=Label.BENIGN),
        Prompt(id="p2", text="Write a poem about the sea and the stars.", label=Label.HARMFUL),
    ]
)


def make_artifact(base: Path, folder: Path) -> Path:
    """A refusal-token artifact on ``base`` whose LoRA really changes the model (non-zero B matrices)."""
    cfg = LLMConfig(name_or_path=str(base))
    model, tokenizer = load_model_and_tokenizer(cfg)
    vocab = RefusalVocabulary()
    added = add_refusal_tokens(tokenizer, vocab)
    init_refusal_embeddings(model, tokenizer, vocab, added)
    new_ids = [tokenizer.convert_tokens_to_ids(t) for t in added]
    peft_model = wrap_with_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0), new_ids)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=gen))
    return save_refusal_artifact(peft_model, tokenizer, vocab, added, folder, base=model_fingerprint(cfg))


def copy_with_new_weights(base: Path, folder: Path) -> Path:
    """A copy of ``base`` where one tensor changed (same file size)."""
    shutil.copytree(base, folder)
    path = folder / "model.safetensors"
    tensors = load_file(path)
    name = sorted(tensors)[len(tensors) // 2]
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, path, metadata={"format": "pt"})
    return folder


def copy_with_new_tokenizer(base: Path, folder: Path) -> Path:
    """A copy of ``base`` whose tokenizer lower-cases its input (other token ids, same weights)."""
    shutil.copytree(base, folder)
    path = folder / "tokenizer.json"
    state = json.loads(path.read_text())
    state["normalizer"] = {"type": "Lowercase"}
    path.write_text(json.dumps(state))
    return folder


@dataclass
class World:
    root: Path
    llm: LLMConfig
    cfg: CacheConfig
    base: ActivationCache
    weights_copy: Path
    tokenizer_copy: Path
    artifact: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    tmp = tmp_path_factory.mktemp("identity")
    model_dir = save_tiny_model(tmp / "base", "llama", num_layers=3)
    llm = LLMConfig(name_or_path=str(model_dir), dtype="float32")
    cfg = CacheConfig(root=str(tmp / "cache"), layers=(0, 1), batch_size=2, max_length=64)
    base = cached_activations(PROMPTS, llm, cfg)
    return World(
        root=tmp / "cache",
        llm=llm,
        cfg=cfg,
        base=base,
        weights_copy=copy_with_new_weights(model_dir, tmp / "weights-copy"),
        tokenizer_copy=copy_with_new_tokenizer(model_dir, tmp / "tokenizer-copy"),
        artifact=make_artifact(model_dir, tmp / "artifact"),
    )


def _other_prompts() -> PromptSet:
    rows = list(PROMPTS)
    rows[1] = dataclasses.replace(rows[1], text="Tell me a story about a unicorn.")
    return PromptSet(rows)


Variant = Callable[[World], tuple[LLMConfig, CacheConfig, PromptSet]]


def _llm(**changes: Any) -> Variant:
    return lambda w: (dataclasses.replace(w.llm, **changes), w.cfg, PROMPTS)


def _cfg(**changes: Any) -> Variant:
    return lambda w: (w.llm, dataclasses.replace(w.cfg, **changes), PROMPTS)


# name -> (how to change the base request, identity fields that must differ, whether the numbers change)
VARIANTS: dict[str, tuple[Variant, set[str], bool]] = {
    "weights": (
        lambda w: (dataclasses.replace(w.llm, name_or_path=str(w.weights_copy)), w.cfg, PROMPTS),
        {"model", "weights_hash"},
        True,
    ),
    "adapter": (
        lambda w: (dataclasses.replace(w.llm, adapter_path=str(w.artifact)), w.cfg, PROMPTS),
        {"adapter_hash", "tokenizer_hash"},  # the artifact also adds its tokens to the tokenizer
        True,
    ),
    "tokenizer": (
        lambda w: (dataclasses.replace(w.llm, name_or_path=str(w.tokenizer_copy)), w.cfg, PROMPTS),
        {"model", "tokenizer_hash"},
        True,
    ),
    "model_dtype": (_llm(dtype="bfloat16"), {"model_dtype"}, True),
    "quantization": (_llm(quantization="8bit"), {"quantization"}, False),
    "attn_implementation": (_llm(attn_implementation="sdpa"), {"attn_implementation"}, False),
    "trust_remote_code": (_llm(trust_remote_code=True), {"trust_remote_code"}, False),
    "chat_template": (_cfg(chat_template=PLAIN), {"chat_template_hash"}, True),
    "system_prompt": (_cfg(system_prompt="Be brief."), {"system_prompt_hash"}, True),
    "max_length": (_cfg(max_length=8), {"max_length"}, True),  # 8 tokens truncate every prompt
    "overflow": (_cfg(overflow="error"), {"overflow"}, False),
    "storage_dtype": (_cfg(dtype="float16"), {"dtype"}, False),
    "layers": (_cfg(layers=(2,)), {"layers"}, False),
    "prompt_set": (lambda w: (w.llm, w.cfg, _other_prompts()), {"prompt_set_hash"}, True),
}


def count_computes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []
    real = build.compute_cache

    def counting(*args: Any, **kwargs: Any) -> ActivationCache:
        calls.append(args[-1])
        return real(*args, **kwargs)

    monkeypatch.setattr(build, "compute_cache", counting)
    return calls


def test_identical_request_reuses_the_cache(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_computes(monkeypatch)
    again = cached_activations(PROMPTS, dataclasses.replace(world.llm), dataclasses.replace(world.cfg))
    assert calls == [] and again.folder == world.base.folder
    assert again.identity == world.base.identity


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_changed_input_gets_a_new_cache(world: World, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    variant, fields, numbers_change = VARIANTS[name]
    llm, cfg, prompts = variant(world)
    if llm.quantization is not None:  # bitsandbytes needs CUDA: load unquantised, only the identity matters
        real_load = build.load_model
        monkeypatch.setattr(
            build, "load_model", lambda c: real_load(dataclasses.replace(c, quantization=None))
        )
    calls = count_computes(monkeypatch)
    cache = cached_activations(prompts, llm, cfg)
    assert len(calls) == 1, f"{name}: the base cache was reused"
    assert cache.folder != world.base.folder and cache.folder.parent == world.root
    changed = {line.split(":")[0] for line in world.base.identity.differences(cache.identity)}
    assert changed == fields
    with pytest.raises(CacheMismatchError, match="|".join(sorted(fields))):
        ActivationCache.open(world.base.folder, expect=request_identity(prompts, llm, cfg))
    if numbers_change:  # reusing the base cache would have served wrong activations
        assert not torch.equal(cache.load(1).float(), world.base.load(1).float())


def test_system_prompt_alone_changes_the_folder_and_the_numbers(tmp_path: Path, tiny_model_dir: Path) -> None:
    llm = LLMConfig(name_or_path=str(tiny_model_dir))
    cfg = CacheConfig(root=str(tmp_path / "cache"), layers=(1,), batch_size=2)
    plain = cached_activations(PROMPTS, llm, cfg)
    briefed = cached_activations(PROMPTS, llm, dataclasses.replace(cfg, system_prompt="Be brief."))
    assert briefed.folder != plain.folder
    assert not torch.equal(briefed.load(1), plain.load(1))
    assert [line.split(":")[0] for line in plain.identity.differences(briefed.identity)] == [
        "system_prompt_hash"
    ]


def by_hand(llm: LLMConfig, cfg: CacheConfig, prompts: PromptSet) -> dict[str, Any]:
    """A request's identity from what each field is documented to hold (see ``CacheIdentity``)."""
    tokenizer = load_tokenizer(llm)
    fingerprint = model_fingerprint(llm)
    template = cfg.chat_template if cfg.chat_template is not None else tokenizer.chat_template
    return {
        "model": llm.name_or_path,  # a local folder, not a GGUF file
        "revision": "local",
        "weights_hash": fingerprint["weights_hash"],
        "adapter_hash": fingerprint["adapter"] if llm.adapter_path else "",
        "model_dtype": llm.dtype,
        "quantization": llm.quantization or "none",
        "attn_implementation": llm.attn_implementation or "",
        "trust_remote_code": llm.trust_remote_code,
        "tokenizer_hash": tokenizer_fingerprint(tokenizer),
        "chat_template_hash": chat_template_hash(tokenizer, template),
        "system_prompt_hash": hashlib.sha256(json.dumps(cfg.system_prompt).encode()).hexdigest(),
        "layers": sorted({layer % 3 for layer in cfg.layers}),  # the tiny model has 3 blocks
        "prompt_set_hash": prompts.content_hash(),
        "dtype": cfg.dtype,
        "max_length": 256 if cfg.max_length is None else cfg.max_length,  # the tiny model's context
        "overflow": cfg.overflow,
    }


def test_base_identity_holds_the_configured_values(world: World) -> None:
    identity = world.base.identity
    assert identity == request_identity(PROMPTS, world.llm, world.cfg)
    assert identity.to_json() == by_hand(world.llm, world.cfg, PROMPTS)
    assert (identity.model, identity.revision, identity.adapter_hash) == (world.llm.name_or_path, "local", "")
    assert (identity.model_dtype, identity.quantization, identity.attn_implementation) == (
        "float32",
        "none",
        "",
    )
    assert identity.trust_remote_code is False and identity.layers == (0, 1)
    assert (identity.dtype, identity.max_length, identity.overflow) == ("float32", 64, "truncate_left")
    for name in (
        "weights_hash",
        "tokenizer_hash",
        "chat_template_hash",
        "system_prompt_hash",
        "prompt_set_hash",
    ):
        assert len(getattr(identity, name)) == 64, name  # sha256 hex digests


EXTRA_REQUESTS: dict[str, Variant] = {
    "negative_unsorted_layers": _cfg(layers=(-1, 0, 2)),
    "model_context": _cfg(max_length=None),
    "template_and_system_prompt": _cfg(chat_template=PLAIN, system_prompt="Be brief."),
}


@pytest.mark.parametrize("name", sorted(VARIANTS) + sorted(EXTRA_REQUESTS))
def test_each_identity_field_holds_its_input(world: World, name: str) -> None:
    """Not only that the folder changes: every field equals the value computed from the request itself."""
    variant = VARIANTS[name][0] if name in VARIANTS else EXTRA_REQUESTS[name]
    llm, cfg, prompts = variant(world)
    assert request_identity(prompts, llm, cfg).to_json() == by_hand(llm, cfg, prompts)


def test_a_found_cache_of_another_identity_is_refused_not_reused(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the lookup returns (e.g. a manifest rewritten after it was read), the cache opened is checked
    against the request: the error names the field that differs, and nothing is served or recomputed."""
    monkeypatch.setattr(build, "find_cache", lambda root, wanted: world.base.folder)
    calls = count_computes(monkeypatch)
    briefed = dataclasses.replace(world.cfg, system_prompt="Be brief.")
    with pytest.raises(CacheMismatchError, match=r"system_prompt_hash: '[0-9a-f]{64}' != '[0-9a-f]{64}'"):
        cached_activations(PROMPTS, world.llm, briefed)
    with pytest.raises(CacheMismatchError, match=r"produced differently[^\n]*\n  layers: \[0, 1\] != \[2\]$"):
        cached_activations(PROMPTS, world.llm, dataclasses.replace(world.cfg, layers=(2,)))
    assert calls == []
    assert cached_activations(PROMPTS, world.llm, world.cfg).folder == world.base.folder  # the real match


def test_cached_rows_are_the_extraction_of_the_templated_prompts(world: World, tmp_path: Path) -> None:
    """The cache holds the last-token residuals of each prompt rendered with the configured template and
    system prompt, as a direct extraction of each prompt alone gives them."""
    cfg = dataclasses.replace(
        world.cfg, root=str(tmp_path), chat_template=PLAIN, system_prompt="Be brief.", batch_size=3
    )
    cache = cached_activations(PROMPTS, world.llm, cfg)
    model, tokenizer = load_model_and_tokenizer(world.llm)
    texts = [f"[system] Be brief.\n[user] {text}\n[assistant] " for text in PROMPTS.texts]
    assert format_prompts(tokenizer, PROMPTS.texts, chat_template=PLAIN, system_prompt="Be brief.") == texts
    with torch.inference_mode():
        direct = {layer: [] for layer in (0, 1)}
        for text in texts:
            (batch,) = iter_last_token_residuals(
                model, tokenizer, [text], [0, 1], batch_size=1, max_length=64
            )
            for layer in (0, 1):
                direct[layer].append(batch.acts[layer].float())
    for layer in (0, 1):
        torch.testing.assert_close(cache.load(layer), torch.cat(direct[layer]), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(cache.load(layer), world.base.load(layer), atol=1e-3)  # not the plain rows


def test_shard_size_and_manifest_facts(world: World, tmp_path: Path) -> None:
    assert world.base.manifest["extra"] == {
        "n_truncated": 0,
        "n_prompts": 3,
        "batching": {
            "batch_size": world.cfg.batch_size,
            "token_budget": None,
            "sort_window": 16,
            "pack_length": None,
        },
        "world_size": 1,
    }
    assert [s["rows"] for s in world.base.manifest["shards"]] == [3]  # default 4096 rows per shard
    small = cached_activations(
        PROMPTS, world.llm, dataclasses.replace(world.cfg, root=str(tmp_path), shard_rows=2)
    )
    assert [s["rows"] for s in small.manifest["shards"]] == [2, 1]
    assert sorted(p.name for p in small.folder.glob("shard-*")) == [
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    assert small.identity == world.base.identity  # the shard size changes the numbers by round-off only:
    for layer in (0, 1):  # each shard is extracted alone, so its prompts batch differently
        torch.testing.assert_close(small.load(layer), world.base.load(layer))
    cut = cached_activations(
        PROMPTS, world.llm, dataclasses.replace(world.cfg, root=str(tmp_path), max_length=8)
    )
    assert cut.manifest["extra"]["n_truncated"] == 3
    assert [p["id"] for p in cut.prompts] == ["p0", "p1", "p2"]
    assert [p["label"] for p in cut.prompts] == ["benign", "benign", "harmful"]


def test_an_adapter_file_changed_in_place_gives_a_new_cache(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``artifact.json`` unchanged, one adapter weight altered (same size): the cache is not reused."""
    artifact = tmp_path / "artifact"
    shutil.copytree(world.artifact, artifact)
    llm = dataclasses.replace(world.llm, adapter_path=str(artifact))
    cache = cached_activations(PROMPTS, llm, world.cfg)
    weights = artifact / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # the same size, and artifact.json still lists the old sha256
    weights.write_bytes(bytes(data))
    changed = request_identity(PROMPTS, llm, world.cfg)
    assert [line.split(":")[0] for line in cache.identity.differences(changed)] == ["adapter_hash"]
    calls = count_computes(monkeypatch)
    altered = r"adapter_model\.safetensors differs from the size/sha256"
    with pytest.raises(RefusalArtifactError, match=altered):  # recomputed: applying the adapter fails
        cached_activations(PROMPTS, llm, world.cfg)
    assert len(calls) == 1


def test_a_packed_cache_has_the_padded_cache_identity_and_rows(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``data.cache.pack_length``: packed passes change the numbers by round-off only (same identity)."""
    from sae_refusal.llm import extraction

    calls: list[int] = []
    real = extraction.packed_last_token_residuals

    def counted(model: Any, rows: Any, layers: Any, pad_id: int) -> Any:
        calls.append(len(rows))
        return real(model, rows, layers, pad_id)

    monkeypatch.setattr(extraction, "packed_last_token_residuals", counted)
    packed = cached_activations(
        PROMPTS, world.llm, dataclasses.replace(world.cfg, root=str(tmp_path), pack_length=64)
    )
    assert packed.identity == world.base.identity
    assert packed.manifest["extra"]["batching"]["pack_length"] == 64 and calls  # the packed path ran
    for layer in (0, 1):
        torch.testing.assert_close(packed.load(layer), world.base.load(layer), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"^data\.cache\.pack_length must be >= 1 or null, got 0$"):
        dataclasses.replace(world.cfg, pack_length=0)
