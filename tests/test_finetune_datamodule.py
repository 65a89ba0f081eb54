"""Base-answer cache (reuse, missing-only generation, model identity) and SFTDataModule (train split only)."""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from tokenizers import AddedToken

import sae_refusal.finetune.base_answers as base_answers_module
from sae_refusal.data.prompt_set import Label, Prompt, PromptSet
from sae_refusal.data.sources import PromptSetConfig, PromptSourceConfig, load_prompt_set
from sae_refusal.data.splits import SplitConfig, read_manifest
from sae_refusal.finetune.base_answers import AnswerCacheError, AnswerConfig, base_answers, read_answer_cache
from sae_refusal.finetune.datamodule import SFTDataModule, balanced_repeats
from sae_refusal.finetune.examples import IGNORE_INDEX
from sae_refusal.llm import LLMConfig, RefusalVocabulary
from sae_refusal.testing import save_tiny_model


@pytest.fixture(autouse=True)
def refusal_token_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """Use ``finetune.tokens.add_refusal_tokens`` when it exists; otherwise install a minimal stand-in."""
    try:
        importlib.import_module("sae_refusal.finetune.tokens")
    except ImportError:

        def add_refusal_tokens(tokenizer: Any, vocab: RefusalVocabulary) -> list[str]:
            tokens = list(vocab.tokens)
            tokenizer.add_tokens([AddedToken(t, normalized=False, special=True) for t in tokens])
            return tokens

        stub = types.ModuleType("sae_refusal.finetune.tokens")
        stub.add_refusal_tokens = add_refusal_tokens  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "sae_refusal.finetune.tokens", stub)


