#!/usr/bin/env bash
# The transfer jobs (issue 16) on the GPU machine, base SmolLM2 <-> refusal-token SmolLM2, both directions.
# See ../shared/DEVICE.md for the staging (a call carries at most 64 MiB with the working tree). Five calls, back
# to back on one warm machine:
#   1. carry [.device/model/smollm2.gguf.part.aa]                                          STAGE=1
#   2. carry [.device/model/smollm2.gguf.part.ab]                                          STAGE=2
#   3. carry [.device/model/smollm2.gguf.part.ac, runs/eval_sae21_base/tensorboard/version_0/sae]   STAGE=3
#   4. carry [.device/whl, .device/data, runs/eval_sae21/tensorboard/version_0/sae, runs/steer/refuse_smollm2/gates]
#      STAGE=4 DIRECTIONS=refuse_to_base
#   5. carry [.device/whl, .device/data, runs/steer/refuse_smollm2/gates]  STAGE=5 DIRECTIONS=base_to_refuse
# each as `STAGE=n [DIRECTIONS=...] bash benchmarks/gpu_transfer.sh`.
# The SAEs (sae-refusal fit ... eval/sae_layer21.yaml [+ transfer/sae_layer21_base.yaml]) and the gates
# (sae-refusal steer --config lightning_configs/steer/refuse_smollm2.yaml) are made on this machine and carried.
# Each job runs `sae-refusal transfer --config lightning_configs/transfer/<direction>.yaml` with the data root at
# .device/data and the staged GGUF; $OUT gets the log and transfer_<direction>.tar.gz (the whole job folder).
set -o pipefail
T0=$(date +%s)
ART=/tmp/art
GGUF=/tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p /tmp/m "$ART"
keep() {  # copy a carried folder to /tmp (survives while the machine is warm) or restore it from there
  if [ -d "$1" ]; then mkdir -p "$ART/$(dirname "$1")" && rm -rf "$ART/$1" && cp -r "$1" "$ART/$1"
  else mkdir -p "$(dirname "$1")" && cp -r "$ART/$1" "$1"; fi
}
case ${STAGE:-4} in
1) cp .device/model/smollm2.gguf.part.aa /tmp/m/; ls -la /tmp/m; exit ;;
2) cp .device/model/smollm2.gguf.part.ab /tmp/m/; ls -la /tmp/m; exit ;;
3) cp .device/model/smollm2.gguf.part.ac /tmp/m/ && keep runs/eval_sae21_base/tensorboard/version_0/sae
   cat /tmp/m/smollm2.gguf.part.* >"$GGUF"; ls -la /tmp/m; exit ;;
esac
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $GGUF" | sha256sum -c - || exit 3
keep runs/eval_sae21_base/tensorboard/version_0/sae
keep runs/eval_sae21/tensorboard/version_0/sae
python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
for direction in ${DIRECTIONS:-refuse_to_base base_to_refuse}; do
  echo "== $direction ($(($(date +%s) - T0)) s)"
  CONFIG=/tmp/transfer_$direction.yaml
  sed "s#\.\./shared/data#.device/data#; s#name_or_path: smollm2#name_or_path: $GGUF#" \
    lightning_configs/transfer/$direction.yaml >"$CONFIG"
  NAME=$direction${SUFFIX:-}
  rm -rf runs/transfer/$NAME
  # EXTRA_ARGS: more flags, e.g. a map variant (SUFFIX=_map EXTRA_ARGS="--map.kind least_squares --eval.columns ...")
  python3 -m sae_refusal.cli transfer --config "$CONFIG" --out_dir runs/transfer/$NAME ${EXTRA_ARGS:-} 2>&1 | grep -v "it/s\]$\|it/s]\s*$" |
    grep -v "Converting and de-quantizing\|Loading weights\|^\s*$" | tee -a "$OUT/log_$NAME.txt" |
    grep "^\[transfer\]\|^\[eval\] intervention\|^  " | tail -60
  tar czf "$OUT/transfer_$NAME.tar.gz" -C runs/transfer "$NAME"
done
echo "total $(($(date +%s) - T0)) s"
