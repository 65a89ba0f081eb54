#!/usr/bin/env bash
# The fine-tuning job as run on the GPU machine (see ../shared/DEVICE.md), in one 10-minute call.
#
#   BUDGET=580 CONFIG=lightning_configs/finetune/smollm2_lora.yaml GRID_ID=1 \
#     bash benchmarks/gpu_finetune_job.sh "name: --overrides ..." ["name2: ..."]
#
# Expects: the SmolLM2 GGUF assembled at /tmp/m (three staging calls), .device/whl and .device/data carried,
# optionally runs/finetune_smollm2/base_answers.jsonl carried (saves ~2 minutes of generation).
# Does: installs the carried wheels, checks the GGUF hash, rewrites the config's data and model paths, then runs
# benchmarks/finetune_grid.sh, which generates (or reuses) the base answers once and gives each run max_time =
# what is left of BUDGET minus REPORT_MARGIN (the end-of-fit report + export; it took > 2 minutes with three
# runs finishing together).
# Returns in $OUT: log, base_answers.jsonl, and per run <name>_report.md (bar + contrast subsets) and
# <name>_artifact.tar (LoRA runs). Lessons: batch 32 x 3 runs ran out of memory on an H100; 2 runs at
# batch 16 fit with room to spare.
set -o pipefail
T0=$(date +%s)
CONFIG=${CONFIG:-lightning_configs/finetune/smollm2_lora.yaml}
GGUF=/tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf
python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 -m sae_refusal.cli "$@"\n' >/tmp/bin/sae-refusal
chmod +x /tmp/bin/sae-refusal && export PATH=/tmp/bin:$PATH
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $GGUF" | sha256sum -c - || exit 3
sed "s#\.\./shared/data#.device/data#; s#name_or_path: smollm2#name_or_path: $GGUF#" "$CONFIG" >/tmp/ft.yaml
export FINETUNE_EXTRA_ARGS="--model.llm.device cuda"
G=runs/grid${GRID_ID:-1}
DEADLINE=$((T0 + ${BUDGET:-580})) bash benchmarks/finetune_grid.sh /tmp/ft.yaml "$G" auto "$@"
cp runs/finetune_smollm2/base_answers.jsonl "$OUT/" 2>/dev/null
for d in "$G"/*/tensorboard/version_0; do
  n=$(basename "$(dirname "$(dirname "$d")")")
  cat "$d"/refusal_report/*/report.md >"$OUT/${n}_report.md" 2>/dev/null
  [ -f "$d/export/artifact/artifact.json" ] && tar cf "$OUT/${n}_artifact.tar" -C "$d/export" artifact
done
grep -h "stopped\|Error" "$G"/*.log | tail -20
echo "total $(($(date +%s) - T0)) s"
