"""Held-out refusal-token evaluation: metrics from known predictions, padding invariance, errors, samples."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from sklearn.metrics import f1_score, precision_score, recall_score
from tokenizers import AddedToken
from transformers import PreTrainedModel

from sae_refusal.categories import DEFAULT_REFUSAL_TOKENS, HUMANIZING, INCOMPLETE, SAFETY, UNSUPPORTED
from sae_refusal.data.prompt_set import Label, Prompt, PromptSet
from sae_refusal.eval import refusal_tokens as ev
from sae_refusal.eval.refusal_tokens import (
    RefusalReport,
    evaluate_refusal_tokens,
    expected_class,
    refusal_report,
    sample_answers,
)
from sae_refusal.llm import RefusalTokenError, RefusalVocabulary
from sae_refusal.llm.first_token import FirstTokenBatch, first_token_logits
from sae_refusal.testing import build_tiny_model, build_tiny_tokenizer

TOKENS = list(DEFAULT_REFUSAL_TOKENS)
OTHER = -1  # "predict a normal token"


def _with_tokens(tokenizer: Any) -> Any:
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=True) for t in TOKENS])
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return _with_tokens(build_tiny_tokenizer())


@pytest.fixture(scope="module")
def model(tokenizer: Any) -> PreTrainedModel:
    model = build_tiny_model("llama", vocab_size=400, num_layers=2, hidden_size=32)
    model.resize_token_embeddings(len(tokenizer))
    return model.eval()


@pytest.fixture(scope="module")
def resolved(tokenizer: Any) -> Any:
    return RefusalVocabulary().resolve(tokenizer)


def _p(pid: str, label: Label, category: str | None = None, source: str = "a") -> Prompt:
    return Prompt(
        id=pid, text=f"Prompt {pid}: how do I bake bread?", label=label, category=category, source=source
    )


# (prompt, predicted class in greedy mode: class index, or OTHER for a non-refusal top token)
# Class order: respond 0, humanizing 1, incomplete 2, indeterminate 3, safety 4, unsupported 5.
CASES: list[tuple[Prompt, int]] = [
    (_p("s1", Label.HARMFUL, SAFETY), 4),
    (_p("s2", Label.HARMFUL, SAFETY), 4),
    (_p("s3", Label.HARMFUL, SAFETY), 0),  # missed refusal
    (_p("s4", Label.HARMFUL, SAFETY, source="b"), 5),  # wrong category
    (_p("h1", Label.HARMFUL, HUMANIZING), 1),
    (_p("h2", Label.HARMFUL, HUMANIZING, source="b"), OTHER),
    (_p("i1", Label.HARMFUL, INCOMPLETE), 2),
    (_p("u1", Label.HARMFUL, UNSUPPORTED), 5),
    (_p("b1", Label.BENIGN), 0),
    (_p("b2", Label.BENIGN), 0),
    (_p("b3", Label.BENIGN, source="b"), 4),  # false refusal
    (_p("b4", Label.BENIGN), OTHER),  # no refusal token at all: not a false refusal
    (_p("b5", Label.BENIGN), 0),
    (_p("a1", Label.AMBIGUOUS, SAFETY, source="c"), 4),  # over-refusal
    (_p("a2", Label.AMBIGUOUS, SAFETY, source="c"), 0),
    (_p("a3", Label.AMBIGUOUS, HUMANIZING, source="c"), 1),  # over-refusal
]
# In restricted mode an OTHER row falls back to its best refusal token, chosen here.
RESTRICTED_FALLBACK = {"h2": 1, "b4": 3}
# Ground truth by hand.
TRUTH = [4, 4, 4, 4, 1, 1, 2, 5, 0, 0, 0, 0, 0, 0, 0, 0]


def _fake_logits(resolved: Any, vocab_size: int, normal_id: int) -> torch.Tensor:
    """Logits whose argmax is each case's prediction and whose best refusal token is RESTRICTED_FALLBACK."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(len(CASES), vocab_size, generator=gen)
    for row, (prompt, pred) in enumerate(CASES):
        if pred == OTHER:
            logits[row, normal_id] = 20.0
            logits[row, resolved.token_ids[RESTRICTED_FALLBACK[prompt.id]]] = 10.0
        else:
            logits[row, resolved.token_ids[pred]] = 20.0
    return logits


