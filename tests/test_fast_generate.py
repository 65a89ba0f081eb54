"""``generate_static`` / ``StaticGenerator`` give the greedy tokens of ``batched.generate`` (float32, CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sae_refusal.llm.batched import BatchContext, Generation, generate
from sae_refusal.llm.fast_generate import ResidualAdd, StaticGenerator, generate_static
from sae_refusal.llm.layers import decoder_layers
from sae_refusal.llm.tokenize import pad_left
from sae_refusal.steer.interventions import Intervention, ResidualSteering
from sae_refusal.testing import build_tiny_model

VOCAB, LAYER, NEW, ALPHA = 120, 1, 8, 0.05


@pytest.fixture(scope="module")
def model() -> nn.Module:
    tiny = build_tiny_model("llama", vocab_size=VOCAB, num_layers=3, hidden_size=32)
    tiny.generation_config.eos_token_id = None
    with torch.no_grad():  # sharper attention than the random init's: token positions then matter
        for block in decoder_layers(tiny):
            block.self_attn.q_proj.weight.mul_(12.0)
            block.self_attn.k_proj.weight.mul_(12.0)
    return tiny


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in (5, 9, 2, 7, 12)]


@pytest.fixture(scope="module")
def vector() -> torch.Tensor:
    # about the residual's own size: the answers depend on alpha (a huge vector would swamp the stream)
    return 0.05 * torch.randn(32, generator=torch.Generator().manual_seed(4))


def _ids(generations: list[Generation]) -> list[list[int]]:
    return [g.token_ids for g in generations]


def _reference(
    model: nn.Module, prompts: list[list[int]], around: BatchContext | None = None
) -> list[list[int]]:
    out = generate(model, prompts, max_new_tokens=NEW, pad_id=0, stop_ids=[], batch_size=3, around=around)
    return _ids(out)


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_unsteered_tokens_equal_batched_generate(
    model: nn.Module, prompts: list[list[int]], mode: str
) -> None:
    fast = generate_static(model, prompts, max_new_tokens=NEW, pad_id=0, batch_size=3, mode=mode)  # type: ignore[arg-type]
    assert _ids(fast) == _reference(model, prompts)


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_residual_edit_equals_residual_steering(
    model: nn.Module, prompts: list[list[int]], vector: torch.Tensor, mode: str
) -> None:
    expected = _reference(
        model, prompts, lambda _i: Intervention(model, {LAYER: ResidualSteering(vector, ALPHA)})
    )
    assert expected != _reference(model, prompts)  # the edit matters
    edits = {LAYER: ResidualAdd(vector, ALPHA)}
    fast = generate_static(model, prompts, max_new_tokens=NEW, pad_id=0, batch_size=3, mode=mode, edits=edits)  # type: ignore[arg-type]
    assert _ids(fast) == expected


def test_eager_mode_runs_the_projects_hooks(
    model: nn.Module, prompts: list[list[int]], vector: torch.Tensor
) -> None:
    def around(_indices: list[int]) -> Intervention:
        return Intervention(model, {LAYER: ResidualSteering(vector, ALPHA, positions="generated")})

    fast = generate_static(
        model, prompts, max_new_tokens=NEW, pad_id=0, batch_size=3, mode="eager", around=around
    )
    assert _ids(fast) == _reference(model, prompts, around)


def test_per_row_alpha_reused_generator(
    model: nn.Module, prompts: list[list[int]], vector: torch.Tensor
) -> None:
    ids_BT, mask_BT = pad_left(prompts[:3], 0)
    plain = _reference(model, prompts[:3])
    steered = _reference(
        model, prompts[:3], lambda _i: Intervention(model, {LAYER: ResidualSteering(vector, ALPHA)})
    )
    edit = ResidualAdd(vector, torch.zeros(3))
    with StaticGenerator(model, batch_size=3, max_cache_len=32, edits={LAYER: edit}) as generator:
        assert generator(ids_BT, mask_BT, NEW).tolist() == plain
        edit.set_alpha(torch.tensor([ALPHA, 0.0, ALPHA]))  # in place: a second call reuses the same buffers
        out = generator(ids_BT, mask_BT, NEW).tolist()
        assert out == [steered[0], plain[1], steered[2]]
        assert generator(ids_BT[:2], mask_BT[:2], NEW).tolist() == [steered[0], plain[1]]  # padded rows
    assert _reference(model, prompts[:3]) == plain  # the edit's hook is gone after the block


def test_stop_ids_cut_answers(model: nn.Module, prompts: list[list[int]]) -> None:
    plain = _reference(model, prompts)
    stop = plain[0][2]
    out = generate_static(model, prompts, max_new_tokens=NEW, pad_id=0, batch_size=2, stop_ids=[stop])
    assert out[0].token_ids == plain[0][: plain[0].index(stop)]
    assert out[0].stop_id == stop


def test_input_checks(model: nn.Module, prompts: list[list[int]], vector: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="cuda_graph"):
        StaticGenerator(model, batch_size=1, max_cache_len=8, mode="cuda_graph")
    with pytest.raises(ValueError, match="around"):  # a compiled step takes no hooks
        generate_static(
            model,
            prompts,
            max_new_tokens=2,
            pad_id=0,
            batch_size=2,
            compile=True,
            around=lambda _i: Intervention(model, {}),
        )
    with pytest.raises(ValueError, match="max_cache_len"):
        ids_BT, mask_BT = pad_left(prompts[:1], 0)
        with StaticGenerator(model, batch_size=1, max_cache_len=6) as generator:
            generator(ids_BT, mask_BT, 4)
    with pytest.raises(ValueError, match="vector"):
        ResidualAdd(vector[None, :])


def test_gate_decisions_set_outside_inference_mode(
    model: nn.Module, prompts: list[list[int]], vector: torch.Tensor
) -> None:
    """The separate-gate pattern: a decision made in inference mode, written by ``set_alpha`` outside it.

    Regression: the edit's buffers used to be created in the generator's inference mode (the edit itself
    built there, or its device move in the first prefill), and ``set_alpha`` outside then failed with
    "Inplace update to inference tensor outside InferenceMode". The first call always places the buffers
    (also on the CPU), so this runs the code that failed on CUDA.
    """
    ids_BT, mask_BT = pad_left(prompts[:3], 0)
    plain = _reference(model, prompts[:3])
    steered = _reference(
        model, prompts[:3], lambda _i: Intervention(model, {LAYER: ResidualSteering(vector, ALPHA)})
    )
    with torch.inference_mode():  # e.g. a gate's scores, and the edit built beside them
        edit = ResidualAdd(vector, torch.zeros(3))
        picked_B = torch.tensor([1.0, 0.0, 1.0]) * ALPHA
    assert not edit.alpha.is_inference() and not edit.vector_D.is_inference()
    with StaticGenerator(model, batch_size=3, max_cache_len=32, edits={LAYER: edit}) as generator:
        edit.set_alpha(torch.zeros(3))
        assert generator(ids_BT, mask_BT, NEW).tolist() == plain
        assert not edit.alpha.is_inference()  # placed in the prefill, still a normal tensor
        edit.set_alpha(picked_B)  # outside inference mode
        assert generator(ids_BT, mask_BT, NEW).tolist() == [steered[0], plain[1], steered[2]]
        with torch.inference_mode():  # the fused gate's pattern: written inside inference mode
            edit.set_alpha(torch.zeros(3))
        edit.set_alpha(torch.zeros(3))  # and then outside again
        assert generator(ids_BT, mask_BT, NEW).tolist() == plain


def test_an_unaligned_cache_length_is_rounded_up_and_gives_the_same_tokens(
    model: nn.Module, prompts: list[list[int]]
) -> None:
    """``max_cache_len`` 21 (the exact need) runs on a 24-column cache; the extra columns are masked."""
    from sae_refusal.llm.fast_generate import CACHE_ALIGN

    batch = prompts[2:5]  # 2, 7 and 12 tokens: 12 + 8 + 1 = 21 positions, not a multiple of CACHE_ALIGN
    ids_BT, mask_BT = pad_left(batch, 0)
    need = ids_BT.shape[1] + NEW + 1
    assert need % CACHE_ALIGN != 0
    with StaticGenerator(model, batch_size=3, max_cache_len=need) as generator:
        assert generator.cache_len == -(-need // CACHE_ALIGN) * CACHE_ALIGN > need
        out = generator(ids_BT, mask_BT, NEW)
        assert generator._real_BS is not None and generator._real_BS.shape[1] == generator.cache_len
        with pytest.raises(ValueError, match=f"exceeds max_cache_len {need}"):  # the limit: the asked one
            generator(ids_BT, mask_BT, need)
    assert out.tolist() == _reference(model, batch)
