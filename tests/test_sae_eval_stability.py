"""Cross-seed stability (sae_eval/stability.py): matched latents and shared head features, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from sae_refusal.sae_eval.stability import full_matching, head_overlap, stability_report

E = torch.eye(3)
#: Seed a: e0, e1, e2. Seed b: e1, 0.6 e0 + 0.8 e2, e2. The best one-to-one pairing (total 2.6, against 1.8
#: for a0 -> b2, a2 -> b1): a0 -> b1 (cos 0.6), a1 -> b0 (1), a2 -> b2 (1).
W_A = E.clone()
W_B = torch.stack([E[1], 0.6 * E[0] + 0.8 * E[2], E[2]])


def test_full_matching_by_hand_and_for_unequal_widths() -> None:
    partner, cosine = full_matching(W_A, W_B)
    assert partner.tolist() == [1, 0, 2]
    torch.testing.assert_close(cosine, torch.tensor([0.6, 1.0, 1.0]))
    # 3 latents into 2: one stays unpaired (-1, NaN)
    partner, cosine = full_matching(W_A, W_B[[0, 2]])
    assert partner.tolist() == [-1, 0, 1] and math.isnan(float(cosine[0]))
    permuted = W_A[[2, 0, 1]]
    assert full_matching(W_A, permuted)[0].tolist() == [1, 2, 0]


def test_head_overlap_by_hand() -> None:
    partner, cosine = full_matching(W_A, W_B)
    top_a = {0: [0, 1], 1: [2], 2: []}  # class 2 selected nothing: left out of the means
    top_b = {0: [0, 1], 1: [1]}
    at_07 = head_overlap(top_a, top_b, partner, cosine, 0.7)
    # class 0: a0 -> b1 at 0.6 (not matched), a1 -> b0 at 1 (matched, in b's top 0): matched 1/2, shared 1/2
    # class 1: a2 -> b2 at 1 (matched, b2 not in b's top 1): matched 1, shared 0
    assert at_07["per_class"] == {
        0: {"matched": 0.5, "shared": 0.5, "n": 2},
        1: {"matched": 1.0, "shared": 0.0, "n": 1},
    }
    assert (at_07["head_matched"], at_07["head_shared"]) == (0.75, 0.25)
    at_05 = head_overlap(top_a, top_b, partner, cosine, 0.5)
    # at 0.5 a0 -> b1 is matched, and b1 is in b's top 0: class 0 shares both (a1 -> b0 too)
    assert (at_05["head_matched"], at_05["head_shared"]) == (1.0, 0.5)
    assert math.isnan(head_overlap({}, top_b, partner, cosine, 0.5)["head_shared"])


def test_stability_report_over_ordered_pairs() -> None:
    tops = {"s0": {0: [0, 1], 1: [2]}, "s1": {0: [0], 1: [1]}}
    report = stability_report({"s0": W_A, "s1": W_B}, tops, (0.7, 0.5), class_names=["benign", "x"])
    forward, backward = report["pairs"]["s0->s1"], report["pairs"]["s1->s0"]
    assert forward["0.7"]["matched_share"] == pytest.approx(2 / 3)
    assert forward["0.5"]["matched_share"] == 1.0
    assert forward["0.7"]["per_class"]["benign"]["shared"] == 0.5
    # s1 -> s0 is the same pairing read backwards: b0 -> a1 (1), b1 -> a0 (0.6), b2 -> a2 (1)
    # class 0: b0 -> a1, in s0's top 0: shared 1; class 1: b1 -> a0 at 0.6: matched at 0.5 only, not in top 1
    assert (backward["0.7"]["head_matched"], backward["0.7"]["head_shared"]) == (0.5, 0.5)
    assert (backward["0.5"]["head_matched"], backward["0.5"]["head_shared"]) == (1.0, 0.5)
    assert report["mean"]["0.7"]["head_shared"] == pytest.approx((0.25 + 0.5) / 2)
    assert report["mean"]["0.7"]["matched_share"] == pytest.approx(2 / 3)
    assert report["mean_match_cosine"] == pytest.approx(2.6 / 3)
    assert stability_report({"s0": W_A}, tops) == {"skipped": "needs two seeds or more, got ['s0']"}


def test_the_backward_pair_reads_the_matching_backwards() -> None:
    """A 3-cycle (a0 -> b2, a1 -> b0, a2 -> b1), so the backward pairing is not the forward one."""
    W_b = torch.stack([E[1], E[2], 0.6 * E[0] + 0.8 * E[1]])
    assert full_matching(W_A, W_b)[0].tolist() == [2, 0, 1]
    report = stability_report({"s0": W_A, "s1": W_b}, {"s0": {0: [1]}, "s1": {0: [0]}}, (0.7,))
    assert report["pairs"]["s0->s1"]["0.7"]["head_shared"] == 1.0  # a1 -> b0
    assert report["pairs"]["s1->s0"]["0.7"]["head_shared"] == 1.0  # b0 -> a1
    assert report["pairs"]["s1->s0"]["0.7"]["matched_share"] == pytest.approx(2 / 3)  # b2 -> a0 at 0.6
