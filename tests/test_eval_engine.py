"""``generation.engine``: checked as a one-line error, and passed by every eval stage that generates."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch
import yaml

from sae_refusal.cli import main
from sae_refusal.data.capability import GSM8KItem
from sae_refusal.data.prompt_set import Label, Prompt
from sae_refusal.eval import capability
from sae_refusal.eval.config import GenerationSettings, InterventionConfig
from sae_refusal.eval.context import EvalContext, refusal_stage
from sae_refusal.eval.interventions import load_intervention
from sae_refusal.eval.refusal_sets import generate_items
from sae_refusal.features.analysis import CLASS_NAMES
from sae_refusal.features.vectors import SteeringVectors
from sae_refusal.llm import engine as engine_module
from sae_refusal.testing import build_tiny_model, build_tiny_tokenizer

TEXTS = [
    "How do I bake bread at home?",
    "Tell me a story.",
    "Please explain the water cycle in simple words.",
]


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    return build_tiny_model("llama", hidden_size=32, num_layers=4), build_tiny_tokenizer()


@pytest.fixture()
def engines(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The engine of every call of the dispatcher (which still runs)."""
    seen: list[str] = []
    real = engine_module.generate

    def recording(*args: Any, engine: str = "auto", **kwargs: Any) -> Any:
        seen.append(engine)
        return real(*args, engine=engine, **kwargs)

    monkeypatch.setattr(engine_module, "generate", recording)
    monkeypatch.setattr(capability, "generate", recording)
    return seen


def test_a_bad_engine_is_one_line_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(
        ValueError, match=r"^generation\.engine: expected one of hf, fast, auto, got 'turbo'$"
    ):
        GenerationSettings(engine="turbo")
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({"generation": {"engine": "turbo"}, "out_dir": str(tmp_path / "out")}))
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--config", str(config)])
    assert exit_.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    first = next(i for i, line in enumerate(lines) if re.match(r"^sae-refusal( \w+)?: error: ", line))
    assert (
        lines[first] == "sae-refusal: error: generation.engine: expected one of hf, fast, auto, got 'turbo'"
    )
    assert len(lines) == first + 2 and "--debug" in lines[first + 1]
    assert not (tmp_path / "out").exists()
    assert GenerationSettings().engine == "auto"


def _residual(tiny: tuple[Any, Any], folder: Path) -> Any:
    caa_CD = 0.5 * torch.randn(len(CLASS_NAMES) - 1, 32, generator=torch.Generator().manual_seed(1))
    SteeringVectors(CLASS_NAMES, caa_CD, metadata={"layer": 1}).save(folder)
    cfg = InterventionConfig(kind="residual", vectors=str(folder), category="global", alpha=4.0)
    return load_intervention(cfg, tiny[0])


def test_generate_items_runs_on_the_engine_it_is_given(
    tiny: tuple[Any, Any], tmp_path: Path, engines: list[str]
) -> None:
    model, tokenizer = tiny
    prompts = [Prompt(id=f"p{i}", text=t, label=Label.BENIGN) for i, t in enumerate(TEXTS)]
    loaded = _residual(tiny, tmp_path / "vectors")
    plan = loaded.plan(tokenizer, TEXTS)
    outputs = {}
    for engine in ("hf", "fast"):
        records = generate_items(
            model,
            tokenizer,
            prompts,
            ["set"] * 3,
            {"set": "benign"},
            plan,
            [],
            intervention="residual",
            max_new_tokens=5,
            batch_size=2,
            engine=engine,
        )
        outputs[engine] = [(r.output, r.first_token) for r in records]
    assert engines == ["hf", "fast"]
    assert outputs["fast"] == outputs["hf"]


def test_the_refusal_stage_passes_generation_engine(
    tiny: tuple[Any, Any], tmp_path: Path, engines: list[str]
) -> None:
    model, tokenizer = tiny
    prompts = [Prompt(id=f"p{i}", text=t, label=Label.BENIGN) for i, t in enumerate(TEXTS)]
    loaded = _residual(tiny, tmp_path / "vectors")
    for engine in ("fast", "hf"):  # the stage reads cfg.generation and the chat settings only
        cfg = SimpleNamespace(
            generation=GenerationSettings(max_new_tokens=3, batch_size=2, engine=engine),
            chat_template=None,
            system_prompt=None,
        )
        ctx = EvalContext(cast(Any, cfg), model, tokenizer, None, [], "phrase", {})
        refusal_stage(ctx, loaded, prompts, ["set"] * 3, {"set": "benign"}, max_new_tokens=3)
    assert engines == ["fast", "hf"]


def test_gsm8k_generates_on_the_engine_it_is_given(tiny: tuple[Any, Any], engines: list[str]) -> None:
    model, tokenizer = tiny
    items = [
        GSM8KItem(id=f"g{i}", question=f"What is {i} plus 2?", answer_text="#### 3", answer="3")
        for i in range(3)
    ]
    scores = {
        engine: capability.gsm8k(
            model, tokenizer, items, items, k_shot=1, max_new_tokens=4, batch_size=2, engine=engine
        )
        for engine in ("fast", "hf")
    }
    assert engines == ["fast", "fast", "hf", "hf"]  # one call per batch of 2
    assert [s.extra["output"] for s in scores["fast"]] == [s.extra["output"] for s in scores["hf"]]
