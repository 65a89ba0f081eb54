"""Callbacks of the fine-tuning job: held-out refusal-token report and export at the end of fit."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L

from sae_refusal.atomic import atomic_write_text
from sae_refusal.data.prompt_set import PromptSet
from sae_refusal.data.sources import PromptSetConfig, load_prompt_set

log = logging.getLogger(__name__)


class RefusalReportCallback(L.Callback):
    """At the end of fit, export the model, then report refusal-token accuracy on held-out prompts.

    The export comes first: the trained weights are what a time-limited job must not lose; the report can
    be recomputed from them (``benchmarks/eval_refusal_artifact.py``). Each stage's wall time is logged.

    The held-out prompts are the data module's ``split`` (the test split of its manifest, never trained on)
    plus ``extra_prompts`` (e.g. the CoCoNot contrast set for over-refusal). Everything goes to
    ``<log_dir>/refusal_report`` (``report.json``, ``report.md``, ``samples.json``) and the model to
    ``<log_dir>/export`` (``model/`` HF folder, ``artifact/`` with LoRA). Runs on global rank zero only.

    Args:
        extra_prompts: Additional held-out prompt sources evaluated alongside the test split.
        split: Which split of the data module's manifest to evaluate.
        mode: ``greedy`` (the first generated token must be the right refusal token) or ``restricted``
            (argmax among the refusal tokens only).
        batch_size: Prompts per forward pass.
        max_length: Token budget per prompt.
        n_samples: Benign / contrast prompts answered greedily and saved, to check answers stay sensible.
        export: Also write the fine-tuned model (HF folder, plus the artifact with LoRA).
        subsets: Name -> prompt sources: the same report restricted to those sources, written to
            ``refusal_report/<name>/`` (e.g. ``bar: [coconot, alpaca]`` for held-out CoCoNot + Alpaca only).
    """

    def __init__(
        self,
        extra_prompts: PromptSetConfig | None = None,
        split: str = "test",
        mode: str = "greedy",
        batch_size: int = 32,
        max_length: int = 1024,
        n_samples: int = 6,
        export: bool = True,
        subsets: dict[str, list[str]] | None = None,
    ) -> None:
        self.extra_prompts = extra_prompts
        self.split = split
        self.mode = mode
        self.batch_size = batch_size
        self.max_length = max_length
        self.n_samples = n_samples
        self.export = export
        self.subsets = dict(subsets or {})
        for name in self.subsets:
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"subsets: {name!r} is not a usable folder name")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check ``subsets`` against the configured sources before training, not after it."""
        if stage != "fit" or not self.subsets:
            return
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        configs = [getattr(datamodule, "prompts", None), self.extra_prompts]
        known = {"builtin"} if configs[0] is None else set()
        for config in configs:
            if config is not None:
                known |= {source.name for source in config.resolved_sources()}
        for name, sources in self.subsets.items():
            unknown = sorted(set(sources) - known)
            if unknown:
                raise ValueError(
                    f"subsets.{name}: unknown prompt sources {unknown}; the held-out prompts come from "
                    f"{sorted(known)}"
                )

    def held_out(self, datamodule: Any) -> PromptSet:
        prompts: PromptSet = datamodule.held_out_prompts(self.split)
        if self.extra_prompts is not None:
            prompts = prompts + load_prompt_set(self.extra_prompts)
        return prompts

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        from sae_refusal.eval.refusal_tokens import evaluate_refusal_tokens, sample_answers
        from sae_refusal.finetune.module import RefusalSFTModule

        if not isinstance(pl_module, RefusalSFTModule):
            raise TypeError(f"RefusalReportCallback needs a RefusalSFTModule, got {type(pl_module).__name__}")
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if self.export:
            start = time.perf_counter()
            written = pl_module.export(out_dir / "export")
            self._stage_done("export", start, {k: str(v) for k, v in written.items()})
        model, tokenizer = pl_module.model, pl_module.tokenizer
        model.eval()
        start = time.perf_counter()
        prompts = self.held_out(trainer.datamodule)  # type: ignore[attr-defined]
        report = evaluate_refusal_tokens(
            model,
            tokenizer,
            prompts,
            vocab=pl_module.vocab,
            mode=self.mode,
            batch_size=self.batch_size,
            max_length=self.max_length,
        )
        self._stage_done("held-out report", start, f"{len(prompts)} prompts")
        report.save(out_dir / "refusal_report")
        reports = {"all": report}
        for name, sources in self.subsets.items():
            reports[name] = report.subset(sources)
            reports[name].save(out_dir / "refusal_report" / name)
        if trainer.logger is not None:
            metrics: dict[str, float] = {}
            for name, rep in reports.items():
                metrics[f"report/{name}/macro_f1"] = rep.macro_f1_all6
                metrics[f"report/{name}/accuracy"] = rep.accuracy
                for key in ("false_refusal_rate", "over_refusal_rate", "harmful_refusal_rate"):
                    value = getattr(rep, key)
                    if value is not None:
                        metrics[f"report/{name}/{key}"] = value
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        answerable = prompts.filter(lambda p: str(p.label) != "harmful")
        step = max(len(answerable) // max(self.n_samples, 1), 1)
        chosen = PromptSet(list(answerable)[::step][: self.n_samples])
        start = time.perf_counter()
        samples = sample_answers(model, tokenizer, chosen, n=self.n_samples, vocab=pl_module.vocab)
        self._stage_done("sample answers", start, f"{len(samples)} answers")
        atomic_write_text(out_dir / "refusal_report" / "samples.json", json.dumps(samples, indent=2))
        log.info("refusal report written to %s", out_dir / "refusal_report")
        for name, rep in reports.items():
            print(f"## Held-out refusal-token report: {name}\n\n{rep.to_markdown()}")

    @staticmethod
    def _stage_done(stage: str, start: float, detail: Any) -> None:
        # print as well as log: the GPU job script greps its run logs, where logging may be silenced
        message = f"RefusalReportCallback: {stage} in {time.perf_counter() - start:.1f} s ({detail})"
        log.info(message)
        print(message, flush=True)
