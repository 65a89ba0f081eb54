"""The hook mechanism and the interventions: identity at alpha 0, the KV cache, positions, per-row batches."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from sae_refusal.llm.hooks import StepContext, StopForward, residual_hooks
from sae_refusal.llm.layers import decoder_layers
from sae_refusal.sae.topk import TopKSAE
from sae_refusal.steer.interventions import (
    DirectionAblation,
    Intervention,
    LatentAblation,
    LatentSteering,
    ResidualSteering,
)
from sae_refusal.testing import build_tiny_model

D = 32
LAYER = 1


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def model(request: pytest.FixtureRequest) -> Any:
    return build_tiny_model(request.param, vocab_size=200, num_layers=4, hidden_size=D, seed=3)


def batch(left_pad: int = 0) -> dict[str, Tensor]:
    """Two prompts; the second left-padded by `left_pad` positions (pad id 0)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    if left_pad:
        ids[1, :left_pad] = 0
        mask[1, :left_pad] = 0
    return {"input_ids": ids, "attention_mask": mask}


def vector(seed: int = 1, scale: float = 1.0) -> Tensor:
    return torch.randn(D, generator=torch.Generator().manual_seed(seed)) * scale


def generate(model: Any, inputs: dict[str, Tensor], use_cache: bool, n: int = 6) -> Tensor:
    out = model.generate(
        **inputs, max_new_tokens=n, do_sample=False, use_cache=use_cache, pad_token_id=0, eos_token_id=None
    )
    return out[:, inputs["input_ids"].shape[1] :]


def logits(model: Any, inputs: dict[str, Tensor]) -> Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def test_alpha_zero_is_bit_identical_in_forward_and_generate(model: Any) -> None:
    inputs = batch(left_pad=2)
    plain_logits, plain_tokens = logits(model, inputs), generate(model, inputs, True)
    for edit in (ResidualSteering(vector(), alpha=0.0), DirectionAblation(vector(), alpha=0.0)):
        with Intervention(model, {LAYER: edit}):
            assert torch.equal(logits(model, inputs), plain_logits)
        with Intervention(model, {LAYER: edit}):
            assert torch.equal(generate(model, inputs, True), plain_tokens)


@pytest.mark.parametrize("positions", ["all", "generated", "prompt", 3])
def test_steered_generation_with_the_kv_cache_equals_without_it(model: Any, positions: Any) -> None:
    inputs = batch(left_pad=2)
    edit = ResidualSteering(vector(scale=3.0), alpha=1.0, positions=positions)
    with Intervention(model, {LAYER: edit}):
        cached = generate(model, inputs, use_cache=True)
    with Intervention(model, {LAYER: edit}):
        uncached = generate(model, inputs, use_cache=False)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, generate(model, inputs, True))  # the steering really acted


def test_steering_reaches_every_decode_step(model: Any) -> None:
    # "generated" leaves the prompt alone, so the first new token is the unsteered one, and later ones move
    inputs = batch()
    plain = generate(model, inputs, True, n=8)
    with Intervention(model, {LAYER: ResidualSteering(vector(scale=5.0), 1.0, positions="generated")}):
        steered = generate(model, inputs, True, n=8)
    assert torch.equal(steered[:, 0], plain[:, 0])
    assert not torch.equal(steered[:, 1:], plain[:, 1:])


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv_cache", "no_cache"])
@pytest.mark.parametrize("left_pad", [0, 2], ids=["unpadded", "left_padded"])
def test_every_call_marks_the_prompt_generated_boundary_at_the_prompt_length(
    model: Any, use_cache: bool, left_pad: int
) -> None:
    """The first generated position is column P (the padded prompt length), in every call of ``generate``.

    With the KV cache each decode call feeds one token: the first (column P) is generated, as is every later
    one; without it each call feeds the whole sequence and columns >= P are generated. Unpadded, Hugging Face
    drops the all-ones mask and the context comes from the cache length. Kills: ``>`` for ``>=`` at the
    boundary, a prompt length fixed one column off, a wrong past length in cached decoding.
    """
    inputs = batch(left_pad=left_pad)
    P, n_new = inputs["input_ids"].shape[1], 4
    seen: list[StepContext] = []
    with residual_hooks(model, {LAYER: lambda h, ctx: seen.append(ctx)}):
        generate(model, inputs, use_cache=use_cache, n=n_new)
    assert len(seen) == n_new  # the prefill, then one call per new token but the last
    for step, ctx in enumerate(seen):
        past = (0 if step == 0 else P + step - 1) if use_cache else 0
        columns = torch.arange(past, P + step)
        assert (ctx.past_length, ctx.prompt_length) == (past, P), step
        assert ctx.generated_BT.tolist() == [(columns >= P).tolist()] * 2, step
        real = torch.stack([torch.ones_like(columns, dtype=torch.bool), columns >= left_pad])
        assert torch.equal(ctx.real_BT, real), step
        assert torch.equal(ctx.prompt_BT, real & (columns < P)), step
        index = torch.stack([columns, columns - left_pad])
        assert torch.equal(ctx.token_index_BT[real], index[real]), step


