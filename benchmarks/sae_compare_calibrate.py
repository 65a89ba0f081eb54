"""Sparsity calibration for issue 26's architecture comparison: which L1 / JumpReLU coefficient gives a
validation L0 near the TopK family's k (32) at each layer of lightning_configs/experiments/sae_compare.

Trains one seed per coefficient without Lightning (:func:`sae_refusal.sae.synthetic.fit_plain`, Adam, the
fit's steps: 30 epochs of the train split at batch 64), on the activation cache the comparison's fit config
describes, and prints train-split-trained / validation-scored L0 and FVU. Each SAE starts as in a fit
(:func:`sae_refusal.sae.base.start_from_data`: decoder bias at the data mean, JumpReLU encoder biases from
``--jr_init_l0``). Only the validation split is read for the choice; the test split is not touched.

    python benchmarks/sae_compare_calibrate.py --device cuda \
        --l1 0.5,1,2,4,8 --jumprelu 0.5,1,2,4,8 --layers 12,21 [--data_root .device/data]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sae_refusal.cli import activation_datamodule
from sae_refusal.sae.architectures import L1
from sae_refusal.sae.base import start_from_data
from sae_refusal.sae.jumprelu_train import JumpReLU
from sae_refusal.sae.synthetic import fit_plain

CONFIGS = [
    "--config",
    "lightning_configs/default.yaml",
    "--config",
    "lightning_configs/experiments/sae_compare/base.yaml",
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", default="12,21")
    parser.add_argument("--l1", default="0.5,1,2,4,8", help="L1 coefficients, comma separated ('' = none)")
    parser.add_argument("--jumprelu", default="0.5,1,2,4,8", help="JumpReLU l0_coef values ('' = none)")
    parser.add_argument("--jr_init_threshold", type=float, default=0.1, help="JumpReLU init_threshold")
    parser.add_argument("--jr_bandwidth", type=float, default=0.05, help="JumpReLU bandwidth")
    parser.add_argument("--jr_sparsity_loss", default="step", help="JumpReLU sparsity_loss: step | tanh")
    parser.add_argument(
        "--jr_init_l0", type=float, default=32.0, help="JumpReLU init_l0 (<= 0: none, biases start at 0)"
    )
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--data_root", default=None)
    parser.add_argument("--out", default=None, help="JSON file for the table")
    args = parser.parse_args()
    extra = ["--data.prompts.data_root", args.data_root] if args.data_root else []
    rows: list[dict[str, object]] = []
    for layer in [int(v) for v in args.layers.split(",")]:
        dm = activation_datamodule([*CONFIGS, *extra, "--data.layer", str(layer)])
        dm.setup("fit")
        train = dm.splits["train"].acts_ND.to(args.device)
        val = dm.splits["val"].acts_ND.to(args.device)
        steps = args.epochs * -(-train.shape[0] // args.batch_size)
        d = train.shape[1]
        grid = [("l1", float(c)) for c in args.l1.split(",") if c] + [
            ("jumprelu", float(c)) for c in args.jumprelu.split(",") if c
        ]
        for arch_name, coef in grid:
            gen = torch.Generator().manual_seed(0)
            arch = (
                L1(l1_coef=coef, init_decoder_norm=0.1)
                if arch_name == "l1"
                else JumpReLU(
                    l0_coef=coef,
                    bandwidth=args.jr_bandwidth,
                    init_threshold=args.jr_init_threshold,
                    init_decoder_norm=0.1,
                    init_l0=args.jr_init_l0 if args.jr_init_l0 > 0 else None,
                    sparsity_loss=args.jr_sparsity_loss,
                )
            )
            sae = arch.build(d, args.expansion * d, gen).to(args.device)
            start_from_data(sae, train)
            t0 = time.perf_counter()
            fit_plain(
                sae,
                train,
                steps=steps,
                batch_size=args.batch_size,
                generator=torch.Generator().manual_seed(1),
            )
            with torch.no_grad():
                out = sae(val)
                z = sae.encode(val)
            row = {
                "layer": layer,
                "arch": arch_name,
                "coef": coef,
                "init_threshold": args.jr_init_threshold if arch_name == "jumprelu" else None,
                "bandwidth": args.jr_bandwidth if arch_name == "jumprelu" else None,
                "init_l0": args.jr_init_l0 if arch_name == "jumprelu" else None,
                "sparsity_loss": args.jr_sparsity_loss if arch_name == "jumprelu" else None,
                "val_l0": float((z != 0).sum(-1).float().mean()),
                "val_fvu": float(out.fvu),
                "steps": steps,
                "seconds": round(time.perf_counter() - t0, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
