#!/usr/bin/env bash
# Run several refusal-token fine-tunes of one config side by side on one GPU (small models leave it idle).
#
#   bash benchmarks/finetune_grid.sh CONFIG OUT MAX_TIME "name: --overrides ..." ["name2: ..." ...]
#
# CONFIG   a lightning_configs/finetune/*.yaml (already pointing at the model and the data)
# OUT      folder; run NAME logs to OUT/NAME/tensorboard/version_0 (report in refusal_report/)
# MAX_TIME Lightning max_time per run (DD:HH:MM:SS); a run that hits it stops training and still reports.
#          "auto": what is left until $DEADLINE (epoch seconds) after the shared preparation, minus
#          $REPORT_MARGIN seconds (default 180) for the end-of-fit report and export.
#
# Base answers and the split manifest are prepared once first (they are shared, then only read).
# Prints one summary line per run from refusal_report/{report,bar/report}.json.
set -euo pipefail
config=$1 out=$2 max_time=$3
shift 3
mkdir -p "$out"
# FINETUNE_EXTRA_ARGS: overrides shared by every run (e.g. "--model.llm.device cuda").
extra=()
if [[ -n "${FINETUNE_EXTRA_ARGS:-}" ]]; then read -r -a extra <<<"$FINETUNE_EXTRA_ARGS"; fi
python3 - "$config" "${extra[@]}" <<'EOF'
import sys
from sae_refusal.cli import FinetuneCLI
from sae_refusal.finetune.datamodule import SFTDataModule
from sae_refusal.finetune.module import RefusalSFTModule

import time
args = ["--config", sys.argv[1], *[a for a in sys.argv[2:] if a]]
sys.argv = sys.argv[:1]  # the CLI reads `args`, not the command line
start = time.perf_counter()
FinetuneCLI(RefusalSFTModule, SFTDataModule, args=args, run=False).datamodule.prepare_data()
print(f"split manifest and base answers ready in {time.perf_counter() - start:.1f} s", flush=True)
EOF
if [[ $max_time == auto ]]; then
  left=$((${DEADLINE:?MAX_TIME auto needs DEADLINE} - $(date +%s) - ${REPORT_MARGIN:-180}))
  ((left > 0)) || { echo "no time left before DEADLINE" >&2; exit 2; }
  printf -v max_time '00:00:%02d:%02d' $((left / 60)) $((left % 60))
  echo "max_time $max_time"
fi
pids=()
for spec in "$@"; do
  name=${spec%%:*}
  read -r -a overrides <<<"${spec#*:}"
  sae-refusal finetune --config "$config" "${extra[@]}" "${overrides[@]}" \
    --trainer.max_time "$max_time" --trainer.enable_progress_bar false --trainer.enable_checkpointing false \
    --trainer.default_root_dir "$out/$name" --trainer.logger.init_args.save_dir "$out/$name" \
    >"$out/$name.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
python3 - "$out" "$@" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for spec in sys.argv[2:]:
    name = spec.split(":", 1)[0]
    found = sorted((out / name).glob("*/version_*/refusal_report/report.json"))
    if not found:
        print(f"{name}: no report (see {out / (name + '.log')})")
        continue
    full = json.loads(found[-1].read_text())
    bar_path = found[-1].parent / "bar" / "report.json"
    bar = json.loads(bar_path.read_text()) if bar_path.exists() else full
    alpaca = next((v for k, v in bar["per_source"].items() if k.startswith("alpaca")), {})
    contrast_path = found[-1].parent / "contrast" / "report.json"
    over = json.loads(contrast_path.read_text()) if contrast_path.exists() else full
    f1 = {k: round(v["f1"], 2) for k, v in bar["per_class"].items()}
    print(
        f"{name}: bar macro-F1 {bar['macro_f1_all6']:.3f} | all macro-F1 {full['macro_f1_all6']:.3f} | "
        f"Alpaca FRR {alpaca.get('refusal_rate', float('nan')):.1%} | over-refusal "
        f"{over['over_refusal_rate'] or 0:.1%} | per-class F1 (bar) {f1}"
    )
EOF
exit $status
