"""Capability scores with an intervention in the path: MMLU, GSM8K, TruthfulQA MC, reference answers, KL.

Every function takes ``around``: ``around(indices)`` returns a context manager entered around each batch's
forward (or ``generate``), given the *item* index of every row of that batch (an item scored on several
rows, one per answer choice, repeats its index). The caller passes e.g.
``lambda idx: Intervention(model, {layer: ResidualSteering(v, alpha)})`` for a global edit, or a per-row
plan (a conditional gate's alpha per item); the hooks of :mod:`sae_refusal.llm.hooks` then act on every
position of the scored forward and on the prefill and every decode step of generation. ``around=None``
is the unsteered model.

Design notes:

* **One log-likelihood primitive.** :func:`continuation_logprobs` tokenises context and continuation
  *separately* and concatenates the ids, so the boundary is exact (no merge across it), and scores rows in
  left-padded batches sorted by length, ``position_ids`` from the attention mask, one forward per batch
  under ``torch.inference_mode``, float32 ``log_softmax``. A row's score does not depend on its batch. Only
  the last ``max continuation + 1`` positions' logits are materialised where the model accepts
  ``logits_to_keep``. An overlong row loses the start of its context, never the continuation.
* **No special tokens are added** when encoding (``add_special_tokens=False``, as elsewhere in the
  project): chat-formatted text carries the template's own tokens, plain-text prompts get none (as
  lm-eval-harness does for models without a mandatory BOS).
* **Plain-text prompts for the benchmarks.** MMLU, GSM8K and TruthfulQA use the standard few-shot text
  formats without a chat template: a refusal-token chat model emits its decision token (``[respond]`` /
  ``[refuse]``) first after the generation prompt, so a chat-formatted prompt would score the decision
  token's neighbourhood, not the answer. Plain text measures the knowledge the intervention may damage, and
  matches published numbers. Reference answers and next-token KL do use the chat template: they measure the
  assistant's behaviour on benign chat prompts.
* **KL(unsteered || steered).** :func:`reference_answers` and :func:`next_token_kl` run each batch twice,
  without and with ``around``, and compare the full next-token distributions in float32
  (``sum_v p (log p - log q)``). With ``around=None`` the second pass is skipped and KL is exactly 0; an
  identity intervention (alpha 0) gives 0 as well, since the hooks leave the hidden states bit-identical.
* **Per-item results.** Every function returns one :class:`ItemScore` per item, in input order:

  ============================  ===============================  ===========================================
  function                      ``value``                        ``extra``
  ============================  ===============================  ===========================================
  :func:`mmlu`                  1.0 if argmax choice is right    ``pred``, ``answer``, ``logprobs`` (per
                                                                 choice), ``subject``
  :func:`gsm8k`                 1.0 on exact match               ``output`` (cut text), ``pred`` (number or
                                                                 ``None``), ``answer``
  :func:`truthfulqa_mc`         MC1 (0.0 / 1.0)                  ``mc1``, ``mc2``, ``best_logprob``,
                                                                 ``correct_logprobs``, ``incorrect_logprobs``
  :func:`reference_answers`     mean NLL per response token      ``n_tokens``, ``nll_sum``, ``kl`` (mean
                                (nats, steered model)            per-token KL over the response positions)
  :func:`next_token_kl`         KL of the first response token   ``argmax_unsteered``, ``argmax_steered``
  ============================  ===============================  ===========================================

  Aggregates (:func:`accuracy`, :func:`mean_of`, :func:`perplexity`) are plain point estimates; confidence
  intervals are computed from the per-item values by :mod:`sae_refusal.eval.stats`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from sae_refusal.data.capability import (
    MMLU_LETTERS,
    GSM8KItem,
    MCItem,
    TruthfulQAItem,
    extract_final_number,
    group_by_subject,
)
from sae_refusal.data.chat import format_prompts
from sae_refusal.llm.batched import (
    BatchContext,
    _accepts_logits_to_keep,
    _eval_mode,
    check_positive,
    iter_padded_batches,
    resolve_pad_id,
    stop_token_ids,
)
from sae_refusal.llm.engine import generate
from sae_refusal.llm.extraction import position_ids_from_mask
from sae_refusal.llm.layers import input_device
from sae_refusal.llm.tokenize import default_max_length, encode_prompts

__all__ = [
    "GSM8K_STOP",
    "ItemScore",
    "accuracy",
    "continuation_logprobs",
    "gsm8k",
    "gsm8k_prompt",
    "mc1",
    "mc2",
    "mean_of",
    "mmlu",
    "mmlu_prompt",
    "next_token_kl",
    "perplexity",
    "reference_answers",
    "truthfulqa_mc",
    "truthfulqa_prompt",
]

#: Where a GSM8K generation is cut: the model starting the next few-shot question.
GSM8K_STOP: tuple[str, ...] = ("\n\nQuestion:", "Question:")


@dataclass(frozen=True)
class ItemScore:
    """One item's score (see the module docstring for ``value`` and ``extra`` per task).

    Args:
        id: The item id (e.g. ``mmlu:test:anatomy:3``), or the prompt index as a string for prompt lists.
        value: The per-item number aggregates average: 0/1 accuracy or exact match, MC1, NLL per token, KL.
        extra: JSON-serialisable details (prediction, output text, MC2, token count, KL, ...).
    """

    id: str
    value: float
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- aggregates


def accuracy(scores: Sequence[ItemScore]) -> float:
    """Mean ``value`` (accuracy, exact match, MC1); NaN for no items."""
    return mean_of(scores)


def mean_of(scores: Sequence[ItemScore], key: str | None = None) -> float:
    """Mean of ``value`` (``key=None``) or of ``extra[key]`` (e.g. ``"mc2"``, ``"kl"``); NaN for no items."""
    values = [s.value if key is None else float(s.extra[key]) for s in scores]
    return sum(values) / len(values) if values else math.nan


def perplexity(scores: Sequence[ItemScore]) -> float:
    """``exp`` of the token-weighted mean NLL of :func:`reference_answers` scores; NaN for no tokens."""
    tokens = sum(int(s.extra["n_tokens"]) for s in scores)
    if tokens == 0:
        return math.nan
    return math.exp(sum(s.value * int(s.extra["n_tokens"]) for s in scores) / tokens)


def mc1(best_logprob: float, incorrect_logprobs: Sequence[float]) -> float:
    """TruthfulQA MC1: 1.0 if the best answer outscores every incorrect one (a tie counts as wrong)."""
    if not incorrect_logprobs:
        raise ValueError("incorrect_logprobs: MC1 needs at least one incorrect answer")
    return 1.0 if best_logprob > max(incorrect_logprobs) else 0.0


def mc2(correct_logprobs: Sequence[float], incorrect_logprobs: Sequence[float]) -> float:
    """TruthfulQA MC2: probability mass of the correct answers, normalised over correct + incorrect.

    Computed from summed log-probs with a log-sum-exp, so very negative scores do not underflow.
    """
    if not correct_logprobs or not incorrect_logprobs:
        raise ValueError("correct_logprobs, incorrect_logprobs: MC2 needs at least one answer of each kind")
    lp_true = torch.logsumexp(torch.tensor(correct_logprobs, dtype=torch.float64), 0)
    lp_all = torch.logsumexp(torch.tensor([*correct_logprobs, *incorrect_logprobs], dtype=torch.float64), 0)
    return float(torch.exp(lp_true - lp_all))


# ----------------------------------------------------------------------------------- shared machinery


def _progress(iterable: Any, progress: bool, desc: str, total: int | None = None) -> Any:
    return tqdm(iterable, desc=desc, total=total, disable=not progress, leave=False)


def _item_context(around: BatchContext | None, row_items: Sequence[int]) -> BatchContext | None:
    """``around`` seen through the row -> item map: batches give row indices, ``around`` wants items."""
    if around is None:
        return None
    return lambda rows: around([int(row_items[r]) for r in rows])


def _entered(around: BatchContext | None, rows: list[int]) -> AbstractContextManager[Any]:
    return around(rows) if around is not None else nullcontext()


def _forward_tail(model: nn.Module, input_ids_BT: Tensor, attention_mask_BT: Tensor, keep: int) -> Tensor:
    """Logits of the last ``keep`` positions of a left-padded batch, ``(B, keep, V)`` in the model dtype."""
    extra: dict[str, Any] = {"logits_to_keep": keep} if _accepts_logits_to_keep(model) else {}
    out = model(
        input_ids=input_ids_BT,
        attention_mask=attention_mask_BT,
        position_ids=position_ids_from_mask(attention_mask_BT),
        use_cache=False,
        **extra,
    )
    return out.logits[:, -keep:, :]


def _resolve_max_length(model: nn.Module, tokenizer: Any, max_length: int | None) -> int:
    if max_length is None:
        return default_max_length(model, tokenizer)
    check_positive("max_length", max_length)
    return max_length


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _encode_pairs(
    tokenizer: Any, contexts: Sequence[str], continuations: Sequence[str], max_length: int
) -> tuple[list[list[int]], list[int]]:
    """Concatenated ids of each (context, continuation) and the continuation's token count."""
    rows: list[list[int]] = []
    counts: list[int] = []
    for i, (ctx_ids, cont_ids) in enumerate(
        zip(_encode(tokenizer, contexts), _encode(tokenizer, continuations), strict=True)
    ):
        if not ctx_ids:
            raise ValueError(f"contexts: context {i} encodes to zero tokens (its first token has no context)")
        if not cont_ids:
            raise ValueError(f"continuations: continuation {i} encodes to zero tokens")
        room = max_length - len(cont_ids)
        if room < 1:
            raise ValueError(
                f"max_length: continuation {i} has {len(cont_ids)} tokens; max_length={max_length} leaves "
                "no room for its context"
            )
        rows.append(ctx_ids[-room:] + cont_ids)
        counts.append(len(cont_ids))
    return rows, counts


