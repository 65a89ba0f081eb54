"""Inputs that used to pass silently into an activation cache now fail early, naming the config key.

Non-finite activations, a token budget beyond the model's context, and chat templates that are a missing
file or ignore the prompt: each raises before (or instead of) writing anything under ``data.cache.root``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import sae_refusal.activations.build as build
from sae_refusal.activations.build import CacheConfig, cached_activations
from sae_refusal.activations.cache import ActivationCache, NonFiniteActivationsError
from sae_refusal.data.chat import ChatTemplateError, format_prompts
from sae_refusal.data.prompt_set import Label, Prompt, PromptSet
from sae_refusal.llm import LLMConfig, load_tokenizer
from sae_refusal.testing import save_tiny_model

PROMPTS = PromptSet(
    [
        Prompt(id="p0", text="How do I bake bread at home?", label=Label.BENIGN),
        Prompt(id="p1", text="Tell me a story about a dragon.", label=Label.BENIGN),
        Prompt(id="p2", text="Write a poem about the sea and the stars.", label=Label.HARMFUL),
        Prompt(id="p3", text="Give me a list of ideas.", label=Label.HARMFUL),
    ]
)


def count_computes(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    calls: list[Any] = []
    real = build.compute_cache

    def counting(*args: Any, **kwargs: Any) -> ActivationCache:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(build, "compute_cache", counting)
    return calls


def model_with_bad_token(folder: Path, value: float) -> Path:
    """A tiny model whose embedding row of a token found only in prompt ``p2`` is set to ``value``."""
    save_tiny_model(folder, "llama", num_layers=2)
    tokenizer = load_tokenizer(LLMConfig(name_or_path=str(folder)))
    ids = [
        set(tokenizer(text, add_special_tokens=False).input_ids)
        for text in format_prompts(tokenizer, PROMPTS.texts)
    ]
    (token, *_) = sorted(ids[2] - ids[0] - ids[1] - ids[3])
    path = folder / "model.safetensors"
    tensors = load_file(path)
    tensors["model.embed_tokens.weight"][token] = value
    save_file(tensors, path, metadata={"format": "pt"})
    return folder


def cache_entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_activations_are_refused_and_nothing_is_written(tmp_path: Path, value: float) -> None:
    model = model_with_bad_token(tmp_path / "model", value)
    cfg = CacheConfig(root=str(tmp_path / "cache"), layers=(0, 1), batch_size=2)
    expected = (
        rf"model '{model}' \(data.llm.dtype='auto'\) produced non-finite activations at layer 0 "
        r"for prompt 'p2'"
    )
    with pytest.raises(NonFiniteActivationsError, match=expected):
        cached_activations(PROMPTS, LLMConfig(name_or_path=str(model)), cfg)
    assert cache_entries(tmp_path / "cache") == []  # no cache folder, no temporary folder


def test_activations_beyond_the_storage_dtype_are_refused(tmp_path: Path) -> None:
    model = save_tiny_model(tmp_path / "model", "llama", num_layers=2)
    path = model / "model.safetensors"
    tensors = load_file(path)
    tensors["model.embed_tokens.weight"] *= 1e8  # residuals ~1e6: finite in float32, beyond float16
    save_file(tensors, path, metadata={"format": "pt"})
    llm = LLMConfig(name_or_path=str(model))
    cfg = CacheConfig(root=str(tmp_path / "cache"), layers=(1,), batch_size=3, dtype="float16")
    expected = r"overflow the storage dtype 'float16' at layer 1 for prompt 'p0'.*data.cache.dtype"
    with pytest.raises(NonFiniteActivationsError, match=expected):
        cached_activations(PROMPTS, llm, cfg)
    assert cache_entries(tmp_path / "cache") == []
    cache = cached_activations(PROMPTS, llm, dataclasses.replace(cfg, dtype="float32"))
    assert torch.isfinite(cache.load(1)).all() and cache.load(1).abs().max() > 65504


def test_max_length_beyond_the_context_names_key_and_context(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_computes(monkeypatch)
    llm = LLMConfig(name_or_path=str(tiny_model_dir))
    expected = rf"^data.cache.max_length: 257 exceeds the context of model '{tiny_model_dir}' \(256 tokens"
    with pytest.raises(ValueError, match=expected):
        cached_activations(PROMPTS, llm, CacheConfig(root=str(tmp_path / "c"), layers=(1,), max_length=257))
    assert calls == [] and cache_entries(tmp_path / "c") == []
    cache = cached_activations(
        PROMPTS, llm, CacheConfig(root=str(tmp_path / "c"), layers=(1,), max_length=256)
    )
    assert cache.identity.max_length == 256
    with pytest.raises(ValueError, match=r"^data.cache.max_length: must be a positive integer, got 0"):
        CacheConfig(max_length=0)


@pytest.mark.parametrize(
    ("template", "error", "message"),
    [
        (
            "templates/chatml.jinja",
            FileNotFoundError,
            r"template file 'templates/chatml.jinja' does not exist",
        ),
        ("chatml.j2", FileNotFoundError, r"template file 'chatml.j2' does not exist"),
        ("chatml", ChatTemplateError, r"'chatml' is neither a Jinja template"),
        ("{{ 'Answer the question.' }}", ChatTemplateError, r"renders every prompt identically"),
        (
            "{{ messages[0]['content'] }}{% if add_generation_prompt %} assistant:{% endif %}",
            ChatTemplateError,
            r"renders every prompt identically",  # only the system message, given a system prompt
        ),
    ],
)
def test_bad_chat_template_is_refused_before_computing(
    tmp_path: Path,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    template: str,
    error: type[Exception],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)  # relative template paths resolve here (and do not exist)
    calls = count_computes(monkeypatch)
    cfg = CacheConfig(
        root=str(tmp_path / "c"), layers=(1,), chat_template=template, system_prompt="Be brief."
    )
    with pytest.raises(error, match=rf"^data.cache.chat_template: .*{message}"):
        cached_activations(PROMPTS, LLMConfig(name_or_path=str(tiny_model_dir)), cfg)
    assert calls == [] and cache_entries(tmp_path / "c") == []
