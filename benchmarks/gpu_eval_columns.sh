#!/usr/bin/env bash
# The eval table's columns on the GPU machine (see ../shared/DEVICE.md), full held-out sets, in one call.
#
#   MODEL=refuse COLUMNS="unsteered caa sas ..." bash benchmarks/gpu_eval_columns.sh
#   MODEL=base   COLUMNS="unsteered caa ..."     bash benchmarks/gpu_eval_columns.sh
#
# Expects: the SmolLM2 GGUF assembled at /tmp/m (three staging calls); carried: .device/whl, .device/data,
# runs/steer/refuse_smollm2/{vectors,gates} (sae-refusal steer) and the SAS vectors folder of
# lightning_configs/eval/columns/sas.yaml (sae-refusal fit ... sae_layer21.yaml).
# Does: installs the carried wheels, checks the GGUF hash, runs
#   sae-refusal eval --config lightning_configs/eval/refuse_smollm2.yaml --config columns/<c>.yaml
#                    --config lightning_configs/eval/full_sets.yaml
# per column with the data root at .device/data and the model on cuda; MODEL=base evaluates the base SmolLM2
# (no adapter, phrase judge, artifacts of the refusal-token model applied with allow_other_model).
# Returns in $OUT: log and eval_<MODEL>.tar.gz (each column's folder without tensorboard/), refreshed after
# every column so a call cut off still returns the finished ones.
set -o pipefail
T0=$(date +%s)
GGUF=/tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf
MODEL=${MODEL:-refuse}
python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $GGUF" | sha256sum -c - || exit 3
BASE=/tmp/eval_base.yaml
sed "s#\.\./shared/data#.device/data#; s#name_or_path: smollm2#name_or_path: $GGUF#; s#device: cpu#device: cuda#" \
  lightning_configs/eval/refuse_smollm2.yaml >$BASE
EXTRA=()
if [ "$MODEL" = base ]; then
  EXTRA=(--llm.adapter_path null --judges.names '[phrase]' --intervention.allow_other_model true)
fi
ROOT=runs/eval/full_$MODEL
mkdir -p "$ROOT"
for c in $COLUMNS; do
  echo "== column $c ($(($(date +%s) - T0)) s)"
  python3 -m sae_refusal.cli eval --config $BASE --config lightning_configs/eval/columns/$c.yaml \
    --config lightning_configs/eval/full_sets.yaml --capability.data_root .device/data \
    --sets.data_root .device/data "${EXTRA[@]}" --out_dir "$ROOT/$c" 2>&1 | grep -v "it/s\]$" | grep -v "^\s*$" |
    grep -v "Converting and de-quantizing\|Loading weights" | tee -a "$OUT/log" | grep "^\[eval\]\|^  [a-zA-Z]" | tail -25
  tar czf "$OUT/eval_$MODEL.tar.gz" --exclude=tensorboard -C runs/eval "full_$MODEL"
done
python3 -m sae_refusal.cli eval-table "$ROOT"/* --out "$ROOT/table.md" | tee "$OUT/table_$MODEL.md"
tar czf "$OUT/eval_$MODEL.tar.gz" --exclude=tensorboard -C runs/eval "full_$MODEL"
echo "total $(($(date +%s) - T0)) s"
