"""How separable are the six refusal-token classes in the *base* model? A linear-probe ceiling per layer.

Reads the prompt sources and the split of a fine-tuning config (``lightning_configs/finetune/*.yaml``), takes
the base model's last-token residual at several layers for every prompt (early-exit extraction), fits an
L2 multinomial logistic regression on the train (+val) split and scores it on the held-out test split and on
the callback's extra prompts (the CoCoNot contrast set) with exactly the metrics of the fine-tuning report
(:func:`sae_refusal.eval.refusal_tokens.report_from_records`): macro-F1 over the six classes on the bar subset
(held-out CoCoNot + Alpaca), Alpaca false-refusal and contrast over-refusal.

It answers "is the task learnable from what the model already represents?": a fine-tune that stays far
below the probe is under-trained; a probe that is itself below the bar points at the data (label noise,
lookalike contrast prompts) rather than the recipe.

Example (GPU, about a minute for SmolLM2)::

    python benchmarks/probe_ceiling.py --config lightning_configs/finetune/smollm2_lora.yaml \\
        --model /tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf --data-root .device/data --device cuda --out probe.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from sae_refusal.atomic import atomic_write_text
from sae_refusal.categories import CATEGORY_SHORT_NAMES, COCONOT_CATEGORIES
from sae_refusal.data import Label, PromptSet
from sae_refusal.data.chat import format_prompts
from sae_refusal.eval.refusal_tokens import report_from_records
from sae_refusal.finetune.config_prompts import finetune_prompts
from sae_refusal.llm import LLMConfig, load_model_and_tokenizer
from sae_refusal.llm.extraction import iter_last_token_residuals

CLASS_NAMES = ["respond", *(CATEGORY_SHORT_NAMES[c] for c in COCONOT_CATEGORIES)]


def _class_of(prompt: Any) -> int:
    if prompt.label == Label.HARMFUL:
        return 1 + COCONOT_CATEGORIES.index(prompt.category)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="a fine-tuning YAML (its data.prompts, data.split)")
    parser.add_argument("--model", default=None, help="override model.llm.name_or_path")
    parser.add_argument("--data-root", default=None, help="override the data roots")
    parser.add_argument("--layers", default=None, help="comma-separated layers (default: every 3rd)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the probe")
    parser.add_argument("--bar-sources", default="coconot,alpaca")
    parser.add_argument("--contrast-source", default="coconot_contrast", help="the over-refusal bar's source")
    parser.add_argument("--root", default="runs/finetune_data", help="where the split manifest lives")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    cfg = yaml.safe_load(Path(args.config).read_text())
    loaded = finetune_prompts(args.config, args.data_root, args.root)
    prompts = loaded.prompts
    train = prompts.filter(lambda p: p.split in ("train", "val"))
    held_out = loaded.held_out

    llm_raw = dict(cfg["model"]["llm"])
    if args.model:
        llm_raw["name_or_path"] = args.model
    llm_raw["device"] = args.device
    model, tokenizer = load_model_and_tokenizer(LLMConfig(**llm_raw))
    model.eval()
    n_layers = model.config.num_hidden_layers
    layers = [int(x) for x in args.layers.split(",")] if args.layers else list(range(2, n_layers, 3))

    def residuals(prompt_set: PromptSet) -> dict[int, np.ndarray]:
        texts = format_prompts(tokenizer, prompt_set.texts)
        parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
        with torch.inference_mode():
            for batch in iter_last_token_residuals(
                model, tokenizer, texts, layers, batch_size=args.batch_size, max_length=1024
            ):
                for layer in layers:
                    parts[layer].append(batch.acts[layer].float())
        return {layer: torch.cat(chunks).numpy() for layer, chunks in parts.items()}

    start = time.perf_counter()
    x_train, x_test = residuals(train), residuals(held_out)
    extract_s = time.perf_counter() - start
    y_train = np.array([_class_of(p) for p in train])
    y_test = [_class_of(p) for p in held_out]
    bar_sources = args.bar_sources.split(",")
    print(f"{len(train)} train, {len(held_out)} held-out prompts; extraction {extract_s:.1f} s")
    print(
        "| layer | macro-F1 (bar) | macro-F1 (all held-out) | Alpaca false-refusal | contrast over-refusal | "
        "all-ambiguous over-refusal |"
    )
    print("|---|---|---|---|---|---|")
    results: list[dict[str, Any]] = []
    for layer in layers:
        scaler = StandardScaler().fit(x_train[layer])
        probe = LogisticRegression(C=args.C, max_iter=3000)
        probe.fit(scaler.transform(x_train[layer]), y_train)
        pred = probe.predict(scaler.transform(x_test[layer])).tolist()
        records = [
            {
                "id": p.id,
                "source": p.source,
                "label": str(p.label),
                "expected": CLASS_NAMES[t],
                "predicted": CLASS_NAMES[int(q)],
                "correct": t == int(q),
                "top_is_refusal_token": True,
                "truncated": False,
            }
            for p, t, q in zip(held_out, y_test, pred, strict=True)
        ]
        report = report_from_records(records, CLASS_NAMES, CLASS_NAMES, "respond")
        bar = report.subset(bar_sources)
        alpaca = next((v for k, v in bar.per_source.items() if k.startswith("alpaca")), None)
        row = {
            "layer": layer,
            "macro_f1_bar": bar.macro_f1_all6,
            "macro_f1_all": report.macro_f1_all6,
            "alpaca_false_refusal": alpaca["refusal_rate"] if alpaca else None,
            "over_refusal_all_ambiguous": report.over_refusal_rate,
            "over_refusal": report.per_source.get(args.contrast_source, {}).get("refusal_rate"),
            "per_class_f1_bar": {k: v["f1"] for k, v in bar.per_class.items()},
        }
        results.append(row)
        print(
            f"| {layer} | {row['macro_f1_bar']:.3f} | {row['macro_f1_all']:.3f} | "
            f"{row['alpaca_false_refusal'] if alpaca is None else format(alpaca['refusal_rate'], '.1%')} | "
            f"{'n/a' if row['over_refusal'] is None else format(row['over_refusal'], '.1%')} | "
            f"{'n/a' if report.over_refusal_rate is None else format(report.over_refusal_rate, '.1%')} |"
        )
    best = max(results, key=lambda r: r["macro_f1_bar"])
    print(f"best layer {best['layer']}: per-class F1 on the bar subset {best['per_class_f1_bar']}")
    if args.out:
        payload = {
            "config": args.config,
            "n_train": len(train),
            "n_held_out": len(held_out),
            "results": results,
        }
        atomic_write_text(args.out, json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
