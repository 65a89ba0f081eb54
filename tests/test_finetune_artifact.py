"""LoRA with trainable refusal-token rows, the small artifact (written by ``finetune``, read by ``llm``), and
applying it through ``LLMConfig``."""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from sae_refusal.finetune.artifact import save_refusal_artifact
from sae_refusal.finetune.lora import LoraSettings, lora_config, wrap_with_lora
from sae_refusal.finetune.tokens import add_refusal_tokens, init_refusal_embeddings
from sae_refusal.llm import (
    LLMConfig,
    RefusalVocabulary,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    model_fingerprint,
)
from sae_refusal.llm.artifact import (
    ARTIFACT_FILE,
    ROWS_FILE,
    RefusalArtifactError,
    apply_refusal_artifact,
    artifact_hash,
    read_refusal_artifact,
)
from sae_refusal.testing import build_tiny_model, build_tiny_tokenizer

SETTINGS = LoraSettings(r=4, alpha=8, dropout=0.0)


def save_base(folder: Path, tied: bool) -> Path:
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model("llama", vocab_size=len(tokenizer), num_layers=2)
    if tied:
        config = model.config
        config.tie_word_embeddings = True
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@dataclass
class Trained:
    cfg: LLMConfig
    artifact: Path
    batch: torch.Tensor
    logits: torch.Tensor  # of the trained model, LoRA merged
    new_ids: list[int]
    new_rows: torch.Tensor  # trained input rows of the new tokens


def toy_batch(tokenizer: Any) -> torch.Tensor:
    texts = [
        "How do I bake bread? [respond] Sure, here it is.",
        "Do you feel lonely? [Humanizing requests] I am an assistant.",
    ]
    rows = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    width = min(len(r) for r in rows)
    return torch.tensor([r[:width] for r in rows])


def logits_of(model: Any, batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch).logits


def train(tmp: Path, tied: bool) -> Trained:
    cfg = LLMConfig(name_or_path=str(save_base(tmp / "base", tied)))
    model, tokenizer = load_model_and_tokenizer(cfg)
    vocab = RefusalVocabulary()
    added = add_refusal_tokens(tokenizer, vocab)
    init_refusal_embeddings(model, tokenizer, vocab, added)
    new_ids = [tokenizer.convert_tokens_to_ids(t) for t in added]
    init_rows = model.get_input_embeddings().weight[new_ids].detach().clone()
    peft_model = wrap_with_lora(model, SETTINGS, new_ids)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "trainable_tokens_delta" in n for n in trainable)
    assert sum("trainable_tokens_delta" in n for n in trainable) == (1 if tied else 2)
    batch = toy_batch(tokenizer)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(4):
        peft_model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    artifact = save_refusal_artifact(
        peft_model, tokenizer, vocab, added, tmp / "artifact", base=model_fingerprint(cfg)
    )
    merged = peft_model.merge_and_unload()
    new_rows = merged.get_input_embeddings().weight[new_ids].detach().clone()
    assert not torch.allclose(new_rows, init_rows)  # the new rows were trained
    return Trained(cfg, artifact, batch, logits_of(merged, batch), new_ids, new_rows)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return train(tmp_path_factory.mktemp("ft"), tied=request.param)


def test_artifact_contents_and_size(trained: Trained) -> None:
    record = json.loads((trained.artifact / ARTIFACT_FILE).read_text())
    assert record["format_version"] == 1
    assert record["added_tokens"][0]["token"] == " [respond]"
    assert [t["id"] for t in record["added_tokens"]] == trained.new_ids
    assert record["lora"] is True
    assert record["base"] == model_fingerprint(trained.cfg)
    files = {p.relative_to(trained.artifact).as_posix() for p in trained.artifact.rglob("*") if p.is_file()}
    assert {
        ARTIFACT_FILE,
        ROWS_FILE,
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    } <= files
    total = sum(p.stat().st_size for p in trained.artifact.rglob("*") if p.is_file())
    assert total < 100_000  # LoRA matrices + 6 rows, never the embedding matrix (400 x 32 floats = 51 KB)


