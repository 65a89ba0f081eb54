"""Contrastive SAE: the supervised terms really enter the training loss, with their weights, and their
gradient reaches the encoder through the sparse codes (TopK and L1 bases)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from sae_refusal.sae import L1, Contrastive, SAEModule, TopK
from sae_refusal.sae.architectures import SAEArchitecture
from sae_refusal.sae.base import SparseAutoencoder
from sae_refusal.sae.contrastive import batch_classes, mean_separation, supcon_loss

D = 8

# SAEModule._seed_loss logs its metrics; outside a Trainer that only warns
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


def make_batch(n: int = 24, seed: int = 0) -> dict[str, torch.Tensor]:
    """Benign (0), harmful (1, categories 1..3) and ambiguous (2) rows; activations depend on the class."""
    gen = torch.Generator().manual_seed(seed)
    label = torch.tensor([i % 3 for i in range(n)])
    category = torch.where(label == 1, torch.tensor([1 + (i % 3) for i in range(n)]), 0)
    acts = torch.randn(n, D, generator=gen) + 2.0 * category[:, None].float()
    return {"acts": acts, "label": label, "category": category}


def module_of(architecture: SAEArchitecture) -> SAEModule:
    module = SAEModule(d_model=D, architecture=architecture, expansion_factor=4, seeds=[0], lr=1e-2)
    with torch.no_grad():  # away from the tied init, and a bias that makes codes depend on the row
        for _, sae in module.named_saes():
            gen = torch.Generator().manual_seed(1)
            for p in sae.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return module


def seed_loss(module: SAEModule, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, SparseAutoencoder]:
    (name, sae), *_ = module.named_saes()
    loss, *_ = module._seed_loss(name, sae, batch, "train")
    return loss, sae


def supervised_terms(sae: SparseAutoencoder, arch: Contrastive, batch: dict[str, torch.Tensor]) -> Any:
    """The two terms computed from the SAE's own codes, outside the module."""
    codes_BF = sae(batch["acts"], return_latents=True).latents_BF
    assert codes_BF is not None
    classes_B = batch_classes(batch["label"], batch["category"], arch.ambiguous_as_benign)
    return supcon_loss(codes_BF, classes_B, arch.temperature), mean_separation(codes_BF, classes_B)


BASES = {"topk": lambda: TopK(k=8, aux_k=0), "l1": lambda: L1(l1_coef=0.1)}


