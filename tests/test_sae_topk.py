"""TopK SAE: the sparse forward/backward equals a dense autograd reference, AuxK, constraints, export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from sae_refusal.sae import ReLUSAE, TopKSAE, load_sae, mean_norm_scale


def dense_reference_loss(sae: TopKSAE, x_BD: torch.Tensor, dead_F: torch.Tensor | None) -> torch.Tensor:
    """The same loss written the plain way: dense pre-activations, scatter, dense decoder."""
    x_BD = x_BD * sae.input_scale
    pre_BF = (x_BD - sae.b_dec_D) @ sae.W_enc_FD.T + sae.b_enc_F
    values, indices = pre_BF.topk(sae.k, dim=-1)
    z_BF = torch.zeros_like(pre_BF).scatter(1, indices, values.relu())
    recon_BD = z_BF @ sae.W_dec_FD + sae.b_dec_D
    loss = (recon_BD - x_BD).pow(2).sum(-1).mean()
    if dead_F is not None and dead_F.any():
        masked = pre_BF.masked_fill(~dead_F, float("-inf"))
        aux_v, aux_i = masked.topk(min(sae.aux_k, int(dead_F.sum())), dim=-1)
        aux_z = torch.zeros_like(pre_BF).scatter(1, aux_i, aux_v.relu())
        residual = (x_BD - recon_BD).detach()
        aux = (aux_z @ sae.W_dec_FD - residual).pow(2).sum() / residual.pow(2).sum()
        loss = loss + sae.aux_coef * aux
    return loss


def force_csr_decodes(monkeypatch: pytest.MonkeyPatch, kernel: str) -> None:
    """CUDA's CSR decode Functions on the CPU, their values' gradient from ``kernel`` (bag | sddmm)."""
    from sae_refusal.sae import topk as topk_module

    def decode(values: torch.Tensor, indices: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        with topk_module.values_grad_kernel(kernel):
            return topk_module._SparseDecode.apply(values.contiguous(), indices.contiguous(), W)

    def pair(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with topk_module.values_grad_kernel(kernel):
            return topk_module._SparseDecodePair.apply(*(a.contiguous() for a in args[:4]), args[4])

    monkeypatch.setattr(topk_module, "sparse_decode", decode)
    monkeypatch.setattr(topk_module, "sparse_decode_pair", pair)


@pytest.mark.parametrize("path", ["dispatch", "csr-bag", "csr-sddmm"])
@pytest.mark.parametrize("with_dead", [False, True], ids=["no-dead", "auxk"])
def test_sparse_path_matches_dense_reference(
    with_dead: bool, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loss and every gradient (AuxK included) of each decode path equal the dense reference's.

    ``csr-*``: the CUDA path (one CSR product for the k and AuxK decodes) forced on the CPU, the decodes'
    values gradient from ``embedding_bag``'s per-sample kernel or from the sampled product (SDDMM).
    """
    if path != "dispatch":
        force_csr_decodes(monkeypatch, path.removeprefix("csr-"))
    gen = torch.Generator().manual_seed(0)
    sae = TopKSAE(12, 48, k=5, aux_k=7, dead_after_steps=3, generator=gen)
    with torch.no_grad():  # move away from the symmetric init so every gradient is non-trivial
        for p in sae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    sae.set_input_scale(1.7)
    x = torch.randn(20, 12, generator=gen)
    dead_F = None
    if with_dead:
        sae.steps_since_fired_F[::3] = 3  # every third latent is dead
        dead_F = sae.dead_F
    x.requires_grad_(True)  # also the input gradient (attribution through the SAE)
    out = sae(x)
    assert ("aux" in out.parts) == with_dead
    grads = torch.autograd.grad(out.loss, [*sae.parameters(), x])
    ref_loss = dense_reference_loss(sae, x, dead_F)
    ref_grads = torch.autograd.grad(ref_loss, [*sae.parameters(), x])
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-5)
    names = [name for name, _ in sae.named_parameters()] + ["input"]
    for name, mine, theirs in zip(names, grads, ref_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")
    # without an input gradient, b_dec's gradient comes from the GEMV path
    x.requires_grad_(False)
    no_x = torch.autograd.grad(sae(x).loss, list(sae.parameters()))
    for name, mine, theirs in zip(names, no_x, ref_grads, strict=False):
        torch.testing.assert_close(
            mine, theirs, rtol=1e-4, atol=1e-5, msg=f"gradient of {name} (no input grad)"
        )


def test_forward_shapes_sparsity_and_raw_space_recon() -> None:
    sae = TopKSAE(16, 64, k=4, generator=torch.Generator().manual_seed(0))
    sae.set_input_scale(3.0)
    x = torch.randn(32, 16)
    out = sae(x, return_latents=True)
    assert out.latents_BF is not None and out.latents_BF.shape == (32, 64)
    assert ((out.latents_BF > 0).sum(-1) <= 4).all() and (out.latents_BF >= 0).all()
    assert out.l0 <= 4 and out.fired_F.sum() == (out.latents_BF > 0).any(0).sum()
    assert sae(x).latents_BF is None  # no dense (B, F) matrix unless asked
    torch.testing.assert_close(sae.decode(sae.encode(x)), out.recon_BD, rtol=1e-5, atol=1e-5)
    manual_fvu = (out.recon_BD - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    torch.testing.assert_close(out.fvu, manual_fvu, rtol=1e-5, atol=1e-6)  # scale-free


def test_parameters_stay_fp32_for_bf16_inputs() -> None:
    sae = TopKSAE(8, 16, 2)
    out = sae(torch.randn(4, 8, dtype=torch.bfloat16))
    assert out.recon_BD.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in sae.parameters())


def test_init_ties_encoder_to_decoder_and_unit_norm() -> None:
    sae = TopKSAE(8, 32, 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sae.W_enc_FD, sae.W_dec_FD)
    torch.testing.assert_close(sae.W_dec_FD.norm(dim=1), torch.ones(32))


def test_parallel_grad_removal_is_orthogonal_to_decoder_rows() -> None:
    sae = TopKSAE(8, 32, 4)
    sae(torch.randn(16, 8)).loss.backward()
    sae.remove_parallel_grads()
    assert sae.W_dec_FD.grad is not None
    assert (sae.W_dec_FD.grad * sae.W_dec_FD).sum(-1).abs().max() < 1e-5


def test_dead_latent_bookkeeping() -> None:
    sae = TopKSAE(4, 6, 2, dead_after_steps=2)
    fired = torch.tensor([True, False, False, True, False, False])
    sae.update_firing(fired)
    assert not sae.dead_F.any()
    sae.update_firing(torch.tensor([True, False, False, False, False, False]))
    assert sae.dead_F.tolist() == [False, True, True, False, True, True]
    sae.eval()
    assert "aux" not in sae(torch.randn(3, 4)).parts  # AuxK only while training


@pytest.mark.parametrize(
    "kwargs",
    [
        {"d_model": 0, "n_latents": 4, "k": 1},
        {"d_model": 4, "n_latents": 4, "k": 0},
        {"d_model": 4, "n_latents": 4, "k": 5},
        {"d_model": 4, "n_latents": 4, "k": 2, "aux_k": -1},
        {"d_model": 4, "n_latents": 4, "k": 2, "dead_after_steps": 0},
    ],
)
def test_invalid_settings_are_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        TopKSAE(**kwargs)


@pytest.mark.parametrize("cls", [TopKSAE, ReLUSAE])
def test_export_round_trip_keeps_scale_and_config(cls: type, tmp_path: Path) -> None:
    sae = cls(8, 16, 3) if cls is TopKSAE else cls(8, 16, l1_coef=0.5)
    sae.set_input_scale(2.5)
    sae.save(tmp_path / "sae", metadata={"seed": 3})
    sae.save(tmp_path / "sae")  # overwriting an export is fine
    loaded = load_sae(tmp_path / "sae")
    assert type(loaded) is cls and float(loaded.input_scale) == 2.5
    x = torch.randn(5, 8)
    torch.testing.assert_close(loaded(x).recon_BD, sae(x).recon_BD)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]
    assert json.loads((tmp_path / "sae" / "cfg.json").read_text())["architecture"] == cls.architecture
    with pytest.raises(FileNotFoundError, match=r"cfg\.json"):
        load_sae(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "cfg.json").write_text(json.dumps({"architecture": "gated"}))
    (tmp_path / "bad" / "sae.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown architecture 'gated'"):
        load_sae(tmp_path / "bad")