def test_a_log_likelihood_score_moves_at_large_alpha_at_every_position(model: Any) -> None:
    # a hook that steered only the last position would leave every earlier token's log-probability alone
    inputs = batch()
    target = inputs["input_ids"][:, 1:]

    def token_logp() -> Tensor:
        logp = torch.log_softmax(logits(model, inputs)[:, :-1].float(), -1)
        return logp.gather(-1, target[..., None])[..., 0]

    plain = token_logp()
    with Intervention(model, {LAYER: ResidualSteering(vector(), alpha=20.0)}):
        steered = token_logp()
    assert (steered - plain).abs().min() > 1e-4
    assert abs(float(steered.sum() - plain.sum())) > 0.05


def test_unsteered_rows_are_bit_identical_and_steered_rows_match_single_prompts(model: Any) -> None:
    inputs = batch(left_pad=2)
    plain = logits(model, inputs)
    v = vector(scale=2.0)
    with Intervention(model, {LAYER: ResidualSteering(torch.stack([v, -v]), alpha=torch.tensor([1.0, 0.0]))}):
        mixed = logits(model, inputs)
    assert torch.equal(mixed[1], plain[1])
    alone = {k: t[:1] for k, t in inputs.items()}
    with Intervention(model, {LAYER: ResidualSteering(v, alpha=1.0)}):
        single = logits(model, alone)
    torch.testing.assert_close(mixed[0], single[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed[0], plain[0], atol=1e-3)


def test_per_row_sign_and_vector(model: Any) -> None:
    inputs = batch()
    v, w = vector(1, 2.0), vector(2, 2.0)
    with Intervention(model, {LAYER: ResidualSteering(torch.stack([v, w]), alpha=torch.tensor([1.0, -1.0]))}):
        both = logits(model, inputs)
    with Intervention(model, {LAYER: ResidualSteering(-w, alpha=1.0)}):
        second = logits(model, inputs)
    torch.testing.assert_close(both[1], second[1], atol=1e-5, rtol=1e-5)


def test_padding_is_never_edited(model: Any) -> None:
    inputs = batch(left_pad=3)
    seen: dict[str, Tensor] = {}

    def after(hidden: Tensor, ctx: StepContext) -> None:
        seen["after"] = hidden.detach().clone()
        seen["real"] = ctx.real_BT.clone()
        seen["index"] = ctx.token_index_BT.clone()

    def before(hidden: Tensor, ctx: StepContext) -> None:
        seen["before"] = hidden.detach().clone()

    edit = ResidualSteering(vector(scale=4.0), alpha=1.0)
    with residual_hooks(model, {LAYER: lambda h, c: (before(h, c), edit(h, c))[1], LAYER + 1: after}):
        logits(model, inputs)
    assert seen["real"][1, :3].logical_not().all() and seen["real"][1, 3:].all() and seen["real"][0].all()
    assert seen["index"][1, 3:].tolist() == [0, 1, 2, 3]  # left padding does not shift the token index
    with residual_hooks(model, {LAYER: lambda h, c: before(h, c)}):
        logits(model, inputs)
    blocks = decoder_layers(model)
    assert len(blocks[LAYER]._forward_hooks) == 0
    # the pad rows at the edited layer are the unsteered ones
    with residual_hooks(model, {LAYER: lambda h, c: (seen.__setitem__("edited", edit(h, c)), None)[1]}):
        logits(model, inputs)
    assert torch.equal(seen["edited"][1, :3], seen["before"][1, :3])
    assert not torch.equal(seen["edited"][1, 3:], seen["before"][1, 3:])


def test_hooks_are_removed_after_an_exception_and_stop_forward_is_swallowed(model: Any) -> None:
    blocks = decoder_layers(model)

    def boom(hidden: Tensor, ctx: StepContext) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), Intervention(model, {LAYER: boom}):
        logits(model, batch())
    assert all(len(b._forward_hooks) == 0 for b in blocks)

    def stop(hidden: Tensor, ctx: StepContext) -> None:
        raise StopForward

    with residual_hooks(model, {LAYER: stop}):
        logits(model, batch())
    assert all(len(b._forward_hooks) == 0 for b in blocks)


