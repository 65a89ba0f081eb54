"""TopK SAE speed paths: bf16 encoder product, AuxK on shared pre-activations, the paired CSR decode, the
fused decoder-norm duties and the distributed AuxK normaliser hook (all checked on CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sae_refusal.sae import TopKSAE, load_sae
from sae_refusal.sae import topk as topk_module
from sae_refusal.sae.base import SparseAutoencoder
from sae_refusal.sae.topk import _SparseDecodePair, _TopKEncode


def _perturbed(sae: TopKSAE, gen: torch.Generator) -> TopKSAE:
    with torch.no_grad():  # away from the symmetric init so every gradient is non-trivial
        for p in sae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return sae


def bf16_reference_loss(sae: TopKSAE, x_BD: torch.Tensor, dead_F: torch.Tensor | None) -> torch.Tensor:
    """Dense formulation of the bf16 encoder: selection and values from the bfloat16 product, gradients
    through the float32 pre-activations (straight-through), float32 everything else."""
    x_BD = x_BD * sae.input_scale
    xc_BD = x_BD - sae.b_dec_D
    pre32_BF = xc_BD @ sae.W_enc_FD.T + sae.b_enc_F
    bf = torch.bfloat16
    pre16_BF = torch.addmm(sae.b_enc_F.detach().to(bf), xc_BD.detach().to(bf), sae.W_enc_FD.detach().to(bf).T)
    pre_BF = pre32_BF + (pre16_BF.float() - pre32_BF).detach()
    indices = pre16_BF.topk(sae.k, dim=-1).indices
    z_BF = torch.zeros_like(pre_BF).scatter(1, indices, pre_BF.gather(1, indices).relu())
    recon_BD = z_BF @ sae.W_dec_FD + sae.b_dec_D
    loss = (recon_BD - x_BD).pow(2).sum(-1).mean()
    if dead_F is not None and dead_F.any():
        aux_i = pre16_BF.masked_fill(~dead_F, float("-inf")).topk(min(sae.aux_k, int(dead_F.sum()))).indices
        aux_z = torch.zeros_like(pre_BF).scatter(1, aux_i, pre_BF.gather(1, aux_i).relu())
        residual = (x_BD - recon_BD).detach()
        loss = loss + sae.aux_coef * (aux_z @ sae.W_dec_FD - residual).pow(2).sum() / residual.pow(2).sum()
    return loss


@pytest.mark.parametrize("with_dead", [False, True], ids=["no-dead", "auxk"])
def test_bf16_encoder_matches_its_dense_reference(with_dead: bool) -> None:
    gen = torch.Generator().manual_seed(11)
    sae = _perturbed(
        TopKSAE(16, 64, k=6, aux_k=9, dead_after_steps=2, encoder_dtype="bfloat16", generator=gen), gen
    )
    sae.set_input_scale(1.3)
    x = torch.randn(24, 16, generator=gen)
    dead_F = None
    if with_dead:
        sae.steps_since_fired_F[1::2] = 2
        dead_F = sae.dead_F
    out = sae(x)
    assert ("aux" in out.parts) == with_dead
    ref = bf16_reference_loss(sae, x, dead_F)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)
    params = list(sae.parameters())
    for (name, p), mine, theirs in zip(
        sae.named_parameters(),
        torch.autograd.grad(out.loss, params),
        torch.autograd.grad(ref, params),
        strict=True,
    ):
        assert mine.dtype == torch.float32 and p.dtype == torch.float32
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")


def test_bf16_encoder_is_exported_and_close_to_fp32(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(12)
    sae = TopKSAE(32, 128, k=8, encoder_dtype="bfloat16", generator=gen)
    sae.save(tmp_path / "sae")
    assert json.loads((tmp_path / "sae" / "cfg.json").read_text())["encoder_dtype"] == "bfloat16"
    loaded = load_sae(tmp_path / "sae")
    assert isinstance(loaded, TopKSAE) and loaded.encoder_dtype == "bfloat16"
    x = torch.randn(64, 32, generator=gen)
    torch.testing.assert_close(loaded(x).recon_BD, sae(x).recon_BD)
    fp32 = TopKSAE(32, 128, k=8)
    fp32.load_state_dict(sae.state_dict())
    with torch.no_grad():
        assert abs(float(sae(x).fvu) - float(fp32(x).fvu)) < 0.02  # rounding of the pre-activations only
    values_BK, _ = sae.encode_sparse(x)
    assert values_BK.dtype == torch.float32


@pytest.mark.parametrize("encoder_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dead_every", [1, 2, 5], ids=["all-dead", "half-dead", "fifth-dead"])
def test_auxk_on_shared_preactivations_selects_the_masked_topk_set(
    encoder_dtype: torch.dtype, dead_every: int
) -> None:
    """The dead-column gather picks exactly the set the masked full-width top-k picks, indices mapped back."""
    gen = torch.Generator().manual_seed(13)
    x, b_dec = torch.randn(40, 24, generator=gen), 0.1 * torch.randn(24, generator=gen)
    W, b_enc = torch.randn(96, 24, generator=gen), 0.1 * torch.randn(96, generator=gen)
    dead_F = torch.zeros(96, dtype=torch.bool)
    dead_F[::dead_every] = True
    k, aux_k = 7, 11
    values, indices, aux_values, aux_indices = _TopKEncode.apply(
        x, b_dec, W, b_enc, k, aux_k, dead_F, encoder_dtype
    )
    xc = x - b_dec
    pre = torch.addmm(b_enc.to(encoder_dtype), xc.to(encoder_dtype), W.to(encoder_dtype).T)
    ref_v, ref_i = pre.topk(k)
    ref_av, ref_ai = pre.masked_fill(~dead_F, float("-inf")).topk(aux_k)
    # the same multiset of pre-activations, at dead latents, no latent twice (bf16 rounding makes ties, and
    # a tie may be broken either way); in float32 (no ties) exactly the same latents
    assert torch.equal(pre.gather(1, indices).sort(1).values, ref_v.sort(1).values)
    assert torch.equal(pre.gather(1, aux_indices).sort(1).values, ref_av.sort(1).values)
    assert bool(dead_F[aux_indices].all())
    assert all(len(set(row.tolist())) == aux_k for row in aux_indices)
    if encoder_dtype == torch.float32:
        assert torch.equal(indices.sort(1).values, ref_i.sort(1).values)
        assert torch.equal(aux_indices.sort(1).values, ref_ai.sort(1).values)
    torch.testing.assert_close(values.sort(1).values, ref_v.float().relu().sort(1).values)
    torch.testing.assert_close(aux_values.sort(1).values, ref_av.float().relu().sort(1).values)
    assert values.dtype == aux_values.dtype == torch.float32


@pytest.mark.parametrize("aux_grad", [True, False], ids=["both-grads", "aux-output-unused"])
def test_paired_csr_decode_matches_two_decodes(aux_grad: bool) -> None:
    gen = torch.Generator().manual_seed(14)
    W = torch.randn(10, 6, generator=gen, requires_grad=True)
    idx = torch.randint(0, 10, (5, 3), generator=gen)
    idx[0] = 4  # repeated rows within one input
    aux_idx = torch.randint(0, 10, (5, 4), generator=gen)
    vals = torch.randn(5, 3, generator=gen, requires_grad=True)
    aux_vals = torch.randn(5, 4, generator=gen, requires_grad=True)
    g, g_aux = torch.randn(5, 6, generator=gen), torch.randn(5, 6, generator=gen)
    out, aux_out = _SparseDecodePair.apply(vals, idx, aux_vals, aux_idx, W)
    ref = F.embedding_bag(idx, W, per_sample_weights=vals, mode="sum")
    ref_aux = F.embedding_bag(aux_idx, W, per_sample_weights=aux_vals, mode="sum")
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(aux_out, ref_aux)
    mine_loss = (out * g).sum() + ((aux_out * g_aux).sum() if aux_grad else 0.0)
    ref_loss = (ref * g).sum() + ((ref_aux * g_aux).sum() if aux_grad else 0.0)
    mine = torch.autograd.grad(mine_loss, [vals, aux_vals, W], allow_unused=True)
    theirs = torch.autograd.grad(ref_loss, [vals, aux_vals, W], allow_unused=True)
    for name, a, b in zip(["values", "aux values", "W"], mine, theirs, strict=True):
        if b is None:  # the aux values got no gradient in the reference: ours must be zero
            assert a is None or not a.any(), name
            continue
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_fused_decoder_duties_match_the_base_class(compiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """TopKSAE's decoder-norm duties (compiled on CUDA; forced here on CPU) equal the base class's."""
    if compiled:
        monkeypatch.setattr(topk_module, "_COMPILED", {})
        real = topk_module._fused

        def forced(name: str, eager, *tensors: torch.Tensor, force: bool = False) -> None:  # type: ignore[no-untyped-def]
            real(name, eager, *tensors, force=True)

        monkeypatch.setattr(topk_module, "_fused", forced)
    gen = torch.Generator().manual_seed(15)
    sae = TopKSAE(16, 40, k=4, generator=gen)
    reference = TopKSAE(16, 40, k=4)
    with torch.no_grad():
        sae.W_dec_FD.mul_(torch.rand(40, 1, generator=gen) + 0.5)
    reference.load_state_dict(sae.state_dict())
    grad = torch.randn(40, 16, generator=gen)
    sae.W_dec_FD.grad, reference.W_dec_FD.grad = grad.clone(), grad.clone()
    sae.remove_parallel_grads()
    SparseAutoencoder.remove_parallel_grads(reference)
    assert sae.W_dec_FD.grad is not None and reference.W_dec_FD.grad is not None
    torch.testing.assert_close(sae.W_dec_FD.grad, reference.W_dec_FD.grad, rtol=1e-5, atol=1e-6)
    assert not torch.equal(sae.W_dec_FD.grad, grad)
    sae.normalize_decoder()
    SparseAutoencoder.normalize_decoder(reference)
    torch.testing.assert_close(sae.W_dec_FD, reference.W_dec_FD, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sae.W_dec_FD.norm(dim=1), torch.ones(40))
    sae.W_dec_FD.grad = None
    sae.remove_parallel_grads()  # no gradient: nothing to do
    if compiled and topk_module._COMPILED.get("normalize_rows") is None:
        pytest.skip("torch.compile is unavailable on this machine: the eager fallback ran")


def test_fused_duties_fall_back_when_compilation_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fn, **kwargs):  # type: ignore[no-untyped-def]
        def run(*args: torch.Tensor) -> None:
            raise RuntimeError("no compiler here")

        return run

    monkeypatch.setattr(topk_module, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", broken)
    W = torch.randn(6, 4) * 3
    with pytest.warns(UserWarning, match="torch.compile of normalize_rows failed"):
        topk_module._fused("normalize_rows", topk_module._normalize_rows_, W, force=True)
    torch.testing.assert_close(W.norm(dim=1), torch.ones(6))
    assert topk_module._COMPILED["normalize_rows"] is None


def test_rank_mean_makes_averaged_half_batch_grads_the_full_batch_grad() -> None:
    """Two 'ranks' with half a batch each, the reducer returning the mean of both energies: the average of
    their AuxK gradients (what DDP does) equals the AuxK gradient of one process with the whole batch."""
    gen = torch.Generator().manual_seed(16)
    sae = _perturbed(TopKSAE(12, 48, k=4, aux_k=6, dead_after_steps=2, generator=gen), gen)
    sae.steps_since_fired_F[::2] = 2
    x = torch.randn(30, 12, generator=gen) * torch.linspace(0.5, 2.0, 30)[:, None]  # unequal halves
    params = list(sae.parameters())
    full = torch.autograd.grad(sae(x).parts["aux"], params)
    halves = [x[:12], x[12:]]  # uneven split on purpose: the sum, not the mean, is shared
    with torch.no_grad():
        energies = []
        for h in halves:
            recon = sae(h).recon_BD
            energies.append((sae.input_scale * (h - recon)).pow(2).sum())
    mean_energy = torch.stack(energies).mean()
    seen: list[torch.Tensor] = []

    def reducer(local: torch.Tensor) -> torch.Tensor:
        seen.append(local)
        return mean_energy

    sae.rank_mean = reducer
    grads = [torch.autograd.grad(sae(h).parts["aux"], params) for h in halves]
    assert len(seen) == 2 and all(not e.requires_grad for e in seen)
    torch.testing.assert_close(torch.stack(seen), torch.stack(energies), rtol=1e-5, atol=1e-6)
    for name, a, b, ref in zip([n for n, _ in sae.named_parameters()], *grads, full, strict=True):
        torch.testing.assert_close((a + b) / 2, ref, rtol=1e-4, atol=1e-6, msg=name)
    sae.rank_mean = None
    assert "rank_mean" not in sae.config()


def test_the_cli_architecture_passes_encoder_dtype_and_names_the_key_on_a_bad_value() -> None:
    from sae_refusal.sae.architectures import TopK

    sae = TopK(k=4, encoder_dtype="bfloat16").build(16, 64, torch.Generator().manual_seed(0))
    assert isinstance(sae, TopKSAE) and sae.encoder_dtype == "bfloat16"
    assert sae.config()["encoder_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match=r"model\.architecture\.encoder_dtype"):
        TopK(encoder_dtype="fp8")
