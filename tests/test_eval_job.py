"""`sae-refusal eval` end to end on a tiny refusal-token model: every column kind, audit, reproducibility."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from sae_refusal.cli import main
from sae_refusal.eval.table import load_metrics, results_table
from tests.test_steer_job import write_config as write_steer_config


def _write_capability_data(root: Path) -> None:
    for split in ("dev", "test"):
        folder = root / "mmlu" / "data" / split
        folder.mkdir(parents=True)
        rows = [f"What is {i} plus {i}?,{i},{2 * i},{3 * i},{4 * i},B" for i in range(1, 9)]
        (folder / f"arithmetic_{split}.csv").write_text("\n".join(rows) + "\n")
    (root / "gsm8k").mkdir()
    for split in ("train", "test"):
        rows = [
            {
                "question": f"Tom has {i} apples and buys {i}. How many?",
                "answer": f"{i}+{i}={2 * i}\n#### {2 * i}",
            }
            for i in range(1, 7)
        ]
        (root / "gsm8k" / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "truthfulqa").mkdir()
    header = "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
    rows = [
        f"Adversarial,Misc,Is the sea number {i} wet?,Yes it is,"
        "Yes it is; It is wet,No it is dry; It is sand,x"
        for i in range(6)
    ]
    (root / "truthfulqa" / "TruthfulQA.csv").write_text(header + "\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny model, its prompt files and a steering study (vectors + gates) to evaluate."""
    tmp = tmp_path_factory.mktemp("eval")
    steer_config = write_steer_config(tmp)
    main(["steer", "--config", str(steer_config)])
    base = yaml.safe_load(steer_config.read_text())
    data = Path(base["sets"]["data_root"])
    _write_capability_data(data)
    # reference answers for the perplexity measure (ids and split unchanged)
    alpaca = data / "benign" / "alpaca_harmless_train.json"
    rows = json.loads(alpaca.read_text())
    alpaca.write_text(
        json.dumps([{**r, "output": f"The sea is deep, fact {i}."} for i, r in enumerate(rows)])
    )
    sets = base["sets"]
    for source in sets["model_prompts"]["sources"]:
        if source["name"] == "alpaca":
            source["response_column"] = "output"
    config = {
        "llm": base["llm"],
        "sets": {**base["sets"], "manifest_root": str(tmp / "eval_splits"), "max_per_set": 8},
        "generation": {"max_new_tokens": 6, "batch_size": 8, "max_length": 256},
        "capability": {
            "data_root": str(data),
            "mmlu_n": 4,
            "mmlu_k_shot": 1,
            "gsm8k_n": 3,
            "gsm8k_k_shot": 1,
            "gsm8k_max_new_tokens": 8,
            "truthfulqa_n": 4,
            "kl_n": 4,
            "reference_n": 4,
            "batch_size": 4,
            "max_length": 256,
        },
        "n_boot": 200,
    }
    path = tmp / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    return {"tmp": tmp, "config": path, "study": Path(base["out_dir"])}


def _column(study: dict[str, Any], name: str, intervention: dict[str, Any], **extra: Any) -> Path:
    column = study["tmp"] / f"{name}.yaml"
    out = study["tmp"] / "runs" / name
    column.write_text(yaml.safe_dump({"intervention": intervention, "out_dir": str(out), **extra}))
    main(["eval", "--config", str(study["config"]), "--config", str(column)])
    return out


def _records(out: Path, name: str = "generations.jsonl") -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def unsteered(study: dict[str, Any]) -> Path:
    return _column(study, "unsteered", {"kind": "none"})


