"""Feature absorption (sae_eval/absorption.py) on constructed latents whose answer is known by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sae_refusal.sae.relu import ReLUSAE
from sae_refusal.sae_eval.absorption import absorption_report, absorption_scores, main_latents
from sae_refusal.sae_eval.probing import dense_probes

#: Probe direction e0. Latents: 0 = e0 (the main latent), 1 at cosine 0.8 with the probe, 2 orthogonal,
#: 3 at cosine 0.05 (enough for full absorption, >= 0.025, not for the fraction, < 0.1).
DIRECTIONS = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.05, math.sqrt(1 - 0.05**2)]])
PROBE = torch.tensor([3.0, 0.0])  # any norm


def _rows() -> tuple[torch.Tensor, torch.Tensor]:
    """(acts, codes) of six rows; the probe projection of each is its first coordinate (offset 0)."""
    codes = torch.tensor(
        [
            [2.0, 0.0, 0.0, 0.0],  # the main latent carries it all: no absorption
            [0.0, 2.5, 0.0, 0.0],  # latent 1 carries it all (projection 2.5 * 0.8 = 2 = a): full, fraction 1
            [1.0, 1.25, 0.0, 0.0],  # main 1 + latent 1 1 of a = 2: not full, fraction 1 / (1 + 1)
            [0.0, 0.0, 0.0, 20.0],  # latent 3 (cos 0.05) carries 1 = a: full, but no fraction (cos < 0.1)
            [0.0, 0.0, 0.0, 0.0],  # nothing fires: a main-latent miss, nothing absorbs
            [0.0, 1.0, 0.0, 0.0],  # a = -1 <= 0: nothing to absorb
        ]
    )
    acts = torch.tensor([[2.0, 0.0], [2.0, 1.5], [2.0, 0.75], [1.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    return acts, codes


def test_full_absorption_and_absorption_fraction_by_hand() -> None:
    acts, codes = _rows()
    score = absorption_scores(acts, codes, DIRECTIONS, torch.zeros(2), PROBE, [0])
    assert score.n_rows == 6 and score.main_latents == [0]
    assert score.main_miss_rate == pytest.approx(4 / 6)  # rows 1, 3, 4, 5
    assert score.full_absorption_rate == pytest.approx(2 / 6)  # rows 1 and 3
    assert score.absorption_fraction == pytest.approx((0 + 1 + 0.5 + 0 + 0 + 0) / 6)


def test_thresholds_change_the_answer_as_defined() -> None:
    acts, codes = _rows()
    args = (acts, codes, DIRECTIONS, torch.zeros(2), PROBE, [0])
    # a full-absorption cosine above 0.05 drops row 3; above 0.8 row 1 too
    assert absorption_scores(*args, full_absorption_cos=0.06).full_absorption_rate == pytest.approx(1 / 6)
    assert absorption_scores(*args, full_absorption_cos=0.81).full_absorption_rate == 0.0
    # a fraction cosine of 0.05 lets latent 3 absorb row 3 (fraction 1)
    assert absorption_scores(*args, fraction_cos=0.05).absorption_fraction == pytest.approx(2.5 / 6)
    # row 2's absorber carries 1 / 2 of a: below a proportion of 0.6 it does not count
    assert absorption_scores(*args, proportion=0.6).absorption_fraction == pytest.approx(1 / 6)
    # the offset (decoder bias) is no latent's to carry: a = (x - offset) . p
    shifted = absorption_scores(acts + 1.0, codes, DIRECTIONS, torch.ones(2), PROBE, [0])
    assert shifted.absorption_fraction == pytest.approx(1.5 / 6)
    # absorbers carrying more than the main latents left (1.5 > a - m = 1) count for what was left only
    more = absorption_scores(torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.875, 0.0, 0.0]]), *args[2:])
    assert more.absorption_fraction == pytest.approx(1 / (1 + 1))


def test_at_most_max_absorbers_latents_absorb_together() -> None:
    directions = torch.tensor([[0.0, 1.0], *([[1.0, 0.0]] * 4)])  # main latent 0 is off the probe
    codes = torch.tensor([[0.0, 0.1, 0.1, 0.1, 0.1]])
    acts = torch.tensor([[0.4, 0.0]])
    args = (acts, codes, directions, torch.zeros(2), PROBE, [0])
    # the top 3 carry 0.3 of a = 0.4 (0.75 < 0.8); all 4 carry it all
    assert absorption_scores(*args, proportion=0.8).absorption_fraction == 0.0
    assert absorption_scores(*args, proportion=0.8, max_absorbers=4).absorption_fraction == 1.0
    empty = absorption_scores(acts[:0], codes[:0], directions, torch.zeros(2), PROBE, [0])
    assert (
        empty.n_rows == 0 and math.isnan(empty.full_absorption_rate) and math.isnan(empty.absorption_fraction)
    )


def test_main_latents_grow_while_the_f1_gain_exceeds_tau() -> None:
    # a feature split in two: latent 0 fires for half the positives, latent 1 for the other half
    Z = np.zeros((8, 3))
    y = np.array([True] * 4 + [False] * 4)
    Z[0:2, 0] = 1.0
    Z[2:4, 1] = 1.0
    main, f1s = main_latents(Z, y, tau_fs=0.03)
    # k = 1: 2 of 4 positives found, F1 2 * 2 / (4 + 2); k = 2: all; k = 3 gains nothing: stop
    assert main == [0, 1]
    assert f1s == pytest.approx([2 / 3, 1.0, 1.0])
    assert main_latents(Z, y, tau_fs=0.5)[0] == [0]  # a gain of 1/3 is not enough
    assert main_latents(Z, y, max_k=1) == ([0], [pytest.approx(2 / 3)])


def test_absorption_report_on_a_constructed_sae() -> None:
    """Category a has its own latent 0 on the fit rows; on held-out rows latent 1 (parallel to it) takes over
    for one of them: that row is fully absorbed."""
    sae = ReLUSAE(2, 3)
    with torch.no_grad():
        sae.W_dec_FD.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
        sae.W_enc_DF.zero_()
        sae.b_enc_F.zero_()
        sae.b_dec_D.zero_()
    names = ["benign", "a"]
    X_train = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    c_train = torch.tensor([1, 1, 0, 0])
    Z_train = torch.tensor([[2.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    # the last held-out a row looks benign: the probe says no, so it is not scored
    X_test = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    c_test = torch.tensor([1, 1, 0, 1])
    Z_test = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    _, probes = dense_probes(X_train.numpy(), c_train, X_test.numpy(), c_test, names)
    offset = sae.decode(torch.zeros(1, 3))[0]
    report = absorption_report(
        Z_train, c_train, X_test, Z_test, c_test, names, probes, sae.W_dec_FD.detach(), offset
    )
    a = report["categories"]["a"]
    assert (a["n_rows"], a["main_latents"], a["k_main"]) == (2, [0], 1)
    assert a["main_miss_rate"] == 0.5 and a["full_absorption_rate"] == 0.5 and a["absorption_fraction"] == 0.5
    assert report["mean"] == {
        "main_miss_rate": 0.5,
        "full_absorption_rate": 0.5,
        "absorption_fraction": 0.5,
        "n_categories": 1,
    }
    missing = absorption_report(
        Z_train, c_train, X_test, Z_test, c_test, [*names, "b"], probes, sae.W_dec_FD.detach(), offset
    )
    assert "skipped" in missing["categories"]["b"] and missing["mean"]["n_categories"] == 1
