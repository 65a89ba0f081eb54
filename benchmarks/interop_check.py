"""An SAE from `sae-refusal fit`, exported by `sae-refusal export`, read by sparsify's and SAELens' loaders.

Compares on real cached activations (rows of an activation cache at the SAE's layer) the project's SAE with
sparsify's `SparseCoder.load_from_disk` and SAELens' `SAE.load_from_disk` of its exports: reconstruction
max |diff|, FVU of each, and the share of rows whose active latents agree exactly. Libraries that are not
importable are reported as skipped. Example (SAELens outside the venv, see benchmarks/saelens_wheels.sh):

    PYTHONPATH=/tmp/saelens_site python benchmarks/interop_check.py \
        --sae_dir runs/eval_sae21/tensorboard/version_0/sae/seed0 \
        --cache runs/activation_cache/ac7f4fefc035e591
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from sae_refusal.activations.cache import ActivationCache
from sae_refusal.cli import main as cli_main
from sae_refusal.sae.formats import sae_metadata
from sae_refusal.sae.loading import load_sae


def _fvu(x: torch.Tensor, recon: torch.Tensor) -> float:
    return float((recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def _compare(
    name: str, ours_z: torch.Tensor, ours_r: torch.Tensor, z: torch.Tensor, r: torch.Tensor, x: torch.Tensor
) -> dict[str, Any]:
    same = float(((ours_z != 0) == (z != 0)).all(dim=1).float().mean())
    row = {
        "library": name,
        "recon_max_abs_diff": float((r - ours_r).abs().max()),
        "recon_max_rel_diff": float((r - ours_r).norm(dim=1).max() / ours_r.norm(dim=1).mean()),
        "fvu_theirs": _fvu(x, r),
        "fvu_ours": _fvu(x, ours_r),
        "rows_with_identical_active_latents": same,
    }
    print(
        f"  {name:9s} recon max |diff| {row['recon_max_abs_diff']:.2e} "
        f"(relative {row['recon_max_rel_diff']:.1e}), "
        f"FVU {row['fvu_theirs']:.5f} vs ours {row['fvu_ours']:.5f}, identical active latents {same:.3f}"
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sae_dir", required=True, help="one SAE export folder (seed{n})")
    parser.add_argument("--cache", required=True, help="an activation cache folder holding the SAE's layer")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    sae = load_sae(args.sae_dir).eval()
    layer = int(sae_metadata(args.sae_dir)["layer"])
    x = ActivationCache.open(args.cache).load(layer).float()[: args.rows]
    with torch.no_grad():
        ours_z, ours_r = sae.encode(x), sae(x).recon_BD
    print(f"{args.sae_dir}: {sae.architecture}, {sae.n_latents} latents, layer {layer}; {len(x)} cached rows")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("sparsify", "saelens"):
            cli_main(["export", "--sae_dir", args.sae_dir, "--format", fmt, "--out", f"{tmp}/{fmt}"])
        seed = Path(args.sae_dir).name
        try:
            from sparsify.sparse_coder import SparseCoder

            coder = SparseCoder.load_from_disk(Path(tmp) / "sparsify" / seed / f"layers.{layer}")
            with torch.no_grad():
                acts, idx, _ = coder.encode(x)
                z = torch.zeros_like(ours_z).scatter(1, idx, acts)
                rows.append(_compare("sparsify", ours_z, ours_r, z, coder.decode(acts, idx), x))
        except ImportError as err:
            print(f"  sparsify  skipped: {err}")
        try:
            from sae_lens import SAE

            lens = SAE.load_from_disk(str(Path(tmp) / "saelens" / seed / f"blocks.{layer}.hook_resid_post"))
            with torch.no_grad():
                z = lens.encode(x)
                rows.append(_compare("saelens", ours_z, ours_r, z, lens.decode(z), x))
        except ImportError as err:
            print(f"  saelens   skipped: {err}")
    if args.json_out:
        Path(args.json_out).write_text(
            json.dumps({"sae_dir": args.sae_dir, "rows": len(x), "results": rows}, indent=2)
        )
        print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