def _sae(seed: int = 0) -> TopKSAE:
    torch.manual_seed(seed)
    return TopKSAE(d_model=D, n_latents=64, k=8).eval()


def test_latent_edits_keep_the_error_term(model: Any) -> None:
    inputs = batch(left_pad=1)
    plain = logits(model, inputs)
    sae = _sae()
    v_F = torch.zeros(64)
    with torch.no_grad(), Intervention(model, {LAYER: LatentSteering(sae, v_F, alpha=3.0)}):
        zero_vector = logits(model, inputs)
    torch.testing.assert_close(zero_vector, plain, atol=1e-5, rtol=1e-5)  # dec(z) + (x - dec(z)) == x
    with Intervention(model, {LAYER: LatentSteering(sae, torch.ones(64), alpha=0.0)}):
        assert torch.equal(logits(model, inputs), plain)
    v_F[5] = 1.0
    with torch.no_grad(), Intervention(model, {LAYER: LatentSteering(sae, v_F, alpha=30.0)}):
        steered = logits(model, inputs)
    expected_shift = 30.0 * sae.decode_direction(v_F)
    with Intervention(model, {LAYER: ResidualSteering(expected_shift, alpha=1.0)}):
        residual = logits(model, inputs)
    torch.testing.assert_close(steered, residual, atol=1e-4, rtol=1e-4)  # linear decoder: the same shift


def test_latent_ablation_removes_the_latents_contribution(model: Any) -> None:
    inputs = batch()
    sae = _sae()
    seen: dict[str, Tensor] = {}
    ablate = LatentAblation(sae, latents=list(range(64)))

    def record(hidden: Tensor, ctx: StepContext) -> Tensor | None:
        seen["x"] = hidden.detach().clone()
        out = ablate(hidden, ctx)
        seen["out"] = out.detach().clone() if out is not None else hidden
        return out

    with torch.no_grad(), residual_hooks(model, {LAYER: record}):
        logits(model, inputs)
    x = seen["x"].reshape(-1, D)
    recon_without = sae.decode(torch.zeros(x.shape[0], 64)) + (x - sae.decode(sae.encode(x)))
    torch.testing.assert_close(seen["out"].reshape(-1, D), recon_without, atol=1e-5, rtol=1e-5)


def test_direction_ablation_zeroes_the_component_at_every_later_layer(model: Any) -> None:
    d = vector(7)
    unit = d / d.norm()
    seen: dict[int, Tensor] = {}
    n_layers = len(decoder_layers(model))
    last = {n_layers - 1: lambda h, c: seen.__setitem__(n_layers - 1, h.detach())}
    with Intervention.ablate_direction(model, d, from_layer=LAYER), residual_hooks(model, last):
        logits(model, batch())
    assert seen[n_layers - 1] @ unit == pytest.approx(torch.zeros(2, 7), abs=1e-4)


def test_bad_inputs_name_the_setting(model: Any) -> None:
    with pytest.raises(ValueError, match="positions"):
        ResidualSteering(vector(), positions="everywhere")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="alpha"):
        ResidualSteering(vector(), alpha=float("nan"))
    with pytest.raises(ValueError, match="layer"):
        Intervention(model, {99: ResidualSteering(vector())})
    three_alphas = {LAYER: ResidualSteering(vector(), [1.0] * 3)}
    with pytest.raises(ValueError, match="alpha"), Intervention(model, three_alphas):
        logits(model, batch())
    narrow = {LAYER: ResidualSteering(torch.ones(5))}
    with pytest.raises(ValueError, match="width"), Intervention(model, narrow):
        logits(model, batch())


def test_bfloat16_models_alpha_zero_identity_and_steering() -> None:
    model = build_tiny_model("llama", vocab_size=200, num_layers=4, hidden_size=D, seed=3).to(torch.bfloat16)
    inputs = batch(left_pad=2)
    plain = logits(model, inputs)
    with Intervention(model, {LAYER: ResidualSteering(vector(), alpha=0.0)}):
        assert torch.equal(logits(model, inputs), plain)
    seen: dict[str, torch.dtype] = {}

    def dtype_after(hidden: Tensor, ctx: StepContext) -> None:
        seen["dtype"] = hidden.dtype

    with Intervention(model, {LAYER: [ResidualSteering(vector(scale=4.0), alpha=1.0), dtype_after]}):
        steered = logits(model, inputs)
    assert seen["dtype"] == torch.bfloat16  # the edit keeps the model's dtype
    assert not torch.equal(steered, plain)
