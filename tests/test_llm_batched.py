"""Batched next-token logits and generation: input order, padding invariance, stop tokens, errors."""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import LogitsProcessor, PreTrainedModel

from sae_refusal.data.chat import format_prompts
from sae_refusal.llm.batched import (
    Generation,
    check_positive,
    generate,
    generate_texts,
    iter_next_token_logits,
    iter_padded_batches,
    next_token_logits,
    resolve_pad_id,
    rows_in_input_order,
    stop_token_ids,
)
from sae_refusal.llm.tokenize import encode_prompts
from sae_refusal.testing import build_tiny_model, build_tiny_tokenizer

TEXTS = [
    "hi",
    "Please explain photosynthesis, the water cycle and gravity in simple words.",
    "Bake bread?",
    "What is the capital of France? Write a poem about the sea.",
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer: Any) -> PreTrainedModel:
    return build_tiny_model("llama", vocab_size=len(tokenizer), num_layers=2, hidden_size=32)


@pytest.fixture(scope="module")
def formatted(tokenizer: Any) -> list[str]:
    return format_prompts(tokenizer, TEXTS)


@pytest.fixture(scope="module")
def input_ids(tokenizer: Any, formatted: list[str]) -> list[list[int]]:
    return encode_prompts(tokenizer, formatted, max_length=256).input_ids


# ------------------------------------------------------------------------------------------- batches


def test_padded_batches_in_input_order_or_longest_first() -> None:
    ids = [[1], [2, 2, 2], [3, 3], [4, 4, 4], [5]]
    plain = list(iter_padded_batches(ids, batch_size=2, pad_id=0))
    assert [b.indices for b in plain] == [[0, 1], [2, 3], [4]]
    assert plain[0].input_ids_BT.tolist() == [[0, 0, 1], [2, 2, 2]]
    assert plain[0].attention_mask_BT.tolist() == [[0, 0, 1], [1, 1, 1]]
    assert plain[0].input_ids_BT.dtype == torch.long
    ranked = list(iter_padded_batches(ids, batch_size=2, pad_id=9, sort_by_length=True))
    assert [b.indices for b in ranked] == [[1, 3], [2, 0], [4]]  # longest first, ties in input order
    assert ranked[1].input_ids_BT.tolist() == [[3, 3], [9, 1]]
    assert list(iter_padded_batches([], batch_size=3, pad_id=0)) == []


def test_rows_in_input_order() -> None:
    rows_NV = torch.arange(12.0).reshape(4, 3)
    scrambled = [([3, 1], rows_NV[[3, 1]]), ([0], rows_NV[[0]]), ([2], rows_NV[[2]])]
    assert torch.equal(rows_in_input_order(scrambled, 4), rows_NV)
    assert rows_in_input_order([], 0).shape == (0, 0)
    with pytest.raises(ValueError, match="batches: 3 rows for n_rows=4"):
        rows_in_input_order(scrambled[:2], 4)


# ------------------------------------------------------------------------------------------- logits


def test_next_token_logits_alone_equals_in_padded_batch(
    model: PreTrainedModel, tokenizer: Any, input_ids: list[list[int]]
) -> None:
    pad_id = resolve_pad_id(tokenizer)
    model.train()  # must switch dropout off and restore the mode
    batch_NV = next_token_logits(model, input_ids, batch_size=4, pad_id=pad_id)
    assert model.training
    model.eval()
    assert batch_NV.shape == (len(TEXTS), len(tokenizer)) and batch_NV.dtype == torch.float32
    assert batch_NV.device.type == "cpu"
    for i, ids in enumerate(input_ids):
        alone_1V = next_token_logits(model, [ids], batch_size=1, pad_id=pad_id)
        torch.testing.assert_close(batch_NV[i], alone_1V[0], atol=1e-4, rtol=0)
    # Sorted by length and in other batch sizes: the same rows, returned in input order.
    ranked_NV = next_token_logits(model, input_ids, batch_size=3, pad_id=pad_id, sort_by_length=True)
    torch.testing.assert_close(ranked_NV, batch_NV, atol=1e-4, rtol=0)
    assert next_token_logits(model, [], batch_size=2, pad_id=pad_id).shape == (0, 0)


def test_iter_next_token_logits_batches_name_their_prompts(
    model: PreTrainedModel, tokenizer: Any, input_ids: list[list[int]]
) -> None:
    batches = list(
        iter_next_token_logits(
            model, input_ids, batch_size=3, pad_id=resolve_pad_id(tokenizer), sort_by_length=True
        )
    )
    lengths = [len(ids) for ids in input_ids]
    assert batches[0].indices == sorted(range(len(TEXTS)), key=lambda i: -lengths[i])[:3]
    assert sorted(i for b in batches for i in b.indices) == list(range(len(TEXTS)))
    assert [b.logits_BV.shape[0] for b in batches] == [3, 1]


# ------------------------------------------------------------------------------------------- generation


