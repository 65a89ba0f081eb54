"""Cross-seed consensus of selected SAE features: decoder matching, identification, shares, errors."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from sae_refusal.features.consensus import (
    ConsensusReport,
    LatentMatch,
    ReferenceConsensus,
    consensus_features,
    decoder_cosine,
    match_latents,
    mean_and_spread,
    reference_consensus,
)

F_LAT, D_MODEL = 24, 32


def _basis(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal decoder rows ``(F, D)`` plus ``(D - F, D)`` unit directions orthogonal to all of them."""
    gen = torch.Generator().manual_seed(seed)
    Q_DD, _ = torch.linalg.qr(torch.randn(D_MODEL, D_MODEL, generator=gen))
    return Q_DD[:, :F_LAT].T.contiguous(), Q_DD[:, F_LAT:].T.contiguous()


def _permuted(W_FD: torch.Tensor, seed: int, noise: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Another seed's decoder: ``W_FD``'s rows permuted plus noise, and ``partner`` (reference -> other)."""
    gen = torch.Generator().manual_seed(seed)
    perm_G = torch.randperm(W_FD.shape[0], generator=gen)  # other row g copies reference row perm_G[g]
    W_other_GD = W_FD[perm_G] + noise * torch.randn(W_FD.shape, generator=gen)
    partner_F = torch.argsort(perm_G)  # reference row f lives at other row partner_F[f]
    return W_other_GD, partner_F


# --------------------------------------------------------------------------------------------- matching


def test_decoder_cosine_matches_dense_and_is_chunk_invariant() -> None:
    gen = torch.Generator().manual_seed(0)
    A_FD = torch.randn(10, 8, generator=gen) * 3.0
    B_GD = torch.randn(13, 8, generator=gen)
    expected_FG = torch.nn.functional.cosine_similarity(A_FD[:, None, :], B_GD[None, :, :], dim=-1)
    full_FG = decoder_cosine(A_FD, B_GD)
    assert full_FG.shape == (10, 13) and full_FG.dtype == torch.float32
    torch.testing.assert_close(full_FG, expected_FG, atol=1e-5, rtol=0)
    torch.testing.assert_close(decoder_cosine(A_FD, B_GD, chunk=3), full_FG)
    rows = torch.tensor([7, 2, 9])
    torch.testing.assert_close(decoder_cosine(A_FD, B_GD, rows=rows, chunk=2), full_FG[rows])
    half_FG = decoder_cosine(A_FD.half(), B_GD.half())
    assert half_FG.dtype == torch.float32
    torch.testing.assert_close(half_FG, full_FG, atol=2e-3, rtol=0)


def test_decoder_cosine_zero_row_is_zero_and_errors() -> None:
    A_FD = torch.zeros(2, 4)
    A_FD[1, 0] = 1.0
    cos = decoder_cosine(A_FD, torch.eye(4))
    assert torch.equal(cos[0], torch.zeros(4)) and cos[1, 0] == 1.0
    with pytest.raises(ValueError, match="widths differ"):
        decoder_cosine(torch.ones(2, 4), torch.ones(2, 5))
    with pytest.raises(ValueError, match="chunk"):
        decoder_cosine(torch.ones(2, 4), torch.ones(2, 4), chunk=0)


def test_match_latents_recovers_permutation() -> None:
    A_FD, _ = _basis(1)
    B_GD, partner_F = _permuted(A_FD, seed=2)
    match = match_latents(A_FD, B_GD)
    assert isinstance(match, LatentMatch)
    assert torch.equal(match.rows, torch.arange(F_LAT))
    assert torch.equal(match.cols, partner_F)
    assert match.rows.dtype == match.cols.dtype == torch.long
    assert float(match.cosine.min()) > 0.99


def test_match_latents_rectangular_keeps_row_order() -> None:
    A_FD, _ = _basis(3)
    B_GD, partner_F = _permuted(A_FD, seed=4)
    rows = [17, 3, 11, 0]
    match = match_latents(A_FD, B_GD, rows)
    assert match.rows.tolist() == rows
    assert match.cols.tolist() == partner_F[rows].tolist()
    assert float(match.cosine.min()) > 0.99
    # A small SAE whose 5 latents sit among the 24 of a wider one.
    small_FD = A_FD[[5, 6, 7, 8, 9]]
    wide = match_latents(small_FD, B_GD)
    assert wide.cols.tolist() == partner_F[[5, 6, 7, 8, 9]].tolist()
    assert len(set(wide.cols.tolist())) == 5
    empty = match_latents(A_FD, B_GD, [])
    assert empty.rows.numel() == empty.cols.numel() == empty.cosine.numel() == 0


def test_match_latents_is_optimal() -> None:
    gen = torch.Generator().manual_seed(14)
    A_FD = torch.randn(5, 3, generator=gen)
    B_GD = torch.randn(6, 3, generator=gen)
    cos_FG = decoder_cosine(A_FD, B_GD)
    best = max(
        sum(float(cos_FG[f, g]) for f, g in enumerate(cols)) for cols in itertools.permutations(range(6), 5)
    )
    match = match_latents(A_FD, B_GD)
    assert len(set(match.cols.tolist())) == 5
    assert float(match.cosine.sum()) == pytest.approx(best, abs=1e-5)
    torch.testing.assert_close(match.cosine, cos_FG[match.rows, match.cols])


def test_match_latents_errors() -> None:
    A_FD = torch.eye(4)
    with pytest.raises(ValueError, match="cannot match 4"):
        match_latents(A_FD, torch.eye(4)[:3])
    with pytest.raises(ValueError, match="duplicate"):
        match_latents(A_FD, A_FD, [1, 1])
    with pytest.raises(ValueError, match="out of range"):
        match_latents(A_FD, A_FD, [4])
    with pytest.raises(ValueError, match="integer"):
        match_latents(A_FD, A_FD, torch.tensor([0.5]))
    with pytest.raises(ValueError, match="2-D"):
        match_latents(torch.ones(4), A_FD)
    bad_FD = A_FD.clone()
    bad_FD[0, 0] = math.nan
    with pytest.raises(ValueError, match="finite"):
        match_latents(bad_FD, A_FD)


# --------------------------------------------------------------------------------------------- consensus


@pytest.fixture()
def two_seeds() -> tuple[dict[str, dict[int, list[int]]], dict[str, torch.Tensor], torch.Tensor]:
    """Seeds a/b: b is a permuted a; b's partner of a's latent 5 only has cosine 0.3 with it."""
    A_FD, comp_KD = _basis(5)
    B_GD, partner_F = _permuted(A_FD, seed=6)
    p = partner_F.tolist()
    B_GD[p[5]] = 0.3 * A_FD[5] + math.sqrt(1 - 0.3**2) * comp_KD[0]
    selected = {
        "a": {0: [1, 2], 1: [3, 4], 2: [5, 6]},
        # 4's partner is selected for class 2 (not 1); 5's partner is selected for class 2 but matches poorly.
        "b": {0: [p[2], p[1]], 1: [p[3], p[10]], 2: [p[4], p[5], p[6]]},
    }
    return selected, {"a": A_FD, "b": B_GD}, partner_F


def test_reference_consensus_two_seeds(two_seeds: tuple) -> None:
    selected, decoders, partner_F = two_seeds
    match = match_latents(decoders["a"], decoders["b"], [5])
    assert int(match.cols[0]) == int(partner_F[5]) and float(match.cosine[0]) == pytest.approx(0.3, abs=0.02)

    report = reference_consensus(selected, decoders, "a", min_share=1.0)
    assert isinstance(report, ReferenceConsensus)
    assert report.reference == "a" and report.seeds == ["a", "b"]
    assert report.kept == {0: [1, 2], 1: [3], 2: [6]}
    assert report.share == {0: {1: 1.0, 2: 1.0}, 1: {3: 1.0, 4: 0.5}, 2: {5: 0.5, 6: 1.0}}
    assert report.stability == {0: 1.0, 1: 0.5, 2: 0.5}
    assert report.mean_match_cosine["b"] == pytest.approx((5 * 1.0 + 0.3) / 6, abs=0.02)
    assert report.min_share == 1.0 and report.min_cosine == 0.5

    # A lower cosine threshold accepts the weak partner of 5; the wrong-class partner of 4 stays out.
    loose = reference_consensus(selected, decoders, "a", min_share=1.0, min_cosine=0.2)
    assert loose.kept == {0: [1, 2], 1: [3], 2: [5, 6]}
    # With the default min_share of 0.5 the reference alone is enough.
    assert reference_consensus(selected, decoders, "a").kept == {0: [1, 2], 1: [3, 4], 2: [5, 6]}


def test_reference_consensus_other_reference_and_tensor_selection(two_seeds: tuple) -> None:
    selected, decoders, partner_F = two_seeds
    p = partner_F.tolist()
    as_tensors = {s: {c: torch.tensor(v) for c, v in per.items()} for s, per in selected.items()}
    report = reference_consensus(as_tensors, decoders, "b", min_share=1.0)
    assert report.reference == "b"
    assert report.kept == {0: sorted([p[1], p[2]]), 1: [p[3]], 2: [p[6]]}
    assert report.stability == {0: 1.0, 1: 0.5, 2: pytest.approx(1 / 3)}
    assert set(report.mean_match_cosine) == {"a"}


def test_consensus_is_symmetric_each_seed_the_reference_in_turn(two_seeds: tuple) -> None:
    selected, decoders, _ = two_seeds
    report = consensus_features(selected, decoders, min_share=1.0)
    assert isinstance(report, ConsensusReport)
    assert report.seeds == ["a", "b"] and list(report.by_reference) == ["a", "b"]
    for ref in ("a", "b"):
        assert report.by_reference[ref] == reference_consensus(selected, decoders, ref, min_share=1.0)
    # hand-computed: reference a {0: 1, 1: 1/2, 2: 1/2}, reference b {0: 1, 1: 1/2, 2: 1/3}
    assert report.stability == {0: 1.0, 1: 0.5, 2: pytest.approx(5 / 12)}
    pairs = [report.by_reference["a"].mean_match_cosine["b"], report.by_reference["b"].mean_match_cosine["a"]]
    assert report.mean_match_cosine == pytest.approx(sum(pairs) / 2)


def test_consensus_does_not_depend_on_the_order_of_the_seeds() -> None:
    A_FD, _ = _basis(7)
    B_GD, pb = _permuted(A_FD, seed=8)
    C_GD, pc = _permuted(A_FD, seed=9)
    selected = {
        "s0": {1: [0, 1, 2], 2: [5]},
        "s1": {1: [int(pb[0]), int(pb[1])], 2: [int(pb[5]), int(pb[7])]},
        "s2": {1: [int(pc[0])], 2: [int(pc[6])]},
    }
    decoders = {"s0": A_FD, "s1": B_GD, "s2": C_GD}
    dumps = set()
    for order in itertools.permutations(selected):
        for decoder_order in (order, order[::-1]):
            report = consensus_features(
                {s: selected[s] for s in order}, {s: decoders[s] for s in decoder_order}, min_share=2 / 3
            )
            dumps.add(json.dumps(report.to_dict(), allow_nan=False))  # values and key order
    assert len(dumps) == 1
    # the per-class stability is the mean over the three references (hand-computed):
    # reference s0: class 1 keeps 0 (3 of 3 seeds), 1 (2 of 3), not 2 (1 of 3); class 2 keeps 5 (s1) -> 2/3, 1
    # reference s1: class 1 keeps pb[0] and pb[1]; class 2 keeps pb[5] (s0), not pb[7] (alone) -> 1, 1/2
    # reference s2: class 1 keeps pc[0] (s0, s1); class 2 not pc[6] (alone) -> 1, 0
    assert report.stability == pytest.approx({1: (2 / 3 + 1 + 1) / 3, 2: (1 + 0.5 + 0) / 3})
    assert report.by_reference["s1"].kept == {1: sorted([int(pb[0]), int(pb[1])]), 2: [int(pb[5])]}


def test_consensus_three_seeds_two_thirds() -> None:
    A_FD, _ = _basis(7)
    B_GD, pb = _permuted(A_FD, seed=8)
    C_GD, pc = _permuted(A_FD, seed=9)
    selected = {
        "s0": {1: [0, 1, 2]},
        "s1": {1: [int(pb[0]), int(pb[1])]},  # 0 and 1 found here
        "s2": {1: [int(pc[0])]},  # only 0 found here
    }
    decoders = {"s0": A_FD, "s1": B_GD, "s2": C_GD}
    report = reference_consensus(selected, decoders, "s0", min_share=2 / 3)
    assert report.share[1] == pytest.approx({0: 1.0, 1: 2 / 3, 2: 1 / 3})
    assert report.kept == {1: [0, 1]}
    assert report.stability[1] == pytest.approx(2 / 3)
    assert set(report.mean_match_cosine) == {"s1", "s2"}
    assert min(report.mean_match_cosine.values()) > 0.99
    assert reference_consensus(selected, decoders, "s0", min_share=0.7).kept == {1: [0]}
    assert reference_consensus(selected, decoders, "s0", min_share=0.3).kept == {1: [0, 1, 2]}


def test_consensus_single_seed_and_empty_class() -> None:
    A_FD, _ = _basis(10)
    report = reference_consensus(
        {"seed0": {0: [3, 1, 3], 1: [], 2: [7]}}, {"seed0": A_FD}, "seed0", min_share=1.0
    )
    assert report.kept == {0: [1, 3], 1: [], 2: [7]}
    assert report.share == {0: {1: 1.0, 3: 1.0}, 1: {}, 2: {7: 1.0}}
    assert report.stability[0] == 1.0 and report.stability[2] == 1.0
    assert math.isnan(report.stability[1])
    assert report.mean_match_cosine == {}


def test_consensus_class_missing_in_reference_and_nothing_selected() -> None:
    A_FD, _ = _basis(11)
    B_GD, pb = _permuted(A_FD, seed=12)
    report = reference_consensus({"a": {0: []}, "b": {0: [], 3: [int(pb[0])]}}, {"a": A_FD, "b": B_GD}, "a")
    assert report.kept == {0: [], 3: []}
    assert math.isnan(report.stability[0]) and math.isnan(report.stability[3])
    assert math.isnan(report.mean_match_cosine["b"])


def test_to_dict_is_strict_json(two_seeds: tuple) -> None:
    selected, decoders, _ = two_seeds
    selected = {s: {**per, 3: []} for s, per in selected.items()}
    names = ["benign", "safety", "humanizing", "other"]
    one = reference_consensus(selected, decoders, "a", min_share=1.0)
    back = json.loads(json.dumps(one.to_dict(names), allow_nan=False))
    assert back["kept"] == {"benign": [1, 2], "safety": [3], "humanizing": [6], "other": []}
    assert back["share"]["safety"] == {"3": 1.0, "4": 0.5}
    assert back["stability"]["other"] is None
    assert back["reference"] == "a" and back["seeds"] == ["a", "b"] and back["min_share"] == 1.0
    assert set(back["mean_match_cosine"]) == {"b"}
    plain = one.to_dict()
    assert set(plain["kept"]) == {"0", "1", "2", "3"}
    json.dumps(plain, allow_nan=False)
    with pytest.raises(ValueError, match="class 3"):
        one.to_dict(names[:3])

    both = consensus_features(selected, decoders, min_share=1.0)
    out = json.loads(json.dumps(both.to_dict(names), allow_nan=False))
    assert out["seeds"] == ["a", "b"] and out["min_share"] == 1.0 and out["min_cosine"] == 0.5
    assert out["stability"] == {
        "benign": 1.0,
        "safety": 0.5,
        "humanizing": pytest.approx(5 / 12),
        "other": None,
    }
    assert out["by_reference"]["a"]["kept"] == back["kept"] and "min_share" not in out["by_reference"]["a"]
    assert out["mean_match_cosine"] == pytest.approx(both.mean_match_cosine)
    with pytest.raises(ValueError, match="class 3"):
        both.to_dict(names[:3])


# --------------------------------------------------------------------------------------------- errors


def test_consensus_errors() -> None:
    A_FD, _ = _basis(13)
    ok_sel = {"a": {0: [1]}, "b": {0: [2]}}
    ok_dec = {"a": A_FD, "b": A_FD.clone()}
    with pytest.raises(ValueError, match=r"seeds differ.*'c'"):
        consensus_features(ok_sel, {"a": A_FD, "c": A_FD})
    with pytest.raises(ValueError, match="reference seed 'z'"):
        reference_consensus(ok_sel, ok_dec, "z")
    with pytest.raises(ValueError, match=r"seed 'b'.*D=16"):
        consensus_features(
            ok_sel, {"a": A_FD, "b": torch.randn(24, 16, generator=torch.Generator().manual_seed(0))}
        )
    with pytest.raises(ValueError, match="seed 'b', class 0: latent index 24 out of range"):
        consensus_features({"a": {0: [1]}, "b": {0: [24]}}, ok_dec)
    with pytest.raises(ValueError, match="seed 'a', class 2: latent index -1"):
        consensus_features({"a": {2: [-1]}, "b": {0: [2]}}, ok_dec)
    with pytest.raises(ValueError, match=r"seed 'a', class 0: latent 1\.5 is not an integer"):
        consensus_features({"a": {0: [1.5]}, "b": {0: [2]}}, ok_dec)  # type: ignore[list-item]
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="min_share"):
            consensus_features(ok_sel, ok_dec, min_share=bad)
    for bad in (-1.1, 1.01):
        with pytest.raises(ValueError, match="min_cosine"):
            consensus_features(ok_sel, ok_dec, min_cosine=bad)
    with pytest.raises(ValueError, match=r"seed 'b'.*2-D"):
        consensus_features(ok_sel, {"a": A_FD, "b": A_FD[None]})
    with pytest.raises(ValueError, match=r"seed 'a'.*2-D"):
        consensus_features(ok_sel, {"a": A_FD[0], "b": A_FD})
    with pytest.raises(ValueError, match=r"seed 'b'.*cannot match 2"):
        consensus_features({"a": {0: [1, 2]}, "b": {0: [0]}}, {"a": A_FD, "b": A_FD[:1]})
    with pytest.raises(ValueError, match="at least one seed"):
        consensus_features({}, {})


# --------------------------------------------------------------------------------------------- summary


def test_mean_and_spread() -> None:
    out = mean_and_spread([1.0, 2.0, math.nan, 3.0])
    assert out["n"] == 3
    assert out["mean"] == pytest.approx(2.0)
    assert out["std"] == pytest.approx(math.sqrt(2 / 3))
    assert out["min"] == 1.0 and out["max"] == 3.0
    one = mean_and_spread([0.25])
    assert one == {"mean": 0.25, "std": 0.0, "min": 0.25, "max": 0.25, "n": 1}
    for empty in ([], [math.nan, math.nan]):
        res = mean_and_spread(empty)
        assert res["n"] == 0
        assert all(math.isnan(res[k]) for k in ("mean", "std", "min", "max"))
