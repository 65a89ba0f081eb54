#!/usr/bin/env bash
# The performance benchmarks of issue 15 on the GPU machine, one call (see ../shared/DEVICE.md):
#   carry [".device/whl", ".device/data", ".device/tok", ".device/whl_sparsify"], then
#   PARTS="extract sae generate" bash benchmarks/gpu_performance.sh       (nvidia-h200)
#   PARTS="ddp" bash benchmarks/gpu_performance.sh                        (nvidia-h200-x2)
#   PARTS="stacked aux_profile auxk stacked_profile" / "compile_cache decode_profile extract_sweep" ... (issue 27;
#   the last three need .device/data and .device/tok)
# .device/tok holds SmolLM2's tokenizer (the real prompt sets go through its chat template):
#   python -c "from sae_refusal.llm import LLMConfig; from sae_refusal.llm.loading import load_tokenizer; \
#              load_tokenizer(LLMConfig(name_or_path='smollm2')).save_pretrained('.device/tok')"
# .device/whl_sparsify: bash benchmarks/sparsify_wheels.sh. Every part writes JSON (and logs) to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/whl/*.whl >/dev/null 2>&1
if [ -d .device/whl_sparsify ]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/whl_sparsify/*.whl >/dev/null 2>&1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv | tee "$OUT/gpu.txt"
for part in ${PARTS:-extract sae generate}; do
    echo "=== $part $(date +%T)"
    case $part in
    extract)
        python3 benchmarks/bench_early_exit.py --model llama3-8b-shape --layers 8 --n-prompts 512 --batch-size 64 \
            --token-budget 16384 --compile --profile "$OUT/extract_profile_synthetic.txt" \
            --json-out "$OUT/extract_synthetic.json"
        python3 benchmarks/bench_early_exit.py --model llama3-8b-shape --layers 8 --prompts real \
            --data-root .device/data --tokenizer .device/tok --n-prompts 2048 --batch-size 64 \
            --token-budget 16384 --compile --json-out "$OUT/extract_real.json" ;;
    sae)
        python3 benchmarks/sae_throughput.py --device cuda --tf32 --no-saelens --n-latents 65536,131072 \
            --dead-fraction 0,0.5 --bf16 --sparsify --seeds 3 --steps 10 --warmup 3 --out "$OUT/sae_scale.json"
        python3 benchmarks/profile_topk_step.py --device cuda --tf32 --encoder-dtype bfloat16 --dead-fraction 0.5 \
            --rows 30 --json "$OUT/sae_profile_bf16_dead.json"
        python3 benchmarks/sae_throughput.py --device cuda --tf32 --no-saelens --quality --quality-steps 300 \
            --bf16 --sparsify --out "$OUT/sae_quality.json" ;;
    generate)
        python3 benchmarks/steered_generation.py ${GENERATE_ARGS:---model llama3-8b-shape --device cuda} \
            --json-out "$OUT/generation.json" ;;
    ddp)
        python3 benchmarks/ddp_scaling.py --out "$OUT/ddp.json" ;;
    extract_sweep)  # the real mix at three token budgets (4,096 / 8,192 / 16,384) (padding vs pass size), with a kernel profile each
        for budget in ${BUDGETS:-4096 8192 16384}; do
            python3 benchmarks/bench_early_exit.py --model llama3-8b-shape --layers 8 --prompts real \
                --data-root .device/data --tokenizer .device/tok --n-prompts 2048 --batch-size 64 \
                --token-budget "$budget" --budget-rows 1024 --pack-length 256 --repeats 2 \
                --profile "$OUT/extract_profile_real_$budget.txt" --json-out "$OUT/extract_real_$budget.json"
        done ;;
    stacked)  # three seeds stacked into one set of GEMMs vs one alone and three side by side
        python3 benchmarks/stacked_seeds.py --device cuda --tf32 --n_latents 65536 --dead_fraction 0.5 \
            --out "$OUT/stacked_65k_dead.json"
        python3 benchmarks/stacked_seeds.py --device cuda --tf32 --n_latents 65536 --dead_fraction 0 \
            --out "$OUT/stacked_65k.json"
        python3 benchmarks/stacked_seeds.py --device cuda --tf32 --n_latents 65536 --dead_fraction 0 \
            --encoder_dtype bfloat16 --out "$OUT/stacked_65k_bf16.json" ;;
    compile_cache)  # the compiled fast step: compile paid in a first process, reused by a second
        python3 benchmarks/compile_cache_reuse.py --device cuda --batch 32 --json "$OUT/compile_cache.json" ;;
    decode_profile)  # the fast generator's decode step (graph-free launches of the same kernels)
        python3 benchmarks/profile_decode_step.py --device cuda --batch 32 --json "$OUT/decode_profile.json" ;;
    auxk)  # AuxK's step overhead with half the latents dead, per values-gradient kernel, 65k and 131k latents
        python3 benchmarks/auxk_overhead.py --device cuda --tf32 --n_latents 65536,131072 --dead_fraction 0.5 \
            --profile --out "$OUT/auxk_overhead.json" ;;
    stacked_profile)  # where the three stacked seeds' step goes (no dead latents)
        python3 benchmarks/stacked_seeds.py --device cuda --tf32 --n_latents 65536 --dead_fraction 0 --profile \
            --out "$OUT/stacked_65k_profile.json" ;;
    aux_profile)  # the TopK step with half the latents dead (AuxK every step), fp32 encoder with TF32
        python3 benchmarks/profile_topk_step.py --device cuda --tf32 --dead-fraction 0.5 --rows 25 \
            --json "$OUT/aux_profile_tf32_dead.json"
        python3 benchmarks/profile_topk_step.py --device cuda --tf32 --dead-fraction 0 --rows 25 \
            --json "$OUT/aux_profile_tf32_nodead.json" ;;
    esac
done 2>&1 | tee "$OUT/log.txt"