def test_greedy_generation_same_batched_and_one_by_one(
    model: PreTrainedModel, tokenizer: Any, input_ids: list[list[int]], formatted: list[str]
) -> None:
    pad_id = resolve_pad_id(tokenizer)
    kw: dict[str, Any] = {"max_new_tokens": 5, "pad_id": pad_id, "stop_ids": [tokenizer.eos_token_id]}
    batched = generate(model, input_ids, batch_size=3, **kw)
    alone = [generate(model, [ids], batch_size=1, **kw)[0] for ids in input_ids]
    assert batched == alone and len(batched) == len(TEXTS)
    assert all(len(g.token_ids) <= 5 and g.stopped == (len(g.token_ids) < 5) for g in batched)
    # longest-first batches come back in input order, each prompt with its own answer
    seen: list[list[int]] = []
    sorted_ = generate(
        model,
        input_ids,
        batch_size=3,
        sort_by_length=True,
        around=lambda idx: seen.append(idx) or nullcontext(),
        **kw,
    )
    assert sorted_ == alone and seen[0] != [0, 1, 2]

    text_kw: dict[str, Any] = {"max_new_tokens": 5, "stop_ids": [tokenizer.eos_token_id]}
    texts = generate_texts(model, tokenizer, formatted, batch_size=4, **text_kw)
    assert texts == [generate_texts(model, tokenizer, [f], batch_size=1, **text_kw)[0] for f in formatted]
    assert texts == [tokenizer.decode(g.token_ids, skip_special_tokens=True) for g in batched]


def test_generation_is_cut_at_the_first_stop_token(
    model: PreTrainedModel, tokenizer: Any, input_ids: list[list[int]]
) -> None:
    pad_id = resolve_pad_id(tokenizer)
    free = generate(model, input_ids, max_new_tokens=3, pad_id=pad_id, stop_ids=[], batch_size=2)
    assert all(len(g.token_ids) == 3 and not g.stopped for g in free)
    first = [g.token_ids[0] for g in free]
    # Every first token a stop token: nothing kept, the stop token named and still the first token.
    stopped = generate(model, input_ids, max_new_tokens=3, pad_id=pad_id, stop_ids=first, batch_size=2)
    for g, token in zip(stopped, first, strict=True):
        assert g == Generation([], token) and g.stopped and g.first_id == token
    assert free[0].first_id == first[0]


class _Always(LogitsProcessor):
    def __init__(self, token_id: int) -> None:
        self.token_id = token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.token_id] = 0.0
        return forced  # type: ignore[return-value]


def test_logits_processors_and_sampling(
    model: PreTrainedModel, tokenizer: Any, input_ids: list[list[int]]
) -> None:
    pad_id = resolve_pad_id(tokenizer)
    forced = generate(
        model,
        input_ids,
        max_new_tokens=2,
        pad_id=pad_id,
        stop_ids=[],
        batch_size=4,
        logits_processors=[_Always(7)],
    )
    assert [g.token_ids for g in forced] == [[7, 7]] * len(TEXTS)
    kw: dict[str, Any] = {"max_new_tokens": 4, "pad_id": pad_id, "stop_ids": [], "batch_size": 2}
    torch.manual_seed(1)
    first = generate(model, input_ids, temperature=1.5, **kw)
    torch.manual_seed(1)
    assert generate(model, input_ids, temperature=1.5, **kw) == first


# ------------------------------------------------------------------------------------------- small helpers


def test_stop_token_ids_and_pad_id() -> None:
    tokenizer = SimpleNamespace(eos_token_id=5, pad_token_id=None)
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[9, 5]))
    assert stop_token_ids(model, tokenizer, [7]) == [5, 7, 9]  # type: ignore[arg-type]
    single = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=3))
    assert stop_token_ids(single, SimpleNamespace(), ()) == [3]  # type: ignore[arg-type]
    assert stop_token_ids(SimpleNamespace(), SimpleNamespace()) == []  # type: ignore[arg-type]
    assert resolve_pad_id(SimpleNamespace(pad_token_id=2, eos_token_id=5)) == 2
    assert resolve_pad_id(tokenizer) == 5
    assert resolve_pad_id(SimpleNamespace()) == 0


@pytest.mark.parametrize("value", [0, -1, True, 1.5, None])
def test_argument_errors(value: Any, model: PreTrainedModel, input_ids: list[list[int]]) -> None:
    with pytest.raises(ValueError, match="batch_size: must be a positive integer"):
        iter_padded_batches(input_ids, batch_size=value, pad_id=0)  # raised at once, not on iteration
    with pytest.raises(ValueError, match="batch_size: must be a positive integer"):
        iter_next_token_logits(model, input_ids, batch_size=value, pad_id=0)
    with pytest.raises(ValueError, match="batch_size: must be a positive integer"):
        generate(model, input_ids, max_new_tokens=2, pad_id=0, stop_ids=[], batch_size=value)
    with pytest.raises(ValueError, match="max_new_tokens: must be a positive integer"):
        generate(model, input_ids, max_new_tokens=value, pad_id=0, stop_ids=[], batch_size=2)
    with pytest.raises(ValueError, match="n_pairs: must be a positive integer"):
        check_positive("n_pairs", value)


def test_bad_temperature_and_empty_prompt(model: PreTrainedModel) -> None:
    with pytest.raises(ValueError, match=r"temperature: must be >= 0"):
        generate(model, [[1, 2]], max_new_tokens=2, pad_id=0, stop_ids=[], batch_size=1, temperature=-0.5)
    with pytest.raises(ValueError, match="pad_left: sequence 1 is empty"):
        next_token_logits(model, [[1, 2], []], batch_size=2, pad_id=0)
    assert generate(model, [], max_new_tokens=2, pad_id=0, stop_ids=[], batch_size=1) == []
