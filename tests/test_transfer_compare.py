"""Transfer comparisons (paired deltas, SAE quality, cosines, overlap) and the mapped SAE, on made-up data."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from sae_refusal.eval.stats import bootstrap_mean
from sae_refusal.sae.topk import TopKSAE
from sae_refusal.transfer.compare import (
    capability_deltas,
    jaccard,
    refusal_deltas,
    row_cosines,
    sae_quality,
)
from sae_refusal.transfer.linear_map import LinearMap, fit_linear_map
from sae_refusal.transfer.mapped_sae import MappedSAE


def _record(set_name: str, i: int, verdict: str, role: str = "harmful") -> dict[str, object]:
    return {"set": set_name, "id": f"{set_name}{i}", "role": role, "judges": {"phrase": {"verdict": verdict}}}


def test_refusal_deltas_pair_items_and_leave_failed_ones_out() -> None:
    base = [_record("h", i, v) for i, v in enumerate(["refused", "complied", "complied", "failed"])]
    base += [_record("o", i, "complied", "over_refusal") for i in range(3)]
    column = [_record("h", i, v) for i, v in enumerate(["refused", "refused", "complied", "refused"])]
    column += [_record("o", i, v, "over_refusal") for i, v in enumerate(["refused", "complied", "complied"])]
    column.reverse()  # pairing is by (set, id), not by position
    out = refusal_deltas(column, base, "phrase", n_boot=200)
    harmful = out["sets"]["h"]
    assert harmful["value"] == pytest.approx(1 / 3) and harmful["n"] == 3 and harmful["n_failed"] == 1
    assert out["sets"]["o"]["value"] == pytest.approx(1 / 3) and out["sets"]["o"]["role"] == "over_refusal"
    assert set(out["blocks"]) == {"harmful", "over_refusal"}
    assert out["blocks"]["harmful"]["low"] <= harmful["value"] <= out["blocks"]["harmful"]["high"]


def test_an_identical_column_has_zero_deltas() -> None:
    records = [_record("h", i, v) for i, v in enumerate(["refused", "complied"] * 5)]
    out = refusal_deltas(records, records, "phrase", n_boot=100)
    assert out["sets"]["h"]["value"] == 0.0 and out["sets"]["h"]["low"] == 0.0 == out["sets"]["h"]["high"]


def test_capability_deltas_pair_by_task_and_id() -> None:
    base = [{"task": "mmlu", "id": str(i), "value": float(i % 2)} for i in range(6)]
    column = [{"task": "mmlu", "id": str(i), "value": 1.0} for i in range(6)]
    column.append({"task": "mmlu", "id": "extra", "value": 1.0})  # unscored unsteered: left out
    out = capability_deltas(column, base, n_boot=100)
    assert (
        out["mmlu"]["value"] == pytest.approx(0.5) and out["mmlu"]["n"] == 6 and out["mmlu"]["n_failed"] == 1
    )


def test_deltas_count_every_left_out_item_and_their_cis_follow_the_seed() -> None:
    # capability: a missing baseline first (the loop goes on), a missing value, a NaN score: 3 left out
    base = [{"task": "gsm8k", "id": str(i), "value": v} for i, v in enumerate([1.0, 0.0, 1.0, 0.0, 0.5])]
    column = [
        {"task": "gsm8k", "id": "none", "value": 1.0},
        {"task": "gsm8k", "id": "0", "value": None},
        {"task": "gsm8k", "id": "1", "value": math.nan},
        {"task": "gsm8k", "id": "2", "value": 0.0},
        {"task": "gsm8k", "id": "3", "value": 1.0},
        {"task": "gsm8k", "id": "4", "value": 1.0},
    ]
    base[4]["value"] = None  # ...and one whose unsteered score is missing: 4 left out, 2 paired
    out = capability_deltas(column, base, n_boot=50, seed=3)["gsm8k"]
    assert (out["n"], out["n_failed"]) == (2, 4) and out["value"] == pytest.approx(0.0)
    expected = bootstrap_mean(np.array([-1.0, 1.0]), n_boot=50, seed=3).to_json()
    assert out == {**expected, "n_failed": 4}  # the CI is the seeded bootstrap of the paired differences
    # refusal: failed verdicts and missing judges count per set and add up per role block
    records = [_record("h", i, "refused") for i in range(6)] + [_record("o", 0, "complied", "over_refusal")]
    column = [_record("h", i, v) for i, v in enumerate(["failed", "failed", "complied", "refused", "x", "y"])]
    column[4] = {"set": "h", "id": "h4", "role": "harmful"}  # no judges at all
    column[5] = {"set": "h", "id": "h5", "role": "harmful", "judges": {"other": {"verdict": "refused"}}}
    column.append(_record("h2", 0, "refused"))  # a second harmful set, with no unsteered counterpart
    column.append(_record("o", 0, "refused", "over_refusal"))
    deltas = refusal_deltas(column, records, "phrase", n_boot=50, seed=5)
    assert deltas["judge"] == "phrase"
    assert (deltas["sets"]["h"]["n"], deltas["sets"]["h"]["n_failed"]) == (2, 4)
    assert (deltas["blocks"]["harmful"]["n"], deltas["blocks"]["harmful"]["n_failed"]) == (2, 5)
    assert deltas["blocks"]["over_refusal"]["n_failed"] == 0
    assert deltas["sets"]["h"] == {
        **bootstrap_mean(np.array([-1.0, 0.0]), n_boot=50, seed=5).to_json(),
        "n_failed": 4,
        "role": "harmful",
    }
    assert deltas["blocks"]["harmful"] == {
        **bootstrap_mean(np.array([-1.0, 0.0]), n_boot=50, seed=5).to_json(),
        "n_failed": 5,
    }


def test_the_delta_cis_are_the_seeded_bootstrap_with_the_given_resamples() -> None:
    rng = np.random.default_rng(0)
    scores = rng.random((2, 30)).round(2)
    base = [{"task": "mmlu", "id": str(i), "value": float(v)} for i, v in enumerate(scores[0])]
    column = [{"task": "mmlu", "id": str(i), "value": float(v)} for i, v in enumerate(scores[1])]
    diffs = scores[1] - scores[0]
    out = capability_deltas(column, base, n_boot=40, seed=7)["mmlu"]
    assert out == {**bootstrap_mean(diffs, n_boot=40, seed=7).to_json(), "n_failed": 0}
    assert out != {**bootstrap_mean(diffs, n_boot=40, seed=8).to_json(), "n_failed": 0}  # the seed shows
    assert out != {**bootstrap_mean(diffs, n_boot=2000, seed=7).to_json(), "n_failed": 0}  # so does n_boot
    verdicts = rng.random((2, 30)) < 0.5
    records = [
        [_record("h", i, "refused" if v else "complied") for i, v in enumerate(row)] for row in verdicts
    ]
    refusal = refusal_deltas(records[1], records[0], "phrase", n_boot=40, seed=7)
    expected = bootstrap_mean(verdicts[1].astype(float) - verdicts[0], n_boot=40, seed=7).to_json()
    assert refusal["sets"]["h"] == {**expected, "n_failed": 0, "role": "harmful"}
    assert refusal["blocks"]["harmful"] == {**expected, "n_failed": 0}
    assert refusal["blocks"] != refusal_deltas(records[1], records[0], "phrase", n_boot=40, seed=8)["blocks"]


def test_sae_quality_counts_l0_dead_latents_and_fvu() -> None:
    sae = TopKSAE(8, 32, k=2, generator=torch.Generator().manual_seed(0))
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    q = sae_quality(sae, x, batch_size=7)
    with torch.no_grad():
        z = sae.encode(x)
        recon = sae.decode(z)
    fvu = float((recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert q["fvu"] == pytest.approx(fvu, rel=1e-5) and q["l0"] == pytest.approx(2.0)
    assert q["dead_fraction"] == pytest.approx(1.0 - float((z != 0).any(0).float().mean()))
    with pytest.raises(ValueError, match="width 9"):
        sae_quality(sae, torch.randn(3, 9))


def test_row_cosines_and_jaccard() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [-1.0, -1.0], [1.0, 0.0]])
    cos = row_cosines(a, b)
    assert cos[0] == pytest.approx(1.0) and cos[1] == pytest.approx(-1.0) and math.isnan(cos[2])
    assert row_cosines(0.1 * a[:2], 0.1 * b[:2]) == pytest.approx([1.0, -1.0])  # short rows are not zero
    with pytest.raises(ValueError, match=r"^vector sets of different shapes: \(3, 2\) vs \(2, 2\)$"):
        row_cosines(a, b[:2])
    assert jaccard([1, 2, 3], [2, 3, 4]) == 0.5 and math.isnan(jaccard([], []))


def test_the_mapped_sae_is_the_inner_sae_under_identity_maps() -> None:
    sae = TopKSAE(8, 32, k=3, generator=torch.Generator().manual_seed(0))
    sae.set_input_scale(0.7)
    identity = LinearMap(W_DE=torch.eye(8), b_E=torch.zeros(8))
    mapped = MappedSAE(sae, identity, identity)
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(mapped.encode(x), sae.encode(x))
    torch.testing.assert_close(mapped(x).recon_BD, sae(x).recon_BD)
    v = torch.randn(2, 32)
    torch.testing.assert_close(mapped.decode_direction(v), sae.decode_direction(v))


def test_the_mapped_sae_reads_a_rotated_and_shifted_copy_exactly() -> None:
    """B = A rotated into a wider space and shifted: A's SAE through the fitted maps reconstructs B as A."""
    gen = torch.Generator().manual_seed(3)
    sae = TopKSAE(6, 24, k=3, generator=gen)
    x_a = torch.randn(200, 6, generator=gen)
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=gen))
    w_de, shift = q[:6], torch.randn(10, generator=gen)
    x_b = x_a @ w_de + shift
    a_to_b, b_to_a = fit_linear_map(x_a, x_b, ridge=0.0), fit_linear_map(x_b, x_a, ridge=1e-9)
    mapped = MappedSAE(sae, b_to_a, a_to_b)
    assert mapped.d_model == 10 and mapped.n_latents == 24
    torch.testing.assert_close(mapped.encode(x_b), sae.encode(x_a), atol=1e-4, rtol=1e-4)
    recon_b = mapped(x_b).recon_BD
    torch.testing.assert_close(recon_b, sae(x_a).recon_BD @ w_de + shift, atol=1e-4, rtol=1e-4)
    assert np.isclose(float(mapped(x_b).fvu.detach()), float(sae_quality(mapped, x_b)["fvu"]), rtol=1e-4)
    with pytest.raises(ValueError, match="do not chain"):
        MappedSAE(sae, a_to_b, a_to_b)
    with pytest.raises(TypeError, match="not saved"):
        mapped.save("anywhere")