def test_apply_reproduces_trained_logits(trained: Trained) -> None:
    model, tokenizer = load_model_and_tokenizer(trained.cfg)
    model, tokenizer = apply_refusal_artifact(
        model, tokenizer, trained.artifact, base=model_fingerprint(trained.cfg)
    )
    assert not isinstance(model, PeftModel)
    torch.testing.assert_close(logits_of(model, trained.batch), trained.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.get_input_embeddings().weight[trained.new_ids], trained.new_rows)


def test_apply_unmerged(trained: Trained) -> None:
    model, tokenizer = load_model_and_tokenizer(trained.cfg)
    model, _ = apply_refusal_artifact(model, tokenizer, trained.artifact, merge=False)
    assert isinstance(model, PeftModel)
    torch.testing.assert_close(logits_of(model, trained.batch), trained.logits, atol=1e-5, rtol=0)


def test_llm_config_adapter_path(trained: Trained) -> None:
    cfg = LLMConfig(name_or_path=trained.cfg.name_or_path, adapter_path=str(trained.artifact))
    model, tokenizer = load_model_and_tokenizer(cfg)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert list(RefusalVocabulary().resolve(tokenizer).token_ids) == sorted(trained.new_ids)
    torch.testing.assert_close(logits_of(model, trained.batch), trained.logits, atol=1e-5, rtol=0)
    alone = load_model(cfg)
    torch.testing.assert_close(logits_of(alone, trained.batch), trained.logits, atol=1e-5, rtol=0)
    assert load_tokenizer(cfg).get_added_vocab() == tokenizer.get_added_vocab()
    fingerprint, base = model_fingerprint(cfg), model_fingerprint(trained.cfg)
    assert "adapter" in fingerprint and "adapter" not in base
    assert {k: v for k, v in fingerprint.items() if k != "adapter"} == base


def test_apply_errors(trained: Trained, tmp_path: Path) -> None:
    def fresh() -> tuple[Any, Any]:
        return load_model_and_tokenizer(trained.cfg)

    with pytest.raises(FileNotFoundError, match="adapter_path"):
        apply_refusal_artifact(*fresh(), tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=ARTIFACT_FILE):
        apply_refusal_artifact(*fresh(), tmp_path)
    with pytest.raises(ValueError, match="adapter_path: empty"):
        LLMConfig(adapter_path=" ")

    copy = tmp_path / "copy"
    shutil.copytree(trained.artifact, copy)
    record = json.loads((copy / ARTIFACT_FILE).read_text())
    (copy / ARTIFACT_FILE).write_text(json.dumps({**record, "format_version": 99}))
    with pytest.raises(RefusalArtifactError, match="format_version"):
        apply_refusal_artifact(*fresh(), copy)
    (copy / ARTIFACT_FILE).write_text(json.dumps(record))
    (copy / ROWS_FILE).write_bytes((copy / ROWS_FILE).read_bytes()[:-4])
    with pytest.raises(RefusalArtifactError, match="truncated or altered"):
        apply_refusal_artifact(*fresh(), copy)

    model, tokenizer = fresh()
    tokenizer.add_tokens(["<extra>"])  # shifts every new id by one
    with pytest.raises(RefusalArtifactError, match=r"get ids \[\d+"):
        apply_refusal_artifact(model, tokenizer, trained.artifact)
    bigger = build_tiny_model("llama", vocab_size=420, num_layers=2)
    with pytest.raises(RefusalArtifactError, match="vocab-size mismatch"):
        apply_refusal_artifact(bigger, build_tiny_tokenizer(), trained.artifact)
    with pytest.warns(UserWarning, match="another base model"):
        apply_refusal_artifact(
            *fresh(), trained.artifact, base={**model_fingerprint(trained.cfg), "weights_hash": "other"}
        )
    with warnings.catch_warnings():  # the same weights under another path or alias are the same base
        warnings.simplefilter("error", UserWarning)
        apply_refusal_artifact(
            *fresh(), trained.artifact, base={**model_fingerprint(trained.cfg), "model": "x"}
        )
    assert read_refusal_artifact(trained.artifact).tokens[0] == " [respond]"


