#!/usr/bin/env bash
# The eval job's generation stage with the hf and the fast engine, full held-out sets, on the GPU machine (see
# ../shared/DEVICE.md), in one call: the baseline and the fast engine on the same card.
#
#   COLUMNS="unsteered caa gate_probe ablation" bash benchmarks/gpu_eval_engines.sh
#
# Expects: the SmolLM2 GGUF assembled at /tmp/m (three staging calls); carried: .device/whl, .device/data.
# Does: installs the carried wheels, checks the GGUF hash, runs the quickstart steering study on cuda (vectors and
# gates for the steered columns, runs/steer/refuse_smollm2), then for each column and engine (hf, fast)
#   sae-refusal eval --config lightning_configs/eval/refuse_smollm2.yaml --config columns/<c>.yaml
#                    --config lightning_configs/eval/full_sets.yaml --generation.engine <e> --capability.tasks '[]'
# with the data root at .device/data and the model on cuda, and prints per column the refusal stage's seconds
# (generation + judges) per engine, the speedup and how many answers the two engines agree on.
# Returns in $OUT: log, engines.json (the summary) and engines.tar.gz (each run's metrics.json and
# generations.jsonl).
set -o pipefail
T0=$(date +%s)
GGUF=/tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf
COLUMNS=${COLUMNS:-"unsteered caa gate_probe"}
ENGINES=${ENGINES:-"hf fast"}
python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $GGUF" | sha256sum -c - || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader | tee -a "$OUT/log"
SBASE=/tmp/steer_base.yaml
sed "s#\.\./shared/data#.device/data#g; s#name_or_path: smollm2#name_or_path: $GGUF#" \
  lightning_configs/steer/refuse_smollm2.yaml >$SBASE
if [ "$COLUMNS" != unsteered ] && [ ! -d runs/steer/refuse_smollm2 ]; then
  echo "== steering study ($(($(date +%s) - T0)) s)" | tee -a "$OUT/log"
  python3 -m sae_refusal.cli steer --config $SBASE --llm.device cuda 2>&1 | grep -v "it/s\]$" |
    grep -v "Converting and de-quantizing\|Loading weights" | tee -a "$OUT/log" | tail -5
fi
EBASE=/tmp/eval_base.yaml
sed "s#\.\./shared/data#.device/data#g; s#name_or_path: smollm2#name_or_path: $GGUF#; s#device: cpu#device: cuda#" \
  lightning_configs/eval/refuse_smollm2.yaml >$EBASE
mkdir -p runs/engines
for c in $COLUMNS; do
  for e in $ENGINES; do
    echo "== column $c, engine $e ($(($(date +%s) - T0)) s)" | tee -a "$OUT/log"
    python3 -m sae_refusal.cli eval --config $EBASE --config lightning_configs/eval/columns/$c.yaml \
      --config lightning_configs/eval/full_sets.yaml --generation.engine "$e" --capability.tasks '[]' \
      --sets.data_root .device/data --sets.manifest_root runs/engines/splits --out_dir "runs/engines/${c}_$e" 2>&1 |
      grep -v "it/s\]$" | grep -v "^\s*$" | grep -v "Converting and de-quantizing\|Loading weights" |
      tee -a "$OUT/log" | grep "^\[eval\]" | tail -6
  done
done
python3 - "$OUT/engines.json" $COLUMNS <<'PY' | tee -a "$OUT/log"
import json, sys
from pathlib import Path

out, columns = sys.argv[1], sys.argv[2:]
summary = {}
for c in columns:
    runs = {}
    for e in ("hf", "fast"):
        folder = Path(f"runs/engines/{c}_{e}")
        if not (folder / "metrics.json").is_file():
            continue
        m = json.loads((folder / "metrics.json").read_text())
        stage = next(k for k in m["timings"] if k.startswith("refusal sets"))
        lines = [json.loads(x) for x in (folder / "generations.jsonl").read_text().splitlines()]
        runs[e] = {"seconds": m["timings"][stage], "stage": stage, "total": m["timings"]["total"],
                   "outputs": {r["id"]: (r["first_token"], r["output"]) for r in lines},
                   "harmful": m["refusal"]["blocks"].get("harmful", {}).get("value"),
                   "over_refusal": m["refusal"]["blocks"].get("over_refusal", {}).get("value")}
    row = {e: {k: v for k, v in r.items() if k != "outputs"} for e, r in runs.items()}
    if len(runs) == 2:
        a, b = runs["hf"]["outputs"], runs["fast"]["outputs"]
        row["speedup"] = runs["hf"]["seconds"] / runs["fast"]["seconds"]
        row["same_first_token"] = sum(a[i][0] == b[i][0] for i in a) / len(a)
        row["same_answer"] = sum(a[i] == b[i] for i in a) / len(a)
        row["n"] = len(a)
    summary[c] = row
    print(c, json.dumps(row))
Path(out).write_text(json.dumps(summary, indent=2))
PY
tar czf "$OUT/engines.tar.gz" --exclude=tensorboard --exclude="*.png" -C runs engines
echo "total $(($(date +%s) - T0)) s" | tee -a "$OUT/log"