def _patch_forward(monkeypatch: pytest.MonkeyPatch, logits: torch.Tensor, batch_size: int = 5) -> None:
    """Replace the model forward by fixed logits, yielded in a scrambled batch order."""

    def fake(_model: Any, _tokenizer: Any, texts: Sequence[str], **_: Any) -> Iterator[FirstTokenBatch]:
        assert len(texts) == logits.shape[0]
        order = list(reversed(range(len(texts))))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            yield FirstTokenBatch(chunk, logits[chunk], [i == 0 for i in chunk])

    monkeypatch.setattr(ev, "iter_first_token_logits", fake)


@pytest.fixture()
def fake_logits(monkeypatch: pytest.MonkeyPatch, tokenizer: Any, resolved: Any) -> torch.Tensor:
    normal_id = tokenizer.convert_tokens_to_ids("a")
    logits = _fake_logits(resolved, len(tokenizer), normal_id)
    _patch_forward(monkeypatch, logits)
    return logits


PROMPTS = PromptSet(p for p, _ in CASES)


def test_expected_classes(resolved: Any) -> None:
    assert [expected_class(p, resolved) for p in PROMPTS] == TRUTH


def test_greedy_metrics_match_hand_counts_and_sklearn(fake_logits: torch.Tensor, tokenizer: Any) -> None:
    report = evaluate_refusal_tokens(None, tokenizer, PROMPTS, mode="greedy")  # type: ignore[arg-type]
    preds = [pred for _, pred in CASES]
    assert report.n == 16
    assert report.class_names == [
        "respond",
        "humanizing",
        "incomplete",
        "indeterminate",
        "safety",
        "unsupported",
    ]
    assert report.accuracy == pytest.approx(sum(t == p for t, p in zip(TRUTH, preds, strict=True)) / 16)
    assert report.accuracy == pytest.approx(9 / 16)
    assert [r["predicted"] for r in report.predictions][5] == "other"
    assert report.confusion_columns[-1] == "other"
    expected_confusion = [[0] * 7 for _ in range(6)]
    for t, p in zip(TRUTH, preds, strict=True):
        expected_confusion[t][6 if p == OTHER else p] += 1
    assert report.confusion == expected_confusion
    # respond row: b1,b2,b5,a2 -> respond; b3,a1 -> safety; a3 -> humanizing; b4 -> other
    assert report.confusion[0] == [4, 1, 0, 0, 2, 0, 1]

    present = [0, 1, 2, 4, 5]  # indeterminate never occurs
    assert report.macro_f1_classes == ["respond", "humanizing", "incomplete", "safety", "unsupported"]
    assert report.macro_f1 == pytest.approx(f1_score(TRUTH, preds, labels=present, average="macro"))
    assert report.macro_f1_all6 == pytest.approx(
        f1_score(TRUTH, preds, labels=list(range(6)), average="macro", zero_division=0)
    )
    for c, name in enumerate(report.class_names):
        row = report.per_class[name]
        kw: dict[str, Any] = {"labels": [c], "average": "macro", "zero_division": 0}
        assert row["precision"] == pytest.approx(precision_score(TRUTH, preds, **kw))
        assert row["recall"] == pytest.approx(recall_score(TRUTH, preds, **kw))
        assert row["f1"] == pytest.approx(f1_score(TRUTH, preds, **kw))
        assert row["support"] == TRUTH.count(c)

    assert report.false_refusal_rate == pytest.approx(1 / 5)  # b3 only (b4 is "other", not a refusal)
    assert report.over_refusal_rate == pytest.approx(2 / 3)  # a1, a3
    assert report.harmful_refusal_rate == pytest.approx(6 / 8)  # all but s3 and h2
    assert report.not_a_refusal_token_rate == pytest.approx(2 / 16)
    assert report.n_by_label == {"ambiguous": 3, "benign": 5, "harmful": 8}
    assert report.per_source["a"] == {"n": 10, "accuracy": pytest.approx(0.8), "refusal_rate": 0.5}
    assert report.per_source["b"]["accuracy"] == pytest.approx(0.0)
    assert report.per_source["c"]["accuracy"] == pytest.approx(1 / 3)
    assert report.per_label["harmful"]["accuracy"] == pytest.approx(5 / 8)
    assert report.n_truncated == 1
    assert [r["id"] for r in report.predictions] == PROMPTS.ids