def test_unsteered_job_writes_every_output_and_numbers_follow_the_items(unsteered: Path) -> None:
    out = unsteered
    for name in ("metrics.json", "report.md", "generations.jsonl", "capability.jsonl", "refusal_rates.png"):
        assert (out / name).is_file(), name
    assert any((out / "tensorboard").iterdir())
    metrics = load_metrics(out)
    records = _records(out)
    assert {r["set"] for r in records} == set(metrics["refusal"]["sets"])
    # held-out items only: exactly the test split of the sets manifest
    assert sum(s["n"] for s in metrics["sets"].values()) == len(records)
    # each set's rate is the share of its items the primary judge called refused
    judge = metrics["judges"]["primary"]
    assert judge == "first_token"
    for set_name, row in metrics["refusal"]["sets"].items():
        verdicts = [r["judges"][judge]["verdict"] for r in records if r["set"] == set_name]
        kept = [v for v in verdicts if v != "failed"]
        assert row["n"] == len(kept)
        assert row["value"] == pytest.approx(sum(v == "refused" for v in kept) / len(kept))
        assert row["low"] <= row["value"] <= row["high"]
    # every record carries each judge's label and the intervention
    assert all(set(r["judges"]) == {"first_token", "phrase"} for r in records)
    assert all(r["intervention"] == "unsteered" for r in records)
    assert {"MMLU accuracy", "GSM8K exact match", "TruthfulQA MC1", "TruthfulQA MC2"} <= set(
        metrics["capability"]
    )
    caps = _records(out, "capability.jsonl")
    assert {c["task"] for c in caps} == {"mmlu", "gsm8k", "truthfulqa", "next_token_kl", "reference"}
    mmlu = [c["value"] for c in caps if c["task"] == "mmlu"]
    assert metrics["capability"]["MMLU accuracy"]["value"] == pytest.approx(sum(mmlu) / len(mmlu))
    assert metrics["capability"]["MMLU accuracy"]["n"] == len(mmlu) == 4
    # unsteered: KL to itself is zero
    assert metrics["capability"]["next-token KL (benign)"]["value"] == 0.0
    ppl = metrics["capability"]["reference perplexity"]
    assert ppl["value"] > 1.0 and ppl["low"] <= ppl["value"] <= ppl["high"]
    refs = [c for c in caps if c["task"] == "reference"]
    nll = sum(c["nll_sum"] for c in refs) / sum(c["n_tokens"] for c in refs)
    assert ppl["value"] == pytest.approx(math.exp(nll))
    report = (out / "report.md").read_text()
    assert "Harmful refusal" in report and "Over-refusal" in report and "MMLU accuracy" in report
    # the fine-tuning job's refusal-token report, over the same items and first tokens
    tokens = json.loads((out / "refusal_token_report" / "report.json").read_text())
    assert tokens["n"] == len(records) == metrics["refusal_token_report"]["n"]
    refused = sum(p["predicted"] not in ("respond", "other") for p in tokens["predictions"])
    assert refused == sum(r["judges"]["first_token"]["verdict"] == "refused" for r in records)
    assert "Judge agreement" in report and metrics["refusal"]["agreement"][0]["judges"] == [
        "first_token",
        "phrase",
    ]


def test_a_rerun_gives_the_same_numbers(study: dict[str, Any], unsteered: Path) -> None:
    first = load_metrics(unsteered)
    second = load_metrics(_column(study, "again", {"kind": "none"}))
    for key in ("refusal", "capability", "sets"):
        a, b = dict(first[key]), dict(second[key])
        a.pop("seconds", None), b.pop("seconds", None)
        assert a == b, key
    assert _records(unsteered) == _records(study["tmp"] / "runs" / "again")


def test_steering_is_in_the_path_of_every_measure(study: dict[str, Any], unsteered: Path) -> None:
    vectors = str(study["study"] / "vectors")
    plain = load_metrics(unsteered)
    out = _column(
        study, "caa_big", {"kind": "residual", "vectors": vectors, "category": "global", "alpha": 40.0}
    )
    steered = load_metrics(out)
    assert steered["intervention"]["layer"] in (1, 2)
    cap, base_cap = steered["capability"], plain["capability"]
    assert cap["next-token KL (benign)"]["value"] > 1e-3
    assert cap["reference KL per token"]["value"] > 1e-3
    assert cap["reference perplexity"]["value"] != pytest.approx(base_cap["reference perplexity"]["value"])
    assert cap["TruthfulQA MC2"]["value"] != pytest.approx(base_cap["TruthfulQA MC2"]["value"])
    steered_caps = {(c["task"], c["id"]): c for c in _records(out, "capability.jsonl")}
    plain_caps = {(c["task"], c["id"]): c for c in _records(unsteered, "capability.jsonl")}
    mmlu = [k for k in plain_caps if k[0] == "mmlu"]
    assert any(steered_caps[k]["logprobs"] != plain_caps[k]["logprobs"] for k in mmlu)
    # (GSM8K generation under steering: tests/test_eval_capability.py; this tiny model emits special tokens)
    gens = {r["id"]: (r["first_token"], r["output"]) for r in _records(out)}
    base = {r["id"]: (r["first_token"], r["output"]) for r in _records(unsteered)}
    assert sum(gens[k] != base[k] for k in base) > len(base) // 2
    ablated = load_metrics(_column(study, "ablation", {"kind": "ablation", "vectors": vectors}))
    assert ablated["capability"]["next-token KL (benign)"]["value"] > 0


def test_a_gate_column_steers_per_item(study: dict[str, Any]) -> None:
    gates = sorted(p.name for p in (study["study"] / "gates").iterdir())
    assert gates
    out = _column(
        study, f"gate_{gates[0]}", {"kind": "gate", "gate": str(study["study"] / "gates" / gates[0])}
    )
    records = _records(out)
    assert all("gate_score" in r["extra"] and "alpha" in r["extra"] for r in records)
    # the study calibrates every gate (study.calibration: platt): the label names the wrapper and the gate
    assert load_metrics(out)["intervention"]["gate_kind"] == f"calibrated({gates[0]})"
    caps = _records(out, "capability.jsonl")
    assert all("gate_score" in c for c in caps)


