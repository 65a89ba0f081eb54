"""Prompt sets: sources (hub or local files), labels, categories, held-out splits, chat templates."""

from sae_refusal.data.chat import (
    ChatTemplateError,
    ChatTemplateFileNotFoundError,
    chat_template_hash,
    format_prompts,
    resolve_chat_template,
)
from sae_refusal.data.prompt_set import Label, Prompt, PromptSet
from sae_refusal.data.sources import (
    LOCAL_PRESETS,
    PRESETS,
    PromptSetConfig,
    PromptSourceConfig,
    load_builtin,
    load_prompt_set,
    load_source,
    preset,
)
from sae_refusal.data.splits import (
    SplitConfig,
    SplitManifest,
    apply_manifest,
    load_or_create_manifest,
    make_split_manifest,
    prompt_set_hash,
    read_manifest,
    write_manifest,
)

__all__ = [
    "LOCAL_PRESETS",
    "PRESETS",
    "ChatTemplateError",
    "ChatTemplateFileNotFoundError",
    "Label",
    "Prompt",
    "PromptSet",
    "PromptSetConfig",
    "PromptSourceConfig",
    "SplitConfig",
    "SplitManifest",
    "apply_manifest",
    "chat_template_hash",
    "format_prompts",
    "load_builtin",
    "load_or_create_manifest",
    "load_prompt_set",
    "load_source",
    "make_split_manifest",
    "preset",
    "prompt_set_hash",
    "read_manifest",
    "resolve_chat_template",
    "write_manifest",
]
