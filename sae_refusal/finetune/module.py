"""``RefusalSFTModule``: supervised fine-tuning that teaches a causal LM to emit a refusal token first.

A thin LightningModule over a Hugging Face model:

* ``configure_model`` (not ``__init__``) loads the base model, adds the refusal tokens to its tokenizer,
  resizes and initialises the new embedding rows, and wraps the model with LoRA when ``lora`` is set;
* the loss is next-token cross-entropy on ``labels`` (``-100`` on the prompt and padding, so only the
  assistant part — refusal token, answer, end of turn — is learned), averaged over the labelled tokens of
  the batch with the refusal-token position weighted ``decision_weight`` times (1 = the model's own loss);
* validation logs the first-token accuracy (is the argmax at the position before the refusal token that
  token?) and the loss;
* ``export`` writes a standard HF folder (``save_pretrained``, LoRA merged) and, with LoRA, the small
  refusal-token artifact (adapter + new token rows) that ``LLMConfig(adapter_path=...)`` applies at load time.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch

from sae_refusal.categories import DEFAULT_REFUSAL_TOKENS
from sae_refusal.distributed import destroy_process_group_at_exit
from sae_refusal.finetune.config import LoraSettings, check_finetune_settings
from sae_refusal.finetune.lora import wrap_with_lora
from sae_refusal.finetune.tokens import add_refusal_tokens, init_refusal_embeddings
from sae_refusal.llm.compat import enable_activation_checkpointing
from sae_refusal.llm.loading import LLMConfig, load_model, load_tokenizer, model_fingerprint
from sae_refusal.llm.refusal_tokens import RefusalVocabulary


def sft_loss(
    logits_BTV: torch.Tensor,
    labels_BT: torch.Tensor,
    target_pos_B: torch.Tensor,
    decision_weight: float = 1.0,
) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled tokens, the decision token weighted ``decision_weight``.

    Token ``t`` is predicted from position ``t - 1``; labels of ``-100`` are ignored. The refusal / respond
    token sits at ``target_pos_B`` (its label is the token itself). With ``decision_weight = 1`` this is the
    Hugging Face loss (mean over all labelled tokens of the batch).

    Args:
        logits_BTV: Logits of every position.
        labels_BT: Target ids, ``-100`` where nothing is learned.
        target_pos_B: Position of each row's refusal / respond token.
        decision_weight: Weight of the decision token relative to one answer token.
    """
    shift_labels_BT = labels_BT[:, 1:]
    labelled_BT = shift_labels_BT != -100
    weight_BT = labelled_BT.float()
    if decision_weight != 1.0:
        rows_B = torch.arange(labels_BT.shape[0], device=labels_BT.device)
        weight_BT[rows_B, target_pos_B - 1] = weight_BT[rows_B, target_pos_B - 1] * decision_weight
    # Only the labelled positions (the assistant part) reach the fp32 cross-entropy: the prompt and padding
    # rows of the (B, T, V) logits are never copied or upcast.
    ce_M = torch.nn.functional.cross_entropy(
        logits_BTV[:, :-1][labelled_BT].float(), shift_labels_BT[labelled_BT], reduction="none"
    )
    weight_M = weight_BT[labelled_BT]
    # a weight sum below 1 is possible (decision_weight < 1 and only decision tokens labelled); 0 only
    # when nothing is labelled, where the loss is 0
    return (ce_M * weight_M).sum() / weight_M.sum().clamp_min(1e-12)


