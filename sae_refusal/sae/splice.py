"""How much an SAE breaks the model: its reconstruction spliced into the residual stream at layer ``l``.

:func:`splice_metrics` runs the LM on held-out prompts three times: clean, with the output of decoder block
``l`` replaced by the SAE's reconstruction, and with that output zeroed, at

* ``positions="last"`` (default): the last prompt position only, the one the project's SAEs are trained on
  (the first response token is predicted there, where a refusal-token model decides). The loss is the
  cross-entropy of the clean model's top token at that position;
* ``positions="all"``: every real (non-padding) position, with the ordinary next-token loss. A last-token SAE
  has never seen the other positions (e.g. the huge-norm first token that attention sinks read), so this
  measures something it was not trained for.

It reports the loss of each run, ``KL(clean || spliced)`` (mean over the scored positions, and at the last
position), how often the spliced model's top token at the last position is the clean one, and the share of
the zero-ablation loss increase the SAE recovers::

    loss_recovered = (loss_zero - loss_spliced) / (loss_zero - loss_clean)

:class:`SpliceMetricsCallback` logs them per seed under the split it scored: at the end of validation epochs
(fit and ``validate``) on the ``val`` split as ``val/seed{n}/splice/...``, at the end of a ``test`` run on the
``test`` split as ``test/seed{n}/splice/...``. Fit never reads the test split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from sae_refusal.data.chat import format_prompts
from sae_refusal.llm.batched import iter_padded_batches, resolve_pad_id
from sae_refusal.llm.extraction import position_ids_from_mask
from sae_refusal.llm.layers import decoder_layers, input_device, validate_layers
from sae_refusal.llm.tokenize import encode_prompts
from sae_refusal.sae.base import SparseAutoencoder

__all__ = ["SpliceMetrics", "SpliceMetricsCallback", "replace_block_output", "splice_metrics"]


@dataclass(frozen=True)
class SpliceMetrics:
    """Next-token metrics with the SAE spliced in (see the module docstring).

    Args:
        loss_clean: Mean next-token cross-entropy of the unmodified model.
        loss_spliced: The same with the SAE reconstruction at the layer.
        loss_zero: The same with the layer's output zeroed.
        loss_recovered: ``(loss_zero - loss_spliced) / (loss_zero - loss_clean)``.
        kl: Mean ``KL(clean || spliced)`` over the predicted positions.
        kl_last: ``KL(clean || spliced)`` at each prompt's last position, averaged over prompts.
        top1_agree_last: Share of prompts whose spliced top token at the last position is the clean one.
        n_tokens: Scored positions the means run over.
        positions: ``last`` or ``all`` (where the SAE was spliced in).
    """

    loss_clean: float
    loss_spliced: float
    loss_zero: float
    loss_recovered: float
    kl: float
    kl_last: float
    top1_agree_last: float
    n_tokens: int
    positions: str = "last"

    def to_dict(self) -> dict[str, float]:
        """The numeric fields as a flat dict."""
        return {k: float(v) for k, v in asdict(self).items() if k != "positions"}


@contextmanager
def replace_block_output(model: nn.Module, layer: int, replace: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Within the block, decoder block ``layer``'s hidden-state output is ``replace(hidden_BTD)``."""

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        if isinstance(output, Tensor):
            return replace(output)
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            return (replace(output[0]), *output[1:])
        raise TypeError(f"unexpected decoder block output type {type(output).__name__}")

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def splice_metrics(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    layer: int,
    sae: SparseAutoencoder,
    *,
    batch_size: int = 16,
    max_length: int = 256,
    chat_template: str | None = None,
    system_prompt: str | None = None,
    positions: str = "last",
) -> SpliceMetrics:
    """Clean, spliced and zero-ablated next-token metrics on chat-formatted ``texts``.

    Args:
        model: A Hugging Face causal LM (any device); the SAE is moved to its input device for the call.
        tokenizer: Its tokenizer.
        texts: User messages; formatted with the chat template (generation prompt added), as in the cache.
        layer: Decoder block whose output is replaced (0-based, negative counts from the end).
        sae: The SAE, trained on that layer's residuals.
        batch_size: Prompts per forward pass.
        max_length: Most tokens a prompt keeps (longer ones keep their end).
        chat_template: Template overriding the tokenizer's.
        system_prompt: Optional system message.
        positions: ``last`` (the trained position) or ``all`` (see the module docstring).

    Raises:
        ValueError: On an empty ``texts``, a layer out of range, an SAE of another width, or an unknown
            ``positions``.
    """
    if not texts:
        raise ValueError("splice_metrics: no prompts")
    if positions not in ("last", "all"):
        raise ValueError(f"positions must be 'last' or 'all', got {positions!r}")
    blocks = decoder_layers(model)
    (layer,) = validate_layers([layer], len(blocks), key="layer")
    width = int(model.get_input_embeddings().weight.shape[1])  # type: ignore[operator]
    if sae.d_model != width:
        raise ValueError(f"SAE width {sae.d_model} does not match the model's d_model {width}")
    device = input_device(model)
    sae_device = next(sae.parameters()).device
    was_training, sae_was_training = model.training, sae.training
    model.eval()
    sae.eval().to(device)
    formatted = format_prompts(
        tokenizer, list(texts), chat_template=chat_template, system_prompt=system_prompt
    )
    encoded = encode_prompts(tokenizer, formatted, max_length=max_length)
    sums = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "kl": 0.0, "kl_last": 0.0, "agree": 0.0}
    n_tokens = n_prompts = 0
    try:
        for batch in iter_padded_batches(
            encoded.input_ids, batch_size=batch_size, pad_id=resolve_pad_id(tokenizer)
        ):
            ids_BT = batch.input_ids_BT.to(device)
            mask_BT = batch.attention_mask_BT.to(device)
            kwargs = {
                "input_ids": ids_BT,
                "attention_mask": mask_BT,
                "position_ids": position_ids_from_mask(mask_BT),
            }
            real_BT1 = mask_BT.bool().unsqueeze(-1)
            if positions == "last":  # left padding: the last column is every prompt's last token
                real_BT1 = torch.zeros_like(real_BT1)
                real_BT1[:, -1] = True

            def spliced(hidden_BTD: Tensor, real_BT1: Tensor = real_BT1) -> Tensor:
                where_BT = real_BT1.squeeze(-1)  # the SAE runs only on the positions it replaces
                out_BTD = hidden_BTD.clone()
                out_BTD[where_BT] = sae(hidden_BTD[where_BT]).recon_BD.to(hidden_BTD.dtype)
                return out_BTD

            def zeroed(hidden_BTD: Tensor, real_BT1: Tensor = real_BT1) -> Tensor:
                return torch.where(real_BT1, torch.zeros_like(hidden_BTD), hidden_BTD)

            clean_BTV = model(**kwargs).logits.float()
            with replace_block_output(model, layer, spliced):
                spliced_BTV = model(**kwargs).logits.float()
            with replace_block_output(model, layer, zeroed):
                zero_BTV = model(**kwargs).logits.float()
            if positions == "all":  # position t predicts token t + 1; both must be real tokens
                scored_BT = torch.zeros_like(mask_BT, dtype=torch.bool)
                scored_BT[:, :-1] = (mask_BT[:, :-1] * mask_BT[:, 1:]).bool()
                targets_BT = torch.zeros_like(ids_BT)
                targets_BT[:, :-1] = ids_BT[:, 1:]
            else:  # the last position, scored against the clean model's top token
                scored_BT = torch.zeros_like(mask_BT, dtype=torch.bool)
                scored_BT[:, -1] = True
                targets_BT = torch.zeros_like(ids_BT)
                targets_BT[:, -1] = clean_BTV[:, -1].argmax(-1)
            targets_N = targets_BT[scored_BT]
            for name, logits in (("clean", clean_BTV), ("spliced", spliced_BTV), ("zero", zero_BTV)):
                sums[name] += float(F.cross_entropy(logits[scored_BT], targets_N, reduction="sum"))
            log_p_BTV = clean_BTV.log_softmax(-1)
            log_q_BTV = spliced_BTV.log_softmax(-1)
            kl_BT = (log_p_BTV.exp() * (log_p_BTV - log_q_BTV)).sum(-1)
            sums["kl"] += float(kl_BT[scored_BT].sum())
            sums["kl_last"] += float(kl_BT[:, -1].sum())
            sums["agree"] += float((spliced_BTV[:, -1].argmax(-1) == clean_BTV[:, -1].argmax(-1)).sum())
            n_tokens += int(scored_BT.sum())
            n_prompts += ids_BT.shape[0]
    finally:
        model.train(was_training)
        sae.train(sae_was_training).to(sae_device)
    n = max(n_tokens, 1)
    clean, spliced_loss, zero = sums["clean"] / n, sums["spliced"] / n, sums["zero"] / n
    gap = zero - clean
    return SpliceMetrics(
        loss_clean=clean,
        loss_spliced=spliced_loss,
        loss_zero=zero,
        loss_recovered=(zero - spliced_loss) / gap if gap > 0 else float("nan"),
        kl=sums["kl"] / n,
        kl_last=sums["kl_last"] / max(n_prompts, 1),
        top1_agree_last=sums["agree"] / max(n_prompts, 1),
        n_tokens=n_tokens,
        positions=positions,
    )


