"""Refusal and over-refusal on held-out sets: generate with the intervention, judge every item, summarise.

:func:`generate_items` answers every prompt greedily with the intervention in the path (the per-item
``around`` of :meth:`~sae_refusal.eval.interventions.LoadedIntervention.plan`, entered around each batch's
``generate``: prefill and every cached decode step), keeps the first generated token (a refusal-token model's
decision) and the answer text, then asks every judge about every item. The result is a list of
:class:`ItemRecord`, the source of every number: :func:`summarise` turns them into per-set rows (and
per-category rows for category-labelled sets) with a bootstrap 95% CI and the item count, block averages
(the unweighted mean of the block's set rates, resampled within each set), the failed-judgement count per
row (failed items are left out of the rate and counted, never read as "not refused") and the agreement of
each judge pair (Cohen's kappa and the disagreeing item ids).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from sae_refusal.data.prompt_set import Prompt
from sae_refusal.data.sources import MISSING_TAG
from sae_refusal.eval.interventions import ItemPlan
from sae_refusal.eval.judges import Judge, JudgeInput, Judgement, Verdict, agreement
from sae_refusal.eval.stats import Estimate, bootstrap_group_mean, bootstrap_mean

__all__ = ["BLOCKS", "ItemRecord", "generate_items", "summarise", "token_report"]

#: Report blocks: set role -> block title.
BLOCKS: dict[str, str] = {
    "over_refusal": "over-refusal",
    "benign": "over-refusal",
    "harmful": "harmful refusal",
}


@dataclass
class ItemRecord:
    """One item of one eval job: what was asked, what came out, what each judge said.

    Attributes:
        id: Prompt id.
        set: Set name (``coconot``, ``or_bench_hard``, ...).
        role: ``harmful``, ``over_refusal`` or ``benign``.
        category: CoCoNot category (harmful CoCoNot rows) or ``None``.
        intervention: The column label.
        prompt: The user message.
        output: The answer (special tokens skipped).
        first_token: The first generated token, special tokens kept (``None``: nothing generated).
        judges: Judge name -> ``{"verdict", "detail"}``.
        extra: Per-item intervention facts (alpha, gate score).
        tags: The prompt's tag values (tag column -> value): the slices of the report.
    """

    id: str
    set: str
    role: str
    category: str | None
    intervention: str
    prompt: str
    output: str
    first_token: str | None
    judges: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON dict (one JSONL line)."""
        return asdict(self)

    def verdict(self, judge: str) -> Verdict:
        """One judge's verdict."""
        return Verdict(self.judges[judge]["verdict"])


