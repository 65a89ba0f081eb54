#!/usr/bin/env bash
# The steering study on the GPU machine (see ../shared/DEVICE.md): full validation / test splits, one run per
# split seed, then (COLUMN=<gate>) the eval column of one tuned gate for its next-token KL and reference
# perplexity on the same test split as seed 0.
#
#   SEEDS="0 1 2" bash benchmarks/gpu_steer_study.sh
#   SEEDS="" COLUMN=ensemble bash benchmarks/gpu_steer_study.sh   # after seed 0 ran on the same warm machine
#
# Expects: the SmolLM2 GGUF assembled at /tmp/m (three staging calls); carried: .device/whl, .device/data.
# Returns in $OUT: log, steer_seed<S>.tar.gz (metrics.json, report.md, pareto.png, gates/, vectors/), and for
# COLUMN the eval column's folder as eval_<COLUMN>.tar.gz. Each run: `sae-refusal steer --config
# lightning_configs/steer/refuse_smollm2.yaml --config lightning_configs/steer/full_sets.yaml --sets.seed S
# --sets.external_split.seed S` with the data root at .device/data and the model on cuda.
set -o pipefail
T0=$(date +%s)
GGUF=/tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf
python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $GGUF" | sha256sum -c - || exit 3
BASE=/tmp/steer_base.yaml
sed "s#\.\./shared/data#.device/data#g; s#name_or_path: smollm2#name_or_path: $GGUF#" \
  lightning_configs/steer/refuse_smollm2.yaml >$BASE
mkdir -p /tmp/runs
for s in $SEEDS; do
  echo "== seed $s ($(($(date +%s) - T0)) s)" | tee -a "$OUT/log"
  python3 -m sae_refusal.cli steer --config $BASE --config lightning_configs/steer/full_sets.yaml \
    --sets.seed "$s" --sets.external_split.seed "$s" --sets.manifest_root /tmp/runs/splits_$s \
    --llm.device cuda --out_dir /tmp/runs/steer_seed$s 2>&1 | grep -v "it/s\]$" |
    grep -v "Converting and de-quantizing\|Loading weights" | tee -a "$OUT/log" | tail -30
  tar czf "$OUT/steer_seed$s.tar.gz" --exclude=tensorboard --exclude=tables.safetensors -C /tmp/runs steer_seed$s
done
if [ -n "$COLUMN" ]; then
  EBASE=/tmp/eval_base.yaml
  sed "s#\.\./shared/data#.device/data#g; s#name_or_path: smollm2#name_or_path: $GGUF#; s#device: cpu#device: cuda#" \
    lightning_configs/eval/refuse_smollm2.yaml >$EBASE
  for c in $COLUMN; do
    echo "== eval column gate $c ($(($(date +%s) - T0)) s)" | tee -a "$OUT/log"
    python3 -m sae_refusal.cli eval --config $EBASE --config lightning_configs/eval/full_sets.yaml \
      --intervention.kind gate --intervention.name "gate $c" --intervention.gate /tmp/runs/steer_seed0/gates/$c \
      --capability.tasks '[next_token_kl, reference]' --capability.data_root .device/data \
      --sets.data_root .device/data --sets.manifest_root /tmp/runs/eval_splits --out_dir /tmp/runs/eval_$c 2>&1 |
      grep -v "it/s\]$" | grep -v "^\s*$" | grep -v "Converting and de-quantizing\|Loading weights" |
      tee -a "$OUT/log" | tail -25
    tar czf "$OUT/eval_$c.tar.gz" --exclude=tensorboard -C /tmp/runs "eval_$c"
  done
fi
echo "total $(($(date +%s) - T0)) s" | tee -a "$OUT/log"
