#!/usr/bin/env bash
# Issue 26's comparison: 6 SAE architectures x layers 12 and 21 of the refusal-token SmolLM2, 3 seeds each
# (lightning_configs/experiments/sae_compare/), then `sae-refusal sae-eval` of every fit and the table
# (benchmarks/sae_compare_table.py). Run from the repository root; the activation cache is computed by the
# first fit (or reused: `sae-refusal cache` with base.yaml fills it for both layers).
#   bash benchmarks/sae_compare.sh                  # everything, into runs/sae_compare
#   ARCHS="topk l1" LAYERS=21 bash benchmarks/sae_compare.sh
#   EXTRA="--trainer.accelerator gpu" bash benchmarks/sae_compare.sh   # fit options (sae-eval reads the fit's config)
set -euo pipefail
E=lightning_configs/experiments/sae_compare
ROOT=${ROOT:-runs/sae_compare}
ARCHS=${ARCHS:-topk batchtopk matryoshka jumprelu l1 contrastive}
LAYERS=${LAYERS:-21 12}
read -r -a extra <<<"${EXTRA:-}"
for layer in $LAYERS; do
  for arch in $ARCHS; do
    out=$ROOT/layer$layer/$arch
    if [[ -f $out/sae_eval/report.json ]]; then
      echo "== layer $layer $arch: done ($out/sae_eval/report.json)"
      continue
    fi
    echo "== layer $layer $arch: fit"
    rm -rf "$out"
    start=$SECONDS
    sae-refusal fit --config lightning_configs/default.yaml --config $E/base.yaml --config "$E/layer$layer.yaml" \
      --config "$E/$arch.yaml" --trainer.default_root_dir "$out" --trainer.logger.init_args.save_dir "$out" \
      "${extra[@]}"
    echo "$((SECONDS - start))" >"$out/fit_seconds.txt"
    v=$out/tensorboard/version_0
    echo "== layer $layer $arch: sae-eval"
    sae-refusal sae-eval --config "$v/config.yaml" --sae_dir "$v/sae" --out "$out/sae_eval"
  done
done
python benchmarks/sae_compare_table.py --root "$ROOT" --out docs/figures/sae_compare.png