def test_mean_norm_scale() -> None:
    acts = torch.randn(100, 16) * 7.0
    scale = mean_norm_scale(acts)
    assert (acts * scale).norm(dim=1).mean().item() == pytest.approx(4.0, rel=1e-5)
    with pytest.raises(ValueError, match="mean row norm"):
        mean_norm_scale(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="non-empty"):
        mean_norm_scale(torch.zeros(0, 4))


def test_topk_training_reduces_fvu_on_sparse_data() -> None:
    gen = torch.Generator().manual_seed(0)
    dictionary = torch.randn(32, 16, generator=gen)
    codes = torch.rand(512, 32, generator=gen) * (torch.rand(512, 32, generator=gen) < 0.1)
    x = codes @ dictionary
    sae = TopKSAE(16, 64, 4, dead_after_steps=20, generator=gen)
    sae.set_input_scale(mean_norm_scale(x))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    first = sae(x).fvu.item()
    for _ in range(200):
        opt.zero_grad()
        out = sae(x)
        out.loss.backward()
        sae.remove_parallel_grads()
        opt.step()
        sae.normalize_decoder()
        sae.update_firing(out.fired_F)
    assert sae(x).fvu.item() < 0.5 * first


def test_relu_l1_penalty_is_decoder_norm_aware() -> None:
    gen = torch.Generator().manual_seed(0)
    sae = ReLUSAE(8, 24, l1_coef=2.0, generator=gen)
    x = torch.randn(16, 8, generator=gen)
    out = sae(x, return_latents=True)
    assert out.latents_BF is not None
    expected_l1 = (out.latents_BF * sae.W_dec_FD.norm(dim=1)).sum(-1).mean()
    torch.testing.assert_close(out.parts["l1"], expected_l1)
    torch.testing.assert_close(out.loss, out.mse + 2.0 * expected_l1)
    # rescaling a latent's encoder by c and its decoder row by 1/c leaves recon and penalty unchanged
    with torch.no_grad():
        sae.W_enc_DF[:, 0] *= 4.0
        sae.b_enc_F[0] *= 4.0
        sae.W_dec_FD[0] /= 4.0
    again = sae(x)
    torch.testing.assert_close(again.recon_BD, out.recon_BD, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again.parts["l1"], out.parts["l1"], rtol=1e-5, atol=1e-5)
    sae.remove_parallel_grads()  # no-op (free decoder norms)
    norms = sae.W_dec_FD.norm(dim=1).clone()
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec_FD.norm(dim=1), norms)


