"""Chat-template application: raw user messages -> the strings a chat model actually sees.

Every stage that feeds prompts to a model goes through :func:`format_prompts`, so activations, steering
and evaluation see identical text. :func:`chat_template_hash` fingerprints the effective template and
system prompt for cache manifests (a changed template means recompute).

The template is the tokenizer's own unless the config key ``chat_template`` gives one (a Jinja string,
or the path of a file holding one). A tokenizer without a template and no configured one is an error,
never a silent fallback to raw text.

A configured value is read as a file when it holds no Jinja markup (``{{``, ``{%``, ``{#``); a ``.json``
file must hold a ``chat_template`` key (``tokenizer_config.json`` / ``chat_template.json`` style). Values
that can only be mistakes are refused, naming the config key: a path-like value (a template suffix such as
``.jinja``, or a path separator) that does not exist, a markup-free value that is no file, and any template
that renders every prompt identically (it ignores the message content).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2 import TemplateError

if TYPE_CHECKING:  # transformers is slow to import; only needed for annotations
    from transformers import PreTrainedTokenizerBase


class ChatTemplateError(ValueError):
    """No usable chat template (or the template failed to render)."""


class ChatTemplateFileNotFoundError(ChatTemplateError, FileNotFoundError):
    """The configured chat template looks like a file path, but no such file exists."""


_JINJA_MARKUP = ("{{", "{%", "{#")
_TEMPLATE_SUFFIXES = re.compile(r"\.(jinja2?|j2|txt|json|tmpl|tpl)$", re.IGNORECASE)
# Two user messages that any real template renders differently.
_PROBES = ("sae-refusal probe: first message", "sae-refusal probe: second message")


def _tokenizer_name(tokenizer: PreTrainedTokenizerBase) -> str:
    name = getattr(tokenizer, "name_or_path", "") or ""
    return repr(name) if name else f"<unnamed {type(tokenizer).__name__}>"


def _looks_like_path(value: str) -> bool:
    stripped = value.strip()
    if "\n" in stripped:
        return False
    return bool(_TEMPLATE_SUFFIXES.search(stripped)) or any(sep in stripped for sep in ("/", "\\", "~"))


def _read_template_file(path: Path, key: str) -> str:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() != ".json":
        return text
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ChatTemplateError(f"{key}: {str(path)!r} is not valid JSON ({err})") from err
    template = data.get("chat_template") if isinstance(data, dict) else None
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...] as in tokenizer_config.json
        named = {d.get("name"): d.get("template") for d in template if isinstance(d, dict)}
        template = named.get("default")
    if not isinstance(template, str) or not template.strip():
        raise ChatTemplateError(
            f"{key}: {str(path)!r} holds no `chat_template` string (a .json template file must look like "
            "tokenizer_config.json or chat_template.json)"
        )
    return template


def resolve_chat_template(
    tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None, *, key: str = "chat_template"
) -> str | dict[str, str]:
    """The effective chat template: ``chat_template`` (a Jinja string or a file path) or the tokenizer's.

    A configured value without Jinja markup is the path of a template file (a ``.json`` file must hold a
    ``chat_template`` key).

    Args:
        tokenizer: A Hugging Face tokenizer.
        chat_template: Configured template overriding the tokenizer's, or ``None``.
        key: Config key of ``chat_template``, named in errors (e.g. ``data.cache.chat_template``).

    Raises:
        ChatTemplateFileNotFoundError: If ``chat_template`` looks like a file path that does not exist
            (a ``FileNotFoundError`` and a ``ChatTemplateError``).
        ChatTemplateError: If ``chat_template`` holds no Jinja markup and is not a file, or if neither it
            nor the tokenizer's own template exists.
    """
    if chat_template:
        if any(marker in chat_template for marker in _JINJA_MARKUP):
            return chat_template
        path = Path(chat_template.strip()).expanduser()
        if path.is_file():
            return _read_template_file(path, key)
        if _looks_like_path(chat_template):
            raise ChatTemplateFileNotFoundError(
                f"{key}: template file {chat_template!r} does not exist (a Jinja template string must "
                "contain {{ ... }} or {% ... %} markup)"
            )
        raise ChatTemplateError(
            f"{key}: {chat_template!r} is neither a Jinja template (no "
            "{{ ... }} or {% ... %} markup: every prompt would render as this same text) nor an existing "
            "template file"
        )
    own: Any = getattr(tokenizer, "chat_template", None)
    if own:
        if isinstance(own, dict):
            return {str(k): str(v) for k, v in own.items()}
        return str(own)
    raise ChatTemplateError(
        f"tokenizer {_tokenizer_name(tokenizer)} has no chat template; set the config key `{key}` "
        f"(a Jinja template string or the path of a file holding one)"
    )


def _messages(text: str, system_prompt: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": text})
    return messages


def _render(
    tokenizer: PreTrainedTokenizerBase,
    template: str | dict[str, str],
    text: str,
    system_prompt: str | None,
    key: str,
) -> str:
    # A dict of named templates is the tokenizer's own: let transformers pick from it.
    explicit = template if isinstance(template, str) else None
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
            f"{key}: chat template of tokenizer {_tokenizer_name(tokenizer)} failed to render: {err}{hint}"
        ) from err
    if not isinstance(rendered, str):
        raise ChatTemplateError(f"apply_chat_template returned {type(rendered).__name__}, expected str")
    return rendered


def _check_uses_content(
    tokenizer: PreTrainedTokenizerBase,
    template: str | dict[str, str],
    system_prompt: str | None,
    key: str,
    configured: bool,
) -> None:
    """Refuse a template that renders two different user messages identically."""
    first, second = (_render(tokenizer, template, probe, system_prompt, key) for probe in _PROBES)
    if first == second:
        source = "the configured template" if configured else f"the template of {_tokenizer_name(tokenizer)}"
        raise ChatTemplateError(
            f"{key}: {source} renders every prompt identically, as {first[:80]!r}: it ignores the message "
            "content (does it loop over `messages` and print `message['content']`?)"
        )


def format_prompts(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    chat_template: str | None = None,
    system_prompt: str | None = None,
    key: str = "chat_template",
) -> list[str]:
    """Wrap each user message in the chat template, ending with the assistant generation prompt.

    Args:
        tokenizer: A Hugging Face tokenizer.
        texts: User messages (no template applied).
        chat_template: Template overriding the tokenizer's (config key ``chat_template``).
        system_prompt: Optional system message put before each user message.
        key: Config key of ``chat_template``, named in errors.

    Returns:
        One formatted string per text (``add_generation_prompt=True``, not tokenized).

    Raises:
        ChatTemplateError: If there is no template, it fails to render (e.g. it rejects a system role) or
            it renders every message identically; see also :func:`resolve_chat_template`.
    """
    if isinstance(texts, str):
        raise TypeError("format_prompts: `texts` must be a sequence of strings, not one string")
    template = resolve_chat_template(tokenizer, chat_template, key=key)
    _check_uses_content(tokenizer, template, system_prompt, key, configured=bool(chat_template))
    return [_render(tokenizer, template, text, system_prompt, key) for text in texts]


def chat_template_hash(
    tokenizer: PreTrainedTokenizerBase,
    chat_template: str | None = None,
    system_prompt: str | None = None,
    *,
    key: str = "chat_template",
) -> str:
    """SHA-256 of the effective chat template and system prompt, for cache manifests.

    The template is checked as :func:`format_prompts` would (it must render and use the message
    content), so a bad one fails before any cache lookup.

    Args:
        tokenizer: A Hugging Face tokenizer.
        chat_template: Template overriding the tokenizer's (config key ``chat_template``).
        system_prompt: Optional system message put before each user message.
        key: Config key of ``chat_template``, named in errors.

    Raises:
        ChatTemplateError: If there is no usable template (see :func:`format_prompts`).
    """
    template = resolve_chat_template(tokenizer, chat_template, key=key)
    _check_uses_content(tokenizer, template, system_prompt, key, configured=bool(chat_template))
    payload = json.dumps({"chat_template": template, "system_prompt": system_prompt}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


__all__ = [
    "ChatTemplateError",
    "ChatTemplateFileNotFoundError",
    "chat_template_hash",
    "format_prompts",
    "resolve_chat_template",
]
