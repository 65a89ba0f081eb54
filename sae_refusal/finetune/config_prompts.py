"""The prompts of a fine-tuning YAML (``lightning_configs/finetune/*.yaml``) without building the CLI.

Evaluation and analysis scripts need exactly the prompts a fine-tune trained and was reported on: the data
module's prompt sources with their split manifest, and the report callback's extra held-out prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sae_refusal.data.prompt_set import PromptSet
from sae_refusal.data.sources import PromptSetConfig, PromptSourceConfig, load_prompt_set
from sae_refusal.data.splits import SplitConfig, split_prompt_set

__all__ = ["FinetunePrompts", "finetune_prompts", "prompt_set_config"]


def prompt_set_config(raw: dict[str, Any], data_root: str | None = None) -> PromptSetConfig:
    """A :class:`PromptSetConfig` from its YAML mapping; ``data_root`` overrides the file's.

    Raises:
        ValueError: If a source entry is not a mapping or has unknown keys (names the source).
    """
    sources = []
    for i, entry in enumerate(raw.get("sources", [])):
        if not isinstance(entry, dict):
            raise ValueError(f"prompts.sources[{i}]: expected a mapping, got {type(entry).__name__}")
        try:
            sources.append(PromptSourceConfig(**entry))
        except TypeError as err:
            raise ValueError(f"prompts.sources[{i}] ({entry.get('name')!r}): {err}") from err
    return PromptSetConfig(
        sources=sources, presets=list(raw.get("presets", [])), data_root=data_root or raw.get("data_root")
    )


@dataclass
class FinetunePrompts:
    """The prompts of a fine-tuning config.

    Args:
        prompts: All data-module prompts, ``split`` set from the manifest.
        extra: The report callback's ``extra_prompts`` (held out, e.g. the CoCoNot contrast set).
    """

    prompts: PromptSet
    extra: PromptSet

    @property
    def held_out(self) -> PromptSet:
        """What the fine-tuning report evaluates: the test split plus the extra prompts."""
        return self.prompts.split("test") + self.extra


def finetune_prompts(
    config: str | Path, data_root: str | None = None, root: str = "runs/finetune_data"
) -> FinetunePrompts:
    """Load the prompts of a fine-tuning YAML with the same split manifest as the fine-tune.

    Args:
        config: The YAML file.
        data_root: Overrides the data roots of the data module and of the callback's extra prompts.
        root: Folder of the default split manifest (the data module's ``root``).

    Raises:
        ValueError: If the file has no ``data.prompts`` mapping.
    """
    cfg = yaml.safe_load(Path(config).read_text()) or {}
    data = cfg.get("data") or {}
    if not isinstance(data.get("prompts"), dict):
        raise ValueError(f"{config}: no `data.prompts` mapping")
    prompts = load_prompt_set(prompt_set_config(data["prompts"], data_root))
    prompts = split_prompt_set(
        prompts, SplitConfig(**data.get("split", {})), data.get("manifest_path"), data.get("root", root)
    )
    extra_cfg = None
    for callback in (cfg.get("trainer") or {}).get("callbacks") or []:
        if str(callback.get("class_path", "")).endswith("RefusalReportCallback"):
            extra_cfg = (callback.get("init_args") or {}).get("extra_prompts")
    extra = load_prompt_set(prompt_set_config(extra_cfg, data_root)) if extra_cfg else PromptSet([])
    return FinetunePrompts(prompts=prompts, extra=extra)