def test_unlisted_files_are_ignored_and_listed_ones_checked(trained: Trained, tmp_path: Path) -> None:
    """A model card beside ``artifact.json`` changes nothing; a same-size edit of a listed file is caught."""
    copy = tmp_path / "copy"
    shutil.copytree(trained.artifact, copy)
    before = artifact_hash(copy)
    (copy / "README.md").write_text("# a model card\n")
    assert artifact_hash(copy) == before
    model, _ = apply_refusal_artifact(*load_model_and_tokenizer(trained.cfg), copy)
    torch.testing.assert_close(logits_of(model, trained.batch), trained.logits, atol=1e-5, rtol=0)
    rows = bytearray((copy / ROWS_FILE).read_bytes())
    rows[-1] ^= 0xFF  # same size, other contents
    (copy / ROWS_FILE).write_bytes(bytes(rows))
    with pytest.raises(RefusalArtifactError, match="truncated or altered"):
        apply_refusal_artifact(*load_model_and_tokenizer(trained.cfg), copy)


def test_rows_only_artifact(tmp_path: Path) -> None:
    cfg = LLMConfig(name_or_path=str(save_base(tmp_path / "base", tied=False)))
    model, tokenizer = load_model_and_tokenizer(cfg)
    vocab = RefusalVocabulary()
    added = add_refusal_tokens(tokenizer, vocab)
    init_refusal_embeddings(model, tokenizer, vocab, added, init="mean")
    with torch.no_grad():
        model.get_input_embeddings().weight[-6:] += 1.0
    artifact = save_refusal_artifact(
        model, tokenizer, vocab, added, tmp_path / "a", base=model_fingerprint(cfg)
    )
    assert not (artifact / "adapter").exists()
    batch = toy_batch(tokenizer)
    applied = load_model(LLMConfig(name_or_path=cfg.name_or_path, adapter_path=str(artifact)))
    torch.testing.assert_close(logits_of(applied, batch), logits_of(model, batch), atol=1e-6, rtol=0)


def test_full_embedding_training_refused(tmp_path: Path) -> None:
    tokenizer, vocab = build_tiny_tokenizer(), RefusalVocabulary()
    model = build_tiny_model("llama", vocab_size=len(tokenizer), num_layers=2)
    added = add_refusal_tokens(tokenizer, vocab)
    init_refusal_embeddings(model, tokenizer, vocab, added)
    peft_model = get_peft_model(
        model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    )
    with pytest.raises(RefusalArtifactError, match="modules_to_save"):
        save_refusal_artifact(peft_model, tokenizer, vocab, added, tmp_path / "a", base={})
    assert not (tmp_path / "a").exists()


def test_lora_settings_and_config() -> None:
    with pytest.raises(ValueError, match=r"lora\.r"):
        LoraSettings(r=0)
    with pytest.raises(ValueError, match=r"lora\.dropout"):
        LoraSettings(dropout=1.0)
    config = lora_config(LoraSettings(), [405, 400])
    assert config.trainable_token_indices == [400, 405]
    assert config.r == 16 and config.lora_alpha == 32
    assert set(config.target_modules) == set(LoraSettings().target_modules)
    untied = lora_config(LoraSettings(), [400], embedding_modules=["model.embed_tokens", "lm_head"])
    assert untied.trainable_token_indices == {"model.embed_tokens": [400], "lm_head": [400]}
    model = build_tiny_model("llama", num_layers=1)
    with pytest.raises(ValueError, match="outside the embedding"):
        wrap_with_lora(model, SETTINGS, [400])
    with pytest.raises(ValueError, match=r"lora\.target_modules"):
        wrap_with_lora(model, LoraSettings(target_modules=["nope"]), [1])


@pytest.mark.slow
def test_smollm2_artifact_is_small(tmp_path: Path) -> None:
    import copy

    cfg = LLMConfig()
    model, tokenizer = load_model_and_tokenizer(cfg)
    fresh_model, fresh_tokenizer = copy.deepcopy(model), copy.deepcopy(tokenizer)
    vocab = RefusalVocabulary()
    added = add_refusal_tokens(tokenizer, vocab)
    init_refusal_embeddings(model, tokenizer, vocab, added)
    assert model.config.tie_word_embeddings
    new_ids = [tokenizer.convert_tokens_to_ids(t) for t in added]
    peft_model = wrap_with_lora(model, LoraSettings(), new_ids)
    batch = toy_batch(tokenizer)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    peft_model.train()
    peft_model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    peft_model.eval()
    with pytest.warns(UserWarning, match="stored in bfloat16"):  # fp32 r=16 LoRA is 18.7 MiB
        artifact = save_refusal_artifact(peft_model, tokenizer, vocab, added, tmp_path / "a", base={})
    sizes = {p.name: p.stat().st_size for p in artifact.rglob("*") if p.is_file()}
    assert max(sizes.values()) < 16 * 2**20
    assert sum(sizes.values()) < 11_000_000
    reference = logits_of(peft_model.merge_and_unload(), batch)
    applied, _ = apply_refusal_artifact(fresh_model, fresh_tokenizer, artifact)
    torch.testing.assert_close(logits_of(applied, batch), reference, atol=5e-3, rtol=0)