def test_relu_training_gets_sparser_with_larger_lambda() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 8, generator=gen) @ torch.randn(8, 8, generator=gen)
    l0 = {}
    for coef in (0.01, 1.0):
        sae = ReLUSAE(8, 32, l1_coef=coef, generator=torch.Generator().manual_seed(0))
        sae.set_input_scale(mean_norm_scale(x))
        opt = torch.optim.Adam(sae.parameters(), lr=5e-3)
        for _ in range(150):
            opt.zero_grad()
            sae(x).loss.backward()
            opt.step()
        l0[coef] = sae(x).l0.item()
    assert l0[1.0] < l0[0.01]


def test_values_grad_kernel_rejects_an_unknown_name_and_restores_the_previous() -> None:
    from sae_refusal.sae import topk as topk_module

    with pytest.raises(ValueError, match="values-gradient kernel must be one of"):
        topk_module.values_grad_kernel("dense").__enter__()
    before = topk_module._values_grad_kernel[0]
    with pytest.raises(RuntimeError), topk_module.values_grad_kernel("sddmm"):
        assert topk_module._values_grad_kernel[0] == "sddmm"
        raise RuntimeError
    assert topk_module._values_grad_kernel[0] == before


def test_sparse_decode_matches_dense() -> None:
    from sae_refusal.sae import sparse_decode

    W = torch.randn(10, 4)
    values, indices = torch.rand(3, 2), torch.tensor([[0, 9], [3, 3], [5, 1]])
    rows = torch.arange(3)[:, None].expand(3, 2)
    dense = torch.zeros(3, 10).index_put_((rows, indices), values, accumulate=True)
    torch.testing.assert_close(sparse_decode(values, indices, W), dense @ W)
    torch.testing.assert_close(F.embedding_bag(indices, W, per_sample_weights=values, mode="sum"), dense @ W)