class SpliceMetricsCallback(L.Callback):
    """Log :func:`splice_metrics` of every seed's SAE on the split being evaluated.

    At the end of a validation epoch (during fit, every ``every_n_epochs``, and in ``validate``) the
    prompts are the first ``n_prompts`` of the data module's ``val`` split and the metrics are logged as
    ``val/seed{n}/splice/<metric>``; at the end of a ``test`` run they are the first ``n_prompts`` of the
    ``test`` split, logged as ``test/seed{n}/splice/<metric>``. The test split is never read during fit. The
    LM is loaded (once, on first use) from the data module's ``llm`` config. Runs on global rank zero;
    skipped during the sanity check.

    Args:
        n_prompts: Held-out prompts used (the first ones of the split, in manifest order).
        every_n_epochs: During fit, run every this many validation epochs.
        batch_size: Prompts per forward pass.
        max_length: Most tokens a prompt keeps.
        positions: ``last`` (the position the SAEs are trained on) or ``all``.
    """

    def __init__(
        self,
        n_prompts: int = 64,
        every_n_epochs: int = 1,
        batch_size: int = 16,
        max_length: int = 256,
        positions: str = "last",
    ) -> None:
        if n_prompts < 1 or every_n_epochs < 1 or batch_size < 1 or max_length < 1:
            raise ValueError(
                "SpliceMetricsCallback: n_prompts, every_n_epochs, batch_size, max_length must be >= 1"
            )
        if positions not in ("last", "all"):
            raise ValueError(f"SpliceMetricsCallback: positions must be 'last' or 'all', got {positions!r}")
        self.positions = positions
        self.n_prompts, self.every_n_epochs = n_prompts, every_n_epochs
        self.batch_size, self.max_length = batch_size, max_length
        self._lm: tuple[Any, Any] | None = None
        self._texts: dict[str, list[str]] = {}

    def _setup(self, trainer: L.Trainer, split: str) -> tuple[Any, Any, list[str], int]:
        from sae_refusal.llm.loading import load_model_and_tokenizer

        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        for attribute in ("llm", "load_prompts", "cache"):
            if not hasattr(datamodule, attribute):
                raise TypeError("SpliceMetricsCallback needs an ActivationDataModule (llm, prompts, layer)")
        if self._lm is None:
            self._lm = load_model_and_tokenizer(datamodule.llm)
        if split not in self._texts:
            prompts = datamodule.load_prompts().split(split)
            if len(prompts) == 0:
                raise ValueError(
                    f"SpliceMetricsCallback: split {split!r} has no prompts; check data.split.val_fraction / "
                    "data.split.test_fraction"
                )
            self._texts[split] = prompts.texts[: self.n_prompts]
        layer = datamodule.cache.layers[0] if datamodule.layer is None else datamodule.layer
        return self._lm[0], self._lm[1], self._texts[split], layer

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == TrainerFn.FITTING and (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self._log_split(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_split(trainer, pl_module, "test")

    def _log_split(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> None:
        """Score ``split``'s prompts with every seed's SAE; log them as ``<split>/seed{n}/splice/...``."""
        if not trainer.is_global_zero:
            return
        model, tokenizer, texts, layer = self._setup(trainer, split)
        cache = trainer.datamodule.cache  # type: ignore[attr-defined]
        metrics: dict[str, float] = {}
        for name, sae in pl_module.named_saes():  # type: ignore[operator]
            result = splice_metrics(
                model,
                tokenizer,
                texts,
                layer,
                sae,
                batch_size=self.batch_size,
                max_length=self.max_length,
                chat_template=cache.chat_template,
                system_prompt=cache.system_prompt,
                positions=self.positions,
            )
            metrics.update({f"{split}/{name}/splice/{k}": v for k, v in result.to_dict().items()})
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        for key, value in metrics.items():
            trainer.callback_metrics[key] = torch.tensor(value)
