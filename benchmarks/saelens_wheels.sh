#!/usr/bin/env bash
# Download SAELens 6.54.12 and the few packages it imports that the GPU image lacks, as wheels, into
# .device/whl_saelens (ignored), for benchmarks/sae_throughput.py on the GPU machine:
#   carry [".device/whl", ".device/whl_saelens"], then run there
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/whl/*.whl .device/whl_saelens/*.whl
#   mkdir -p /tmp/site/wandb && touch /tmp/site/wandb/__init__.py   # SAELens imports wandb; never used here
#   PYTHONPATH=/tmp/site:$PWD python3 benchmarks/sae_throughput.py --device cuda [--tf32]
# transformer-lens < 4 because sae-lens 6.54 pins it; xxhash as a CPython 3.12 manylinux wheel (the image's Python).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.device/whl_saelens
mkdir -p "$dest"
python -m pip download -q --no-deps -d "$dest" sae-lens==6.54.12 "transformer-lens<4" einops fancy-einsum \
    jaxtyping wadler-lindig beartype typeguard simple-parsing babe better-abc tenacity python-dotenv rich \
    pygments markdown-it-py mdurl pytest iniconfig pluggy
python -m pip download -q --no-deps -d "$dest" --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 xxhash
ls "$dest"
