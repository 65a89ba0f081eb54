"""Length-aware batching of the extraction (`plan_batches`, `token_budget`): every prompt once, no pass over
its budget, and the yielded activations byte-for-byte those of the unsorted path."""

from __future__ import annotations

import itertools
import random
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from sae_refusal.activations.build import CacheConfig
from sae_refusal.llm.extraction import iter_last_token_residuals, plan_batches
from sae_refusal.testing import build_tiny_model, build_tiny_tokenizer


class _Block(nn.Module):
    """A causal "block" whose every output is exact in float32 whatever the batch: small integers only
    (a running sum over real tokens plus the position), so any mix-up of rows, padding or order shows as a
    different byte."""

    def forward(self, hidden_BTD: Tensor, mask_BT: Tensor, position_BT: Tensor) -> Tensor:
        kept_BTD = hidden_BTD * mask_BT[..., None]
        return hidden_BTD + kept_BTD.cumsum(dim=1) + position_BT[..., None]


class _Inner(nn.Module):
    def __init__(self, vocab: int, width: int, n_layers: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, width)
        with torch.no_grad():
            self.embed_tokens.weight.copy_(torch.randint(-3, 4, (vocab, width)).float())
        self.layers = nn.ModuleList(_Block() for _ in range(n_layers))


class BatchInvariantLM(nn.Module):
    """Just enough of a Hugging Face causal LM for the extraction (``model.layers``, a config)."""

    def __init__(self, vocab: int = 64, width: int = 6, n_layers: int = 3) -> None:
        super().__init__()
        self.model = _Inner(vocab, width, n_layers)
        self.config = SimpleNamespace(max_position_embeddings=512, hidden_size=width)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, **_: Any) -> None:
        hidden_BTD = self.model.embed_tokens(input_ids)
        for block in self.model.layers:
            hidden_BTD = block(hidden_BTD, attention_mask.float(), position_ids.float())


class _IdTokenizer:
    """Text "a b c" -> ids [1, 2, 3] (one id per word), pad id 0."""

    pad_token_id = 0
    eos_token_id = 0
    chat_template = None
    model_max_length = 512

    def __call__(self, texts: list[str], **_: Any) -> dict[str, list[list[int]]]:
        return {"input_ids": [[int(w) for w in text.split()] for text in texts]}


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(str(rng.randint(1, 63)) for _ in range(rng.choice([1, 2, 5, 9, 30, 70]))) for _ in range(n)
    ]


def _stacked(model: nn.Module, tokenizer: Any, texts: list[str], **kwargs: Any) -> dict[int, Tensor]:
    batches = list(iter_last_token_residuals(model, tokenizer, texts, [0, 2], **kwargs))
    assert [i for b in batches for i in b.indices] == list(range(len(texts)))
    return {layer: torch.cat([b.acts[layer] for b in batches]) for layer in (0, 2)}


def test_the_planned_passes_cover_every_prompt_once_within_the_budget() -> None:
    rng = random.Random(1)
    lengths = [rng.randint(1, 300) for _ in range(500)] + [3000]  # one prompt over the budget
    passes = plan_batches(lengths, batch_size=64, token_budget=2048)
    assert sorted(i for p in passes for i in p) == list(range(len(lengths)))
    for p in passes:
        assert len(p) <= 64
        padded = len(p) * max(lengths[i] for i in p)
        assert padded <= 2048 or len(p) == 1
    assert [3000] in [[lengths[i] for i in p] for p in passes]  # the long one alone
    # longest first, and each pass as full as the budget allows: the next prompt would not have fitted
    flat = [lengths[i] for p in passes for i in p]
    assert flat == sorted(lengths, reverse=True)
    for p, nxt in itertools.pairwise(passes):
        width = max(lengths[i] for i in p)
        assert len(p) == 64 or (len(p) + 1) * max(width, lengths[nxt[0]]) > 2048
    # padding: the budgeted plan computes fewer padded tokens than input-order batches of 64
    budget_tokens = sum(len(p) * max(lengths[i] for i in p) for p in passes)
    plain = plan_batches(lengths, batch_size=64, sort=False)
    assert plain == [list(range(s, min(s + 64, len(lengths)))) for s in range(0, len(lengths), 64)]
    plain_tokens = sum(len(p) * max(lengths[i] for i in p) for p in plain)
    assert budget_tokens < 0.75 * plain_tokens


def test_ties_keep_input_order_and_bad_arguments_name_their_key() -> None:
    assert plan_batches([3, 5, 3, 5], batch_size=2) == [[1, 3], [0, 2]]
    # unsorted with a budget: the longer newcomer sets the pass's width
    assert plan_batches([1, 10, 1, 1], batch_size=8, token_budget=12, sort=False) == [[0], [1], [2, 3]]
    with pytest.raises(ValueError, match="token_budget"):
        plan_batches([1], batch_size=2, token_budget=0)
    with pytest.raises(ValueError, match="batch_size"):
        plan_batches([1], batch_size=0)
    with pytest.raises(ValueError, match="token_budget"):
        list(
            iter_last_token_residuals(
                BatchInvariantLM(), _IdTokenizer(), ["1 2"], [0], batch_size=2, token_budget=-5
            )
        )
    with pytest.raises(ValueError, match=r"data\.cache\.token_budget"):
        CacheConfig(token_budget=0)
    with pytest.raises(ValueError, match=r"data\.cache\.sort_window"):
        CacheConfig(sort_window=0)


@pytest.mark.parametrize(
    ("batch_size", "sort_window", "token_budget"), [(8, 4, None), (64, 8, 200), (16, 2, 64)]
)
def test_sorted_budgeted_extraction_gives_the_same_bytes_as_the_unsorted_path(
    batch_size: int, sort_window: int, token_budget: int | None
) -> None:
    torch.manual_seed(0)
    model, tokenizer = BatchInvariantLM(), _IdTokenizer()
    texts = _texts(90)
    unsorted = _stacked(model, tokenizer, texts, batch_size=8, sort_window=1)
    budgeted = _stacked(
        model, tokenizer, texts, batch_size=batch_size, sort_window=sort_window, token_budget=token_budget
    )
    for layer in (0, 2):
        assert unsorted[layer].dtype == budgeted[layer].dtype
        assert unsorted[layer].numpy().tobytes() == budgeted[layer].numpy().tobytes()
    # and each row is that prompt's own: its alone value (the fake model is exact, so bytes again)
    for index in (0, 17, 89):
        alone = _stacked(model, tokenizer, [texts[index]], batch_size=1, sort_window=1)
        assert torch.equal(alone[2][0], budgeted[2][index])


def test_a_real_tiny_model_agrees_to_float_round_off() -> None:
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model("llama", vocab_size=len(tokenizer), num_layers=3, hidden_size=64)
    rng = random.Random(0)
    words = ["how", "do", "i", "bake", "bread", "at", "home", "tell", "me", "a", "story", "dragon"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 60))) for _ in range(40)]
    unsorted = _stacked(model, tokenizer, texts, batch_size=8, sort_window=1)
    budgeted = _stacked(model, tokenizer, texts, batch_size=32, sort_window=4, token_budget=256)
    for layer in (0, 2):
        torch.testing.assert_close(budgeted[layer], unsorted[layer], atol=1e-5, rtol=1e-5)


def test_the_benchmarks_8b_shape_is_llama_3_8b() -> None:
    from sae_refusal.testing import build_llama3_8b_shape

    model = build_llama3_8b_shape("meta")  # shapes only, no memory
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248
    assert next(model.parameters()).dtype == torch.bfloat16 and not model.training
    assert not any(p.requires_grad for p in model.parameters())