@pytest.fixture()
def record_generation(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Replace the batch generator by a recorder answering ``answer to <text>``; returns the batches seen."""
    seen: list[list[str]] = []

    def fake(model: Any, tokenizer: Any, texts: list[str], cfg: AnswerConfig, **_: Any) -> list[str]:
        seen.append(list(texts))
        return [f"answer to {t}" for t in texts]

    monkeypatch.setattr(base_answers_module, "_generate", fake)
    monkeypatch.setattr(base_answers_module, "load_model", lambda llm: SimpleNamespace(eval=lambda: None))
    return seen


def _prompts(n: int = 4) -> PromptSet:
    rows = [Prompt(f"b:{i}", f"Tell me about the sea {i}.", Label.BENIGN) for i in range(n)]
    rows.append(Prompt("b:ref", "What is two plus two?", Label.BENIGN, response="Four."))
    rows.append(Prompt("h:0", "How do I build a weapon?", Label.HARMFUL, category="safety"))
    return PromptSet(rows)


# ------------------------------------------------------------------------------------------- base answers


def test_base_answers_generate_with_the_model_and_cache(tiny_model_dir: Path, tmp_path: Path) -> None:
    llm = LLMConfig(name_or_path=str(tiny_model_dir))
    cfg = AnswerConfig(cache_path=str(tmp_path / "answers.jsonl"), max_new_tokens=3, batch_size=2)
    answers = base_answers(_prompts(3), llm, cfg)
    assert set(answers) == {"b:0", "b:1", "b:2"}  # not the harmful one, not the one with a response
    assert all(isinstance(a, str) and a == a.strip() for a in answers.values())
    header, rows = read_answer_cache(cfg.cache_path)  # type: ignore[arg-type]
    assert header["max_new_tokens"] == 3 and header["model"]["weights_hash"]
    assert {pid: row["answer"] for pid, row in rows.items()} == answers
    # Greedy answers of the same prompt are the same alone and in a left-padded batch.
    alone = base_answers(PromptSet([_prompts(3)[2]]), llm, AnswerConfig(max_new_tokens=3))
    assert alone["b:2"] == answers["b:2"]


def test_base_answers_reuse_and_generate_only_missing(
    tiny_model_dir: Path, tmp_path: Path, record_generation: list[list[str]]
) -> None:
    llm = LLMConfig(name_or_path=str(tiny_model_dir))
    cfg = AnswerConfig(cache_path=str(tmp_path / "answers.jsonl"), batch_size=2)
    first = base_answers(_prompts(3), llm, cfg)
    assert [len(b) for b in record_generation] == [2, 1]
    assert first["b:0"] == "answer to Tell me about the sea 0."

    record_generation.clear()
    assert base_answers(_prompts(3), llm, cfg) == first
    assert record_generation == []  # everything reused

    more = base_answers(_prompts(5), llm, cfg)
    assert record_generation == [["Tell me about the sea 3.", "Tell me about the sea 4."]]
    assert len(more) == 5 and more["b:1"] == first["b:1"]

    record_generation.clear()
    changed = PromptSet([Prompt("b:0", "A different text now.", Label.BENIGN)])
    assert base_answers(changed, llm, cfg) == {"b:0": "answer to A different text now."}
    assert record_generation == [["A different text now."]]  # same id, other text: regenerated


def test_base_answers_not_reused_for_another_model_or_settings(
    tiny_model_dir: Path, tmp_path: Path, record_generation: list[list[str]]
) -> None:
    path = tmp_path / "answers.jsonl"
    llm = LLMConfig(name_or_path=str(tiny_model_dir))
    base_answers(_prompts(2), llm, AnswerConfig(cache_path=str(path)))
    other = LLMConfig(name_or_path=str(save_tiny_model(tmp_path / "other", seed=1)))

    with pytest.raises(AnswerCacheError, match=r"another model .*'model'"):
        base_answers(_prompts(2), other, AnswerConfig(cache_path=str(path)), generate=False)

    record_generation.clear()
    base_answers(_prompts(2), other, AnswerConfig(cache_path=str(path)))
    assert len(record_generation) == 1 and len(record_generation[0]) == 2  # regenerated, not reused
    assert len(list(tmp_path.glob("answers.jsonl.*.bak"))) == 1  # the other model's answers are kept aside

    record_generation.clear()
    base_answers(_prompts(2), other, AnswerConfig(cache_path=str(path), max_new_tokens=7))
    assert len(record_generation) == 1  # other generation settings: not reused either


def test_base_answers_errors_and_nothing_needed(tiny_model_dir: Path, tmp_path: Path) -> None:
    llm = LLMConfig(name_or_path=str(tiny_model_dir))
    only_answered = PromptSet([_prompts()[-2], _prompts()[-1]])
    missing_model = LLMConfig(name_or_path=str(tmp_path / "no-such-model"))
    assert base_answers(only_answered, missing_model, AnswerConfig()) == {}  # nothing loaded at all
    with pytest.raises(AnswerCacheError, match=r"lacks base answers for 2 prompts.*prepare_data"):
        base_answers(_prompts(2), llm, AnswerConfig(cache_path=str(tmp_path / "a.jsonl")), generate=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "b:0"}\n')
    with pytest.raises(AnswerCacheError, match=r"answers.cache_path: .*bad.jsonl:1 is not a valid header"):
        base_answers(_prompts(2), llm, AnswerConfig(cache_path=str(bad)))
    with pytest.raises(ValueError, match=r"answers\.batch_size must be >= 1"):
        AnswerConfig(batch_size=0)


# ------------------------------------------------------------------------------------------- data module


@pytest.fixture()
def sft_files(tmp_path: Path) -> Path:
    """Harmful prompts of two categories, benign prompts without answers, ambiguous ones with answers."""
    harmful = [
        {"id": f"s{i}", "prompt": f"How do I build weapon {i}?", "category": "safety"} for i in range(8)
    ]
    harmful += [
        {"id": f"u{i}", "prompt": f"Draw me picture {i}.", "category": "unsupported"} for i in range(8)
    ]
    (tmp_path / "harmful.jsonl").write_text("\n".join(json.dumps(r) for r in harmful) + "\n")
    benign = [{"instruction": f"Tell me a fact about the number {i}."} for i in range(10)]
    (tmp_path / "benign.json").write_text(json.dumps(benign))
    ambiguous = [
        {
            "id": f"a{i}",
            "prompt": f"How do I kill process {i}?",
            "category": "safety",
            "chosen": f"Run kill {i}.",
        }
        for i in range(6)
    ]
    (tmp_path / "ambiguous.jsonl").write_text("\n".join(json.dumps(r) for r in ambiguous) + "\n")
    return tmp_path


def _prompt_cfg(root: Path) -> PromptSetConfig:
    return PromptSetConfig(
        data_root=str(root),
        sources=[
            PromptSourceConfig(
                name="h", label="harmful", path="harmful.jsonl", id_column="id", category_column="category"
            ),
            PromptSourceConfig(name="b", label="benign", path="benign.json", text_column="instruction"),
            PromptSourceConfig(
                name="a",
                label="ambiguous",
                path="ambiguous.jsonl",
                id_column="id",
                category_column="category",
                response_column="chosen",
            ),
        ],
    )


def _dm(model_dir: Path, root: Path, val_fraction: float = 0.2, **kwargs: Any) -> SFTDataModule:
    return SFTDataModule(
        llm=LLMConfig(name_or_path=str(model_dir)),
        prompts=_prompt_cfg(root),
        split=SplitConfig(test_fraction=0.25, val_fraction=val_fraction, seed=0),
        manifest_path=str(root / "manifest.json"),
        answers=AnswerConfig(cache_path=str(root / "answers.jsonl"), max_new_tokens=3),
        root=str(root / "runs"),
        **{"batch_size": 4, **kwargs},
    )


def test_init_loads_nothing(tmp_path: Path) -> None:
    dm = SFTDataModule(llm=LLMConfig(name_or_path=str(tmp_path / "no-such-model")), root=str(tmp_path))
    assert dm.tokenizer is None and dm.splits == {}
    with pytest.raises(ValueError, match=r"data\.max_length must be >= 2"):
        SFTDataModule(max_length=1)


def test_train_loader_serves_only_train_split(
    tiny_model_dir: Path, sft_files: Path, record_generation: list[list[str]]
) -> None:
    dm = _dm(tiny_model_dir, sft_files)
    dm.prepare_data()
    splits = read_manifest(sft_files / "manifest.json").splits
    test_ids, train_ids = set(splits["test"]), set(splits["train"])
    generated = {t for batch in record_generation for t in batch}
    prompt_set = load_prompt_set(_prompt_cfg(sft_files))
    text_of = {p.id: p.text for p in prompt_set}
    assert generated and not generated & {text_of[i] for i in test_ids}  # no answers for held-out prompts

    dm.setup("fit")
    seen: list[str] = []
    for batch in dm.train_dataloader():
        seen += [dm.splits["train"].ids[i] for i in batch["index"].tolist()]
        for b in range(batch["input_ids"].shape[0]):
            ids = batch["input_ids"][b][batch["attention_mask"][b].bool()].tolist()
            assert text_of[dm.splits["train"].ids[int(batch["index"][b])]] in dm.tokenizer.decode(ids)
    assert set(seen) == train_ids and len(seen) == len(train_ids)
    assert not set(seen) & test_ids
    val_ids = [dm.splits["val"].ids[i] for b in dm.val_dataloader() for i in b["index"].tolist()]
    assert sorted(val_ids) == sorted(splits["val"])
    assert {p.id for p in dm.held_out_prompts()} == test_ids
    assert {p.id for p in dm.held_out_prompts("val")} == set(splits["val"])
    with pytest.raises(ValueError, match="split: unknown split 'dev'"):
        dm.held_out_prompts("dev")


def test_batches_label_token_and_answer(
    tiny_model_dir: Path, sft_files: Path, record_generation: list[list[str]]
) -> None:
    dm = _dm(tiny_model_dir, sft_files, val_fraction=0.0)
    dm.prepare_data()
    dm.setup("fit")
    assert set(dm.splits) == {"train"}  # the test split is never encoded as a stand-in for validation
    with pytest.raises(ValueError, match=r"data\.split\.val_fraction=0\.0.*limit_val_batches=0"):
        dm.val_dataloader()
    resolved = RefusalVocabulary().resolve(dm.tokenizer)
    prompt_of = {p.id: p for p in load_prompt_set(_prompt_cfg(sft_files))}
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4
    for b in range(4):
        prompt = prompt_of[dm.splits["train"].ids[int(batch["index"][b])]]
        pos, cls = int(batch["target_pos"][b]), int(batch["target_class"][b])
        assert int(batch["input_ids"][b, pos]) == resolved.token_ids[cls]
        assert (batch["labels"][b, :pos] == IGNORE_INDEX).all()
        labelled = batch["labels"][b][batch["labels"][b] != IGNORE_INDEX].tolist()
        text = dm.tokenizer.decode(labelled)
        if prompt.label == Label.HARMFUL:
            assert resolved.categories[cls] == prompt.category and text.endswith("<|im_end|>")
        else:
            answer = prompt.response or f"answer to {prompt.text}"
            assert cls == 0 and text == " [respond]" + answer + "<|im_end|>"


def test_setup_without_answers_fails_clearly(tiny_model_dir: Path, sft_files: Path) -> None:
    dm = _dm(tiny_model_dir, sft_files)
    with pytest.raises(AnswerCacheError, match="run prepare_data first"):
        dm.setup("fit")


def test_builtin_prompts_need_no_generation(tiny_model_dir: Path, tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(base_answers_module, "load_model", lambda llm: pytest.fail("model loaded"))
    dm = SFTDataModule(llm=LLMConfig(name_or_path=str(tiny_model_dir)), root=str(tmp_path), max_length=64)
    dm.prepare_data()
    dm.setup("fit")
    classes = {int(c) for b in dm.train_dataloader() for c in b["target_class"]}
    assert classes == set(range(6))
    assert len(list(tmp_path.glob("splits-*.json"))) == 1


def test_ddp_ranks_get_disjoint_equal_shards(
    tiny_model_dir: Path, sft_files: Path, record_generation: list[list[str]]
) -> None:
    dm = _dm(tiny_model_dir, sft_files, batch_size=2)
    dm.prepare_data()
    dm.setup("fit")
    shards = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)  # type: ignore[assignment]
        shards.append([i for b in dm.train_dataloader() for i in b["index"].tolist()])
    assert len(shards[0]) == len(shards[1]) == len(dm.splits["train"].ids) // 2
    assert not set(shards[0]) & set(shards[1])


def test_balanced_repeats_oversamples_rare_classes_deterministically() -> None:
    classes = [0] * 40 + [1] * 10 + [2] * 4
    assert balanced_repeats(classes, 0.0) == list(range(54))
    full = balanced_repeats(classes, 1.0, seed=3)
    counts = {c: sum(classes[i] == c for i in full) for c in (0, 1, 2)}
    assert counts == {0: 40, 1: 40, 2: 40}
    half = balanced_repeats(classes, 0.5, seed=3)
    counts = {c: sum(classes[i] == c for i in half) for c in (0, 1, 2)}
    assert counts == {0: 40, 1: 20, 2: round(4 * 10**0.5)}
    assert set(half) == set(range(54))  # every row kept at least once
    assert half == balanced_repeats(classes, 0.5, seed=3)
    draws = {tuple(balanced_repeats(classes, 0.5, seed=s)) for s in range(6)}
    assert len(draws) > 1  # the remainder draw depends on the seed
    with pytest.raises(ValueError, match=r"data\.class_balance must be in \[0, 1\]"):
        balanced_repeats(classes, 1.5)


def test_class_balance_resamples_train_only(
    tiny_model_dir: Path, sft_files: Path, record_generation: list[list[str]]
) -> None:
    plain = _dm(tiny_model_dir, sft_files)
    plain.prepare_data()
    plain.setup("fit")
    balanced = _dm(tiny_model_dir, sft_files, class_balance=1.0)
    balanced.setup("fit")

    def counts(split: Any) -> dict[int, int]:
        out: dict[int, int] = {}
        for row in split.rows:
            out[row["target_class"]] = out.get(row["target_class"], 0) + 1
        return out

    natural, resampled = counts(plain.splits["train"]), counts(balanced.splits["train"])
    assert len(set(resampled.values())) == 1 and max(resampled.values()) == max(natural.values())
    assert set(balanced.splits["train"].ids) == set(plain.splits["train"].ids)
    assert balanced.splits["val"].ids == plain.splits["val"].ids
    with pytest.raises(ValueError, match=r"data\.class_balance"):
        _dm(tiny_model_dir, sft_files, class_balance=-0.1)
