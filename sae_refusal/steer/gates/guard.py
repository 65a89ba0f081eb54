"""The guard gate: an external guard model scores the user message; it names no category.

:class:`GuardGate` runs a local sequence classifier (``mode="classifier"``, the label index meaning harmful
set by ``harmful_label``) or a chat model whose next-token logits of two answers (``"unsafe"`` / ``"safe"``)
after ``prompt_format`` give the score (``mode="chat"``). The guard model is referenced by path, loaded on
first use, and never copied into a gate folder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from sae_refusal.data.chat import format_prompts
from sae_refusal.llm.batched import check_positive, next_token_logits, resolve_pad_id
from sae_refusal.llm.tokenize import encode_prompts
from sae_refusal.sae.base import SparseAutoencoder
from sae_refusal.steer.gates.base import GateScores, _scores

_DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class GuardGate:
    """An external guard model: score = its probability that the user message is harmful; no category.

    Args:
        path: Local Hugging Face folder (or hub id, if reachable) of the guard model and its tokenizer.
        mode: ``"classifier"``: an ``AutoModelForSequenceClassification``; ``"chat"``: a causal LM asked in
            ``prompt_format``, whose next-token logits of ``answers`` give the score.
        harmful_label: (classifier) The label meaning harmful: an index, or a name of ``config.label2id``.
        prompt_format: (chat) ``str.format`` pattern with a ``{prompt}`` field for the user message.
        answers: (chat) ``(harmful, harmless)`` answer strings; the first token of each is compared:
            score = ``softmax(logit_harmful, logit_harmless)[0]``.
        use_chat_template: (chat) Wrap the formatted question in the guard tokenizer's chat template as a
            user message (generation prompt added); false: feed it as plain text.
        device: Where the guard model runs.
        dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16``.
        max_length: Most tokens per prompt (longer ones lose their beginning in chat mode, their end in
            classifier mode, as the classifier's tokenizer truncates).

    The model loads on first use. It ignores the ``model`` / ``tokenizer`` passed to :meth:`score_prompts`
    (those of the steered model).
    """

    kind: ClassVar[str] = "guard"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        mode: Literal["classifier", "chat"] = "classifier",
        harmful_label: int | str = 1,
        prompt_format: str = "{prompt}",
        answers: tuple[str, str] = ("unsafe", "safe"),
        use_chat_template: bool = True,
        device: str = "cpu",
        dtype: str = "auto",
        max_length: int = 1024,
    ) -> None:
        if mode not in ("classifier", "chat"):
            raise ValueError(f"mode: expected 'classifier' or 'chat', got {mode!r}")
        if "{prompt}" not in prompt_format:
            raise ValueError(f"prompt_format: needs a {{prompt}} field, got {prompt_format!r}")
        try:
            prompt_format.format(prompt="x")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"prompt_format: {err!r}; escape literal braces as {{{{ }}}}") from err
        if len(answers) != 2 or not all(answers) or answers[0] == answers[1]:
            raise ValueError(f"answers: expected two distinct non-empty strings, got {answers!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: expected one of {tuple(_DTYPES)}, got {dtype!r}")
        check_positive("max_length", max_length)
        self.path = str(path)
        self.mode = mode
        self.harmful_label = harmful_label
        self.prompt_format = prompt_format
        self.answers = (str(answers[0]), str(answers[1]))
        self.use_chat_template = bool(use_chat_template)
        self.device = device
        self.dtype = dtype
        self.max_length = max_length
        self._loaded: tuple[nn.Module, Any] | None = None

    @property
    def layer(self) -> None:
        """Reads no residuals."""
        return None

    @property
    def d_model(self) -> None:
        """Any width."""
        return None

    @property
    def class_names(self) -> None:
        """Names no category."""
        return None

    def _load(self) -> tuple[nn.Module, Any]:
        if self._loaded is None:
            from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.path)
            auto = AutoModelForSequenceClassification if self.mode == "classifier" else AutoModelForCausalLM
            model: Any = auto.from_pretrained(self.path, dtype=_DTYPES[self.dtype])
            model = model.to(self.device).eval()
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            self._loaded = (model, tokenizer)
        return self._loaded

    def harmful_index(self, model: nn.Module) -> int:
        """The classifier's label index meaning harmful (``harmful_label`` resolved against its config)."""
        config: Any = model.config
        n_labels = int(getattr(config, "num_labels", 0))
        label = self.harmful_label
        if isinstance(label, str):
            label2id = {
                str(k).casefold(): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()
            }
            if label.casefold() not in label2id:
                raise ValueError(
                    f"harmful_label: {label!r} is not a label of {self.path} ({sorted(label2id)})"
                )
            return label2id[label.casefold()]
        if isinstance(label, bool) or not 0 <= int(label) < n_labels:
            raise ValueError(
                f"harmful_label: {label!r} is not a label index of a {n_labels}-label classifier"
            )
        return int(label)

    def score_prompts(
        self,
        model: nn.Module,
        tokenizer: Any,
        texts: Sequence[str],
        *,
        batch_size: int = 32,
        max_length: int | None = None,
        chat_template: str | None = None,
        system_prompt: str | None = None,
    ) -> GateScores:
        """Score with the guard model (the steered ``model`` / ``tokenizer`` and the template are unused)."""
        check_positive("batch_size", batch_size)
        if isinstance(texts, str):
            raise TypeError("texts: expected a sequence of strings, got a single string")
        guard, guard_tokenizer = self._load()
        limit = self.max_length if max_length is None else max_length
        if self.mode == "classifier":
            score_N = self._classify(guard, guard_tokenizer, list(texts), batch_size, limit)
        else:
            score_N = self._ask(guard, guard_tokenizer, list(texts), batch_size, limit)
        return _scores(score_N, torch.zeros(len(texts), dtype=torch.long))

    def _classify(
        self, guard: nn.Module, tokenizer: Any, texts: list[str], batch_size: int, max_length: int
    ) -> Tensor:
        harmful = self.harmful_index(guard)
        config: Any = guard.config
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id
        tokenizer.padding_side = "right"  # decoder classifiers read the last non-pad token; positions from 0
        device = next(guard.parameters()).device
        parts = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = tokenizer(
                    texts[start : start + batch_size],
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                ).to(device)
                logits_BL = guard(**batch).logits.float()
                parts.append(torch.softmax(logits_BL, dim=-1)[:, harmful].cpu())
        return torch.cat(parts) if parts else torch.empty(0)

    def _ask(
        self, guard: nn.Module, tokenizer: Any, texts: list[str], batch_size: int, max_length: int
    ) -> Tensor:
        ids = []
        for answer in self.answers:
            encoded = tokenizer.encode(answer, add_special_tokens=False)
            if not encoded:
                raise ValueError(f"answers: {answer!r} encodes to no token")
            ids.append(int(encoded[0]))
        if ids[0] == ids[1]:
            raise ValueError(
                f"answers: {self.answers} start with the same token; pick distinguishable answers"
            )
        questions = [self.prompt_format.format(prompt=text) for text in texts]
        if self.use_chat_template:
            questions = format_prompts(tokenizer, questions, key="guard.use_chat_template")
        encoded_prompts = encode_prompts(
            tokenizer, questions, max_length=max_length, overflow="truncate_left"
        )
        logits_NV = next_token_logits(
            guard, encoded_prompts.input_ids, batch_size=batch_size, pad_id=resolve_pad_id(tokenizer)
        )
        return torch.softmax(logits_NV[:, ids], dim=1)[:, 0]

    def config(self) -> dict[str, Any]:
        """Everything that rebuilds the gate (the guard model is referenced by ``path``)."""
        return {
            "path": self.path,
            "mode": self.mode,
            "harmful_label": self.harmful_label,
            "prompt_format": self.prompt_format,
            "answers": list(self.answers),
            "use_chat_template": self.use_chat_template,
            "device": self.device,
            "dtype": self.dtype,
            "max_length": self.max_length,
        }

    def tensors(self) -> dict[str, Tensor]:
        """None: nothing is fitted."""
        return {}

    @classmethod
    def from_saved(
        cls, config: Mapping[str, Any], tensors: Mapping[str, Tensor], sae: SparseAutoencoder | None = None
    ) -> GuardGate:
        """Rebuild from :meth:`config`."""
        answers = config.get("answers", ("unsafe", "safe"))
        return cls(
            config["path"],
            mode=config.get("mode", "classifier"),
            harmful_label=config.get("harmful_label", 1),
            prompt_format=config.get("prompt_format", "{prompt}"),
            answers=(str(answers[0]), str(answers[1])),
            use_chat_template=bool(config.get("use_chat_template", True)),
            device=config.get("device", "cpu"),
            dtype=config.get("dtype", "auto"),
            max_length=int(config.get("max_length", 1024)),
        )
