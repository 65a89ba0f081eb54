"""SFT examples of the refusal-token recipe: prompt -> refusal token + answer, encoded with loss masks.

An :class:`SFTExample` pairs a prompt with its target: a harmful prompt of CoCoNot category ``c`` gets the
category's token and a short refusal (:func:`~sae_refusal.finetune.refusals.refusal_text`); a benign or
ambiguous prompt gets the respond token and an answer (the prompt's own ``response`` when it has one, else
the base model's answer from :mod:`sae_refusal.finetune.base_answers`).

:func:`encode_example` lays an example out as one causal-LM sequence::

    input_ids = chat-formatted prompt (generation prompt included) + [refusal token] + answer + [end of turn]
    labels    = -100 over the prompt, the input ids elsewhere (only the assistant part is learned)

Labels are aligned with ``input_ids`` (Hugging Face models shift them internally), and ``target_pos`` is
the index of the refusal token, so the logits at ``target_pos - 1`` predict it. An overlong example keeps
the end of the prompt and the refusal token: the answer is cut first (the sequence stays a prefix of the
full one, so the end-of-turn token goes before any answer token), and only when the prompt and the token
alone exceed ``max_length`` is the prompt cut from the left.

The end-of-turn token is read off the chat template (whatever it writes right after an assistant message:
``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3, ``</s>`` for Zephyr), falling back to the
tokenizer's EOS token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import torch
from jinja2 import TemplateError
from torch import Tensor

from sae_refusal.categories import COCONOT_CATEGORIES
from sae_refusal.data.chat import format_prompts, resolve_chat_template
from sae_refusal.data.prompt_set import Label, PromptSet
from sae_refusal.finetune.refusals import refusal_text
from sae_refusal.llm.refusal_tokens import RefusalVocabulary, ResolvedRefusalTokens

__all__ = [
    "IGNORE_INDEX",
    "EncodedSFT",
    "SFTExample",
    "build_examples",
    "class_tokens",
    "collate_sft",
    "encode_example",
    "end_of_turn_token",
]

#: Label value ignored by the loss (prompt and padding positions).
IGNORE_INDEX = -100

_MARKER = "\x1fSAE_REFUSAL_ANSWER\x1f"


@dataclass(frozen=True)
class SFTExample:
    """One training example of the refusal-token recipe (not tokenized).

    Args:
        prompt_id: Id of the prompt.
        prompt_text: The user message (no chat template).
        target_token: The refusal token string the answer starts with (e.g. ``" [respond]"``).
        answer: Text after the token: a refusal for harmful prompts, an answer otherwise.
        target_class: Class index of ``target_token`` (respond 0, then categories in
            :data:`~sae_refusal.categories.COCONOT_CATEGORIES` order, those in the vocabulary only).
    """

    prompt_id: str
    prompt_text: str
    target_token: str
    answer: str
    target_class: int


class EncodedSFT(TypedDict):
    """One encoded example.

    Args:
        input_ids: Prompt ids + refusal token id + answer ids + end-of-turn id (after truncation).
        labels: ``-100`` over the prompt, equal to ``input_ids`` elsewhere.
        target_pos: Index of the refusal token in ``input_ids``.
        target_class: Class index of the refusal token.
        prompt_truncated: 1 if the prompt was cut from the left, else 0.
        answer_truncated: 1 if the answer (or its end-of-turn token) was cut, else 0.
    """

    input_ids: list[int]
    labels: list[int]
    target_pos: int
    target_class: int
    prompt_truncated: int
    answer_truncated: int


def class_tokens(vocab: RefusalVocabulary | ResolvedRefusalTokens) -> dict[str | None, tuple[int, str]]:
    """Category (``None`` = respond) -> ``(class index, token string)``, without needing a tokenizer.

    The order is :class:`~sae_refusal.llm.refusal_tokens.ResolvedRefusalTokens`'s: respond first, then the
    categories present in the vocabulary in ``COCONOT_CATEGORIES`` order.

    Args:
        vocab: A refusal vocabulary, or one already resolved against a tokenizer.
    """
    if isinstance(vocab, ResolvedRefusalTokens):
        return {c: (i, t) for i, (c, t) in enumerate(zip(vocab.categories, vocab.tokens, strict=True))}
    by_category = {category: token for token, category in vocab.tokens.items()}
    order = [c for c in (None, *COCONOT_CATEGORIES) if c in by_category]
    return {c: (i, by_category[c]) for i, c in enumerate(order)}


def build_examples(
    prompt_set: PromptSet,
    vocab: RefusalVocabulary | ResolvedRefusalTokens,
    answers: Mapping[str, str],
) -> list[SFTExample]:
    """Turn labelled prompts into SFT examples, in prompt-set order.

    Harmful prompts get their category's token and :func:`refusal_text`; benign and ambiguous prompts get the
    respond token and their ``response``, else ``answers[prompt.id]``.

    Args:
        prompt_set: The prompts (typically one split).
        vocab: Refusal vocabulary (token -> category) or its resolved form; fixes the class indices.
        answers: Prompt id -> answer for benign / ambiguous prompts without a ``response`` (base-model
            answers); a ``response`` takes precedence.

    Raises:
        ValueError: If a harmful prompt has no category or a category without a token, if an answerable
            prompt is found but the vocabulary has no respond token, or if answerable prompts have neither a
            ``response`` nor an entry in ``answers`` (all such ids are counted, the first ones listed).
    """
    classes = class_tokens(vocab)
    examples: list[SFTExample] = []
    no_answer: list[str] = []
    no_category: list[str] = []
    no_token: dict[str, list[str]] = {}
    for prompt in prompt_set:
        if prompt.label == Label.HARMFUL:
            if prompt.category is None:
                no_category.append(prompt.id)
                continue
            if prompt.category not in classes:
                no_token.setdefault(prompt.category, []).append(prompt.id)
                continue
            index, token = classes[prompt.category]
            answer = refusal_text(prompt.category, prompt.id)
        else:
            if None not in classes:
                tokens = sorted(t for _, t in classes.values())
                raise ValueError(
                    f"refusal_tokens: no respond token (category null) in {tokens}; {prompt.label} prompts "
                    f"such as {prompt.id!r} need one"
                )
            index, token = classes[None]
            found = prompt.response if prompt.response is not None else answers.get(prompt.id)
            if found is None:
                no_answer.append(prompt.id)
                continue
            answer = found
        examples.append(SFTExample(prompt.id, prompt.text, token, answer, index))
    if no_category:
        raise ValueError(
            f"{len(no_category)} harmful prompts have no category, so no refusal token: {no_category[:10]}; "
            f"set `category` or `category_column` on their source"
        )
    if no_token:
        detail = {c: ids[:3] for c, ids in no_token.items()}
        raise ValueError(
            f"refusal_tokens: no token for categories {sorted(no_token)} of harmful prompts (e.g. {detail}); "
            f"add them to refusal_tokens or filter the source with `categories`"
        )
    if no_answer:
        raise ValueError(
            f"{len(no_answer)} benign/ambiguous prompts have neither a `response` nor a base-model answer: "
            f"{no_answer[:10]}{' ...' if len(no_answer) > 10 else ''}; set `response_column` on their source "
            f"or generate base answers first (data module `prepare_data`)"
        )
    return examples


def _special_strings(tokenizer: Any) -> list[str]:
    names = set(getattr(tokenizer, "all_special_tokens", []) or [])
    added = getattr(tokenizer, "get_added_vocab", None)
    if callable(added):
        names.update(added())
    return sorted((n for n in names if n), key=len, reverse=True)


def end_of_turn_token(tokenizer: Any, chat_template: str | None = None) -> tuple[str, int]:
    """The token that ends an assistant turn, as ``(string, id)``.

    Read from the chat template: the special token it writes right after an assistant message's content
    (``<|im_end|>`` for ChatML templates). Falls back to the tokenizer's EOS token.

    Args:
        tokenizer: A Hugging Face tokenizer.
        chat_template: Template overriding the tokenizer's (config key ``chat_template``).

    Raises:
        ValueError: If neither the template nor the tokenizer gives an end token with a single id.
    """
    try:
        template = resolve_chat_template(tokenizer, chat_template)
        explicit = template if isinstance(template, str) else None
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _MARKER}],
            chat_template=explicit,
            tokenize=False,
        )
    except (TemplateError, ValueError, TypeError):
        rendered = None
    if isinstance(rendered, str) and _MARKER in rendered:
        suffix = rendered.split(_MARKER, 1)[1].lstrip(" ")
        for name in _special_strings(tokenizer):
            if suffix.startswith(name):
                token_id = tokenizer.convert_tokens_to_ids(name)
                if isinstance(token_id, int) and token_id >= 0:
                    return name, token_id
    eos, eos_id = getattr(tokenizer, "eos_token", None), getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, str) and isinstance(eos_id, int):
        return eos, eos_id
    raise ValueError(
        "chat_template: cannot tell which token ends an assistant turn (the template writes no special token "
        "after the answer and the tokenizer has no EOS token)"
    )


def encode_example(
    tokenizer: Any,
    example: SFTExample,
    *,
    token_id: int,
    max_length: int,
    chat_template: str | None = None,
    system_prompt: str | None = None,
    eos_token_id: int | None = None,
) -> EncodedSFT:
    """Encode one example as ``prompt + [token_id] + answer + [end of turn]`` with prompt-masked labels.

    Args:
        tokenizer: The tokenizer, with the refusal tokens added.
        example: The example.
        token_id: Id of ``example.target_token`` in ``tokenizer``.
        max_length: Most tokens of the whole sequence (config key ``max_length``); at least 2.
        chat_template: Template overriding the tokenizer's (config key ``chat_template``).
        system_prompt: Optional system message (config key ``system_prompt``).
        eos_token_id: End-of-turn id; default :func:`end_of_turn_token` (pass it to skip re-rendering the
            template for every example).

    Returns:
        ``input_ids``, ``labels``, ``target_pos``, ``target_class`` and the two truncation flags.

    Raises:
        ValueError: If ``max_length < 2`` or the prompt encodes to no tokens.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(
            f"max_length: must be an integer >= 2 (prompt token + refusal token), got {max_length!r}"
        )
    if eos_token_id is None:
        eos_token_id = end_of_turn_token(tokenizer, chat_template)[1]
    formatted = format_prompts(
        tokenizer, [example.prompt_text], chat_template=chat_template, system_prompt=system_prompt
    )[0]
    prompt_ids = list(tokenizer(formatted, add_special_tokens=False)["input_ids"])
    if not prompt_ids:
        raise ValueError(f"prompt {example.prompt_id!r} encodes to zero tokens")
    tail = [*tokenizer(example.answer, add_special_tokens=False)["input_ids"], int(eos_token_id)]
    prompt_truncated = len(prompt_ids) + 1 > max_length
    if prompt_truncated:
        prompt_ids = prompt_ids[-(max_length - 1) :]
    budget = max_length - len(prompt_ids) - 1
    answer_truncated = len(tail) > budget
    tail = tail[:budget]
    target = [int(token_id), *(int(i) for i in tail)]
    return EncodedSFT(
        input_ids=[int(i) for i in prompt_ids] + target,
        labels=[IGNORE_INDEX] * len(prompt_ids) + target,
        target_pos=len(prompt_ids),
        target_class=example.target_class,
        prompt_truncated=int(prompt_truncated),
        answer_truncated=int(answer_truncated),
    )


