"""The ground-truth benchmark's data (planted sparse dictionary) and its recovery scores, checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_refusal.sae.synthetic import SyntheticConfig, SyntheticData, feature_recovery, make_synthetic


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_the_planted_dictionary_recovers_itself_under_any_permutation_and_scale() -> None:
    data = make_synthetic(SyntheticConfig(d_model=16, n_features=40, n_samples=4000, mean_active=3), _gen())
    perfect = feature_recovery(data.dictionary_GD, data.codes_NG, data)
    assert (perfect.mmcs, perfect.recall, perfect.precision) == pytest.approx((1.0, 1.0, 1.0))
    assert perfect.mcc == pytest.approx(1.0) and perfect.n_live == 40
    order = torch.randperm(40, generator=_gen(1))
    scale = torch.rand(40, generator=_gen(2)) + 0.5
    dead = torch.zeros(4000, 8)  # latents that never fire count in neither precision nor MCC
    decoder = torch.cat([-3.0 * data.dictionary_GD[order], torch.randn(8, 16, generator=_gen(3))])
    shuffled = feature_recovery(decoder, torch.cat([data.codes_NG[:, order] * scale, dead], dim=1), data)
    assert shuffled.mmcs == pytest.approx(1.0) and shuffled.mcc == pytest.approx(1.0)
    assert shuffled.precision == pytest.approx(1.0) and shuffled.n_live == 40


def test_scores_match_a_hand_computation() -> None:
    # two true features along the axes; one learned latent along their diagonal (45 degrees from each)
    codes = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 0.0]])
    truth = SyntheticData(codes @ torch.eye(2), codes, torch.eye(2), torch.full((2,), -1))
    diagonal = torch.tensor([[1.0, 1.0]]) / 2**0.5
    learned = torch.tensor([[1.0], [1.0], [3.0], [0.0]])
    got = feature_recovery(diagonal, learned, truth, threshold=0.7)
    assert got.mmcs == pytest.approx(2**-0.5) and got.recall == 1.0 and got.precision == 1.0
    assert got.n_live == 1
    # MCC: the one latent matches the feature it correlates with best; the other feature has no latent and
    # counts 0; the mean is over the 2 true features
    corr = [np.corrcoef(codes[:, g].numpy(), learned[:, 0].numpy())[0, 1] for g in range(2)]
    assert got.mcc == pytest.approx(max(corr) / 2)
    assert feature_recovery(diagonal, learned, truth, threshold=0.9).recall == 0.0


def test_codes_are_sparse_hierarchical_and_correlated_as_configured() -> None:
    cfg = SyntheticConfig(
        d_model=8,
        n_features=60,
        n_samples=20000,
        mean_active=3,
        pair_correlation=0.9,
        n_parents=4,
        children_per_parent=3,
        child_given_parent=0.5,
        noise_std=0.1,
    )
    data = make_synthetic(cfg, _gen())
    fires = data.codes_NG > 0
    # children fire only with their parent, about half the time it fires
    for child in range(4, 16):
        parent = int(data.parent_of_G[child])
        assert not bool((fires[:, child] & ~fires[:, parent]).any())
        share = float(fires[fires[:, parent], child].float().mean())
        assert 0.4 < share < 0.6
    # a pair's second feature follows its first with probability 0.9
    first, second = 16, 17
    assert float(fires[fires[:, first], second].float().mean()) > 0.85
    # independent features fire at p = mean_active / G
    assert float(fires[:, 16::2].float().mean()) == pytest.approx(3 / 60, rel=0.1)
    # unit-norm dictionary, noise at 10% of the clean norm, same draws from the same generator
    assert torch.allclose(data.dictionary_GD.norm(dim=1), torch.ones(60))
    noise = data.acts_ND - data.codes_NG @ data.dictionary_GD
    clean_norm = float((data.codes_NG @ data.dictionary_GD).norm(dim=1).mean())
    assert float(noise.norm(dim=1).mean()) == pytest.approx(0.1 * clean_norm, rel=0.1)
    again = make_synthetic(cfg, _gen())
    assert torch.equal(again.acts_ND, data.acts_ND)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"mean_active": 0}, "mean_active"),
        ({"pair_correlation": 1.5}, "pair_correlation"),
        ({"n_parents": 30, "children_per_parent": 3, "n_features": 60}, "n_parents"),
        ({"d_model": 0}, "d_model"),
    ],
)
def test_bad_settings_name_the_key(overrides: dict[str, float], key: str) -> None:
    with pytest.raises(ValueError, match=f"synthetic.{key}"):
        SyntheticConfig(**overrides)  # type: ignore[arg-type]


def test_a_trained_topk_sae_finds_the_planted_directions() -> None:
    from sae_refusal.sae.architectures import TopK
    from sae_refusal.sae.synthetic import fit_plain

    data = make_synthetic(SyntheticConfig(d_model=16, n_features=32, n_samples=4000, mean_active=2), _gen())
    sae = TopK(k=2, aux_k=16, dead_after_steps=50).build(16, 32, _gen(1))
    before = feature_recovery(sae.W_dec_FD, sae(data.acts_ND, return_latents=True).latents_BF.detach(), data)
    fit_plain(sae, data.acts_ND, steps=600, batch_size=256, lr=3e-3, generator=_gen(2))
    with torch.no_grad():
        after = feature_recovery(sae.W_dec_FD, sae(data.acts_ND, return_latents=True).latents_BF, data)
    assert after.mmcs > 0.9 > before.mmcs and after.mcc > before.mcc + 0.3


def test_the_benchmark_script_reports_every_architecture_asked_for() -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "synthetic_recovery.py"
    args = ["--arch", "topk,l1", "--steps", "5", "--samples", "300", "--threads", "1"]
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["arch"] for r in result["rows"]] == ["topk", "l1"]
    assert all(0.0 <= r["mcc"] <= 1.0 and r["l0"] > 0 for r in result["rows"])
