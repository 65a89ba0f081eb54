#!/usr/bin/env bash
# Download EleutherAI sparsify (eai-sparsify 1.3.3) and the pure-Python packages its `import sparsify` needs that
# the GPU image lacks, as wheels, into .device/whl_sparsify (ignored), for benchmarks/sae_throughput.py --sparsify
# on the GPU machine (the image has torch, transformers, safetensors, accelerate, numpy, huggingface-hub, tqdm):
#   carry [".device/whl_sparsify"], then run there
#   python3 -m pip install -q --no-index --no-deps --target /tmp/sp .device/whl_sparsify/*.whl
#   PYTHONPATH=/tmp/sp:$PWD python3 benchmarks/sae_throughput.py --device cuda --tf32 --sparsify ...
# SparseCoder needs einops, natsort, simple-parsing (+ docstring-parser); its default optimiser schedulefree.
# `import sparsify` would also import its trainer (datasets -> pandas, pyarrow): the benchmark falls back to
# loading sparsify's modules without that __init__ (import_sparsify), so datasets is not needed.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.device/whl_sparsify
mkdir -p "$dest"
python -m pip download -q --no-deps -d "$dest" eai-sparsify==1.3.3 einops natsort schedulefree simple-parsing \
    docstring-parser
ls "$dest"
