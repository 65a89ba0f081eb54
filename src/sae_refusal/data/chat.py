"""Chat-template application: raw user messages -> the strings a chat model actually sees.

Every stage that feeds prompts to a model goes through :func:`format_prompts`, so activations, steering
and evaluation see identical text. :func:`chat_template_hash` fingerprints the effective template and
system prompt for cache manifests (a changed template means recompute).

The template is the tokenizer's own unless the config key ``chat_template`` gives one (a Jinja string,
or the path of a file holding one). A tokenizer without a template and no configured one is an error,
never a silent fallback to raw text.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2 import TemplateError

if TYPE_CHECKING:  # transformers is slow to import; only needed for annotations
    from transformers import PreTrainedTokenizerBase


class ChatTemplateError(ValueError):
    """No usable chat template (or the template failed to render)."""


def _tokenizer_name(tokenizer: PreTrainedTokenizerBase) -> str:
    name = getattr(tokenizer, "name_or_path", "") or ""
    return repr(name) if name else f"<unnamed {type(tokenizer).__name__}>"


def resolve_chat_template(
    tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None
) -> str | dict[str, str]:
    """The effective chat template: ``chat_template`` (a Jinja string or a file path) or the tokenizer's.

    Args:
        tokenizer: A Hugging Face tokenizer.
        chat_template: Configured template overriding the tokenizer's, or ``None``.

    Raises:
        ChatTemplateError: If neither exists.
    """
    if chat_template:
        if "{" not in chat_template and Path(chat_template).expanduser().is_file():
            return Path(chat_template).expanduser().read_text(encoding="utf-8")
        return chat_template
    own: Any = getattr(tokenizer, "chat_template", None)
    if own:
        if isinstance(own, dict):
            return {str(k): str(v) for k, v in own.items()}
        return str(own)
    raise ChatTemplateError(
        f"tokenizer {_tokenizer_name(tokenizer)} has no chat template; set the config key `chat_template` "
        f"(a Jinja template string or the path of a file holding one)"
    )


def _messages(text: str, system_prompt: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": text})
    return messages


def format_prompts(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    chat_template: str | None = None,
    system_prompt: str | None = None,
) -> list[str]:
    """Wrap each user message in the chat template, ending with the assistant generation prompt.

    Args:
        tokenizer: A Hugging Face tokenizer.
        texts: User messages (no template applied).
        chat_template: Template overriding the tokenizer's (config key ``chat_template``).
        system_prompt: Optional system message put before each user message.

    Returns:
        One formatted string per text (``add_generation_prompt=True``, not tokenized).

    Raises:
        ChatTemplateError: If there is no template, or it fails to render (e.g. it rejects a system role).
    """
    if isinstance(texts, str):
        raise TypeError("format_prompts: `texts` must be a sequence of strings, not one string")
    template = resolve_chat_template(tokenizer, chat_template)
    # A dict of named templates is the tokenizer's own: let transformers pick from it.
    explicit = template if isinstance(template, str) else None
    out: list[str] = []
    for text in texts:
        try:
            rendered = tokenizer.apply_chat_template(
                _messages(text, system_prompt),
                chat_template=explicit,
                add_generation_prompt=True,
                tokenize=False,
            )
        except TemplateError as err:
            hint = ""
            if system_prompt:
                hint = " (does the template accept a system message? unset `system_prompt`)"
            raise ChatTemplateError(
                f"chat template of tokenizer {_tokenizer_name(tokenizer)} failed to render: {err}{hint}"
            ) from err
        if not isinstance(rendered, str):
            raise ChatTemplateError(f"apply_chat_template returned {type(rendered).__name__}, expected str")
        out.append(rendered)
    return out


def chat_template_hash(
    tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None, system_prompt: str | None = None
) -> str:
    """SHA-256 of the effective chat template and system prompt, for cache manifests.

    Raises:
        ChatTemplateError: If there is no template.
    """
    template = resolve_chat_template(tokenizer, chat_template)
    payload = json.dumps({"chat_template": template, "system_prompt": system_prompt}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


__all__ = ["ChatTemplateError", "chat_template_hash", "format_prompts", "resolve_chat_template"]
