"""Packed extraction (:mod:`sae_refusal.llm.packing`): the plan covers every prompt once within its limits,
and a packed prompt's residual is the one it has alone, on real (tiny) Llama / Qwen2 / Mistral models with
eager and SDPA attention."""

from __future__ import annotations

import random

import pytest
import torch

from sae_refusal.llm.extraction import iter_last_token_residuals
from sae_refusal.llm.packing import check_pack_length, packed_last_token_residuals, plan_packs
from sae_refusal.testing import build_tiny_model, build_tiny_tokenizer


def test_plan_packs_covers_every_prompt_once_within_rows_and_budget() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(1, 40) for _ in range(300)] + [70]  # one prompt longer than a row
    passes = plan_packs(lengths, pack_length=64, token_budget=512)
    seen = [i for p in passes for row in p for i in row]
    assert sorted(seen) == list(range(len(lengths)))
    for p in passes:
        fills = [sum(lengths[i] for i in row) for row in p]
        assert all(f <= 64 or len(row) == 1 for f, row in zip(fills, p, strict=True))
        assert len(p) * max(fills) <= 512 or len(p) == 1
    # first-fit-decreasing fills the rows: padding (tails) below 5% of the tokens here
    padded = sum(len(p) * max(sum(lengths[i] for i in row) for row in p) for p in passes)
    assert 1 - sum(lengths) / padded < 0.05
    assert plan_packs(lengths, pack_length=64, token_budget=512) == passes  # deterministic
    with pytest.raises(ValueError, match="pack_length and token_budget must be >= 1"):
        plan_packs(lengths, pack_length=0, token_budget=512)


@pytest.mark.parametrize(
    ("arch", "attn"), [("llama", "eager"), ("llama", "sdpa"), ("qwen2", "sdpa"), ("mistral", "eager")]
)
def test_a_packed_prompt_has_the_residual_it_has_alone(arch: str, attn: str) -> None:
    model = build_tiny_model(arch, vocab_size=100, num_layers=3, hidden_size=32)
    model.config._attn_implementation = attn
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 100, (n,), generator=gen).tolist() for n in (5, 9, 2, 7, 1)]
    alone = [
        packed_last_token_residuals(model, [[p]], [0, 2], pad_id=0)  # one prompt, one row: plain causal
        for p in prompts
    ]
    with torch.no_grad():  # and "alone" is what the model computes without any custom mask
        plain = model(input_ids=torch.tensor([prompts[1]]), output_hidden_states=True).hidden_states[1][0, -1]
    torch.testing.assert_close(alone[1][0][0], plain, atol=1e-5, rtol=1e-5)  # block 0's output
    rows = [[prompts[0], prompts[1]], [prompts[2], prompts[3], prompts[4]]]  # row 0 full, row 1 has a tail
    packed = packed_last_token_residuals(model, rows, [0, 2], pad_id=0)
    order = [0, 1, 2, 3, 4]
    for layer in (0, 2):
        expected = torch.cat([alone[i][layer] for i in order])
        torch.testing.assert_close(packed[layer], expected, atol=1e-5, rtol=1e-5)


def test_iter_with_packing_yields_the_padded_residuals_in_input_order() -> None:
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model("llama", vocab_size=len(tokenizer), num_layers=3, hidden_size=32)
    rng = random.Random(2)
    words = ["how", "do", "i", "bake", "bread", "tell", "me", "a", "story", "please"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(37)]
    common = {"batch_size": 8, "sort_window": 2, "max_length": 64}
    padded = list(iter_last_token_residuals(model, tokenizer, texts, [1, 2], **common))
    packed = list(iter_last_token_residuals(model, tokenizer, texts, [1, 2], pack_length=24, **common))
    assert [b.indices for b in packed] == [b.indices for b in padded]
    for a, b in zip(packed, padded, strict=True):
        for layer in (1, 2):
            torch.testing.assert_close(a.acts[layer], b.acts[layer], atol=1e-5, rtol=1e-5)


def test_pack_length_is_checked_against_its_range_and_a_sliding_window() -> None:
    with pytest.raises(ValueError, match=r"^data\.cache\.pack_length: must be a positive integer"):
        check_pack_length(0, key="data.cache.pack_length")
    model = build_tiny_model("mistral", vocab_size=100, num_layers=2, hidden_size=32)
    model.config.sliding_window = 16
    with pytest.raises(ValueError, match=r"^pack_length: 32 exceeds the model's sliding window \(16\)"):
        check_pack_length(32, model)
    check_pack_length(16, model)
    check_pack_length(None, model)


def test_positions_restart_at_each_packed_prompt_and_tails_are_masked() -> None:
    """RoPE is shift-invariant, so the residual test cannot see the positions: check what the model gets."""
    model = build_tiny_model("llama", vocab_size=100, num_layers=2, hidden_size=32)
    seen: dict[str, torch.Tensor] = {}

    def spy(_module: torch.nn.Module, _args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        seen.update({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})

    handle = model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        packed_last_token_residuals(model, [[[5, 6, 7], [8, 9]], [[10]]], [0], pad_id=0)
    finally:
        handle.remove()
    assert seen["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 0, 0, 0]]
    allowed = seen["attention_mask"][:, 0] == 0
    assert allowed[0].tolist()[3] == [False, False, False, True, False]  # prompt 2 sees itself, not prompt 1
    assert allowed[1].tolist()[2] == [False, False, True, False, False]  # a tail token sees only itself
