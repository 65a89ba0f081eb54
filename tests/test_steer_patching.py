"""Attribution against activation patching: first-order agreement, exact invariants, cleanup, errors."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from sae_refusal.llm.hooks import decoder_stack
from sae_refusal.llm.layers import decoder_layers
from sae_refusal.sae.topk import TopKSAE
from sae_refusal.steer.patching import (
    Unit,
    activation_patching_effects,
    attribution_scores,
    compare_patching,
    logit_diff_metric,
    residual_at,
    residual_patch_effects,
    spearman,
)
from sae_refusal.testing import build_tiny_model

D, VOCAB, LAYER = 32, 200, 1
METRIC = logit_diff_metric(5, 7)
UNITS: list[Unit] = ["dims", "positions", "latents"]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request: pytest.FixtureRequest) -> Any:
    return build_tiny_model(request.param, vocab_size=VOCAB, num_layers=4, hidden_size=D, seed=1)


@pytest.fixture(scope="module")
def sae() -> TopKSAE:
    sae = TopKSAE(d_model=D, n_latents=64, k=8, generator=torch.Generator().manual_seed(0))
    sae.set_input_scale(0.5)
    with torch.no_grad():
        sae.b_dec_D.normal_(generator=torch.Generator().manual_seed(1))
    return sae


def prompt(n_tokens: int, seed: int) -> Tensor:
    return torch.randint(3, VOCAB, (n_tokens,), generator=torch.Generator().manual_seed(seed))


def plain_metric(model: Any, ids_T: Tensor) -> float:
    with torch.no_grad():
        return float(METRIC(model(input_ids=ids_T[None]).logits[:, -1])[0])


def test_attribution_is_exact_where_the_metric_is_linear_in_the_unit(sae: TopKSAE) -> None:
    # without the final norm the answer logits are linear in the last block's output at the answer position
    model = build_tiny_model("llama", vocab_size=VOCAB, num_layers=3, hidden_size=D, seed=2)
    model.model.norm = nn.Identity()
    clean, corrupt = prompt(9, 0), prompt(7, 1)
    for unit in UNITS:
        result = compare_patching(model, clean, corrupt, -1, METRIC, unit, sae=sae, n_positions=4)
        torch.testing.assert_close(result.attribution_U, result.patching_U, rtol=1e-4, atol=1e-5)
        assert result.patching_U.abs().max() > 1e-3  # the patches really did something


@pytest.mark.parametrize("unit", UNITS)
def test_small_patches_agree_with_attribution_to_first_order(model: Any, sae: TopKSAE, unit: Unit) -> None:
    # prompts of different lengths: positions align from the end
    clean, corrupt = prompt(11, 2), prompt(8, 3)
    result = compare_patching(model, clean, corrupt, LAYER, METRIC, unit, sae=sae, n_positions=5, step=1e-2)
    scale = float(result.patching_U.abs().max())
    assert scale > 0
    torch.testing.assert_close(result.attribution_U, result.patching_U, rtol=0.05, atol=0.02 * scale)
    assert result.spearman > 0.98
    assert result.n_units == {"dims": D, "positions": 5, "latents": sae.n_latents}[unit]


@pytest.mark.parametrize("unit", UNITS)
def test_identical_prompts_give_zero_effects_and_scores_exactly(model: Any, sae: TopKSAE, unit: Unit) -> None:
    ids = prompt(9, 4)
    scores = attribution_scores(model, ids, ids, LAYER, METRIC, unit, sae=sae, n_positions=3)
    effects = activation_patching_effects(model, ids, ids, LAYER, METRIC, unit, sae=sae, n_positions=3)
    assert torch.equal(scores, torch.zeros_like(scores))
    assert torch.equal(effects, torch.zeros_like(effects))
    assert not scores.requires_grad and not effects.requires_grad


def test_patching_every_position_reproduces_the_corrupted_metric(model: Any) -> None:
    clean, corrupt = prompt(10, 5), prompt(10, 6)
    delta_TD = residual_at(model, corrupt, LAYER) - residual_at(model, clean, LAYER)
    (effect,) = residual_patch_effects(model, clean, LAYER, METRIC, delta_TD[None])
    expected = plain_metric(model, corrupt) - plain_metric(model, clean)
    assert abs(expected) > 1e-3
    assert math.isclose(float(effect), expected, rel_tol=1e-4, abs_tol=1e-5)


@pytest.mark.parametrize("unit", UNITS)
def test_prefix_cache_and_batching_do_not_change_the_effects(model: Any, sae: TopKSAE, unit: Unit) -> None:
    clean, corrupt = prompt(12, 7), prompt(9, 8)
    kwargs: dict[str, Any] = dict(sae=sae, n_positions=4, units=[0, 3, 2, 1])
    oracle = activation_patching_effects(
        model, clean, corrupt, LAYER, METRIC, unit, batch_size=64, reuse_prefix=False, **kwargs
    )
    cached = activation_patching_effects(model, clean, corrupt, LAYER, METRIC, unit, batch_size=3, **kwargs)
    torch.testing.assert_close(cached, oracle, rtol=1e-4, atol=1e-5)
    assert oracle.abs().max() > 0


def test_units_subset_matches_the_full_run_in_the_given_order(model: Any) -> None:
    clean, corrupt = prompt(10, 9), prompt(10, 10)
    full = activation_patching_effects(model, clean, corrupt, LAYER, METRIC, "dims")
    subset = activation_patching_effects(model, clean, corrupt, LAYER, METRIC, "dims", units=[7, 2, 30])
    torch.testing.assert_close(subset, full[[7, 2, 30]], rtol=1e-4, atol=1e-6)


def test_latent_attribution_pass_leaves_the_forward_unchanged(model: Any, sae: TopKSAE) -> None:
    seen: list[Tensor] = []

    def recording(logits_BV: Tensor) -> Tensor:
        seen.append(logits_BV.detach().clone())
        return METRIC(logits_BV)

    clean, corrupt = prompt(9, 11), prompt(8, 12)
    attribution_scores(model, clean, corrupt, LAYER, recording, "latents", sae=sae)
    plain_clean, _plain_corrupt, through_codes = seen  # clean run, corrupted run, the attribution pass
    assert torch.equal(through_codes, plain_clean)


def test_hooks_flags_and_gradients_are_restored(model: Any, sae: TopKSAE) -> None:
    params = list(model.parameters())
    before = [i % 2 == 0 for i in range(len(params))]
    for p, flag in zip(params, before, strict=True):
        p.requires_grad_(flag)
    model.train()
    try:
        for unit in UNITS:
            attribution_scores(model, prompt(8, 13), prompt(8, 14), LAYER, METRIC, unit, sae=sae)

        def failing(_logits: Tensor) -> Tensor:
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            attribution_scores(model, prompt(8, 13), prompt(8, 14), LAYER, failing)
        assert [p.requires_grad for p in params] == before
        assert all(p.requires_grad for p in sae.parameters())
        assert all(m.training for m in model.modules()) and sae.training
        assert all(p.grad is None for p in [*params, *sae.parameters()])
        assert all(not block._forward_hooks for block in decoder_layers(model))
        assert not decoder_stack(model)._forward_pre_hooks
    finally:
        model.eval()
        for p in params:
            p.requires_grad_(True)


def test_attribution_works_inside_inference_mode(model: Any) -> None:
    clean, corrupt = prompt(8, 15), prompt(8, 16)
    expected = attribution_scores(model, clean, corrupt, LAYER, METRIC)
    with torch.inference_mode():
        got = attribution_scores(model, clean, corrupt, LAYER, METRIC)
    torch.testing.assert_close(got, expected)


def test_spearman_handles_ties_and_constants() -> None:
    x = torch.tensor([1.0, 2.0, 2.0, 3.0])
    assert spearman(x, x * 10) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    # ties get average ranks: ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4)
    assert spearman(x, torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx(0.9486832980505138)
    assert math.isnan(spearman(x, torch.ones(4)))


def _call(model: Any, **overrides: Any) -> Callable[[], Any]:
    kwargs: dict[str, Any] = dict(
        clean_ids=prompt(8, 17), corrupt_ids=prompt(6, 18), layer=LAYER, metric_fn=METRIC, unit="dims"
    )
    kwargs.update(overrides)
    return lambda: activation_patching_effects(model, **kwargs)


@pytest.mark.parametrize(
    ("key", "overrides"),
    [
        ("clean_ids", {"clean_ids": torch.rand(8)}),
        ("clean_ids", {"clean_ids": torch.zeros(2, 8, dtype=torch.long)}),
        ("corrupt_ids", {"corrupt_ids": torch.zeros(0, dtype=torch.long)}),
        ("layer", {"layer": 9}),
        ("unit", {"unit": "heads"}),
        ("sae", {"unit": "latents"}),
        ("sae", {"unit": "latents", "sae": TopKSAE(d_model=16, n_latents=64, k=8)}),
        ("n_positions", {"unit": "positions", "n_positions": 0}),
        ("n_positions", {"unit": "positions", "n_positions": 7}),  # the corrupted prompt has 6 tokens
        ("units", {"units": [0, 32]}),
        ("units", {"units": [1, 1]}),
        ("units", {"units": []}),
        ("step", {"step": 0.0}),
        ("step", {"step": math.nan}),
        ("batch_size", {"batch_size": 1}),
        ("metric_fn", {"metric_fn": lambda logits_BV: logits_BV[:, :2]}),
        ("target_id/respond_id", {"metric_fn": logit_diff_metric(VOCAB, 1)}),
    ],
)
def test_bad_arguments_raise_naming_them(model: Any, key: str, overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=rf"^{key}:"):
        _call(model, **overrides)()


def test_bad_arguments_of_the_helpers_raise_naming_them(model: Any) -> None:
    with pytest.raises(ValueError, match=r"^target_id:"):
        logit_diff_metric(-1, 2)
    with pytest.raises(ValueError, match=r"^target_id:"):
        logit_diff_metric(3, 3)
    with pytest.raises(ValueError, match=r"^respond_id:"):
        logit_diff_metric(3, True)
    with pytest.raises(ValueError, match=r"^deltas_USD:"):
        residual_patch_effects(model, prompt(5, 0), LAYER, METRIC, torch.zeros(1, 6, D))
    with pytest.raises(ValueError, match=r"^layer:"):
        residual_at(model, prompt(5, 0), -9)
    with pytest.raises(ValueError, match=r"^x_N, y_N:"):
        spearman(torch.zeros(3), torch.zeros(4))