def test_decoded_directions_cross_by_the_maps_linear_part_only() -> None:
    """With non-zero map biases (and a decoder bias, an input scale), a latent direction decodes to the
    difference it makes to B's reconstruction: ``decode(z + v) - decode(z)``, whatever ``z``.

    Kills: the A -> B map's bias added to directions (or the B -> A map's used), the inner SAE's ``decode``
    (with ``b_dec``) in place of ``decode_direction``.
    """
    gen = torch.Generator().manual_seed(4)
    sae = TopKSAE(6, 24, k=3, generator=gen)
    sae.set_input_scale(0.6)
    with torch.no_grad():
        sae.b_dec_D.copy_(torch.randn(6, generator=gen))
    a_to_b = LinearMap(W_DE=torch.randn(6, 10, generator=gen), b_E=3.0 + torch.randn(10, generator=gen))
    b_to_a = LinearMap(W_DE=torch.randn(10, 6, generator=gen), b_E=-2.0 + torch.randn(6, generator=gen))
    mapped = MappedSAE(sae, b_to_a, a_to_b)
    v_KF = torch.randn(5, 24, generator=gen)
    z_KF = torch.relu(torch.randn(5, 24, generator=gen))
    with torch.no_grad():
        direction_KE = mapped.decode_direction(v_KF)
        difference_KE = mapped.decode(z_KF + v_KF) - mapped.decode(z_KF)
        through_the_map = sae.decode_direction(v_KF) @ a_to_b.W_DE
    assert direction_KE.shape == (5, 10)
    # float32, entries O(10): each is a sum of F + D = 30 products, rounding well below 1e-4
    torch.testing.assert_close(direction_KE, difference_KE, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(direction_KE, through_the_map, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(direction_KE, through_the_map + a_to_b.b_E, atol=1.0)  # the biases matter here


def test_the_mapped_sae_reports_fvu_in_bs_space_and_checks_each_width() -> None:
    gen = torch.Generator().manual_seed(5)
    sae = TopKSAE(6, 24, k=3, generator=gen)
    a_to_b = LinearMap(W_DE=torch.randn(6, 10, generator=gen), b_E=torch.randn(10, generator=gen))
    b_to_a = LinearMap(W_DE=0.3 * torch.randn(10, 6, generator=gen), b_E=torch.randn(6, generator=gen))
    mapped = MappedSAE(sae, b_to_a, a_to_b)
    x_BE = torch.randn(40, 10, generator=gen)
    with torch.no_grad():
        out = mapped(x_BE)
        inner = sae(b_to_a(x_BE))
    assert out.latents_BF is None and mapped(x_BE, return_latents=True).latents_BF is not None
    recon_BE = mapped.decode(mapped.encode(x_BE))
    torch.testing.assert_close(out.recon_BD, recon_BE)
    fvu = (x_BE - recon_BE).pow(2).sum() / (x_BE - x_BE.mean(0)).pow(2).sum()
    torch.testing.assert_close(out.fvu, fvu)  # B's rows against B's reconstruction...
    assert not torch.isclose(out.fvu, inner.fvu, rtol=0.1)  # ...not the inner SAE's FVU in A's space
    assert mapped.config() == {"inner": {"architecture": "topk", **sae.config()}}
    d6_to_8 = LinearMap(W_DE=torch.zeros(6, 8), b_E=torch.zeros(8))
    d8_to_6 = LinearMap(W_DE=torch.zeros(8, 6), b_E=torch.zeros(6))
    d10_to_5 = LinearMap(W_DE=torch.zeros(10, 5), b_E=torch.zeros(5))
    d5_to_10 = LinearMap(W_DE=torch.zeros(5, 10), b_E=torch.zeros(10))
    # each of the three widths that must chain, wrong alone
    for into_a, out_of_a in ((d10_to_5, a_to_b), (b_to_a, d5_to_10), (d8_to_6, a_to_b)):
        with pytest.raises(ValueError, match="maps do not chain with the SAE"):
            MappedSAE(sae, into_a, out_of_a)
    assert MappedSAE(sae, d8_to_6, d6_to_8).d_model == 8


def _split(acts_ND: torch.Tensor, codes_N: torch.Tensor) -> Any:
    from sae_refusal.activations.datamodule import ActivationBatch

    return ActivationBatch(
        acts_ND=acts_ND,
        label_N=(codes_N > 0).long(),  # 0 benign, 1 harmful
        category_N=codes_N.clone(),
        ids=[f"p{i}" for i in range(len(codes_N))],
    )


def test_a_heads_accuracy_on_b_is_scored_on_bs_codes(tmp_path: Path) -> None:
    """B reads each prompt as A reads another prompt's class: A's head, good on A, is near chance on B."""
    from sae_refusal.features.analysis import FeatureAnalysisConfig
    from sae_refusal.transfer.features import compare_features

    gen = torch.Generator().manual_seed(0)
    centres = 6.0 * torch.randn(3, 16, generator=gen)
    splits_a, splits_b = {}, {}
    for split, n in (("train", 240), ("val", 30), ("test", 120)):
        codes = torch.arange(n) % 3
        acts = centres[codes] + torch.randn(n, 16, generator=gen)
        splits_a[split] = _split(acts, codes)
        splits_b[split] = _split(acts[torch.randperm(n, generator=gen)], codes)
    sae = TopKSAE(16, 64, k=8, generator=gen)
    side = SimpleNamespace(
        spec=SimpleNamespace(llm=SimpleNamespace(name_or_path="m")), layer=1, fingerprint={}, d_model=16
    )
    a, b = SimpleNamespace(**vars(side), splits=splits_a), SimpleNamespace(**vars(side), splits=splits_b)
    cfg = SimpleNamespace(features=FeatureAnalysisConfig(projections=[], n_permutations=0, top_k_features=4))
    result, _, _ = compare_features(cfg, a, b, {"s": sae}, {"s": sae}, None, {"s": tmp_path}, tmp_path)
    head = result["per_seed"]["s"]["head"]
    assert head["a_on_a"]["accuracy"] > 0.9
    assert head["a_on_b"]["accuracy"] < head["a_on_a"]["accuracy"] - 0.3
