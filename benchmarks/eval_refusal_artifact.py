"""Evaluate a refusal-token artifact on the held-out split of its fine-tuning config, and test a respond bias.

Loads the base model with the artifact applied (``LLMConfig(adapter_path=...)``), reads the first-token
logits of the validation split and of the held-out prompts (test split + the report callback's extra
prompts, e.g. the CoCoNot contrast set), and prints:

* the greedy report (the model's own first token, the number the issue's bar is about) on all held-out
  prompts and on the bar subset (held-out CoCoNot + Alpaca);
* a calibration study: a constant ``b`` added to the ``[respond]`` logit (what generation's
  ``sequence_bias={(respond_id,): b}`` does) trades harmful recall against false / over-refusal. ``b`` is
  chosen on a *calibration* set (best macro-F1 over the six tokens within ``--max-false-refusal`` and
  ``--max-over-refusal``): the validation split, plus with ``--calibration-share s`` a stratified share
  ``s`` of the contrast source's held-out prompts, which are then left out of every reported number. The
  result is reported on the remaining held-out prompts; the full curve on them is printed for the record,
  never used to choose. ``--write-artifact DIR`` writes a copy of the artifact that carries the chosen
  bias (applied by ``generate`` and by the refusal report wherever the artifact is loaded).

Example (CPU, ~10 minutes for SmolLM2 on 2 cores)::

    python benchmarks/eval_refusal_artifact.py --config lightning_configs/finetune/smollm2_lora.yaml \\
        --adapter runs/gpu_ft2/artifact --out runs/gpu_ft2/eval
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from sae_refusal.atomic import atomic_write_text
from sae_refusal.data import PromptSet
from sae_refusal.eval.calibration import (
    biased_report,
    choose_respond_bias,
    refusal_logits,
    split_for_calibration,
)
from sae_refusal.eval.refusal_tokens import RefusalReport, sample_answers
from sae_refusal.finetune.artifact import write_respond_bias
from sae_refusal.finetune.config_prompts import finetune_prompts
from sae_refusal.llm import LLMConfig, RefusalVocabulary, load_model_and_tokenizer
from sae_refusal.llm.first_token import first_token_logits


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--adapter", required=True, help="refusal-token artifact folder")
    parser.add_argument("--model", default=None, help="override model.llm.name_or_path")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--root", default="runs/finetune_data", help="where the split manifest lives")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--bar-sources", default="coconot,alpaca")
    parser.add_argument("--contrast-source", default="coconot_contrast", help="the over-refusal bar's source")
    parser.add_argument("--biases", default="-3,-2,-1.5,-1,-0.5,0,0.5,1,1.5,2,3,4")
    parser.add_argument("--max-false-refusal", type=float, default=None, help="limit on val when choosing")
    parser.add_argument("--max-over-refusal", type=float, default=None, help="limit on val when choosing")
    parser.add_argument(
        "--calibration-share", type=float, default=0.0, help="share of the contrast source used to calibrate"
    )
    parser.add_argument("--calibration-seed", type=int, default=0)
    parser.add_argument("--write-artifact", default=None, help="write the calibrated artifact here")
    parser.add_argument("--n-samples", type=int, default=6)
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args()

    cfg = yaml.safe_load(Path(args.config).read_text())
    loaded = finetune_prompts(args.config, args.data_root, args.root)
    prompts = loaded.prompts
    sets = {"val": prompts.split("val"), "held_out": loaded.held_out}

    llm_raw = dict(cfg["model"]["llm"])
    if args.model:
        llm_raw["name_or_path"] = args.model
    llm_raw.update(device=args.device, adapter_path=args.adapter)
    model, tokenizer = load_model_and_tokenizer(LLMConfig(**llm_raw))
    resolved = RefusalVocabulary().resolve(tokenizer)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    compact: dict[str, torch.Tensor] = {}
    for name, prompt_set in sets.items():
        cached = out / f"logits_{name}.pt"  # compact logits, reused by a rerun on the same prompts
        if cached.exists():
            saved = torch.load(cached)
            if saved["ids"] == prompt_set.ids:
                compact[name] = saved["compact"]
                continue
        start = time.perf_counter()
        logits_NV = first_token_logits(model, tokenizer, prompt_set.texts, batch_size=args.batch_size)
        compact[name] = refusal_logits(logits_NV, resolved)
        torch.save({"ids": prompt_set.ids, "compact": compact[name]}, cached)
        print(f"{name}: {len(prompt_set)} prompts in {time.perf_counter() - start:.0f} s")

    held_out_index = {pid: i for i, pid in enumerate(sets["held_out"].ids)}
    calibration, compact_cal = sets["val"], compact["val"]
    if args.calibration_share > 0:
        drawn, rest = split_for_calibration(
            sets["held_out"], args.contrast_source, args.calibration_share, seed=args.calibration_seed
        )
        calibration = sets["val"] + drawn
        compact_cal = torch.cat([compact["val"], compact["held_out"][[held_out_index[i] for i in drawn.ids]]])
        sets["held_out"] = rest
        compact["held_out"] = compact["held_out"][[held_out_index[i] for i in rest.ids]]
        n_val, n_drawn = len(sets["val"]), len(drawn)
        print(f"calibration: {n_val} val + {n_drawn} {args.contrast_source}; reported on: {len(rest)}")

    def report(name: str, b: float) -> RefusalReport:
        return biased_report(sets[name], compact[name], resolved, b)

    bar_sources = args.bar_sources.split(",")
    greedy = report("held_out", 0.0)
    greedy.save(out / "greedy")
    greedy.subset(bar_sources).save(out / "greedy" / "bar")
    biases = [float(x) for x in args.biases.split(",")]

    def row(rep: RefusalReport) -> dict[str, Any]:
        bar = rep.subset(bar_sources)
        alpaca = next((v for k, v in bar.per_source.items() if k.startswith("alpaca")), None)
        return {
            "macro_f1_bar": bar.macro_f1_all6,
            "macro_f1_all": rep.macro_f1_all6,
            "alpaca_false_refusal": None if alpaca is None else alpaca["refusal_rate"],
            "over_refusal_all_ambiguous": rep.over_refusal_rate,
            "over_refusal": rep.per_source.get(args.contrast_source, {}).get("refusal_rate"),
            "harmful_refusal": rep.harmful_refusal_rate,
        }

    choice = choose_respond_bias(
        calibration,
        compact_cal,
        resolved,
        biases,
        max_false_refusal=args.max_false_refusal,
        max_over_refusal=args.max_over_refusal,
    )
    val_curve = {row["bias"]: row["macro_f1"] for row in choice.table}
    chosen = choice.bias
    curve = {b: row(report("held_out", b)) for b in biases}
    print(
        "\n| respond bias | calibration macro-F1 | bar macro-F1 (held-out) | Alpaca FRR | "
        "contrast over-refusal | all-ambiguous over-refusal | harmful refused |"
    )
    print("|---|---|---|---|---|---|---|")
    for b in biases:
        r = curve[b]
        frr = "n/a" if r["alpaca_false_refusal"] is None else f"{r['alpaca_false_refusal']:.1%}"
        mark = " (chosen)" if b == chosen else ""
        print(
            f"| {b:+.1f}{mark} | {val_curve[b]:.3f} | {r['macro_f1_bar']:.3f} | {frr} | "
            f"{r['over_refusal']:.1%} | {r['over_refusal_all_ambiguous']:.1%} | {r['harmful_refusal']:.1%} |"
        )
    g = row(greedy)
    print(f"\ngreedy (bias 0, reported held-out): {json.dumps(g)}")
    reported = report("held_out", chosen)
    reported.save(out / "chosen")
    reported.subset(bar_sources).save(out / "chosen" / "bar")
    print(
        f"chosen bias {chosen:+g} (feasible on calibration: {choice.feasible}): {json.dumps(curve[chosen])}"
    )
    calibration_record = {
        "criterion": "best macro-F1 over the six tokens within the limits (ties: bias nearest 0)",
        "max_false_refusal": args.max_false_refusal,
        "max_over_refusal": args.max_over_refusal,
        "feasible": choice.feasible,
        "calibration_set": {
            "validation_split": len(sets["val"]) if args.calibration_share > 0 else len(calibration),
            "share_of": args.contrast_source if args.calibration_share > 0 else None,
            "share": args.calibration_share,
            "seed": args.calibration_seed,
            "n": len(calibration),
            "ids_sha256": hashlib.sha256("\n".join(sorted(calibration.ids)).encode()).hexdigest(),
        },
        "table": choice.table,
        "config": args.config,
    }
    if args.write_artifact:
        written = write_respond_bias(args.adapter, chosen, calibration_record, out=args.write_artifact)
        print(f"calibrated artifact written to {written}")
    samples_from = sets["held_out"].filter(lambda p: str(p.label) != "harmful")
    step = max(len(samples_from) // max(args.n_samples, 1), 1)
    chosen_samples = PromptSet(list(samples_from)[::step][: args.n_samples])
    samples = sample_answers(model, tokenizer, chosen_samples, n=args.n_samples, vocab=RefusalVocabulary())
    for s in samples:
        print(json.dumps(s)[:400])
    payload = {
        "adapter": args.adapter,
        "n": {k: len(v) for k, v in sets.items()},
        "greedy": g,
        "calibration_macro_f1_by_bias": val_curve,
        "chosen_bias": chosen,
        "calibration": calibration_record,
        "n_reported": len(sets["held_out"]),
        "held_out_by_bias": curve,
        "samples": samples,
    }
    atomic_write_text(out / "eval.json", json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