@pytest.mark.parametrize("path", ["dispatch", "csr-bag", "csr-sddmm"])
def test_sparse_decode_gradients_match_dense_with_repeated_indices(path: str) -> None:
    """Every decoder path (CPU dispatch: embedding_bag; CUDA: the CSR Function, with either values-gradient
    kernel) sums repeated indices."""
    from sae_refusal.sae.topk import _SparseDecode, values_grad_kernel
    from sae_refusal.sae.topk import sparse_decode as dispatch

    def sparse_decode(v: torch.Tensor, i: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        if path == "dispatch":
            return dispatch(v, i, W)
        with values_grad_kernel(path.removeprefix("csr-")):  # the kernel of the decodes built here
            return _SparseDecode.apply(v, i, W)

    gen = torch.Generator().manual_seed(3)
    W = torch.randn(10, 4, generator=gen, requires_grad=True)
    values = torch.rand(3, 3, generator=gen, requires_grad=True)
    indices = torch.tensor([[0, 9, 0], [3, 3, 3], [5, 1, 7]])
    grad_out = torch.randn(3, 4, generator=gen)
    out = sparse_decode(values, indices, W)
    mine = torch.autograd.grad(out, [values, W], grad_out)
    rows = torch.arange(3)[:, None].expand(3, 3)
    dense = torch.zeros(3, 10).index_put((rows, indices), values, accumulate=True)
    torch.testing.assert_close(out, dense @ W)  # the forward value too (the CSR path builds its own rows)
    ref = torch.autograd.grad(dense @ W, [values, W], grad_out)
    for a, b in zip(mine, ref, strict=True):
        torch.testing.assert_close(a, b)
    with torch.no_grad():  # no autograd node when nothing needs a gradient
        assert sparse_decode(values, indices, W).grad_fn is None
    rows_only = torch.autograd.grad(sparse_decode(values.detach(), indices, W), W, grad_out)[0]
    torch.testing.assert_close(rows_only, ref[1])


def _negative_topk_sae(with_dead: bool) -> tuple[TopKSAE, torch.Tensor]:
    """A TopK SAE and inputs where about half of each row's top-k (and AuxK) pre-activations are negative."""
    gen = torch.Generator().manual_seed(5)
    sae = TopKSAE(12, 48, k=6, aux_k=6, dead_after_steps=3, generator=gen)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
        sae.b_enc_F.sub_(2.0)  # pushes most pre-activations below zero
    sae.set_input_scale(0.8)
    if with_dead:
        sae.steps_since_fired_F[1::2] = 3
    return sae, torch.randn(24, 12, generator=gen)


def _topk_preacts(sae: TopKSAE, x_BD: torch.Tensor, mask_F: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        pre_BF = (x_BD * sae.input_scale - sae.b_dec_D) @ sae.W_enc_FD.T + sae.b_enc_F
        if mask_F is not None:
            pre_BF = pre_BF.masked_fill(~mask_F, float("-inf"))
        return pre_BF.topk(sae.k, dim=-1).values


@pytest.mark.parametrize("with_dead", [False, True], ids=["no-dead", "auxk"])
def test_negative_topk_preactivations_give_zero_latents_and_zero_gradient(with_dead: bool) -> None:
    """The ReLU after TopK: a negative pre-activation among the top k is an inactive (zero) latent.

    Kills: the ``.relu()`` of the top-k (or AuxK) values removed, and the backward gate
    ``grad * (values > 0)`` removed or loosened (e.g. ``>= 0``), checked against dense autograd.
    """
    sae, x = _negative_topk_sae(with_dead)
    top_BK = _topk_preacts(sae, x)
    assert (top_BK < 0).float().mean() > 0.3 and (top_BK > 0).any()  # the case under test does occur
    if with_dead:
        aux_BK = _topk_preacts(sae, x, sae.dead_F)
        assert (aux_BK < 0).any() and (aux_BK > 0).any()

    latents = sae.encode(x)
    assert (latents >= 0).all()
    torch.testing.assert_close((latents > 0).sum(-1), (top_BK > 0).sum(-1))
    out = sae(x, return_latents=True)
    assert out.latents_BF is not None and (out.latents_BF >= 0).all()
    assert out.l0.item() == pytest.approx((top_BK > 0).sum(-1).float().mean().item())
    assert out.l0.item() < sae.k

    x.requires_grad_(True)
    out = sae(x)
    grads = torch.autograd.grad(out.loss, [*sae.parameters(), x])
    ref_loss = dense_reference_loss(sae, x, sae.dead_F if with_dead else None)
    ref_grads = torch.autograd.grad(ref_loss, [*sae.parameters(), x])
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-5)
    names = [name for name, _ in sae.named_parameters()] + ["input"]
    for name, mine, theirs in zip(names, grads, ref_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")


def test_all_negative_preactivations_reconstruct_the_decoder_bias() -> None:
    """Every pre-activation negative: no latent fires, the reconstruction is ``b_dec``, nothing is learned
    through the encoder (its gradient is exactly zero)."""
    sae = TopKSAE(6, 12, k=3, aux_k=0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc_F.fill_(-100.0)
        sae.b_dec_D.copy_(torch.arange(6.0))
    sae.set_input_scale(2.0)
    x = torch.randn(5, 6)
    out = sae(x, return_latents=True)
    assert out.latents_BF is not None and not out.latents_BF.any()
    assert out.l0.item() == 0.0 and not out.fired_F.any()
    torch.testing.assert_close(out.recon_BD, (torch.arange(6.0) / 2.0).expand(5, 6))
    out.loss.backward()
    assert sae.W_enc_FD.grad is not None and sae.b_enc_F.grad is not None
    assert not sae.W_enc_FD.grad.any() and not sae.b_enc_F.grad.any()
    assert sae.W_dec_FD.grad is not None and not sae.W_dec_FD.grad.any()


def test_decode_adds_the_decoder_bias_and_undoes_the_input_scale() -> None:
    sae = TopKSAE(6, 12, k=3, aux_k=0, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        sae.b_dec_D.copy_(torch.linspace(-1.0, 2.0, 6))
    sae.set_input_scale(1.5)
    x = torch.randn(5, 6)
    out = sae(x, return_latents=True)
    assert out.latents_BF is not None
    torch.testing.assert_close(sae.decode(out.latents_BF), out.recon_BD)
    torch.testing.assert_close(out.recon_BD, (out.latents_BF @ sae.W_dec_FD + sae.b_dec_D) / 1.5)


@pytest.mark.parametrize(("aux_k", "n_dead"), [(1, 5), (4, 1)], ids=["aux_k=1", "one-dead-latent"])
def test_auxk_with_a_single_auxiliary_latent(aux_k: int, n_dead: int) -> None:
    """One auxiliary latent (``aux_k = 1``, or one dead latent) is still an AuxK term, both directions."""
    gen = torch.Generator().manual_seed(6)
    sae = TopKSAE(8, 24, k=3, aux_k=aux_k, aux_coef=0.5, dead_after_steps=2, generator=gen)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    sae.steps_since_fired_F[:n_dead] = 2
    assert int(sae.dead_F.sum()) == n_dead
    x = torch.randn(10, 8, generator=gen)
    out = sae(x)
    assert "aux" in out.parts and out.parts["aux"].item() > 0
    ref = dense_reference_loss(sae, x, sae.dead_F)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    for (name, _), mine, theirs in zip(
        sae.named_parameters(),
        torch.autograd.grad(out.loss, list(sae.parameters())),
        torch.autograd.grad(ref, list(sae.parameters())),
        strict=True,
    ):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("frozen", ["W_enc_FD", "b_enc_F", "b_dec_D", "W_dec_FD"])
def test_gradients_with_one_parameter_frozen(frozen: str) -> None:
    """The custom backward fills each gradient on its own flag (attribution and partial fine-tuning freeze
    some parameters): with any one frozen, the others and the input still match the dense reference."""
    gen = torch.Generator().manual_seed(8)
    sae = TopKSAE(8, 24, k=4, aux_k=0, generator=gen)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    getattr(sae, frozen).requires_grad_(False)
    x = torch.randn(12, 8, generator=gen, requires_grad=True)
    wanted = [p for p in sae.parameters() if p.requires_grad] + [x]
    mine = torch.autograd.grad(sae(x).loss, wanted)
    theirs = torch.autograd.grad(dense_reference_loss(sae, x, None), wanted)
    for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=f"gradient {i} with {frozen} frozen")


def test_setting_edges_and_defaults() -> None:
    TopKSAE(4, 6, k=1)
    TopKSAE(4, 6, k=6)  # every latent active is allowed
    TopKSAE(4, 6, k=2, aux_k=0, aux_coef=0.0, dead_after_steps=1)
    with pytest.raises(ValueError, match=r"k must be in \[1, n_latents=6\], got 7"):
        TopKSAE(4, 6, k=7)
    with pytest.raises(ValueError, match="aux_k and aux_coef must be >= 0 and dead_after_steps >= 1"):
        TopKSAE(4, 6, k=2, aux_coef=-0.1)
    sae = TopKSAE(4, 6, k=2)
    assert sae.config() == {
        "d_model": 4,
        "n_latents": 6,
        "k": 2,
        "aux_k": 256,
        "aux_coef": 1.0 / 32.0,
        "dead_after_steps": 1000,
        "encoder_dtype": "float32",
    }
    assert sae.rank_mean is None
    assert "rank_mean" not in dict(sae.named_parameters()) | dict(sae.named_buffers())
    with pytest.raises(ValueError, match="encoder_dtype must be one of"):
        TopKSAE(4, 6, k=2, encoder_dtype="float16")
    assert sae.steps_since_fired_F.dtype == torch.long and not sae.steps_since_fired_F.any()


def test_auxk_term_of_a_one_row_batch_is_the_share_of_the_residual_energy() -> None:
    """A 1-row batch has no variance about its mean: the AuxK term must not divide by it (it gave ~1e11)."""
    gen = torch.Generator().manual_seed(3)
    sae = TopKSAE(8, 24, k=2, aux_k=4, dead_after_steps=1, generator=gen)
    sae.train()
    sae.update_firing(torch.zeros(24, dtype=torch.bool))
    sae.update_firing(torch.zeros(24, dtype=torch.bool))  # every latent dead
    x_1D = torch.randn(1, 8, generator=gen)
    out = sae(x_1D)
    aux = out.parts["aux"].item()
    expected = (dense_reference_loss(sae, x_1D, sae.dead_F) - out.mse) / sae.aux_coef
    assert aux == pytest.approx(expected.item(), rel=1e-4)
    assert 0.0 < aux < 1e3
    x_BD = x_1D.expand(5, 8).clone()
    assert sae(x_BD).parts["aux"].item() == pytest.approx(aux, rel=1e-5)  # the same row five times
