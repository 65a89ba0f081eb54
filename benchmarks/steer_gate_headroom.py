"""How far conditional steering is from its bound: an oracle gate and each gate's AUC on a study's test split.

Reads a finished ``sae-refusal steer`` run (``metrics.json``, ``tables.safetensors``, ``gates/``), rebuilds
its prompt sets from the recorded config, and reports:

* the **oracle gate** (score = the prompt's true harmful label), tuned on the validation table with the run's
  floor and scored on the test table: what a perfect harmful / benign call reaches with the same vector, layer
  and alpha grid, i.e. the headroom left to the gates;
* each residual gate's **ROC AUC** of the harmful call on the test prompts (its scores recomputed from the
  saved gate on the test prompts' residuals), and the refusal-token gate's from the table's alpha-0 column.

* with the run's **do-no-harm** settings (``study.do_no_harm``, ``tolerance``, ``act_on``; harm groups as the
  study builds them): the oracle under the same constraints, and **noisy oracles** (score = sigmoid of the
  label's sign times ``--separation`` plus standard normal noise, several draws): what validation-tuned policy
  a gate of a given test AUC reaches on test, i.e. how good a call the bar needs.

No steering pass runs: outcomes come from the saved tables (``--aucs`` also loads the model to recompute the
residual gates' test AUC). Prints one JSON line at the end.

    python benchmarks/steer_gate_headroom.py --run runs/steer/refuse_smollm2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score

from sae_refusal.categories import CATEGORY_SHORT_NAMES
from sae_refusal.cli import config_from_namespace, steer_parser
from sae_refusal.llm.loading import load_model_and_tokenizer
from sae_refusal.steer.framing import is_jailbreak_framed
from sae_refusal.steer.gate_study import harm_group_masks
from sae_refusal.steer.gates import load_gate
from sae_refusal.steer.job import SteerJobConfig
from sae_refusal.steer.sets import build_steer_sets, is_harmful
from sae_refusal.steer.study import last_token_acts
from sae_refusal.steer.tuning import OutcomeTable, evaluate_policy, tune_policy


def _short_category(category: object) -> str | None:
    """The study's short category name (``safety``, ...) of a CoCoNot category, as the job names groups."""
    if category is None:
        return None
    return CATEGORY_SHORT_NAMES.get(str(category), str(category))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="a `sae-refusal steer` output folder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--aucs", action="store_true", help="recompute residual gates' AUC (loads the model)")
    parser.add_argument("--separation", default="0.5,1,1.5,2,3", help="noisy-oracle label separations")
    parser.add_argument("--draws", type=int, default=5, help="noisy-oracle draws per separation")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    metrics = json.loads((run / "metrics.json").read_text())
    tensors = load_file(str(run / "tables.safetensors"))
    recorded = metrics["config"]
    config_parser = steer_parser()
    cfg = config_from_namespace(config_parser, config_parser.parse_object(recorded), SteerJobConfig)
    sets = build_steer_sets(cfg.sets)
    start = time.perf_counter()
    tables: dict[str, OutcomeTable] = {}
    prompts: dict[str, list] = {}
    for split in ("val", "test"):
        rows, groups = sets.with_set_names(split)
        harmful = torch.tensor([is_harmful(p) for p in rows])
        refused = tensors[f"{split}_refused_NA"].bool()
        if refused.shape[0] != len(rows):
            raise SystemExit(f"--run: the table has {refused.shape[0]} {split} rows, the sets {len(rows)}")
        tables[split] = OutcomeTable(tensors[f"{split}_alphas_A"], refused, harmful, tuple(groups))
        prompts[split] = rows
    floor = float(metrics["floor"])
    oracle = {split: tables[split].harmful_N.float() for split in tables}
    tuned = tune_policy(tables["val"], oracle["val"], floor=floor, vector="global")
    oracle_test = evaluate_policy(tables["test"], oracle["test"], tuned.policy)
    print(f"oracle gate on test: {oracle_test.rates} (policy {tuned.policy})", flush=True)

    harmful_test = tables["test"].harmful_N.numpy()
    aucs: dict[str, float] = {}
    zero = tables["test"].alpha_index(0.0)
    aucs["refusal_token"] = float(
        roc_auc_score(harmful_test, tables["test"].refused_NA[:, zero].float().numpy())
    )
    study = recorded.get("study", {})
    constraints: dict[str, object] = {}
    noisy: list[dict[str, float]] = []
    if study.get("do_no_harm"):
        masks = {}
        for split in ("val", "test"):
            rows = prompts[split]
            masks[split] = harm_group_masks(
                tables[split].groups,
                tables[split].harmful_N,
                [_short_category(p.category) for p in rows],
                torch.tensor([is_jailbreak_framed(p.text) for p in rows]),
                cfg.sets.harmful_source,
            )
        constraints = dict(
            act_on=study.get("act_on", "all"),
            harm_groups=masks["val"],
            tolerance=float(study.get("tolerance", 0.02)),
        )
        held = tune_policy(tables["val"], oracle["val"], floor=floor, vector="global", **constraints)  # type: ignore[arg-type]
        held_test = evaluate_policy(tables["test"], oracle["test"], held.policy)
        print(f"oracle gate under do no harm, test: {held_test.rates}", flush=True)
        generator = torch.Generator().manual_seed(0)
        for separation in [float(x) for x in args.separation.split(",")]:
            for draw in range(args.draws):
                scores = {}
                for split in ("val", "test"):
                    sign = oracle[split] * 2 - 1
                    noise = torch.randn(sign.shape, generator=generator)
                    scores[split] = torch.sigmoid(separation * sign + noise)
                try:
                    tuned_noisy = tune_policy(
                        tables["val"],
                        scores["val"],
                        floor=floor,
                        vector="global",
                        **constraints,  # type: ignore[arg-type]
                    )
                except ValueError:
                    noisy.append({"separation": separation, "draw": draw, "auc_test": float("nan")})
                    continue
                point = evaluate_policy(tables["test"], scores["test"], tuned_noisy.policy)
                noisy.append(
                    {
                        "separation": separation,
                        "draw": draw,
                        "auc_test": float(
                            roc_auc_score(tables["test"].harmful_N.numpy(), scores["test"].numpy())
                        ),
                        "over_refusal": point.rates.over_refusal,
                        "harmful_refusal": point.rates.harmful_refusal,
                    }
                )
            last = [n for n in noisy if n["separation"] == separation and "over_refusal" in n]
            if last:
                print(
                    f"noisy oracle, separation {separation}: test AUC "
                    f"{sum(n['auc_test'] for n in last) / len(last):.3f}, over-refusal "
                    f"{sum(n['over_refusal'] for n in last) / len(last):.3f}, harmful refusal "
                    f"{sum(n['harmful_refusal'] for n in last) / len(last):.3f} (mean of {len(last)} draws)",
                    flush=True,
                )
        constraints = {
            "oracle_test": {
                "over_refusal": held_test.rates.over_refusal,
                "harmful_refusal": held_test.rates.harmful_refusal,
            },
            "policy": held.policy.to_dict(),
        }
    kinds = ("probe", "distance")  # single-layer residual gates: scored on the test residuals here
    residual_gates = [k for k in kinds if (run / "gates" / k).is_dir()] if args.aucs else []
    if residual_gates:
        model, tokenizer = load_model_and_tokenizer(cfg.llm)
        model.eval()
        layer = int(metrics["layer"])
        texts = [p.text for p in prompts["test"]]
        acts = last_token_acts(model, tokenizer, texts, [layer], chat_template=cfg.chat_template)[layer]
        for kind in residual_gates:
            steering = load_gate(run / "gates" / kind)
            scores = steering.gate.score(acts).score_N  # type: ignore[attr-defined]
            aucs[kind] = float(roc_auc_score(harmful_test, scores.numpy()))
            # where the call matters: among prompts the model refuses (down-steering must spare harmful ones)
            # and among those it answers (up-steering must spare benign ones)
            r0 = tables["test"].refused_NA[:, zero].numpy()
            for name, subset in (("refused", r0), ("answered", ~r0)):
                aucs[f"{kind}/{name}"] = float(roc_auc_score(harmful_test[subset], scores.numpy()[subset]))
            print(
                f"{kind}: test AUC {aucs[kind]:.3f}; among refused {aucs[f'{kind}/refused']:.3f} "
                f"(n {int(r0.sum())}), among answered {aucs[f'{kind}/answered']:.3f} (n {int((~r0).sum())})",
                flush=True,
            )
    record = {
        "run": str(run),
        "layer": metrics["layer"],
        "floor": floor,
        "oracle_policy": tuned.policy.to_dict(),
        "oracle_test": {
            "over_refusal": oracle_test.rates.over_refusal,
            "harmful_refusal": oracle_test.rates.harmful_refusal,
        },
        "gates_test": {
            k: {x: g["test"][x] for x in ("over_refusal", "harmful_refusal")}
            for k, g in metrics["gates"].items()
            if "test" in g
        },
        "auc_test": aucs,
        "do_no_harm_oracle": constraints,
        "noisy_oracles": noisy,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