class RefusalSFTModule(L.LightningModule):
    """Fine-tune a causal LM to start every answer with a categorical refusal token or ``[respond]``.

    Args:
        llm: The base model to fine-tune (hub id, folder, GGUF, or the ``smollm2`` alias).
        refusal_tokens: Token string -> CoCoNot category (``null`` = respond); default: the published
            spellings.
        token_init: How new embedding rows start: ``category_words`` (mean of the category name's tokens) or
            ``mean`` (mean of all rows).
        lora: LoRA settings; ``null`` fine-tunes every weight.
        lr: Peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps, then cosine decay to 10% of ``lr``.
        gradient_checkpointing: Trade compute for memory on large models.
        decision_weight: Weight of the refusal / respond token's loss relative to one answer token. An answer
            has ~100 tokens and the decision one, so values around 5-20 make the decision matter; 1 gives the
            plain mean next-token loss.
    """

    def __init__(
        self,
        llm: LLMConfig | None = None,
        refusal_tokens: dict[str, str | None] | None = None,
        token_init: str = "category_words",
        lora: LoraSettings | None = None,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 20,
        gradient_checkpointing: bool = False,
        decision_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_finetune_settings(lr, warmup_steps, decision_weight)  # also checked before Lightning loads
        self.llm = llm or LLMConfig()
        self.vocab = RefusalVocabulary(
            dict(refusal_tokens) if refusal_tokens else dict(DEFAULT_REFUSAL_TOKENS)
        )
        self.token_init = token_init
        self.lora = lora
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.gradient_checkpointing = gradient_checkpointing
        self.decision_weight = decision_weight
        self.model: Any = None
        self.tokenizer: Any = None
        self.added_tokens: list[str] = []

    def setup(self, stage: str) -> None:
        # a gloo group left to interpreter finalisation can abort a finished DDP run (sae_refusal.distributed)
        destroy_process_group_at_exit()

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is not None:
            return
        tokenizer = load_tokenizer(self.llm)
        model = load_model(self.llm)
        added = add_refusal_tokens(tokenizer, self.vocab)
        init_refusal_embeddings(model, tokenizer, self.vocab, added, init=self.token_init)
        model.requires_grad_(True)
        new_ids = [int(tokenizer.convert_tokens_to_ids(t)) for t in added]
        if self.lora is not None:
            model = wrap_with_lora(model, self.lora, new_ids)
        if self.gradient_checkpointing:
            enable_activation_checkpointing(model)
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
        model.train()
        self.model, self.tokenizer, self.added_tokens = model, tokenizer, added

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Next-token logits ``(B, T, V)`` of a batch."""
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def loss(self, batch: dict[str, torch.Tensor], logits_BTV: torch.Tensor) -> torch.Tensor:
        """Weighted next-token loss (see :func:`sft_loss`)."""
        return sft_loss(logits_BTV, batch["labels"], batch["target_pos"], self.decision_weight)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch, self(batch))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite fine-tuning loss at step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def _first_token_accuracy(self, batch: dict[str, torch.Tensor], logits_BTV: torch.Tensor) -> torch.Tensor:
        rows_B = torch.arange(batch["input_ids"].shape[0], device=logits_BTV.device)
        predicted_B = logits_BTV[rows_B, batch["target_pos"] - 1].argmax(-1)
        target_B = batch["input_ids"][rows_B, batch["target_pos"]]
        return (predicted_B == target_B).float().mean()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits_BTV = self(batch)
        n = batch["input_ids"].shape[0]
        self.log("val/loss", self.loss(batch, logits_BTV), prog_bar=True, batch_size=n, sync_dist=True)
        self.log(
            "val/token_acc",
            self._first_token_accuracy(batch, logits_BTV),
            prog_bar=True,
            batch_size=n,
            sync_dist=True,
        )

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("no trainable parameters: check model.lora settings")
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(self.warmup_steps, total)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / max(warmup, 1)
            progress = (step - warmup) / max(total - warmup, 1)
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ export
    def export(self, folder: str | Path) -> dict[str, Path]:
        """Write ``<folder>/model`` (HF folder, LoRA merged) and, with LoRA, ``<folder>/artifact``."""
        from sae_refusal.atomic import AtomicFolder
        from sae_refusal.finetune.artifact import save_refusal_artifact

        folder = Path(folder)
        written: dict[str, Path] = {}
        model = self.model
        if self.lora is not None:
            written["artifact"] = save_refusal_artifact(
                model,
                self.tokenizer,
                self.vocab,
                self.added_tokens,
                folder / "artifact",
                base=model_fingerprint(self.llm),
            )
            model = model.merge_and_unload()
            self.model = model
        with AtomicFolder(folder / "model") as out:
            model.save_pretrained(out.tmp)
            self.tokenizer.save_pretrained(out.tmp)
            written["model"] = out.commit()
        return written
