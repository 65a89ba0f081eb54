"""The base model's own answers to benign / ambiguous prompts that come without a reference answer.

Training ``[respond]`` on the base model's ordinary answers keeps its behaviour on answerable prompts: only
the first token changes. Answers are generated once (greedy by default, left-padded batches, the project's
chat template, stopped at the end-of-turn token) and cached in a JSONL file:

* line 1: ``{"header": {...}}``: the identity of the answers (model fingerprint, dtype, chat-template hash,
  ``max_new_tokens``, ``temperature``);
* then one row per prompt: ``{"id", "text_sha256", "answer"}``.

A row is reused only when the header matches and the prompt's id *and* text hash match; only missing
prompts are generated. The file is rewritten atomically after every generated batch, so an interrupt loses
at most one batch. A cache written for another model or other settings is never reused: it is moved aside to
``<name>.<old identity>.bak`` and a new one is started (with ``generate=False`` it is an error instead).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae_refusal.atomic import atomic_write_text
from sae_refusal.data.chat import chat_template_hash, format_prompts
from sae_refusal.data.prompt_set import Label, Prompt, PromptSet
from sae_refusal.finetune.examples import end_of_turn_token
from sae_refusal.llm.batched import generate_texts, stop_token_ids
from sae_refusal.llm.loading import LLMConfig, load_model, load_tokenizer, model_fingerprint

__all__ = [
    "ANSWER_CACHE_VERSION",
    "AnswerCacheError",
    "AnswerConfig",
    "answer_identity",
    "base_answers",
    "needs_answer",
    "read_answer_cache",
]

log = logging.getLogger(__name__)

ANSWER_CACHE_VERSION = 1


class AnswerCacheError(ValueError):
    """The answer cache is unreadable, belongs to another model / settings, or lacks needed answers."""


@dataclass
class AnswerConfig:
    """How base-model answers are generated and cached.

    Args:
        cache_path: JSONL file of cached answers; ``None`` keeps nothing on disk (the data module then uses
            a default path under its ``root``).
        max_new_tokens: Most tokens generated per answer (answers cut there are kept as they are).
        batch_size: Prompts per ``generate`` call; the cache is written after each batch.
        temperature: 0 for greedy decoding (reproducible); above 0 samples at that temperature.
    """

    cache_path: str | None = None
    max_new_tokens: int = 96
    batch_size: int = 16
    temperature: float = 0.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"answers.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"answers.batch_size must be >= 1, got {self.batch_size}")
        if self.temperature < 0:
            raise ValueError(f"answers.temperature must be >= 0, got {self.temperature}")


def needs_answer(prompt: Prompt) -> bool:
    """Whether a prompt needs a base-model answer: benign or ambiguous, without a ``response``."""
    return prompt.label != Label.HARMFUL and prompt.response is None


def _text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def answer_identity(
    llm: LLMConfig,
    cfg: AnswerConfig,
    tokenizer: Any,
    *,
    chat_template: str | None = None,
    system_prompt: str | None = None,
) -> dict[str, Any]:
    """Everything that determines the answers: the cache header.

    Args:
        llm: The base model config (fingerprinted without loading the weights).
        cfg: Generation settings.
        tokenizer: The base tokenizer (for the chat-template hash).
        chat_template: Template overriding the tokenizer's (config key ``chat_template``).
        system_prompt: Optional system message (config key ``system_prompt``).
    """
    return {
        "version": ANSWER_CACHE_VERSION,
        "model": model_fingerprint(llm),
        "dtype": llm.dtype,
        "chat_template_sha256": chat_template_hash(tokenizer, chat_template, system_prompt),
        "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature,
    }


def _identity_key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def read_answer_cache(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, dict[str, str]]]:
    """Read a cache file: ``(header, {id: {"text_sha256", "answer"}})``.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        AnswerCacheError: If the file has no header line or a malformed row (the line is named).
    """
    path = Path(path)
    header: dict[str, Any] | None = None
    rows: dict[str, dict[str, str]] = {}
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if header is None:
                    header = dict(row["header"])
                    continue
                rows[str(row["id"])] = {"text_sha256": str(row["text_sha256"]), "answer": str(row["answer"])}
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                what = "header line" if header is None else "answer row"
                raise AnswerCacheError(
                    f"answers.cache_path: {path}:{lineno} is not a valid {what} ({err!r}); delete the file "
                    f"or choose another answers.cache_path"
                ) from err
    if header is None:
        raise AnswerCacheError(
            f"answers.cache_path: {path} has no header line; delete it or choose another path"
        )
    return header, rows


def _write_cache(path: Path, identity: dict[str, Any], rows: dict[str, dict[str, str]]) -> None:
    lines = [json.dumps({"header": identity}, sort_keys=True)]
    lines += [json.dumps({"id": pid, **row}, ensure_ascii=False) for pid, row in rows.items()]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _generate(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    cfg: AnswerConfig,
    *,
    stop_ids: list[int],
    chat_template: str | None,
    system_prompt: str | None,
) -> list[str]:
    """Answer one batch of user messages; each answer is cut at its first stop token and stripped."""
    formatted = format_prompts(tokenizer, texts, chat_template=chat_template, system_prompt=system_prompt)
    answers = generate_texts(
        model,
        tokenizer,
        formatted,
        max_new_tokens=cfg.max_new_tokens,
        stop_ids=stop_ids,
        batch_size=cfg.batch_size,
        temperature=cfg.temperature,
    )
    return [answer.strip() for answer in answers]


def base_answers(
    prompt_set: PromptSet,
    llm: LLMConfig,
    cfg: AnswerConfig,
    *,
    model: Any = None,
    tokenizer: Any = None,
    chat_template: str | None = None,
    system_prompt: str | None = None,
    generate: bool = True,
) -> dict[str, str]:
    """Base-model answers for every prompt of ``prompt_set`` that needs one (:func:`needs_answer`).

    Cached answers are reused; missing ones are generated in batches of ``cfg.batch_size`` and written to
    ``cfg.cache_path`` after every batch. Nothing is loaded when no prompt needs an answer, and the model is
    loaded only when something must be generated.

    Args:
        prompt_set: The prompts; harmful ones and ones with a ``response`` are skipped.
        llm: The base model config; its fingerprint keys the cache.
        cfg: Generation and cache settings.
        model: The base model already loaded from ``llm`` (else loaded on demand).
        tokenizer: The base tokenizer (else loaded from ``llm``).
        chat_template: Template overriding the tokenizer's (config key ``chat_template``).
        system_prompt: Optional system message (config key ``system_prompt``).
        generate: If false, only read the cache (for ``setup`` on every DDP rank): a missing answer is an
            error instead of a generation.

    Returns:
        Prompt id -> answer (stripped; possibly cut at ``max_new_tokens``), for the prompts that need one.

    Raises:
        AnswerCacheError: If the cache file is malformed, or (with ``generate=False``) belongs to another
            model / settings or lacks answers.
    """
    needed = [p for p in prompt_set if needs_answer(p)]
    if not needed:
        return {}
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(llm)
    identity = answer_identity(llm, cfg, tokenizer, chat_template=chat_template, system_prompt=system_prompt)
    path = Path(cfg.cache_path) if cfg.cache_path is not None else None
    rows: dict[str, dict[str, str]] = {}
    if path is not None and path.exists():
        header, cached = read_answer_cache(path)
        if header == identity:
            rows = cached
        elif not generate:
            raise AnswerCacheError(
                f"answers.cache_path: {path} holds answers of another model or generation settings (differs "
                f"in {_differences(header, identity)}); run prepare_data to generate answers for this one"
            )
        else:
            aside = path.with_name(f"{path.name}.{_identity_key(header)[:12]}.bak")
            os.replace(path, aside)
            log.warning(
                "answers.cache_path: %s was written for another model or settings (differs in %s); "
                "not reused, moved to %s",
                path,
                _differences(header, identity),
                aside,
            )

    answers: dict[str, str] = {}
    missing: list[Prompt] = []
    for prompt in needed:
        row = rows.get(prompt.id)
        if row is not None and row["text_sha256"] == _text_hash(prompt.text):
            answers[prompt.id] = row["answer"]
        else:
            missing.append(prompt)
    if not missing:
        return answers
    if not generate:
        ids = [p.id for p in missing]
        raise AnswerCacheError(
            f"answers.cache_path: {path} lacks base answers for {len(ids)} prompts, e.g. {ids[:5]}; run "
            f"prepare_data first (it generates them)"
        )

    log.info("generating base answers for %d of %d prompts", len(missing), len(needed))
    if model is None:
        model = load_model(llm)
    model.eval()
    stop_ids = stop_token_ids(model, tokenizer, [end_of_turn_token(tokenizer, chat_template)[1]])
    for start in range(0, len(missing), cfg.batch_size):
        batch = missing[start : start + cfg.batch_size]
        texts = _generate(
            model,
            tokenizer,
            [p.text for p in batch],
            cfg,
            stop_ids=stop_ids,
            chat_template=chat_template,
            system_prompt=system_prompt,
        )
        for prompt, text in zip(batch, texts, strict=True):
            answers[prompt.id] = text
            rows[prompt.id] = {"text_sha256": _text_hash(prompt.text), "answer": text}
        if path is not None:
            _write_cache(path, identity, rows)
    return answers
