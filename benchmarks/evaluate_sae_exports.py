"""Score exported SAEs (``<log_dir>/sae/seed{n}``) without Lightning: FVU, L0, dead latents, splice metrics.

Reads the activation cache of a fit config's data section (the same prompts, split and layer as the fit),
loads every seed's export with :func:`sae_refusal.sae.load_sae`, and prints per seed: held-out (test split)
FVU and L0, per-class FVU, the share of latents that never fire on the training split, and the splice
metrics at the last prompt position on the first ``--n-prompts`` test prompts, and the two quantities the
contrastive terms train (SupCon loss, cosine of the mean harmful and benign codes) on the test split.
Optionally writes the training split's activations to ``--dump-train`` (for ``benchmarks/sae_throughput.py
--quality --acts``).

    python benchmarks/evaluate_sae_exports.py --config lightning_configs/default.yaml \\
        --data lightning_configs/data/coconot_alpaca.yaml --layer 12 \\
        --exports runs/sae_real/topk/tensorboard/version_0/sae --out runs/sae_real/topk_eval.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from sae_refusal.cli import activation_datamodule
from sae_refusal.llm import load_model_and_tokenizer
from sae_refusal.sae import load_sae
from sae_refusal.sae.contrastive import batch_classes, mean_separation, supcon_loss
from sae_refusal.sae.module import EVAL_CLASS_NAMES, class_names_of_batch
from sae_refusal.sae.splice import splice_metrics


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--data", default=None)
    parser.add_argument("--layer", type=int, required=True)
    parser.add_argument("--exports", required=True, help="folder holding seed*/cfg.json")
    parser.add_argument("--n-prompts", type=int, default=64)
    parser.add_argument("--dump-train", default=None, help="write the training activations here (.pt)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    fit_args = [
        "--config",
        args.config,
        *(["--data", args.data] if args.data else []),
        "--data.layer",
        str(args.layer),
    ]
    dm = activation_datamodule(fit_args)  # the data section exactly as `sae-refusal fit` reads it
    dm.setup()
    train, test = dm.splits["train"], dm.splits["test"]
    if args.dump_train:
        torch.save(train.acts_ND.clone(), args.dump_train)
    model, tokenizer = load_model_and_tokenizer(dm.llm)
    texts = dm.load_prompts().split("test").texts[: args.n_prompts]
    classes_N = class_names_of_batch(test.label_N, test.category_N)
    rows: dict[str, Any] = {}
    for folder in sorted(Path(args.exports).glob("seed*")):
        sae = load_sae(folder)
        out = sae(test.acts_ND)
        x = test.acts_ND.float()
        err_N = (out.recon_BD - x).pow(2).sum(-1)
        mean_D = train.acts_ND.float().mean(0)
        per_class = {}
        for i, name in enumerate(EVAL_CLASS_NAMES):
            keep = classes_N == i
            if keep.any():
                per_class[name] = float(err_N[keep].sum() / (x[keep] - mean_D).pow(2).sum())
        fired_F = sae(train.acts_ND).fired_F
        codes_NF = sae.encode(test.acts_ND)
        supervised = batch_classes(test.label_N, test.category_N)
        splice = splice_metrics(model, tokenizer, texts, args.layer, sae, positions="last")
        rows[folder.name] = {
            "architecture": sae.architecture,
            "test_fvu": float(out.fvu),
            "test_l0": float(out.l0),
            "never_fired_on_train": float(1.0 - fired_F.float().mean()),
            "fvu_per_class": per_class,
            # what the contrastive terms act on, for any architecture (lower = classes more apart)
            "test_supcon": float(supcon_loss(codes_NF, supervised, 0.1)),
            "test_mean_code_cosine_harmful_benign": float(mean_separation(codes_NF, supervised)),
            "splice_last": splice.to_dict(),
        }
        print(f"{folder.name}: {json.dumps(rows[folder.name])}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