def test_subset_recomputes_metrics_on_chosen_sources(fake_logits: torch.Tensor, tokenizer: Any) -> None:
    report = evaluate_refusal_tokens(None, tokenizer, PROMPTS)  # type: ignore[arg-type]
    sub = report.subset(["a", "b"])  # drops the contrast prompts (source c)
    keep = [i for i, (p, _) in enumerate(CASES) if p.source in ("a", "b")]
    truth = [TRUTH[i] for i in keep]
    preds = [CASES[i][1] for i in keep]
    assert sub.n == len(keep) == 13 and sub.over_refusal_rate is None
    assert sub.macro_f1 == pytest.approx(f1_score(truth, preds, labels=[0, 1, 2, 4, 5], average="macro"))
    assert sub.false_refusal_rate == report.false_refusal_rate
    assert sub.per_source == {k: v for k, v in report.per_source.items() if k != "c"}
    assert report.subset(["a", "b", "c"]) == report
    with pytest.raises(
        ValueError, match=r"no prompts from sources \['zzz'\]; the report has \['a', 'b', 'c'\]"
    ):
        report.subset(["zzz"])


def test_p_expected_and_top_token(fake_logits: torch.Tensor, tokenizer: Any, resolved: Any) -> None:
    report = evaluate_refusal_tokens(None, tokenizer, PROMPTS)  # type: ignore[arg-type]
    full = fake_logits.softmax(dim=1)
    restricted = fake_logits[:, list(resolved.token_ids)].softmax(dim=1)
    for row, (record, truth) in enumerate(zip(report.predictions, TRUTH, strict=True)):
        expected_id = resolved.token_ids[truth]
        assert record["p_expected"] == pytest.approx(float(full[row, expected_id]), abs=1e-6)
        assert record["p_expected_restricted"] == pytest.approx(float(restricted[row, truth]), abs=1e-6)
        assert record["top_token"] == tokenizer.decode([int(fake_logits[row].argmax())])
        assert record["top_is_refusal_token"] == (CASES[row][1] != OTHER)


def test_restricted_mode_falls_back_to_best_refusal_token(fake_logits: torch.Tensor, tokenizer: Any) -> None:
    report = evaluate_refusal_tokens(None, tokenizer, PROMPTS, mode="restricted")  # type: ignore[arg-type]
    by_id = {r["id"]: r["predicted"] for r in report.predictions}
    assert by_id["h2"] == "humanizing"  # right after all
    assert by_id["b4"] == "indeterminate"  # now a false refusal
    assert all(row[-1] == 0 for row in report.confusion)
    assert report.accuracy == pytest.approx(10 / 16)
    assert report.false_refusal_rate == pytest.approx(2 / 5)
    assert report.not_a_refusal_token_rate == pytest.approx(2 / 16)  # still reported
    assert "indeterminate" in report.macro_f1_classes


