"""Early-exit last-token extraction: equals the naive full forward, padding-invariant, really stops early."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel

from sae_refusal.llm import (
    encode_prompts,
    full_forward_last_token,
    iter_last_token_residuals,
    last_token_residuals,
    pad_left,
    position_ids_from_mask,
)
from sae_refusal.llm.tokenize import context_length, default_max_length
from sae_refusal.testing import TINY_ARCHITECTURES, build_tiny_model, build_tiny_tokenizer

TEXTS = [
    "<|im_start|>user\nHow do I bake bread at home?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nPlease explain photosynthesis, the water cycle and gravity in simple words, "
    "then write a poem about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
]
ATOL = 1e-5


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tiny_tokenizer()


@pytest.fixture(scope="module", params=TINY_ARCHITECTURES)
def model(request: pytest.FixtureRequest, tokenizer: Any) -> PreTrainedModel:
    return build_tiny_model(request.param, vocab_size=len(tokenizer), num_layers=4, hidden_size=32)


def _batch(tokenizer: Any, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = encode_prompts(tokenizer, texts, max_length=256).input_ids
    return pad_left(ids, tokenizer.pad_token_id)


def _pad_right(batch_ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in batch_ids)
    input_ids = torch.full((len(batch_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(batch_ids):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    return input_ids, mask


def test_early_exit_equals_hidden_states(model: PreTrainedModel, tokenizer: Any) -> None:
    input_ids, mask = _batch(tokenizer, TEXTS)
    layers = [0, 1, 2]  # non-final: HF's hidden_states[l + 1] is the raw residual stream
    acts = last_token_residuals(model, input_ids, mask, layers)
    with torch.inference_mode():
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            output_hidden_states=True,
            use_cache=False,
        )
    last = mask.shape[1] - 1  # left padded: the last position is real for every row
    assert list(acts) == layers
    for layer in layers:
        assert acts[layer].shape == (len(TEXTS), 32)
        torch.testing.assert_close(acts[layer], out.hidden_states[layer + 1][:, last], atol=ATOL, rtol=0)
    oracle = full_forward_last_token(model, input_ids, mask, [*layers, 3])
    final = last_token_residuals(model, input_ids, mask, [3])
    torch.testing.assert_close(final[3], oracle[3], atol=ATOL, rtol=0)
    for layer in layers:
        torch.testing.assert_close(acts[layer], oracle[layer], atol=ATOL, rtol=0)


def test_final_layer_is_before_the_final_norm(tokenizer: Any) -> None:
    model = build_tiny_model("llama", vocab_size=len(tokenizer))
    input_ids, mask = _batch(tokenizer, TEXTS[:2])
    acts = last_token_residuals(model, input_ids, mask, [-1])
    with torch.inference_mode():
        out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
    normed = out.hidden_states[-1][:, -1]
    assert not torch.allclose(acts[3], normed, atol=1e-3)
    torch.testing.assert_close(model.model.norm(acts[3]), normed, atol=ATOL, rtol=0)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_alone_equals_inside_padded_batch(model: PreTrainedModel, tokenizer: Any, padding: str) -> None:
    ids = encode_prompts(tokenizer, TEXTS, max_length=256).input_ids
    short = 1  # the shortest prompt gets the most padding
    assert len(ids[short]) < max(len(x) for x in ids)
    pad_fn = pad_left if padding == "left" else _pad_right
    input_ids, mask = pad_fn(ids, tokenizer.pad_token_id)
    batched = last_token_residuals(model, input_ids, mask, [0, 2, 3])
    for index in range(len(ids)):
        alone_ids = torch.tensor([ids[index]])
        alone = last_token_residuals(model, alone_ids, torch.ones_like(alone_ids), [0, 2, 3])
        for layer in (0, 2, 3):
            torch.testing.assert_close(batched[layer][index], alone[layer][0], atol=ATOL, rtol=0)


def test_early_exit_skips_later_layers(tokenizer: Any) -> None:
    model = build_tiny_model("llama", vocab_size=len(tokenizer), num_layers=4)
    calls = {"last_layer": 0, "lm_head": 0, "norm": 0}

    def counter(name: str) -> Any:
        def hook(*_: Any) -> None:
            calls[name] += 1

        return hook

    handles = [
        model.model.layers[3].register_forward_hook(counter("last_layer")),
        model.lm_head.register_forward_hook(counter("lm_head")),
        model.model.norm.register_forward_hook(counter("norm")),
    ]
    try:
        input_ids, mask = _batch(tokenizer, TEXTS)
        last_token_residuals(model, input_ids, mask, [1])
        assert calls == {"last_layer": 0, "lm_head": 0, "norm": 0}
        last_token_residuals(model, input_ids, mask, [3])
        assert calls == {"last_layer": 1, "lm_head": 0, "norm": 0}
    finally:
        for handle in handles:
            handle.remove()


def _n_hooks(model: PreTrainedModel) -> int:
    return sum(len(block._forward_hooks) for block in model.model.layers)


def test_hooks_removed_after_success_and_exception(tokenizer: Any) -> None:
    model = build_tiny_model("llama", vocab_size=len(tokenizer))
    input_ids, mask = _batch(tokenizer, TEXTS)
    last_token_residuals(model, input_ids, mask, [0, 2])
    assert _n_hooks(model) == 0

    def boom(*_: Any) -> None:
        raise RuntimeError("boom in block 1")

    handle = model.model.layers[1].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom in block 1"):
            last_token_residuals(model, input_ids, mask, [0, 2])
    finally:
        handle.remove()
    assert _n_hooks(model) == 0


def test_invalid_layers_and_inputs(tokenizer: Any) -> None:
    model = build_tiny_model("llama", vocab_size=len(tokenizer), num_layers=4)
    input_ids, mask = _batch(tokenizer, TEXTS[:2])
    with pytest.raises(ValueError, match=r"^layers: layer 4 is out of range"):
        last_token_residuals(model, input_ids, mask, [4])
    with pytest.raises(ValueError, match="no real token"):
        last_token_residuals(model, input_ids, torch.zeros_like(mask), [0])
    with pytest.raises(ValueError, match="shape"):
        last_token_residuals(model, input_ids, mask[:, 1:], [0])
    assert _n_hooks(model) == 0


def test_iterator_keeps_input_order_and_matches(tokenizer: Any) -> None:
    model = build_tiny_model("qwen2", vocab_size=len(tokenizer))
    texts = [TEXTS[i % len(TEXTS)] + "x" * (i % 5) for i in range(11)]
    batches = list(iter_last_token_residuals(model, tokenizer, texts, [1, -1], batch_size=3, sort_window=2))
    assert [i for b in batches for i in b.indices] == list(range(11))
    assert [len(b.indices) for b in batches] == [3, 3, 3, 2]
    got = {layer: torch.cat([b.acts[layer] for b in batches]) for layer in (1, 3)}
    for index in (0, 4, 10):
        alone_ids = encode_prompts(tokenizer, [texts[index]], max_length=256).input_ids
        ids = torch.tensor(alone_ids)
        alone = last_token_residuals(model, ids, torch.ones_like(ids), [1, 3])
        for layer in (1, 3):
            torch.testing.assert_close(got[layer][index], alone[layer][0], atol=ATOL, rtol=0)
    assert all(b.n_truncated == 0 for b in batches)


def test_iterator_truncation_and_errors(tokenizer: Any) -> None:
    model = build_tiny_model("llama", vocab_size=len(tokenizer))
    batches = list(iter_last_token_residuals(model, tokenizer, TEXTS, [0], batch_size=2, max_length=12))
    assert sum(b.n_truncated for b in batches) == 4
    assert all(n == 12 for b in batches for n in b.n_tokens)
    with pytest.raises(ValueError, match=r"^max_length: prompt 0 has"):
        list(
            iter_last_token_residuals(
                model, tokenizer, TEXTS, [0], batch_size=2, max_length=12, overflow="error"
            )
        )
    with pytest.raises(ValueError, match=r"^batch_size"):
        list(iter_last_token_residuals(model, tokenizer, TEXTS, [0], batch_size=0))
    with pytest.raises(ValueError, match=r"^layers"):
        list(iter_last_token_residuals(model, tokenizer, TEXTS, [9], batch_size=2))
    assert default_max_length(model, tokenizer) == 256
    with pytest.raises(ValueError, match=r"^max_length: 257 exceeds the context \(256 tokens"):
        list(iter_last_token_residuals(model, tokenizer, TEXTS, [0], batch_size=2, max_length=257))
    assert (
        len(list(iter_last_token_residuals(model, tokenizer, TEXTS, [0], batch_size=8, max_length=256))) == 1
    )


def test_context_length_sources(tokenizer: Any) -> None:
    model = build_tiny_model("llama", vocab_size=len(tokenizer))
    assert context_length(model.config) == context_length(model) == 256
    no_positions = SimpleNamespace()  # a config without max_position_embeddings
    assert context_length(no_positions, tokenizer) == 256  # the tokenizer's model_max_length
    tokenizer_unlimited = build_tiny_tokenizer()
    tokenizer_unlimited.model_max_length = int(1e30)  # transformers' "no limit" sentinel
    assert context_length(no_positions, tokenizer_unlimited) is None
    assert default_max_length(nn.Identity(), tokenizer_unlimited) == 4096


def test_encode_prompts_policies(tokenizer: Any) -> None:
    full = encode_prompts(tokenizer, TEXTS, max_length=1000)
    assert full.n_truncated == 0 and full.truncated_indices == []
    # No special tokens are added: the chat markup is already in the text.
    assert (
        full.input_ids[1] == tokenizer("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    )
    limit = len(full.input_ids[1]) + 1
    cut = encode_prompts(tokenizer, TEXTS, max_length=limit)
    long_ones = [i for i, ids in enumerate(full.input_ids) if len(ids) > limit]
    assert cut.n_truncated == len(long_ones) > 0 and cut.truncated_indices == long_ones
    for i in long_ones:
        assert cut.input_ids[i] == full.input_ids[i][-limit:]
    assert cut.input_ids[1] == full.input_ids[1]
    with pytest.raises(
        ValueError, match=rf"^max_length: prompt {long_ones[0]} has {len(full.input_ids[long_ones[0]])}"
    ):
        encode_prompts(tokenizer, TEXTS, max_length=limit, overflow="error")
    with pytest.raises(ValueError, match=r"^overflow: unknown policy 'truncate_right'"):
        encode_prompts(tokenizer, TEXTS, max_length=limit, overflow="truncate_right")
    with pytest.raises(ValueError, match=r"^max_length"):
        encode_prompts(tokenizer, TEXTS, max_length=0)
    with pytest.raises(ValueError, match="zero tokens"):
        encode_prompts(tokenizer, ["ok", ""], max_length=10)


def test_pad_left_and_positions() -> None:
    input_ids, mask = pad_left([[5, 6, 7], [8]], pad_token_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    with pytest.raises(ValueError, match="empty batch"):
        pad_left([], 0)
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        pad_left([[1], []], 0)


def test_position_ids_follow_the_mask_with_absolute_positions(tokenizer: Any) -> None:
    """RoPE is shift-invariant, so the tiny models cannot tell; GPT-2's learned positions can."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=len(tokenizer), n_positions=256)
    model = GPT2LMHeadModel(config).eval()
    ids = encode_prompts(tokenizer, TEXTS, max_length=256).input_ids
    input_ids, mask = pad_left(ids, tokenizer.pad_token_id)
    batched = last_token_residuals(model, input_ids, mask, [0, 1])
    alone_ids = torch.tensor([ids[1]])
    alone = last_token_residuals(model, alone_ids, torch.ones_like(alone_ids), [0, 1])
    for layer in (0, 1):
        torch.testing.assert_close(batched[layer][1], alone[layer][0], atol=ATOL, rtol=0)
    oracle = full_forward_last_token(model, input_ids, mask, [0, 1])
    torch.testing.assert_close(oracle[1], batched[1], atol=ATOL, rtol=0)
