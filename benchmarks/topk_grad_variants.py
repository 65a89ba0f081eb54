"""Time the ways to form the TopK encoder's weight gradient ``S^T @ x`` (S sparse (B, F), k per row).

    python benchmarks/topk_grad_variants.py --device cuda [--tf32]

Each variant is checked against the first one, then timed (CUDA events, median of ``--reps``).
Also times the encoder pre-activation ``addmm(b_enc, x, W_enc.T)`` against ``mm`` + in-place bias add.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sae_refusal.sae.topk import rows_grad, sparse_decode


def timed(fn: Callable[[], torch.Tensor], reps: int, device: torch.device) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs (after two warm-ups)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            import time

            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--d-model", type=int, default=4096)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--tf32", action="store_true")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    B, D, F_, K = args.batch, args.d_model, args.d_model * args.expansion, args.k
    x_BD = torch.randn(B, D, device=device, generator=gen)
    W_FD = torch.randn(F_, D, device=device, generator=gen) / D**0.5
    b_F = torch.randn(F_, device=device, generator=gen)
    grad_BK = torch.randn(B, K, device=device, generator=gen)
    indices_BK = torch.randint(0, F_, (B, K), device=device, generator=gen)
    rows = torch.arange(B, device=device).repeat_interleave(K)

    def coo() -> torch.Tensor:
        S_FB = torch.sparse_coo_tensor(
            torch.stack([indices_BK.reshape(-1), rows]), grad_BK.reshape(-1), (F_, B), check_invariants=False
        )
        return torch.sparse.mm(S_FB, x_BD)

    def csr_rows_grad() -> torch.Tensor:  # what TopKSAE uses
        return rows_grad(indices_BK, grad_BK, x_BD, F_)

    def bag_backward() -> torch.Tensor:
        weight = torch.zeros(F_, D, device=device, requires_grad=True)
        out = F.embedding_bag(indices_BK, weight, per_sample_weights=grad_BK, mode="sum")
        (grad,) = torch.autograd.grad(out, weight, grad_outputs=x_BD)
        return grad

    variants = {
        "coo_spmm": coo,
        "csr_rows_grad (ours)": csr_rows_grad,
        "embedding_bag_backward": bag_backward,
    }
    ref = coo()
    print(f"B={B} D={D} F={F_} k={K} {device} tf32={args.tf32}")
    for name, fn in variants.items():
        out = fn()
        err = (out - ref).abs().max().item() / ref.abs().max().item()
        print(
            f"{name:24s} {timed(fn, args.reps, device):8.3f} ms  rel err {err:.2e}  "
            f"contiguous {out.is_contiguous()}"
        )
    # repeated indices within a row are summed (AuxK can pick a latent TopK picked too)
    rep_BK = indices_BK.clone()
    rep_BK[:, 1] = rep_BK[:, 0]
    dense_BF = torch.zeros(B, F_, device=device).scatter_add_(1, rep_BK, grad_BK)
    tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
    dense_ref = dense_BF.T @ x_BD  # full fp32 reference
    torch.backends.cuda.matmul.allow_tf32 = tf32
    err = (rows_grad(rep_BK, grad_BK, x_BD, F_) - dense_ref).abs().max().item()
    print(f"repeated indices: max abs error against the fp32 dense product {err:.2e}")

    # the decoder forward (and its backward) as embedding_bag vs the CSR SpMM that sparse_decode uses
    values_BK = grad_BK.abs()
    W_req = W_FD.clone().requires_grad_(True)
    v_req = values_BK.clone().requires_grad_(True)

    def bag_fwd() -> torch.Tensor:
        return F.embedding_bag(indices_BK, W_FD, per_sample_weights=values_BK, mode="sum")

    def csr_fwd() -> torch.Tensor:
        return sparse_decode(values_BK, indices_BK, W_FD)

    def bag_fwd_bwd() -> torch.Tensor:
        out = F.embedding_bag(indices_BK, W_req, per_sample_weights=v_req, mode="sum")
        return torch.autograd.grad(out, [v_req, W_req], x_BD)[0]

    def csr_fwd_bwd() -> torch.Tensor:
        return torch.autograd.grad(sparse_decode(v_req, indices_BK, W_req), [v_req, W_req], x_BD)[0]

    for name, fn in {
        "decode embedding_bag": bag_fwd,
        "decode csr (ours)": csr_fwd,
        "decode+bwd embedding_bag": bag_fwd_bwd,
        "decode+bwd csr (ours)": csr_fwd_bwd,
    }.items():
        print(f"{name:24s} {timed(fn, args.reps, device):8.3f} ms")
    rep_dense = torch.zeros(B, F_, device=device).scatter_add_(1, rep_BK, values_BK)
    torch.backends.cuda.matmul.allow_tf32 = False
    err = (sparse_decode(values_BK, rep_BK, W_FD) - rep_dense @ W_FD).abs().max().item()
    torch.backends.cuda.matmul.allow_tf32 = tf32
    print(f"decode with repeated indices: max abs error against the fp32 dense product {err:.2e}")

    def pre_addmm() -> torch.Tensor:
        return torch.addmm(b_F, x_BD, W_FD.T)

    def pre_mm_add() -> torch.Tensor:
        return torch.mm(x_BD, W_FD.T).add_(b_F)

    pre_ref = pre_addmm()
    for name, fn in {"addmm": pre_addmm, "mm_add_": pre_mm_add}.items():
        err = (fn() - pre_ref).abs().max().item()
        print(f"{name:24s} {timed(fn, args.reps, device):8.3f} ms  max abs err {err:.2e}")
    pre = pre_addmm()
    print(f"{'topk':24s} {timed(lambda: pre.topk(K, dim=-1, sorted=False)[0], args.reps, device):8.3f} ms")


if __name__ == "__main__":
    main()