@pytest.mark.parametrize("base", BASES, ids=list(BASES))
def test_seed_loss_adds_each_weighted_supervised_term(base: str) -> None:
    """loss = SAE loss + supcon_weight * supcon + separation_weight * separation.

    Kills: the terms weighted 0 (or dropped, or one weight used for both) in the training loss.
    """
    batch = make_batch()
    weights = (0.7, 0.3)
    arch = Contrastive(BASES[base](), supcon_weight=weights[0], separation_weight=weights[1], temperature=0.5)
    module = module_of(arch)
    loss, sae = seed_loss(module, batch)
    supcon, separation = supervised_terms(sae, arch, batch)
    assert supcon.item() > 0.1 and separation.item() > 0.1  # both terms matter on this batch
    plain = sae(batch["acts"]).loss
    expected = plain + weights[0] * supcon + weights[1] * separation
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert arch.loss_weights() == {"supcon": 0.7, "separation": 0.3}

    unweighted = module_of(Contrastive(BASES[base](), supcon_weight=0.0, separation_weight=0.0))
    torch.testing.assert_close(seed_loss(unweighted, batch)[0], plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("base", BASES, ids=list(BASES))
def test_supervised_gradient_reaches_the_encoder(base: str) -> None:
    """The contrastive terms train the encoder through the codes (not only the logged value).

    grad(loss with weights w) - grad(loss with weights 0) == w . grad(terms), and is non-zero on the encoder.
    Kills: codes detached before the supervised terms, terms weighted 0, the TopK dense codes built without a
    gradient path.
    """
    batch = make_batch(seed=3)
    w_supcon, w_sep = 0.5, 2.0
    arch = Contrastive(BASES[base](), supcon_weight=w_supcon, separation_weight=w_sep, temperature=0.3)
    with_terms = module_of(arch)
    without = module_of(Contrastive(BASES[base](), supcon_weight=0.0, separation_weight=0.0))
    loss_a, sae_a = seed_loss(with_terms, batch)
    loss_b, sae_b = seed_loss(without, batch)
    enc_a = [p for n, p in sae_a.named_parameters() if n.startswith(("W_enc", "b_enc"))]
    enc_b = [p for n, p in sae_b.named_parameters() if n.startswith(("W_enc", "b_enc"))]
    assert len(enc_a) == 2
    grads_a = torch.autograd.grad(loss_a, enc_a)
    grads_b = torch.autograd.grad(loss_b, enc_b)
    supcon, separation = supervised_terms(sae_a, arch, batch)
    grads_terms = torch.autograd.grad(w_supcon * supcon + w_sep * separation, enc_a)
    # Tolerance from float32 rounding, not from the size of the difference: ga and gb are each dominated by
    # the reconstruction gradient (|g| up to ~31 on the TopK encoder, ~100x the supervised part), and their
    # difference cancels it but keeps both rounding errors. Each encoder gradient element is a float32
    # reduction over the D decoder columns (the code's gradient) and then the B batch rows, whose error is at
    # most about (D + B) * eps * |g| (Higham's gamma_n bound on a sum of n terms): here 32 * 1.2e-7 * 31 =
    # 1.2e-4 for TopK (measured: 4e-6 at 1 and 2 threads), far below the supervised gradient (0.14-0.98).
    reduction = D + batch["acts"].shape[0]
    eps = torch.finfo(torch.float32).eps
    for ga, gb, gt in zip(grads_a, grads_b, grads_terms, strict=True):
        atol = reduction * eps * max(float(ga.abs().max()), float(gb.abs().max()))
        assert gt.abs().max() > 100 * atol  # the supervised terms move the encoder, far above the rounding
        torch.testing.assert_close(ga - gb, gt, rtol=1e-5, atol=atol)


def test_training_steps_with_supcon_separate_the_classes_more() -> None:
    """A few Adam steps on the total loss: with SupCon on, same-class codes end up more similar than
    different-class codes by a wider margin than without it (the term is optimised, not only logged)."""

    def margin(weight: float) -> float:
        batch = make_batch(n=48, seed=7)
        arch = Contrastive(TopK(k=8, aux_k=0), supcon_weight=weight, separation_weight=0.0, temperature=0.2)
        module = module_of(arch)
        (_, sae), *_ = module.named_saes()
        opt = torch.optim.Adam(sae.parameters(), lr=2e-2)
        for _ in range(40):
            opt.zero_grad()
            seed_loss(module, batch)[0].backward()
            sae.remove_parallel_grads()
            opt.step()
            sae.normalize_decoder()
        with torch.no_grad():
            codes = sae(batch["acts"], return_latents=True).latents_BF
            assert codes is not None
            z = torch.nn.functional.normalize(codes, dim=1)
            sim = z @ z.T
            classes = batch_classes(batch["label"], batch["category"])
            same = classes[:, None] == classes[None, :]
            off_diag = ~torch.eye(len(classes), dtype=torch.bool)
            return float(sim[same & off_diag].mean() - sim[~same].mean())

    with_supcon, without = margin(3.0), margin(0.0)  # about 0.33 and 0.18
    assert math.isfinite(with_supcon) and with_supcon > without + 0.08


def hand_supcon(codes: torch.Tensor, classes: list[int], t: float) -> float:
    """Khosla et al.'s L_out written with loops: rows of class -1 dropped, anchors need a positive."""
    keep = [i for i, c in enumerate(classes) if c >= 0]
    z = torch.nn.functional.normalize(codes[keep], dim=1).tolist()
    cls = [classes[i] for i in keep]
    terms = []
    for i in range(len(keep)):
        others = [j for j in range(len(keep)) if j != i]
        positives = [j for j in others if cls[j] == cls[i]]
        if not positives:
            continue
        sim = {j: sum(a * b for a, b in zip(z[i], z[j], strict=True)) / t for j in others}
        log_denominator = math.log(sum(math.exp(s) for s in sim.values()))
        terms.append(-sum(sim[j] - log_denominator for j in positives) / len(positives))
    return sum(terms) / len(terms)


def test_supcon_with_unbalanced_classes_a_lone_class_and_ignored_rows() -> None:
    """Unequal numbers of positives per anchor (where a per-column normaliser or a sum instead of a mean
    over positives shows), a class with one row (no anchor) and an ignored row."""
    gen = torch.Generator().manual_seed(4)
    codes = torch.rand(8, 5, generator=gen)
    classes = [0, 0, 0, 1, 1, 2, -1, 0]
    for t in (0.1, 0.7):
        got = supcon_loss(codes, torch.tensor(classes), t).item()
        assert got == pytest.approx(hand_supcon(codes, classes, t), rel=1e-5)
    assert supcon_loss(codes, torch.tensor(classes)).item() == pytest.approx(hand_supcon(codes, classes, 0.1))


def test_supcon_degenerate_batches_give_zero_with_a_graph() -> None:
    codes = torch.rand(3, 4, requires_grad=True)
    for classes in ([0, -1, -1], [0, 1, 2], [-1, -1, -1]):
        loss = supcon_loss(codes, torch.tensor(classes))
        assert loss.item() == 0.0 and loss.requires_grad, classes
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        supcon_loss(codes, torch.tensor([0, 0, 1]), 0.0)
    with pytest.raises(ValueError, match="codes_BF has 3 rows, classes_B 2"):
        supcon_loss(codes, torch.tensor([0, 1]))


def test_mean_separation_is_the_cosine_of_the_class_means() -> None:
    """Harmful = every class >= 1 (category 1 included), benign = class 0, ignored rows (-1) left out."""
    codes = torch.tensor(
        [[1.0, 0.0, 0.0], [0.0, 2.0, 1.0], [3.0, 1.0, 0.0], [0.0, 0.0, 4.0], [9.0, 9.0, 9.0]]
    )
    classes = torch.tensor([0, 1, 0, 2, -1])
    harmful, benign = codes[[1, 3]].mean(0), codes[[0, 2]].mean(0)
    expected = float(harmful @ benign / (harmful.norm() * benign.norm()))
    assert expected > 0.05
    assert mean_separation(codes, classes).item() == pytest.approx(expected, rel=1e-6)
    only_one = torch.tensor([0, 1, 0, -1, -1])  # harmful = row 1 only (category 1)
    one = float(codes[1] @ benign / (codes[1].norm() * benign.norm()))
    assert mean_separation(codes, only_one).item() == pytest.approx(one, rel=1e-6)
    assert mean_separation(codes, torch.tensor([1, 1, 2, 3, -1])).item() == 0.0  # no benign row


def test_ambiguous_rows_are_benign_or_ignored_as_configured() -> None:
    batch = make_batch(n=18, seed=5)
    for as_benign in (True, False):
        arch = Contrastive(TopK(k=8, aux_k=0), temperature=0.4, ambiguous_as_benign=as_benign)
        module = module_of(arch)
        (_, sae), *_ = module.named_saes()
        out = sae(batch["acts"], return_latents=True)
        terms = arch.extra_losses(out, batch)
        assert out.latents_BF is not None
        classes = batch_classes(batch["label"], batch["category"], as_benign)
        assert (classes == -1).any() != as_benign
        torch.testing.assert_close(terms["supcon"], supcon_loss(out.latents_BF, classes, 0.4))
        torch.testing.assert_close(terms["separation"], mean_separation(out.latents_BF, classes))
    benign = Contrastive(TopK(k=8, aux_k=0), temperature=0.4)
    ignored = Contrastive(TopK(k=8, aux_k=0), temperature=0.4, ambiguous_as_benign=False)
    (_, sae), *_ = module_of(benign).named_saes()
    out = sae(batch["acts"], return_latents=True)
    assert benign.extra_losses(out, batch)["supcon"] != ignored.extra_losses(out, batch)["supcon"]
    with pytest.raises(ValueError, match="did not return latents"):
        benign.extra_losses(sae(batch["acts"]), batch)


@pytest.mark.parametrize("arch", [lambda: L1(), lambda: Contrastive(L1()), lambda: Contrastive(TopK(k=4))])
def test_every_architecture_builds_from_its_seed(arch: Any) -> None:
    """The initial weights come from the seed's generator (reproducible, different per seed)."""
    a = dict(SAEModule(d_model=D, architecture=arch(), expansion_factor=2, seeds=[3, 4]).named_saes())
    b = dict(SAEModule(d_model=D, architecture=arch(), expansion_factor=2, seeds=[3]).named_saes())
    torch.testing.assert_close(a["seed3"].W_dec_FD, b["seed3"].W_dec_FD, rtol=0, atol=0)
    assert not torch.equal(a["seed3"].W_dec_FD, a["seed4"].W_dec_FD)


def test_architecture_settings_defaults_and_description() -> None:
    Contrastive(TopK(), supcon_weight=0.0, separation_weight=0.0)  # plain base SAE, still valid
    bad = {
        (-1.0, 0.0, 0.1): r"model\.architecture\.supcon_weight must be >= 0, got -1\.0",
        (0.1, -1.0, 0.1): r"model\.architecture\.separation_weight must be >= 0, got -1\.0",
        (0.1, 0.0, 0.0): r"model\.architecture\.temperature must be > 0, got 0\.0",
    }
    for (supcon, separation, temperature), message in bad.items():
        with pytest.raises(ValueError, match=message):
            Contrastive(TopK(), supcon, separation, temperature)
    with pytest.raises(ValueError, match=r"model\.architecture\.base: a Contrastive SAE needs a TopK or L1"):
        Contrastive(Contrastive(TopK()))
    arch = Contrastive(L1())
    assert (arch.supcon_weight, arch.separation_weight, arch.temperature) == (0.1, 0.0, 0.1)
    assert arch.ambiguous_as_benign is True
    assert (L1().l1_coef, L1().init_decoder_norm) == (0.5, 0.1)
    topk = TopK()
    assert (topk.k, topk.aux_k, topk.aux_coef, topk.dead_after_steps) == (32, 256, 1.0 / 32.0, 1000)
    for k in (1, 2 * D):
        TopK(k=k).build(D, 2 * D, torch.Generator())  # both edges of [1, n_latents]
    assert arch.describe() == {
        "class": "Contrastive",
        "base": {"class": "L1", "l1_coef": 0.5, "init_decoder_norm": 0.1},
        "supcon_weight": 0.1,
        "separation_weight": 0.0,
        "temperature": 0.1,
        "ambiguous_as_benign": True,
    }