def _check_rows(n: int, row_items: Sequence[int] | None, **named: Sequence[Any]) -> list[int]:
    for name, values in named.items():
        if len(values) != n:
            raise ValueError(f"{name}: {len(values)} entries for {n} rows")
    if row_items is None:
        return list(range(n))
    if len(row_items) != n:
        raise ValueError(f"row_items: {len(row_items)} entries for {n} rows")
    return [int(i) for i in row_items]


@dataclass
class _RowLogprobs:
    """Per-row float32 log-softmax over the continuation's predicting positions, ``(n, V)`` on device."""

    row: int
    logprobs_nV: Tensor
    targets_n: Tensor


def _iter_continuation_logprobs(
    model: nn.Module,
    tokenizer: Any,
    rows: list[list[int]],
    counts: list[int],
    *,
    batch_size: int,
    around: BatchContext | None,
    progress: bool,
    desc: str = "log-likelihood",
) -> Iterator[_RowLogprobs]:
    """One forward per left-padded batch (longest first); ``around`` gets the batch's *row* indices.

    Must run inside ``_eval_mode`` and ``torch.inference_mode`` (the callers hold them).
    """
    device = input_device(model)
    batches = iter_padded_batches(
        rows, batch_size=batch_size, pad_id=resolve_pad_id(tokenizer), sort_by_length=True
    )
    n_batches = -(-len(rows) // batch_size)
    for batch in _progress(batches, progress, desc, total=n_batches):
        keep = max(counts[r] for r in batch.indices) + 1
        ids_BT = batch.input_ids_BT.to(device)
        with _entered(around, batch.indices):
            logits_BKV = _forward_tail(model, ids_BT, batch.attention_mask_BT.to(device), keep)
        for b, r in enumerate(batch.indices):
            n = counts[r]
            # Left padding: the continuation fills the last n columns; position t is predicted at t - 1.
            logprobs_nV = logits_BKV[b, keep - n - 1 : keep - 1].float().log_softmax(dim=-1)
            yield _RowLogprobs(r, logprobs_nV, ids_BT[b, -n:])


def continuation_logprobs(
    model: nn.Module,
    tokenizer: Any,
    contexts: Sequence[str],
    continuations: Sequence[str],
    *,
    row_items: Sequence[int] | None = None,
    batch_size: int,
    max_length: int | None = None,
    around: BatchContext | None = None,
    progress: bool = False,
) -> list[tuple[float, int]]:
    """Summed log-probability of each continuation given its context, and its token count.

    Args:
        model: A Hugging Face causal LM, on any device.
        tokenizer: Its tokenizer.
        contexts: One context per row (already formatted; no special tokens are added).
        continuations: One continuation per row, tokenised on its own (mind its leading space).
        row_items: The item index of each row, passed to ``around`` (several rows may share an item);
            ``None`` makes every row its own item.
        batch_size: Rows per forward pass.
        max_length: Most tokens per row; an overlong row loses the start of its context. ``None``: the
            model's context length (capped, see :func:`~sae_refusal.llm.tokenize.default_max_length`).
        around: ``around(item_indices)`` -> a context manager entered around each batch's forward.
        progress: Show a progress bar over the batches.

    Returns:
        ``(sum of log-probs in nats, number of continuation tokens)`` per row, in input order.

    Raises:
        ValueError: On mismatched lengths, a non-positive size, an empty context or continuation, or a
            continuation that does not fit in ``max_length``.
    """
    items = _check_rows(len(contexts), row_items, continuations=continuations)
    check_positive("batch_size", batch_size)
    rows, counts = _encode_pairs(
        tokenizer, contexts, continuations, _resolve_max_length(model, tokenizer, max_length)
    )
    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    with _eval_mode(model), torch.inference_mode():
        for scored in _iter_continuation_logprobs(
            model,
            tokenizer,
            rows,
            counts,
            batch_size=batch_size,
            around=_item_context(around, items),
            progress=progress,
            desc="log-likelihood",
        ):
            total = scored.logprobs_nV.gather(-1, scored.targets_n[:, None]).sum()
            out[scored.row] = (float(total), counts[scored.row])
    return out


# --------------------------------------------------------------------------------------------- MMLU


def _mmlu_block(item: MCItem) -> str:
    options = "".join(
        f"\n{letter}. {choice}" for letter, choice in zip(MMLU_LETTERS, item.choices, strict=False)
    )
    return f"{item.question.strip()}{options}\nAnswer:"


def mmlu_prompt(item: MCItem, shots: Sequence[MCItem] = ()) -> str:
    """The lm-eval-harness MMLU prompt: a subject header, the solved shots, then the question.

    ``"The following are multiple choice questions (with answers) about {subject}.\\n\\n"``, each shot as
    ``"{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: {letter}\\n\\n"``, then the question block ending
    in ``"Answer:"``; the scored continuations are ``" A"`` .. ``" D"``.

    Args:
        item: The question.
        shots: Solved examples (normally the first k dev items of the same subject).
    """
    about = f" about {item.subject.replace('_', ' ')}" if item.subject else ""
    header = f"The following are multiple choice questions (with answers){about}.\n\n"
    solved = "".join(f"{_mmlu_block(s)} {MMLU_LETTERS[s.answer]}\n\n" for s in shots)
    return header + solved + _mmlu_block(item)


def mmlu(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[MCItem],
    dev_items: Sequence[MCItem],
    *,
    k_shot: int = 5,
    batch_size: int,
    max_length: int | None = None,
    around: BatchContext | None = None,
    progress: bool = False,
) -> list[ItemScore]:
    """MMLU accuracy per item: the choice letter with the highest log-prob after :func:`mmlu_prompt`.

    Args:
        model: A Hugging Face causal LM.
        tokenizer: Its tokenizer.
        items: The questions.
        dev_items: Solved examples; the first ``k_shot`` of each item's subject are its shots.
        k_shot: Shots per prompt (0 for zero-shot).
        batch_size: Rows per forward (each item takes one row per choice).
        max_length: Most tokens per row (the prompt's start is cut first); ``None``: the model's context.
        around: ``around(item_indices)`` -> the context around each batch's forward.
        progress: Show a progress bar.

    Returns:
        One :class:`ItemScore` per item: ``value`` 1.0 if correct; ``extra`` ``pred``, ``answer``,
        ``logprobs`` (one per choice), ``subject``.

    Raises:
        ValueError: If ``k_shot`` is negative or a subject has fewer than ``k_shot`` dev items.
    """
    if isinstance(k_shot, bool) or not isinstance(k_shot, int) or k_shot < 0:
        raise ValueError(f"k_shot: must be an integer >= 0, got {k_shot!r}")
    by_subject = group_by_subject(dev_items)
    contexts: list[str] = []
    continuations: list[str] = []
    row_items: list[int] = []
    for i, item in enumerate(items):
        shots = by_subject.get(item.subject, [])[:k_shot]
        if len(shots) < k_shot:
            raise ValueError(
                f"k_shot: {k_shot} shots asked, dev_items has {len(shots)} for subject {item.subject!r}"
            )
        prompt = mmlu_prompt(item, shots)
        for letter in MMLU_LETTERS[: len(item.choices)]:
            contexts.append(prompt)
            continuations.append(f" {letter}")
            row_items.append(i)
    scored = continuation_logprobs(
        model,
        tokenizer,
        contexts,
        continuations,
        row_items=row_items,
        batch_size=batch_size,
        max_length=max_length,
        around=around,
        progress=progress,
    )
    out: list[ItemScore] = []
    start = 0
    for item in items:
        logprobs = [lp for lp, _ in scored[start : start + len(item.choices)]]
        start += len(item.choices)
        pred = max(range(len(logprobs)), key=logprobs.__getitem__)
        extra = {"pred": pred, "answer": item.answer, "logprobs": logprobs, "subject": item.subject}
        out.append(ItemScore(item.id, float(pred == item.answer), extra))
    return out


# -------------------------------------------------------------------------------------------- GSM8K


def gsm8k_prompt(item: GSM8KItem, shots: Sequence[GSM8KItem] = ()) -> str:
    """``"Question: {q}\\nAnswer: {solution}\\n\\n"`` per shot, then ``"Question: {q}\\nAnswer:"``.

    Shot solutions are the reference texts (reasoning ending in ``#### N``), as in lm-eval-harness.
    """
    solved = "".join(f"Question: {s.question}\nAnswer: {s.answer_text}\n\n" for s in shots)
    return f"{solved}Question: {item.question}\nAnswer:"


def _cut(text: str, stops: Sequence[str]) -> str:
    ends = [text.find(s) for s in stops if s in text]
    return text[: min(ends)] if ends else text


def gsm8k(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[GSM8KItem],
    shots: Sequence[GSM8KItem],
    *,
    k_shot: int = 4,
    max_new_tokens: int = 256,
    batch_size: int,
    max_length: int | None = None,
    around: BatchContext | None = None,
    progress: bool = False,
    engine: str = "auto",
) -> list[ItemScore]:
    """GSM8K exact match: greedy generation after :func:`gsm8k_prompt`, final number vs the reference.

    Generation runs with :func:`sae_refusal.llm.engine.generate` (``around`` wraps prefill and every decode
    step), stops at the tokenizer's EOS, and is cut at the first :data:`GSM8K_STOP` string.

    Args:
        model: A Hugging Face causal LM.
        tokenizer: Its tokenizer.
        items: The problems.
        shots: Solved examples (the train split); the first ``k_shot`` are used for every item.
        k_shot: Shots per prompt (0 for zero-shot).
        max_new_tokens: Most generated tokens per item.
        batch_size: Items per ``generate`` call.
        max_length: Most prompt tokens (the start is cut first); ``None``: the model's context less
            ``max_new_tokens``.
        around: ``around(item_indices)`` -> the context around each batch's ``generate``.
        progress: Show a progress bar.
        engine: Generation engine: ``hf``, ``fast`` or ``auto`` (``generation.engine``).

    Returns:
        One :class:`ItemScore` per item: ``value`` 1.0 on exact match; ``extra`` ``output`` (the cut
        generation), ``pred`` (its final number or ``None``), ``answer``.

    Raises:
        ValueError: If ``k_shot`` is negative or larger than ``len(shots)``, or on a non-positive size.
    """
    if isinstance(k_shot, bool) or not isinstance(k_shot, int) or not 0 <= k_shot <= len(shots):
        raise ValueError(f"k_shot: must be an integer in [0, len(shots)={len(shots)}], got {k_shot!r}")
    check_positive("max_new_tokens", max_new_tokens)
    check_positive("batch_size", batch_size)
    if max_length is None:
        max_length = max(default_max_length(model, tokenizer) - max_new_tokens, 1)
    prompts = [gsm8k_prompt(item, shots[:k_shot]) for item in items]
    input_ids = encode_prompts(tokenizer, prompts, max_length=max_length).input_ids
    pad_id, stops = resolve_pad_id(tokenizer), stop_token_ids(model, tokenizer)
    outputs: list[str] = []
    for start in _progress(range(0, len(items), batch_size), progress, "gsm8k"):
        chunk = input_ids[start : start + batch_size]
        shifted: BatchContext | None = None
        if around is not None:
            shifted = _shift(around, start)
        generations = generate(
            model,
            chunk,
            max_new_tokens=max_new_tokens,
            pad_id=pad_id,
            stop_ids=stops,
            batch_size=batch_size,
            around=shifted,
            engine=engine,
        )
        outputs += [tokenizer.decode(g.token_ids, skip_special_tokens=True) for g in generations]
    out: list[ItemScore] = []
    for item, raw in zip(items, outputs, strict=True):
        text = _cut(raw, GSM8K_STOP)
        pred = extract_final_number(text)
        extra = {"output": text, "pred": pred, "answer": item.answer}
        out.append(ItemScore(item.id, float(pred == item.answer), extra))
    return out


def _shift(around: BatchContext, offset: int) -> BatchContext:
    def shifted(indices: list[int]) -> AbstractContextManager[Any]:
        return around([offset + i for i in indices])

    return shifted


# ---------------------------------------------------------------------------------------- TruthfulQA


def truthfulqa_prompt(item: TruthfulQAItem) -> str:
    """``"Q: {question}\\nA:"``; each answer is scored as the continuation ``" {answer}"``."""
    return f"Q: {item.question}\nA:"


def truthfulqa_mc(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[TruthfulQAItem],
    *,
    batch_size: int,
    max_length: int | None = None,
    around: BatchContext | None = None,
    progress: bool = False,
) -> list[ItemScore]:
    """TruthfulQA MC1 and MC2 from summed answer log-probs after :func:`truthfulqa_prompt`.

    MC1 (:func:`mc1`) compares the best answer with the incorrect ones; MC2 (:func:`mc2`) is the normalised
    probability mass of the correct answers among correct + incorrect.

    Args:
        model: A Hugging Face causal LM.
        tokenizer: Its tokenizer.
        items: The questions (the best answer must be one of ``correct``, as the loader ensures).
        batch_size: Rows per forward (each item takes one row per answer).
        max_length: Most tokens per row; ``None``: the model's context.
        around: ``around(item_indices)`` -> the context around each batch's forward.
        progress: Show a progress bar.

    Returns:
        One :class:`ItemScore` per item: ``value`` = MC1; ``extra`` ``mc1``, ``mc2``, ``best_logprob``,
        ``correct_logprobs``, ``incorrect_logprobs``.

    Raises:
        ValueError: If an item's best answer is not among its correct answers.
    """
    contexts: list[str] = []
    continuations: list[str] = []
    row_items: list[int] = []
    for i, item in enumerate(items):
        if item.best not in item.correct:
            raise ValueError(f"items: item {item.id}: its best answer is not among its correct answers")
        prompt = truthfulqa_prompt(item)
        for answer in (*item.correct, *item.incorrect):
            contexts.append(prompt)
            continuations.append(f" {answer}")
            row_items.append(i)
    scored = continuation_logprobs(
        model,
        tokenizer,
        contexts,
        continuations,
        row_items=row_items,
        batch_size=batch_size,
        max_length=max_length,
        around=around,
        progress=progress,
    )
    out: list[ItemScore] = []
    start = 0
    for item in items:
        n_true = len(item.correct)
        logprobs = [lp for lp, _ in scored[start : start + n_true + len(item.incorrect)]]
        start += len(logprobs)
        correct, incorrect = logprobs[:n_true], logprobs[n_true:]
        best = correct[item.correct.index(item.best)]
        score1 = mc1(best, incorrect)
        extra = {
            "mc1": score1,
            "mc2": mc2(correct, incorrect),
            "best_logprob": best,
            "correct_logprobs": correct,
            "incorrect_logprobs": incorrect,
        }
        out.append(ItemScore(item.id, score1, extra))
    return out


# ------------------------------------------------------------------------------- chat-format measures


def _kl_rows(p_log: Tensor, q_log: Tensor) -> Tensor:
    """``KL(p || q)`` per row of float32 log-probs ``(..., V)``, summed over the vocabulary."""
    return (p_log.exp() * (p_log - q_log)).sum(dim=-1).clamp_min(0.0)


def reference_answers(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    batch_size: int,
    max_length: int | None = None,
    chat_template: str | None = None,
    system_prompt: str | None = None,
    ids: Sequence[str] | None = None,
    around: BatchContext | None = None,
    progress: bool = False,
) -> list[ItemScore]:
    """NLL of reference responses under the (steered) model, and KL(unsteered || steered) along them.

    Each prompt is chat-formatted with its generation prompt (:func:`~sae_refusal.data.chat.format_prompts`)
    and the reference response is the continuation (no end-of-turn token appended). Each batch runs once
    without ``around`` and once with it (only once when ``around`` is None); NLL comes from the run with
    it, KL compares the two runs' full next-token distributions at the positions that predict the response
    tokens.

    Args:
        model: A Hugging Face causal LM.
        tokenizer: Its tokenizer (with a chat template, or pass ``chat_template``).
        prompts: User messages (item ``i`` is prompt ``i``).
        responses: One reference answer per prompt.
        batch_size: Items per forward.
        max_length: Most tokens per row (the prompt's start is cut first); ``None``: the model's context.
        chat_template: Template overriding the tokenizer's.
        system_prompt: Optional system message.
        ids: One id per prompt for the scores; ``None`` uses the prompt index.
        around: ``around(item_indices)`` -> the context around each batch's steered forward.
        progress: Show a progress bar.

    Returns:
        One :class:`ItemScore` per prompt: ``value`` = mean NLL per response token (nats);
        ``extra`` ``n_tokens``, ``nll_sum``, ``kl`` (mean KL per response position). Use :func:`perplexity`
        for the token-weighted perplexity.

    Raises:
        ValueError: On mismatched lengths or an empty response; see :func:`continuation_logprobs`.
    """
    _check_rows(len(prompts), None, responses=responses)
    names = _ids(ids, len(prompts))
    check_positive("batch_size", batch_size)
    formatted = format_prompts(tokenizer, prompts, chat_template=chat_template, system_prompt=system_prompt)
    rows, counts = _encode_pairs(
        tokenizer, formatted, responses, _resolve_max_length(model, tokenizer, max_length)
    )
    nll: list[float] = [0.0] * len(rows)
    kl: list[float] = [0.0] * len(rows)
    with _eval_mode(model), torch.inference_mode():
        # Batch by batch: the unsteered pass (when needed) and the steered pass over the same rows.
        for chunk in _progress(_chunks(rows, batch_size), progress, "reference answers"):
            sub_rows = [rows[r] for r in chunk]
            sub_counts = [counts[r] for r in chunk]
            base: dict[int, Tensor] = {}
            if around is not None:
                for s in _iter_continuation_logprobs(
                    model, tokenizer, sub_rows, sub_counts, batch_size=batch_size, around=None, progress=False
                ):
                    base[s.row] = s.logprobs_nV
            steer = _item_context(around, chunk)
            for s in _iter_continuation_logprobs(
                model, tokenizer, sub_rows, sub_counts, batch_size=batch_size, around=steer, progress=False
            ):
                r = chunk[s.row]
                nll[r] = -float(s.logprobs_nV.gather(-1, s.targets_n[:, None]).sum())
                if s.row in base:
                    kl[r] = float(_kl_rows(base.pop(s.row), s.logprobs_nV).mean())
    return [
        ItemScore(names[i], nll[i] / counts[i], {"n_tokens": counts[i], "nll_sum": nll[i], "kl": kl[i]})
        for i in range(len(rows))
    ]


def _ids(ids: Sequence[str] | None, n: int) -> list[str]:
    if ids is None:
        return [str(i) for i in range(n)]
    if len(ids) != n:
        raise ValueError(f"ids: {len(ids)} ids for {n} prompts")
    return [str(i) for i in ids]


def _chunks(rows: list[list[int]], batch_size: int) -> list[list[int]]:
    """Row indices longest first, cut into groups of ``batch_size`` (one padded batch each)."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def next_token_kl(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    batch_size: int,
    max_length: int | None = None,
    chat_template: str | None = None,
    system_prompt: str | None = None,
    ids: Sequence[str] | None = None,
    around: BatchContext | None = None,
    progress: bool = False,
) -> list[ItemScore]:
    """KL(unsteered || steered) of the first response token's distribution on chat-formatted prompts.

    Args:
        model: A Hugging Face causal LM.
        tokenizer: Its tokenizer (with a chat template, or pass ``chat_template``).
        prompts: User messages, typically benign (item ``i`` is prompt ``i``).
        batch_size: Prompts per forward.
        max_length: Most prompt tokens (the start is cut first); ``None``: the model's context.
        chat_template: Template overriding the tokenizer's.
        system_prompt: Optional system message.
        ids: One id per prompt for the scores; ``None`` uses the prompt index.
        around: ``around(item_indices)`` -> the context around each batch's steered forward; ``None``
            gives KL 0 without a second pass.
        progress: Show a progress bar.

    Returns:
        One :class:`ItemScore` per prompt: ``value`` = KL in nats; ``extra``
        ``argmax_unsteered`` and ``argmax_steered`` (the most likely first token of each run).
    """
    names = _ids(ids, len(prompts))
    check_positive("batch_size", batch_size)
    formatted = format_prompts(tokenizer, prompts, chat_template=chat_template, system_prompt=system_prompt)
    input_ids = encode_prompts(
        tokenizer, formatted, max_length=_resolve_max_length(model, tokenizer, max_length)
    ).input_ids
    device = input_device(model)
    out: list[ItemScore | None] = [None] * len(input_ids)
    batches = iter_padded_batches(
        input_ids, batch_size=batch_size, pad_id=resolve_pad_id(tokenizer), sort_by_length=True
    )
    with _eval_mode(model), torch.inference_mode():
        for batch in _progress(batches, progress, "next-token KL", total=-(-len(input_ids) // batch_size)):
            ids_BT, mask_BT = batch.input_ids_BT.to(device), batch.attention_mask_BT.to(device)
            base_BV = _forward_tail(model, ids_BT, mask_BT, 1)[:, -1].float().log_softmax(-1)
            steered_BV = base_BV
            if around is not None:
                with around(batch.indices):
                    steered_BV = _forward_tail(model, ids_BT, mask_BT, 1)[:, -1].float().log_softmax(-1)
            kl_B = _kl_rows(base_BV, steered_BV) if around is not None else torch.zeros(len(batch.indices))
            for b, i in enumerate(batch.indices):
                extra = {
                    "argmax_unsteered": int(base_BV[b].argmax()),
                    "argmax_steered": int(steered_BV[b].argmax()),
                }
                out[i] = ItemScore(names[i], float(kl_B[b]), extra)
    return [s for s in out if s is not None]