def generate_items(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    set_names: Sequence[str],
    roles: Mapping[str, str],
    plan: ItemPlan,
    judges: Sequence[Judge],
    *,
    intervention: str,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    max_length: int = 1024,
    chat_template: str | None = None,
    system_prompt: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    engine: str = "auto",
) -> list[ItemRecord]:
    """Answer each prompt with the intervention applied and judge each answer.

    Args:
        model: A Hugging Face causal LM.
        tokenizer: Its tokenizer.
        prompts: The items.
        set_names: Each item's set name.
        roles: Set name -> role.
        plan: The intervention's plan for exactly these prompts (``plan.alpha_N`` has one row per prompt).
        judges: Refusal judges; each judges every item.
        intervention: The column label written into each record.
        max_new_tokens: Most tokens generated per item.
        batch_size: Prompts per ``generate`` call.
        max_length: Most prompt tokens kept.
        chat_template: Template overriding the tokenizer's.
        system_prompt: Optional system message.
        progress: ``progress(done, total)`` after each batch of generation.
        engine: Generation engine, ``hf``, ``fast`` or ``auto`` (``generation.engine``;
            :func:`sae_refusal.llm.engine.generate`).

    Raises:
        ValueError: When the lengths of ``prompts``, ``set_names`` and the plan differ, or on an unknown
            engine.
    """
    from sae_refusal.data.chat import format_prompts
    from sae_refusal.eval.refusal_tokens import chat_stop_ids
    from sae_refusal.llm.batched import resolve_pad_id
    from sae_refusal.llm.engine import generate
    from sae_refusal.llm.tokenize import encode_prompts

    if len(set_names) != len(prompts) or int(plan.alpha_N.shape[0]) != len(prompts):
        raise ValueError(
            f"prompts ({len(prompts)}), set_names ({len(set_names)}) and the plan "
            f"({int(plan.alpha_N.shape[0])}) must have one row per item"
        )
    if not prompts:
        return []
    formatted = format_prompts(
        tokenizer, [p.text for p in prompts], chat_template=chat_template, system_prompt=system_prompt
    )
    input_ids = encode_prompts(tokenizer, formatted, max_length=max_length).input_ids
    done = [0]
    around = plan.around

    def counted(indices: list[int]) -> Any:
        if progress is not None:
            if done[0]:
                progress(done[0], len(prompts))
            done[0] += len(indices)
        return around(indices) if around is not None else nullcontext()

    generations = generate(
        model,
        input_ids,
        max_new_tokens=max_new_tokens,
        pad_id=resolve_pad_id(tokenizer),
        stop_ids=chat_stop_ids(model, tokenizer, chat_template),
        batch_size=batch_size,
        around=counted,
        sort_by_length=True,
        engine=engine,
    )
    if progress is not None:
        progress(len(prompts), len(prompts))
    outputs = [tokenizer.decode(g.token_ids, skip_special_tokens=True).strip() for g in generations]
    firsts = [None if g.first_id is None else tokenizer.decode([g.first_id]) for g in generations]
    inputs = [
        JudgeInput(prompt=p.text, output=o, first_token_id=g.first_id)
        for p, o, g in zip(prompts, outputs, generations, strict=True)
    ]
    verdicts: dict[str, list[Judgement]] = {judge.name: judge.judge(inputs) for judge in judges}
    records = []
    for i, (prompt, name) in enumerate(zip(prompts, set_names, strict=True)):
        records.append(
            ItemRecord(
                id=prompt.id,
                set=name,
                role=roles[name],
                category=prompt.category if roles[name] == "harmful" else None,
                intervention=intervention,
                prompt=prompt.text,
                output=outputs[i],
                first_token=firsts[i],
                judges={j: verdicts[j][i].to_json() for j in verdicts},
                extra=plan.item_record(i),
                tags=prompt.tag_dict,
            )
        )
    return records


def _values(records: Sequence[ItemRecord], judge: str) -> tuple[np.ndarray, int]:
    verdicts = [r.verdict(judge) for r in records]
    kept = np.array([v == Verdict.REFUSED for v in verdicts if v != Verdict.FAILED], dtype=np.float64)
    return kept, sum(v == Verdict.FAILED for v in verdicts)


def _row(est: Estimate, n_failed: int) -> dict[str, Any]:
    return {**est.to_json(), "n_failed": n_failed}


def _slices(
    rows: Sequence[ItemRecord], judge: str, *, n_boot: int, seed: int
) -> dict[str, dict[str, dict[str, Any]]]:
    """Refusal per tag value of one set's items (tag column -> value -> row), values sorted."""
    columns = list(dict.fromkeys(c for r in rows for c in r.tags))
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for c_index, column in enumerate(columns):
        groups: dict[str, list[ItemRecord]] = {}
        for r in rows:
            groups.setdefault(r.tags.get(column, MISSING_TAG), []).append(r)
        out[column] = {}
        for v_index, (value, v_rows) in enumerate(sorted(groups.items())):
            values, failed = _values(v_rows, judge)
            est = bootstrap_mean(values, n_boot=n_boot, seed=seed + 10 * c_index + v_index)
            out[column][value] = _row(est, failed)
    return out