def test_the_sweep_writes_curves_and_a_pareto_plot(study: dict[str, Any]) -> None:
    sweep = {
        "alphas": [-20.0, 20.0],
        "categories": ["global", "safety"],
        "intervention": {"kind": "residual", "vectors": str(study["study"] / "vectors")},
        "max_new_tokens": 1,
    }
    out = _column(study, "sweep", {"kind": "none"}, sweep=sweep, capability={"tasks": ["next_token_kl"]})
    points = load_metrics(out)["sweep"]
    assert [(p["category"], p["alpha"]) for p in points] == [
        (c, a) for c in ("global", "safety") for a in (-20.0, 0.0, 20.0)
    ]
    zero = [p for p in points if p["alpha"] == 0.0]
    assert zero[0]["harmful"] == zero[1]["harmful"] and zero[0]["next_token_kl"]["value"] == 0.0
    assert all(p["next_token_kl"]["value"] > 0 for p in points if p["alpha"] != 0.0)
    assert (out / "sweep.png").is_file() and (out / "pareto.png").is_file()


def test_the_table_has_a_column_per_job_and_ci_in_every_cell(study: dict[str, Any], unsteered: Path) -> None:
    runs = study["tmp"] / "runs"
    folders = [p for p in sorted(runs.iterdir()) if (p / "metrics.json").is_file()][:3]
    table = results_table([load_metrics(p) for p in folders])
    lines = table.splitlines()
    assert lines[0].count("|") == len(folders) + 2
    cells = [
        c.strip()
        for line in lines[2:]
        if line.startswith("| ") and "**" not in line
        for c in line.split("|")[2:-1]
    ]
    assert cells and all(c == "-" or ("[" in c and "n=" in c) for c in cells)
    assert "MMLU accuracy" in table and "harmful refusal average" in table


def test_an_existing_out_dir_and_a_bad_kind_are_refused(
    study: dict[str, Any], unsteered: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (unsteered / "metrics.json").read_bytes()
    with pytest.raises(SystemExit):
        main(["eval", "--config", str(study["config"]), "--out_dir", str(unsteered)])
    assert "out_dir" in capsys.readouterr().err
    assert (unsteered / "metrics.json").read_bytes() == before
    with pytest.raises(SystemExit):
        _column(study, "bad_kind", {"kind": "teleport"})
    assert "intervention.kind" in capsys.readouterr().err
    assert not (study["tmp"] / "runs" / "bad_kind").exists()


def test_a_model_without_refusal_tokens_is_judged_by_phrases(study: dict[str, Any], tmp_path: Path) -> None:
    from sae_refusal.testing import build_tiny_model, build_tiny_tokenizer

    folder = tmp_path / "base"
    build_tiny_model("llama", hidden_size=32, num_layers=4).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    out = _column(
        study,
        "base_model",
        {"kind": "none"},
        llm={"name_or_path": str(folder), "dtype": "float32"},
        capability={"tasks": ["next_token_kl"]},
    )
    metrics = load_metrics(out)
    assert metrics["judges"] == {"names": ["phrase"], "primary": "phrase"}
    assert all(set(r["judges"]) == {"phrase"} for r in _records(out))


def test_a_users_csv_is_a_row_of_the_table_with_one_config_entry(
    study: dict[str, Any], unsteered: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = study["tmp"] / "redteam.csv"
    rows = [f"please explain attack {i},{'en' if i % 2 else 'fr'}" for i in range(6)]
    csv.write_text("prompt,language\n" + "\n".join(rows) + "\n")
    entry = {"name": "redteam", "role": "harmful", "path": str(csv), "tag_columns": ["language"]}
    out = _column(study, "user_csv", {"kind": "none"}, sets={"external": [entry]}, capability={"tasks": []})
    metrics = load_metrics(out)
    assert metrics["refusal"]["sets"]["redteam"]["n"] == 6
    assert set(metrics["refusal"]["slices"]["redteam"]["language"]) == {"en", "fr"}
    assert metrics["sets"]["redteam"]["origin"]["path"] == str(csv)
    lines = [r for r in _records(out) if r["set"] == "redteam"]
    assert len(lines) == 6 and {r["tags"]["language"] for r in lines} == {"en", "fr"}
    table = results_table([load_metrics(out)])
    assert "| redteam |" in table and "redteam / language=fr" in table
    assert "| redteam (harmful) | language | en |" in (out / "report.md").read_text()
    # a bad entry fails before the model loads, naming the set and key; nothing is written
    bad = {**entry, "text_column": "question"}
    with pytest.raises(SystemExit):
        _column(study, "bad_set", {"kind": "none"}, sets={"external": [bad]})
    err = capsys.readouterr().err
    assert "sets.external[0] ('redteam')" in err and "text_column" in err
    assert not (study["tmp"] / "runs" / "bad_set").exists()
