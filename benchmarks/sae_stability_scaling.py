"""Why cross-seed stability is low on the refusal-token model: stability against dictionary width and the
number of training rows (issue 26's decisive experiment).

Trains one SAE per (width, training rows, seed) on the activation cache of
``lightning_configs/experiments/sae_compare`` without Lightning (:func:`sae_refusal.sae.synthetic.fit_plain`:
Adam, the fit's decoder-norm duties, a fixed number of epochs over the rows it gets), then scores each group
of seeds with ``sae-refusal sae-eval``'s own :func:`sae_refusal.sae_eval.job.evaluate_saes` (test split):
test FVU, L0, dead share, head accuracy, latents matched across seeds at decoder cosine 0.7, and the share of
the heads' top-10 features shared between seeds. Only the train split trains and fits heads.

    python benchmarks/sae_stability_scaling.py --layer 21 --arch topk --widths 576,1152,2304,4608 \
        --row_fractions 0.25,0.5,1 --out runs/sae_stability_scaling.json [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sae_refusal.activations.datamodule import ActivationBatch
from sae_refusal.cli import activation_datamodule
from sae_refusal.sae.architectures import TopK
from sae_refusal.sae.base import SparseAutoencoder
from sae_refusal.sae.batchtopk import BatchTopK
from sae_refusal.sae.synthetic import fit_plain
from sae_refusal.sae_eval.config import SAEEvalConfig
from sae_refusal.sae_eval.job import evaluate_saes

CONFIGS = [
    *("--config", "lightning_configs/default.yaml"),
    *("--config", "lightning_configs/experiments/sae_compare/base.yaml"),
]


def subset(batch: ActivationBatch, fraction: float, seed: int) -> ActivationBatch:
    """A seeded draw of ``fraction`` of the rows of ``batch`` (all of them at 1)."""
    n = len(batch.acts_ND)
    keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: max(1, round(fraction * n))]
    keep = keep.sort().values
    return ActivationBatch(
        acts_ND=batch.acts_ND[keep],
        label_N=batch.label_N[keep],
        category_N=batch.category_N[keep],
        ids=[batch.ids[i] for i in keep.tolist()],
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layer", type=int, default=21)
    parser.add_argument("--arch", choices=("topk", "batchtopk"), default="topk")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--widths", default="576,1152,2304,4608")
    parser.add_argument("--row_fractions", default="1")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data_root", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    extra = ["--data.prompts.data_root", args.data_root] if args.data_root else []
    dm = activation_datamodule([*CONFIGS, *extra, "--data.layer", str(args.layer)])
    dm.setup("fit")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: list[dict[str, object]] = []
    for fraction in [float(f) for f in args.row_fractions.split(",")]:
        train = subset(dm.splits["train"], fraction, seed=0)
        splits = {**dm.splits, "train": train}
        acts = train.acts_ND.to(args.device)
        steps = args.epochs * -(-len(acts) // args.batch_size)
        for width in [int(w) for w in args.widths.split(",")]:
            t0 = time.perf_counter()
            saes: dict[str, SparseAutoencoder] = {}
            for seed in seeds:
                # the comparison configs' AuxK settings (lightning_configs/experiments/sae_compare)
                settings = {"k": args.k, "aux_k": 256, "dead_after_steps": 200}
                arch = TopK(**settings) if args.arch == "topk" else BatchTopK(**settings)
                sae = arch.build(acts.shape[1], width, torch.Generator().manual_seed(seed)).to(args.device)
                gen = torch.Generator().manual_seed(1000 + seed)
                fit_plain(sae, acts, steps=steps, batch_size=args.batch_size, generator=gen)
                saes[f"seed{seed}"] = sae.cpu()
            report = evaluate_saes(splits, saes, SAEEvalConfig(), verbose=False)
            s = report["summary"]
            row = {
                "layer": args.layer,
                "arch": args.arch,
                "width": width,
                "train_rows": len(acts),
                "steps": steps,
                "test_fvu": s["fvu"]["mean"],
                "test_l0": s["l0"]["mean"],
                "dead_share": s["dead_share"]["mean"],
                "head_accuracy": s["head_accuracy"]["mean"],
                "matched_share@0.7": s.get("stability/matched_share@0.7"),
                "head_shared@0.7": s.get("stability/head_shared@0.7"),
                "head_shared@0.5": s.get("stability/head_shared@0.5"),
                "head_matched@0.7": s.get("stability/head_matched@0.7"),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
