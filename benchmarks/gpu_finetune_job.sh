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
# Returns in $OUT: log, base_answers.jsonl, and per run <name>.log, <name>_report.md (bar + contrast subsets)
# and <name>_artifact.tar (LoRA runs); the run files are copied every 15 s, so a call cut off still returns
# what was done (the export is written before the report).
# Lessons: batch 32 x 3 runs ran out of memory on an H100; 2 runs at batch 16 fit with room to spare; two
# runs of smollm2_lora_orbench.yaml with BUDGET=570 ran past the 10-minute call (report after max_time).
set -o pipefail
T0=$(date +%s)
CONFIG=${CONFIG:-lightning_configs/finetune/smollm2_lora.yaml}
GGUF=/tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf
python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 -m sae_refusal.cli "$@"\n' >/tmp/bin/sae-refusal
chmod +x /tmp/bin/sae-refusal && export PATH=/tmp/bin:$PATH
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $GGUF" | sha256sum -c - || exit 3
sed "s#\.\./shared/data#.device/data#; s#name_or_path: smollm2#name_or_path: $GGUF#" "$CONFIG" >/tmp/ft.yaml
export FINETUNE_EXTRA_ARGS="--model.llm.device cuda"
G=runs/grid${GRID_ID:-1}
save_results() {  # run logs, reports and artifacts into $OUT; repeated, so a call cut off still returns them
  cp "$G"/*.log "$OUT/" 2>/dev/null
  for d in "$G"/*/tensorboard/version_0; do
    n=$(basename "$(dirname "$(dirname "$d")")")
    cat "$d"/refusal_report/*/report.md >"$OUT/${n}_report.md" 2>/dev/null || rm -f "$OUT/${n}_report.md"
    [ -f "$d/export/artifact/artifact.json" ] && [ ! -f "$OUT/${n}_artifact.tar" ] &&
      tar cf "$OUT/${n}_artifact.tar" -C "$d/export" artifact
  done
}
(while sleep 15; do save_results; done) &
saver=$!
DEADLINE=$((T0 + ${BUDGET:-580})) bash benchmarks/finetune_grid.sh /tmp/ft.yaml "$G" auto "$@"
kill "$saver" 2>/dev/null
cp runs/finetune_smollm2/base_answers.jsonl "$OUT/" 2>/dev/null
save_results
grep -h "stopped\|Error\|RefusalReportCallback:" "$G"/*.log | tail -20
echo "total $(($(date +%s) - T0)) s"
