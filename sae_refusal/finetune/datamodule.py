"""``SFTDataModule``: refusal-token SFT examples from the train split of a held-out manifest.

Lifecycle (see the Lightning pitfalls in docs/ARCHITECTURE.md):

* ``__init__`` stores configs only (no model, no tokenizer, no file I/O); the module is pickled to workers.
* ``prepare_data`` (one process per node) loads the prompt set, writes the split manifest and generates the
  base model's answers for the benign / ambiguous training and validation prompts that have no
  ``response`` (loading the base model only if some answer is not cached yet). It sets no state.
* ``setup`` (every process) loads the tokenizer, adds the refusal tokens, reads the manifest and the answer
  cache (never generating) and encodes the examples of the training split and of the validation split
  (``val``; with no validation prompts ``val_dataloader`` raises: the test split never stands in for it).

Only the ``train`` split is ever trained on; :meth:`SFTDataModule.held_out_prompts` gives evaluation jobs the
held-out prompts. Under DDP each rank gets a disjoint slice of the training rows with the same number of
batches (``DistributedSampler(drop_last=True)``, reshuffled per epoch with a fixed seed).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from sae_refusal.categories import DEFAULT_REFUSAL_TOKENS
from sae_refusal.data.prompt_set import PromptSet
from sae_refusal.data.sources import PromptSetConfig, load_builtin, load_prompt_set
from sae_refusal.data.splits import (
    SPLIT_NAMES,
    SplitConfig,
    split_prompt_set,
)
from sae_refusal.finetune.base_answers import AnswerConfig, base_answers
from sae_refusal.finetune.examples import (
    EncodedSFT,
    build_examples,
    collate_sft,
    encode_example,
    end_of_turn_token,
)
from sae_refusal.llm.loading import LLMConfig, load_tokenizer
from sae_refusal.llm.refusal_tokens import RefusalVocabulary
from sae_refusal.loaders import empty_validation_error, map_style_loader

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_ROOT", "SFTDataModule", "SFTDataset", "SFTSplit", "balanced_repeats"]

#: Folder of the default split manifest and answer cache when their paths are not configured.
DEFAULT_ROOT = "runs/finetune_data"


@dataclass
class SFTSplit:
    """Encoded examples of one split.

    Args:
        ids: Prompt ids, row-aligned with ``rows``.
        rows: Encoded examples.
        n_prompt_truncated: Examples whose prompt was cut from the left.
        n_answer_truncated: Examples whose answer (or end-of-turn token) was cut.
    """

    ids: list[str]
    rows: list[EncodedSFT]
    n_prompt_truncated: int = 0
    n_answer_truncated: int = 0


def balanced_repeats(classes: list[int], power: float, seed: int = 0) -> list[int]:
    """Row indices that oversample rare classes: class ``c`` gets ``n_c * (n_max / n_c) ** power`` rows.

    ``power = 0`` keeps every row once (natural frequencies); ``power = 1`` brings every class up to the
    largest class's count; ``0.5`` is in between (a class 30x rarer than the largest is repeated ~5.5x).
    Whole repeats come first; the fractional remainder is a seeded draw without replacement, so the result
    is deterministic and every original row appears at least once. Rows are returned grouped by original
    order (the loader shuffles).

    Args:
        classes: Class of each row.
        power: Balancing strength in ``[0, 1]``.
        seed: Seed of the remainder draw.

    Raises:
        ValueError: If ``power`` is outside ``[0, 1]``.
    """
    if not 0.0 <= power <= 1.0:
        raise ValueError(f"data.class_balance must be in [0, 1], got {power}")
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(classes):
        by_class.setdefault(c, []).append(i)
    if not by_class or power == 0.0:
        return list(range(len(classes)))
    n_max = max(len(rows) for rows in by_class.values())
    generator = torch.Generator().manual_seed(seed)
    picked: list[int] = []
    for c in sorted(by_class):
        rows = by_class[c]
        target = round(len(rows) * (n_max / len(rows)) ** power)
        whole, remainder = divmod(target, len(rows))
        picked.extend(rows * whole)
        if remainder:
            order = torch.randperm(len(rows), generator=generator)[:remainder].tolist()
            picked.extend(rows[j] for j in order)
    return sorted(picked)


class SFTDataset(Dataset[dict[str, Any]]):
    """Map-style dataset over an :class:`SFTSplit`; items are encoded examples plus their row ``index``."""

    def __init__(self, split: SFTSplit) -> None:
        self.split = split

    @property
    def ids(self) -> list[str]:
        """Prompt id of each row."""
        return self.split.ids

    def __len__(self) -> int:
        return len(self.split.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.split.rows[index], "index": index}


class SFTDataModule(L.LightningDataModule):
    """Refusal-token SFT data: the training split of a prompt set, each prompt with its target token + answer.

    Args:
        llm: The base model (its tokenizer encodes the examples; the model itself answers prompts that have
            no ``response``).
        prompts: Prompt sources; ``None`` uses the small labelled set shipped with the package.
        split: Held-out split settings (fractions, seed, strata).
        manifest_path: Where the split manifest is written / read; default
            ``<root>/splits-<prompt-set hash>-<split-config hash>.json``.
        refusal_tokens: Token string -> CoCoNot category (``null`` = respond); default the published
            spellings (:data:`~sae_refusal.categories.DEFAULT_REFUSAL_TOKENS`).
        answers: Base-answer generation and cache settings; ``answers.cache_path`` defaults to
            ``<root>/base_answers.jsonl``.
        max_length: Most tokens per example (prompt + token + answer + end of turn); the answer is cut first.
        batch_size: Examples per batch.
        num_workers: DataLoader workers.
        chat_template: Template overriding the tokenizer's (a Jinja string or a file path).
        system_prompt: Optional system message put before each prompt.
        shuffle_seed: Seed of the per-epoch shuffle.
        class_balance: Oversampling of rare target tokens in the training split, in ``[0, 1]`` (see
            :func:`balanced_repeats`): 0 keeps natural frequencies, 1 repeats every class up to the largest.
            Validation is never resampled.
        root: Folder of the default manifest and answer cache.
    """

    def __init__(
        self,
        llm: LLMConfig | None = None,
        prompts: PromptSetConfig | None = None,
        split: SplitConfig | None = None,
        manifest_path: str | None = None,
        refusal_tokens: dict[str, str | None] | None = None,
        answers: AnswerConfig | None = None,
        max_length: int = 512,
        batch_size: int = 8,
        num_workers: int = 0,
        chat_template: str | None = None,
        system_prompt: str | None = None,
        shuffle_seed: int = 0,
        class_balance: float = 0.0,
        root: str = DEFAULT_ROOT,
    ) -> None:
        super().__init__()
        if max_length < 2:
            raise ValueError(f"data.max_length must be >= 2, got {max_length}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        if not 0.0 <= class_balance <= 1.0:
            raise ValueError(f"data.class_balance must be in [0, 1], got {class_balance}")
        self.llm = llm or LLMConfig()
        self.prompts = prompts
        self.split = split or SplitConfig()
        self.manifest_path = manifest_path
        self.vocab = RefusalVocabulary(
            dict(refusal_tokens) if refusal_tokens else dict(DEFAULT_REFUSAL_TOKENS)
        )
        self.answers = answers or AnswerConfig()
        self.max_length = max_length
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.shuffle_seed = shuffle_seed
        self.class_balance = class_balance
        self.root = root
        self.tokenizer: Any = None
        self.splits: dict[str, SFTSplit] = {}
        self._prompt_set: PromptSet | None = None

    # ---------------------------------------------------------------- prompts and paths
    def load_prompts(self) -> PromptSet:
        """The full prompt set (all splits), with ``split`` set from the manifest (created if absent)."""
        prompt_set = load_builtin() if self.prompts is None else load_prompt_set(self.prompts)
        return split_prompt_set(prompt_set, self.split, self.manifest_path, root=self.root)

    def _answer_config(self) -> AnswerConfig:
        if self.answers.cache_path is not None:
            return self.answers
        return AnswerConfig(
            **{**asdict(self.answers), "cache_path": str(Path(self.root) / "base_answers.jsonl")}
        )

    @staticmethod
    def _encoded_splits(prompt_set: PromptSet) -> tuple[str, ...]:
        """``train``, and ``val`` when it has prompts (the test split never stands in for validation)."""
        return ("train", "val") if len(prompt_set.split("val")) > 0 else ("train",)

    def _trained_prompts(self, prompt_set: PromptSet) -> PromptSet:
        """Prompts that become examples: the train split and the validation split."""
        names = set(self._encoded_splits(prompt_set))
        return prompt_set.filter(lambda p: p.split in names)

    def held_out_prompts(self, split: str = "test") -> PromptSet:
        """The prompts of one split of the manifest (default the held-out test split), for evaluation jobs.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.

        Raises:
            ValueError: If ``split`` is not a split name.
        """
        if split not in SPLIT_NAMES:
            raise ValueError(f"split: unknown split {split!r}; expected one of {SPLIT_NAMES}")
        prompt_set = self._prompt_set if self._prompt_set is not None else self.load_prompts()
        return prompt_set.split(split)

    # ---------------------------------------------------------------- preparation
    def prepare_data(self) -> None:
        """Write the split manifest and generate (or reuse) base answers; sets no state."""
        prompt_set = self.load_prompts()
        base_answers(
            self._trained_prompts(prompt_set),
            self.llm,
            self._answer_config(),
            chat_template=self.chat_template,
            system_prompt=self.system_prompt,
        )

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenizer, add the refusal tokens and encode the train and validation examples."""
        if self.splits:
            return
        from sae_refusal.finetune.tokens import add_refusal_tokens

        prompt_set = self.load_prompts()
        tokenizer = load_tokenizer(self.llm)
        answers = base_answers(
            self._trained_prompts(prompt_set),
            self.llm,
            self._answer_config(),
            tokenizer=tokenizer,
            chat_template=self.chat_template,
            system_prompt=self.system_prompt,
            generate=False,
        )
        add_refusal_tokens(tokenizer, self.vocab)
        resolved = self.vocab.resolve(tokenizer)
        eos_id = end_of_turn_token(tokenizer, self.chat_template)[1]
        splits: dict[str, SFTSplit] = {}
        for name in self._encoded_splits(prompt_set):
            examples = build_examples(prompt_set.split(name), resolved, answers)
            rows = [
                encode_example(
                    tokenizer,
                    example,
                    token_id=resolved.token_ids[example.target_class],
                    max_length=self.max_length,
                    chat_template=self.chat_template,
                    system_prompt=self.system_prompt,
                    eos_token_id=eos_id,
                )
                for example in examples
            ]
            ids = [e.prompt_id for e in examples]
            n_prompt_truncated = sum(r["prompt_truncated"] for r in rows)
            n_answer_truncated = sum(r["answer_truncated"] for r in rows)
            if name == "train" and self.class_balance > 0:
                keep = balanced_repeats(
                    [r["target_class"] for r in rows], self.class_balance, self.shuffle_seed
                )
                ids, rows = [ids[i] for i in keep], [rows[i] for i in keep]
                log.info(
                    "class_balance=%s: %d training rows from %d examples",
                    self.class_balance,
                    len(rows),
                    len(examples),
                )
            splits[name] = SFTSplit(
                ids=ids,
                rows=rows,
                n_prompt_truncated=n_prompt_truncated,
                n_answer_truncated=n_answer_truncated,
            )
            if splits[name].n_prompt_truncated or splits[name].n_answer_truncated:
                log.info(
                    "split %s: %d of %d examples exceed data.max_length=%d (%d prompts cut from the left, "
                    "%d answers cut)",
                    name,
                    sum(1 for r in rows if r["prompt_truncated"] or r["answer_truncated"]),
                    len(rows),
                    self.max_length,
                    splits[name].n_prompt_truncated,
                    splits[name].n_answer_truncated,
                )
        self.tokenizer = tokenizer
        self._prompt_set = prompt_set
        self.splits = splits

    # ---------------------------------------------------------------- loaders
    def _loader(self, name: str, train: bool) -> DataLoader[dict[str, Any]]:
        if not self.splits:
            raise RuntimeError("SFTDataModule.setup() has not run")
        dataset = SFTDataset(self.splits[name])
        if len(dataset) == 0:
            raise ValueError(
                f"split {name!r} has no examples; check split.test_fraction / split.val_fraction and the "
                "prompts"
            )
        return map_style_loader(
            dataset,
            trainer=self.trainer,
            batch_size=self.batch_size,
            train=train,
            seed=self.shuffle_seed,
            num_workers=self.num_workers,
            collate_fn=functools.partial(collate_sft, pad_token_id=int(self.tokenizer.pad_token_id)),
        )

    def train_dataloader(self) -> DataLoader[dict[str, Any]]:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader[dict[str, Any]]:
        """The validation split; never the test split in its place.

        Raises:
            ValueError: If there is no validation split (``data.split.val_fraction`` is 0).
        """
        if "val" not in self.splits and self.splits:
            raise empty_validation_error(self.split.val_fraction, "fine-tune")
        return self._loader("val", train=False)