def summarise(
    records: Sequence[ItemRecord], judge: str, *, n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Per-set and per-category refusal rates (with CIs), block averages, failures and judge agreement.

    Args:
        records: Every item of one intervention.
        judge: The judge whose verdicts make the rates (others are summarised under ``by_judge``).
        n_boot: Bootstrap resamples.
        seed: Bootstrap seed.

    Returns:
        ``{"judge", "sets": {name: row}, "categories": {set: {category: row}}, "slices": {set: {tag column:
        {value: row}}}, "blocks": {role: row},
        "by_judge": {judge: {set: row}}, "agreement": [...], "n_failed": {judge: count}}``; a row is
        ``{"value", "low", "high", "n", "n_failed", "role"}`` (rates are the share refused).
    """
    start = time.perf_counter()
    by_set: dict[str, list[ItemRecord]] = {}
    for record in records:
        by_set.setdefault(record.set, []).append(record)
    judges = sorted({j for r in records for j in r.judges})
    if records and judge not in judges:
        raise ValueError(f"judges.primary: {judge!r} did not judge these items (judges: {judges})")
    out: dict[str, Any] = {
        "judge": judge,
        "sets": {},
        "categories": {},
        "slices": {},
        "blocks": {},
        "by_judge": {},
    }
    block_values: dict[str, dict[str, np.ndarray]] = {}
    block_failed: dict[str, int] = {}
    for k, (name, rows) in enumerate(by_set.items()):
        values, failed = _values(rows, judge)
        role = rows[0].role
        out["sets"][name] = {
            **_row(bootstrap_mean(values, n_boot=n_boot, seed=seed + k), failed),
            "role": role,
        }
        if values.size:
            block_values.setdefault(role, {})[name] = values
        block_failed[role] = block_failed.get(role, 0) + failed
        categories: dict[str, list[ItemRecord]] = {}
        for r in rows:
            if r.category is not None:
                categories.setdefault(r.category, []).append(r)
        if categories:
            cat_rows = {}
            for c_index, (category, c_rows) in enumerate(sorted(categories.items())):
                c_values, c_failed = _values(c_rows, judge)
                est = bootstrap_mean(c_values, n_boot=n_boot, seed=seed + 1000 + c_index)
                cat_rows[category] = _row(est, c_failed)
            macro = {c: _values(r, judge)[0] for c, r in sorted(categories.items())}
            macro = {c: v for c, v in macro.items() if v.size}
            if macro:
                cat_rows["macro average"] = _row(bootstrap_group_mean(macro, n_boot=n_boot, seed=seed), 0)
            out["categories"][name] = cat_rows
        slices = _slices(rows, judge, n_boot=n_boot, seed=seed + 2000 + 100 * k)
        if slices:
            out["slices"][name] = slices
    for role, groups in block_values.items():
        est = bootstrap_group_mean(groups, n_boot=n_boot, seed=seed)
        out["blocks"][role] = {**_row(est, block_failed[role]), "sets": sorted(groups)}
    for other in judges:
        per: dict[str, Any] = {}
        for name, rows in by_set.items():
            values, failed = _values(rows, other)
            value = float(values.mean()) if values.size else float("nan")
            per[name] = {"value": value, "n": int(values.size), "n_failed": failed}
        out["by_judge"][other] = per
    out["n_failed"] = {j: _values(records, j)[1] for j in judges}
    labels = {
        j: [Judgement(Verdict(r.judges[j]["verdict"]), r.judges[j].get("detail")) for r in records]
        for j in judges
    }
    out["agreement"] = []
    if len(judges) > 1:
        for a in agreement(labels):
            out["agreement"].append(
                {
                    "judges": list(a.judges),
                    "kappa": a.kappa,
                    "n": a.n,
                    "n_disagree": a.n_disagree,
                    "disagreements": [records[i].id for i in a.disagreements],
                }
            )
    out["seconds"] = time.perf_counter() - start
    return out


def token_report(records: Sequence[ItemRecord], prompts: Sequence[Prompt], resolved: Any) -> Any:
    """The refusal-token report (:class:`~sae_refusal.eval.refusal_tokens.RefusalReport`: accuracy, macro-F1,
    confusion over the six tokens) of the generated first tokens, from the ``first_token`` judge's labels.

    The same report the fine-tuning job writes, here under the job's intervention: the expected token is the
    prompt's category token (harmful) or ``[respond]``; a first token that is no refusal token, or a failed
    judgement, is ``"other"``.

    Raises:
        ValueError: If the records carry no ``first_token`` judgement, or a harmful prompt has no category.
    """
    from sae_refusal.eval.refusal_tokens import OTHER_CLASS_NAME, expected_class, report_from_records

    names = list(resolved.class_names)
    rows = []
    for record, prompt in zip(records, prompts, strict=True):
        if "first_token" not in record.judges:
            raise ValueError("judges.names: the refusal-token report needs the first_token judge")
        detail = record.judges["first_token"].get("detail")
        predicted = detail if detail in names else OTHER_CLASS_NAME
        expected = names[expected_class(prompt, resolved)]
        rows.append(
            {
                "id": prompt.id,
                "source": record.set,
                "label": str(prompt.label),
                "category": prompt.category,
                "expected": expected,
                "predicted": predicted,
                "correct": expected == predicted,
                "top_is_refusal_token": predicted != OTHER_CLASS_NAME,
                "top_token": record.first_token,
                "p_expected": None,  # generation keeps the token, not its probability
                "truncated": False,
            }
        )
    respond = names[resolved.class_index(None)]
    return report_from_records(rows, names, list(resolved.tokens), respond, mode="greedy")