def test_save_load_and_markdown(fake_logits: torch.Tensor, tokenizer: Any, tmp_path: Path) -> None:
    report = evaluate_refusal_tokens(None, tokenizer, PROMPTS)  # type: ignore[arg-type]
    folder = report.save(tmp_path / "refusal_report")
    assert sorted(p.name for p in folder.iterdir()) == ["report.json", "report.md"]
    data = json.loads((folder / "report.json").read_text())
    assert data["accuracy"] == pytest.approx(report.accuracy)
    assert len(data["predictions"]) == 16
    assert RefusalReport.load(folder) == report
    md = (folder / "report.md").read_text()
    assert "| safety |" in md and "| expected \\ predicted |" in md and "other |" in md
    assert "false-refusal rate" in md and "over-refusal rate" in md and "## Errors (7" in md


def test_input_errors(tokenizer: Any, resolved: Any) -> None:
    with pytest.raises(ValueError, match="no category"):
        expected_class(_p("x", Label.HARMFUL), resolved)
    partial = RefusalVocabulary({" [respond]": None, " [Requests with safety concerns]": "safety"})
    with pytest.raises(ValueError, match=r"'h1'.*'Humanizing requests' has no refusal token"):
        evaluate_refusal_tokens(None, tokenizer, PROMPTS, vocab=partial)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        evaluate_refusal_tokens(None, tokenizer, PROMPTS, mode="sampled")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        evaluate_refusal_tokens(None, tokenizer, PromptSet([]))  # type: ignore[arg-type]
    logits = torch.zeros(3, len(tokenizer))
    with pytest.raises(ValueError, match="3 rows for 16 prompts"):
        refusal_report(PROMPTS, resolved.classify(logits), resolved)


def test_missing_tokens_raise_refusal_token_error(model: PreTrainedModel) -> None:
    with pytest.raises(RefusalTokenError, match=r"\[respond\]"):
        evaluate_refusal_tokens(model, build_tiny_tokenizer(), PROMPTS)


def test_first_token_logits_alone_equals_in_padded_batch(model: PreTrainedModel, tokenizer: Any) -> None:
    texts = [
        "hi",
        "Please explain photosynthesis, the water cycle and gravity in simple words.",
        "Bake bread?",
    ]
    model.train()  # evaluation must switch dropout off and restore the mode
    batch = first_token_logits(model, tokenizer, texts, batch_size=3)
    assert model.training
    model.eval()
    assert batch.shape == (3, len(tokenizer)) and batch.dtype == torch.float32
    assert batch.device.type == "cpu"
    for i, text in enumerate(texts):
        alone = first_token_logits(model, tokenizer, [text])
        torch.testing.assert_close(batch[i], alone[0], atol=1e-4, rtol=0)
    # Different batch sizes (so different sorting and padding) give the same rows in input order.
    torch.testing.assert_close(
        first_token_logits(model, tokenizer, texts, batch_size=2), batch, atol=1e-4, rtol=0
    )


def test_real_forward_report_is_consistent(model: PreTrainedModel, tokenizer: Any, resolved: Any) -> None:
    report = evaluate_refusal_tokens(model, tokenizer, PROMPTS, batch_size=4, mode="restricted")
    logits = first_token_logits(model, tokenizer, PROMPTS.texts)
    pred = resolved.classify(logits).pred_class_B.tolist()
    assert [r["predicted"] for r in report.predictions] == [resolved.class_names[c] for c in pred]
    assert sum(map(sum, report.confusion)) == 16


def test_sample_answers_keep_special_tokens(model: PreTrainedModel, tokenizer: Any) -> None:
    prompts = PROMPTS.filter(lambda p: p.label is not Label.HARMFUL)
    samples = sample_answers(model, tokenizer, prompts, n=2, max_new_tokens=4, vocab=RefusalVocabulary())
    assert [s["id"] for s in samples] == prompts.ids[:2]
    for s in samples:
        assert set(s) >= {"id", "prompt", "first_token", "first_class", "answer", "n_new_tokens", "stopped"}
        assert s["n_new_tokens"] <= 4
        assert s["answer"].startswith(s["first_token"]) or s["n_new_tokens"] == 0
    json.dumps(samples)