def collate_sft(rows: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, Tensor]:
    """Right-pad encoded examples into a batch.

    Args:
        rows: Encoded examples (:class:`EncodedSFT`; an extra integer ``index`` is batched too).
        pad_token_id: Id written into padding positions (masked out of attention and loss).

    Returns:
        ``input_ids`` (B, T), ``attention_mask`` (B, T, 1 on real tokens), ``labels`` (B, T, -100 on padding),
        ``target_pos`` (B,), ``target_class`` (B,) and ``index`` (B,) when the rows carry one; all
        ``torch.long``.

    Raises:
        ValueError: If ``rows`` is empty or a row has no tokens.
    """
    if len(rows) == 0:
        raise ValueError("collate_sft: empty batch")
    lengths = [len(row["input_ids"]) for row in rows]
    if min(lengths) == 0:
        raise ValueError(f"collate_sft: row {lengths.index(0)} has no tokens")
    width = max(lengths)
    input_ids_BT = torch.full((len(rows), width), int(pad_token_id), dtype=torch.long)
    attention_mask_BT = torch.zeros((len(rows), width), dtype=torch.long)
    labels_BT = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for b, row in enumerate(rows):
        n = lengths[b]
        input_ids_BT[b, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
        attention_mask_BT[b, :n] = 1
        labels_BT[b, :n] = torch.as_tensor(row["labels"], dtype=torch.long)
    batch = {
        "input_ids": input_ids_BT,
        "attention_mask": attention_mask_BT,
        "labels": labels_BT,
        "target_pos": torch.tensor([int(row["target_pos"]) for row in rows], dtype=torch.long),
        "target_class": torch.tensor([int(row["target_class"]) for row in rows], dtype=torch.long),
    }
    if all("index" in row for row in rows):
        batch["index"] = torch.tensor([int(row["index"]) for row in rows], dtype=torch.long)
    return batch