def test_calibrated_respond_bias_travels_with_the_artifact(trained: Trained, tmp_path: Path) -> None:
    from sae_refusal.data.prompt_set import Label, Prompt, PromptSet
    from sae_refusal.eval.refusal_tokens import evaluate_refusal_tokens
    from sae_refusal.finetune.artifact import write_respond_bias
    from sae_refusal.llm.refusal_tokens import respond_bias_of

    calibration = {"criterion": "test", "n": 3}
    out = write_respond_bias(trained.artifact, 2.5, calibration, out=tmp_path / "calibrated")
    assert read_refusal_artifact(trained.artifact).respond_bias == 0.0  # the source is untouched
    record = read_refusal_artifact(out)
    assert record.respond_bias == 2.5 and record.calibration == calibration
    assert artifact_hash(out) != artifact_hash(trained.artifact)  # caches keyed on it are not reused

    plain, tokenizer = load_model_and_tokenizer(
        LLMConfig(name_or_path=trained.cfg.name_or_path, adapter_path=str(trained.artifact))
    )
    biased, _ = load_model_and_tokenizer(
        LLMConfig(name_or_path=trained.cfg.name_or_path, adapter_path=str(out))
    )
    respond_id = RefusalVocabulary().resolve(tokenizer).respond_id
    assert respond_bias_of(plain, respond_id) == 0.0
    assert respond_bias_of(biased, respond_id) == 2.5
    # generate applies it: the first step's scores are the raw logits + 2.5 on the respond token only
    prompt = trained.batch[:1, :5]
    raw = logits_of(plain, prompt)[:, -1]
    with torch.no_grad():
        gen = biased.generate(
            prompt, max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
    shift = gen.scores[0] - raw
    torch.testing.assert_close(shift[0, respond_id], torch.tensor(2.5), atol=1e-4, rtol=0)
    assert shift[0, torch.arange(shift.shape[1]) != respond_id].abs().max() < 1e-4
    # the refusal report reads what generate would do, and says so
    prompts = PromptSet(
        [
            Prompt(id="b", text="How do I bake bread?", label=Label.BENIGN, source="a"),
            Prompt(id="h", text="Do you feel lonely?", label=Label.HARMFUL, category="Humanizing requests"),
        ]
    )
    by_artifact = evaluate_refusal_tokens(biased, tokenizer, prompts)
    explicit = evaluate_refusal_tokens(plain, tokenizer, prompts, respond_bias=2.5)
    assert by_artifact.respond_bias == explicit.respond_bias == 2.5
    assert by_artifact.predictions == explicit.predictions
    assert evaluate_refusal_tokens(biased, tokenizer, prompts, respond_bias=0.0).respond_bias == 0.0
    # the merged export keeps it (generation_config.json)
    biased.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert respond_bias_of(reloaded, respond_id) == 2.5

    # in place, 0 removes the bias; bad values are refused before anything is written
    write_respond_bias(out, 0.0, {})
    assert read_refusal_artifact(out).respond_bias == 0.0
    assert "respond_bias" not in json.loads((out / ARTIFACT_FILE).read_text())
    with pytest.raises(ValueError, match="finite"):
        write_respond_bias(out, float("nan"), {})
    with pytest.raises(ValueError, match="JSON"):
        write_respond_bias(out, 1.0, {"bad": object()})
    assert read_refusal_artifact(out).respond_bias == 0.0
    broken = json.loads((out / ARTIFACT_FILE).read_text())
    broken["respond_bias"] = "Infinity"
    (out / ARTIFACT_FILE).write_text(json.dumps(broken))
    with pytest.raises(RefusalArtifactError, match="finite"):
        read_refusal_artifact(out)
