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

Cost: the clean and zero-ablated runs do not depend on the SAE and are shared by all the SAEs scored together
(:func:`splice_metrics_per_sae`, :class:`SplicePrompts`). With ``positions="last"`` the prompts run once
into a KV cache up to their last position; every run (clean, zero, each SAE) then computes the last
position only, and only its logits (the positions before it cannot see the last one under causal attention,
so this equals the full forward; tested against a plain per-SAE computation).

:class:`SpliceMetricsCallback` logs them per seed under the split it scored: at the end of validation epochs
(fit and ``validate``) on the ``val`` split as ``val/seed{n}/splice/...``, at the end of a ``test`` run on the
``test`` split as ``test/seed{n}/splice/...``. Fit never reads the test split.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from sae_refusal.data.chat import format_prompts
from sae_refusal.llm.batched import forward_parameters, iter_padded_batches, resolve_pad_id
from sae_refusal.llm.extraction import position_ids_from_mask
from sae_refusal.llm.hooks import residual_hooks
from sae_refusal.llm.layers import decoder_layers, input_device, validate_layers
from sae_refusal.llm.tokenize import encode_prompts
from sae_refusal.sae.base import SparseAutoencoder

__all__ = [
    "SpliceMetrics",
    "SpliceMetricsCallback",
    "SplicePrompts",
    "encode_splice_prompts",
    "replace_block_output",
    "splice_metrics",
    "splice_metrics_encoded",
    "splice_metrics_per_sae",
]

log = logging.getLogger(__name__)


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
    """Within the block, decoder block ``layer``'s hidden-state output is ``replace(hidden_BTD)``.

    A thin use of the project's one hook mechanism (:func:`sae_refusal.llm.hooks.residual_hooks`).
    """
    with residual_hooks(model, {layer: lambda hidden_BTD, _ctx: replace(hidden_BTD)}):
        yield


def _new_cache(model: nn.Module) -> tuple[str, Any] | None:
    """``(keyword, empty DynamicCache)`` when the model's forward takes a KV cache, else ``None``.

    The keyword is ``cache`` (recent transformers releases) or ``past_key_values`` (older ones).
    """
    parameters = forward_parameters(model)
    keyword = next((k for k in ("cache", "past_key_values") if k in parameters), None)
    if keyword is None:
        return None
    try:
        from transformers import DynamicCache
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return keyword, DynamicCache()


class _LastPosition:
    """Logits at the last position of one left-padded batch, as often as needed, at the cost of one token.

    One forward over all positions but the last fills a KV cache (the prefix). Each :meth:`logits` call then
    runs only the last position against that cache, so a hook that changes the last position's residual (the
    spliced SAE, the zero ablation) sees exactly what a full forward would give it: under causal attention
    the earlier positions never read the last one. The cache is cropped back to the prefix after each call.
    Models whose ``forward`` takes no KV cache get a full forward per call instead. Only the last position's
    logits are computed (``logits_to_keep=1`` where the model takes it).
    """

    def __init__(self, model: nn.Module, ids_BT: Tensor, mask_BT: Tensor) -> None:
        self.model, self.ids_BT, self.mask_BT = model, ids_BT, mask_BT
        self.pos_BT = position_ids_from_mask(mask_BT)
        parameters = forward_parameters(model)
        self.extra: dict[str, Any] = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
        self.cache: dict[str, Any] = {}
        self.prefix = ids_BT.shape[1] - 1
        made = _new_cache(model) if self.prefix > 0 else None
        if made is not None:
            keyword, cache = made
            model(
                input_ids=ids_BT[:, :-1],
                attention_mask=mask_BT[:, :-1],
                position_ids=self.pos_BT[:, :-1],
                use_cache=True,
                **{keyword: cache},
                **self.extra,
            )
            if cache.get_seq_length() == self.prefix:
                self.cache = {keyword: cache}

    def logits(self) -> Tensor:
        """``(B, 1, V)`` float32 logits at the last position, with the hooks active now."""
        if not self.cache:
            out = self.model(
                input_ids=self.ids_BT,
                attention_mask=self.mask_BT,
                position_ids=self.pos_BT,
                use_cache=False,
                **self.extra,
            )
            return out.logits[:, -1:].float()
        out = self.model(
            input_ids=self.ids_BT[:, -1:],
            attention_mask=self.mask_BT,
            position_ids=self.pos_BT[:, -1:],
            use_cache=True,
            **self.cache,
            **self.extra,
        )
        cache = next(iter(self.cache.values()))
        cache.crop(-1)  # drop the last position again (a negative count removes tokens in every release)
        if cache.get_seq_length() != self.prefix:
            raise RuntimeError(
                f"KV cache holds {cache.get_seq_length()} positions after crop, not {self.prefix}"
            )
        return out.logits[:, -1:].float()


def _splice(sae: SparseAutoencoder, where_BT: Tensor) -> Callable[[Tensor], Tensor]:
    """A block-output replacement that puts the SAE's reconstruction at the positions ``where_BT``."""

    def spliced(hidden_BTD: Tensor) -> Tensor:
        # the SAE runs only on the positions it replaces
        where = where_BT if where_BT.shape[1] == hidden_BTD.shape[1] else where_BT[:, -hidden_BTD.shape[1] :]
        out_BTD = hidden_BTD.clone()
        out_BTD[where] = sae(hidden_BTD[where]).recon_BD.to(hidden_BTD.dtype)
        return out_BTD

    return spliced


def _zeroed(where_BT: Tensor) -> Callable[[Tensor], Tensor]:
    """A block-output replacement that zeroes the positions ``where_BT``."""

    def zeroed(hidden_BTD: Tensor) -> Tensor:
        where = where_BT if where_BT.shape[1] == hidden_BTD.shape[1] else where_BT[:, -hidden_BTD.shape[1] :]
        return torch.where(where.unsqueeze(-1), torch.zeros_like(hidden_BTD), hidden_BTD)

    return zeroed


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
    return splice_metrics_per_sae(
        model,
        tokenizer,
        texts,
        layer,
        {"sae": sae},
        batch_size=batch_size,
        max_length=max_length,
        chat_template=chat_template,
        system_prompt=system_prompt,
        positions=positions,
    )["sae"]


def encode_splice_prompts(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_length: int = 256,
    chat_template: str | None = None,
    system_prompt: str | None = None,
) -> list[list[int]]:
    """Token ids of ``texts`` as :func:`splice_metrics` scores them (chat template, generation prompt).

    Raises:
        ValueError: On an empty ``texts``.
    """
    if not texts:
        raise ValueError("splice_metrics: no prompts")
    formatted = format_prompts(
        tokenizer, list(texts), chat_template=chat_template, system_prompt=system_prompt
    )
    return encode_prompts(tokenizer, formatted, max_length=max_length).input_ids


@torch.no_grad()
def splice_metrics_per_sae(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    layer: int,
    saes: Mapping[str, SparseAutoencoder],
    *,
    batch_size: int = 16,
    max_length: int = 256,
    chat_template: str | None = None,
    system_prompt: str | None = None,
    positions: str = "last",
) -> dict[str, SpliceMetrics]:
    """:func:`splice_metrics` of several SAEs of one layer; the clean and zero-ablated runs are shared.

    Same arguments as :func:`splice_metrics`, with ``saes`` by name; returns the metrics by the same names.
    """
    if positions not in ("last", "all"):
        raise ValueError(f"positions must be 'last' or 'all', got {positions!r}")
    input_ids = encode_splice_prompts(
        tokenizer, texts, max_length=max_length, chat_template=chat_template, system_prompt=system_prompt
    )
    return splice_metrics_encoded(
        model,
        input_ids,
        layer,
        saes,
        pad_id=resolve_pad_id(tokenizer),
        batch_size=batch_size,
        positions=positions,
    )


@torch.no_grad()
def splice_metrics_encoded(
    model: nn.Module,
    input_ids: Sequence[Sequence[int]],
    layer: int,
    saes: Mapping[str, SparseAutoencoder],
    *,
    pad_id: int,
    batch_size: int = 16,
    positions: str = "last",
) -> dict[str, SpliceMetrics]:
    """:func:`splice_metrics_per_sae` on prompts already encoded (:func:`encode_splice_prompts`).

    Per batch the clean and the zero-ablated runs are computed once and shared by every SAE (see
    :class:`SplicePrompts`, which can also keep them between calls).

    Args:
        model: A Hugging Face causal LM (any device); each SAE is moved to its input device for the call.
        input_ids: One non-empty list of token ids per prompt.
        layer: Decoder block whose output is replaced (0-based, negative counts from the end).
        saes: SAEs trained on that layer's residuals, by name.
        pad_id: Id written into the padding positions.
        batch_size: Prompts per forward pass.
        positions: ``last`` (the trained position) or ``all`` (see the module docstring).

    Raises:
        ValueError: On no prompts or no SAEs, a layer out of range, an SAE of another width, or an unknown
            ``positions``.
    """
    runner = SplicePrompts(model, input_ids, layer, pad_id=pad_id, batch_size=batch_size, positions=positions)
    return runner.metrics(saes)


@dataclass
class _CleanBatch:
    """The part of one batch's metrics that does not depend on the SAE."""

    run: Callable[[], Tensor]  # logits ((B, 1, V) for positions=last) with the hooks active at the call
    where_BT: Tensor  # the positions replaced by the SAE or zeroed
    scored_BT: Tensor  # the positions scored (of the logits `run` returns)
    targets_N: Tensor
    log_p_BTV: Tensor  # clean log-probabilities
    clean_top_B: Tensor  # clean top token at the last position
    loss_clean: float  # cross-entropy sums over the scored positions
    loss_zero: float


class SplicePrompts:
    """Splice metrics of SAEs on fixed encoded prompts, one model and one layer; the SAE-free part shared.

    Per batch of prompts the clean run and the zero-ablated run do not depend on the SAE: they are computed
    once for all the SAEs of a :meth:`metrics` call. With ``positions="last"`` every position but the last
    runs once into a KV cache and each run (clean, zero, one per SAE) computes only the last position and
    only its logits; with ``positions="all"`` each run is a full forward.

    With ``keep=True`` (``positions="last"`` only) that SAE-free part (per batch: the KV cache of the
    prompts, the clean log-probabilities at the last position and the zero-ablated loss) is kept between
    :meth:`metrics` calls, so a later call runs only one token per prompt and SAE. The model must not change
    between calls then (e.g. the frozen LM of :class:`SpliceMetricsCallback`). The memory held is the KV cache
    of the prompts (SmolLM2-135M: ~46 KB per token, ~70 MB for 32 prompts of ~50 tokens) plus ``B x V``
    floats per batch.

    Args:
        model: A Hugging Face causal LM (any device).
        input_ids: One non-empty list of token ids per prompt (:func:`encode_splice_prompts`).
        layer: Decoder block whose output is replaced (0-based, negative counts from the end).
        pad_id: Id written into the padding positions.
        batch_size: Prompts per forward pass (prompts are batched longest first: less padding).
        positions: ``last`` (the trained position) or ``all`` (see the module docstring).
        keep: Keep the SAE-free part between calls (``positions="last"`` only; ignored for ``all``).

    Raises:
        ValueError: On no prompts, a layer out of range or an unknown ``positions``.
    """

    def __init__(
        self,
        model: nn.Module,
        input_ids: Sequence[Sequence[int]],
        layer: int,
        *,
        pad_id: int,
        batch_size: int = 16,
        positions: str = "last",
        keep: bool = False,
    ) -> None:
        if not input_ids:
            raise ValueError("splice_metrics: no prompts")
        if positions not in ("last", "all"):
            raise ValueError(f"positions must be 'last' or 'all', got {positions!r}")
        (self.layer,) = validate_layers([layer], len(decoder_layers(model)), key="layer")
        self.model, self.input_ids = model, [list(ids) for ids in input_ids]
        self.pad_id, self.batch_size, self.positions = pad_id, batch_size, positions
        self.keep = keep and positions == "last"
        self._kept: list[_CleanBatch] | None = None

    def _batches(self, device: torch.device) -> Iterator[_CleanBatch]:
        if self._kept is not None:
            yield from self._kept
            return
        kept: list[_CleanBatch] = []
        for batch in iter_padded_batches(
            self.input_ids, batch_size=self.batch_size, pad_id=self.pad_id, sort_by_length=True
        ):
            clean = self._clean_batch(batch.input_ids_BT.to(device), batch.attention_mask_BT.to(device))
            if self.keep:
                kept.append(clean)
            yield clean
        if self.keep:
            self._kept = kept

    def _clean_batch(self, ids_BT: Tensor, mask_BT: Tensor) -> _CleanBatch:
        model = self.model
        run: Callable[[], Tensor]
        if self.positions == "last":  # left padding: the last column is every prompt's last token
            where_BT = torch.zeros_like(mask_BT, dtype=torch.bool)
            where_BT[:, -1] = True
            run = _LastPosition(model, ids_BT, mask_BT).logits
            scored_BT = torch.ones(ids_BT.shape[0], 1, dtype=torch.bool, device=ids_BT.device)
        else:
            where_BT = mask_BT.bool()
            kwargs = {
                "input_ids": ids_BT,
                "attention_mask": mask_BT,
                "position_ids": position_ids_from_mask(mask_BT),
                "use_cache": False,
            }

            def run() -> Tensor:
                return model(**kwargs).logits.float()

            # position t predicts token t + 1; both must be real tokens
            scored_BT = torch.zeros_like(mask_BT, dtype=torch.bool)
            scored_BT[:, :-1] = (mask_BT[:, :-1] * mask_BT[:, 1:]).bool()
        clean_BTV = run()
        with replace_block_output(model, self.layer, _zeroed(where_BT)):
            zero_BTV = run()
        if self.positions == "all":
            targets_BT = torch.zeros_like(ids_BT)
            targets_BT[:, :-1] = ids_BT[:, 1:]
        else:  # the last position, scored against the clean model's top token
            targets_BT = clean_BTV.argmax(-1)
        targets_N = targets_BT[scored_BT]
        return _CleanBatch(
            run=run,
            where_BT=where_BT,
            scored_BT=scored_BT,
            targets_N=targets_N,
            log_p_BTV=clean_BTV.log_softmax(-1),
            clean_top_B=clean_BTV[:, -1].argmax(-1),
            loss_clean=float(F.cross_entropy(clean_BTV[scored_BT], targets_N, reduction="sum")),
            loss_zero=float(F.cross_entropy(zero_BTV[scored_BT], targets_N, reduction="sum")),
        )

    @torch.no_grad()
    def metrics(self, saes: Mapping[str, SparseAutoencoder]) -> dict[str, SpliceMetrics]:
        """The metrics of each SAE, by the names of ``saes``.

        Raises:
            ValueError: On no SAEs or an SAE of another width than the model's.
        """
        model, layer = self.model, self.layer
        if not saes:
            raise ValueError("splice_metrics: no SAEs")
        width = int(model.get_input_embeddings().weight.shape[1])  # type: ignore[operator]
        for sae in saes.values():
            if sae.d_model != width:
                raise ValueError(f"SAE width {sae.d_model} does not match the model's d_model {width}")
        device = input_device(model)
        was_training = model.training
        states = {name: (next(sae.parameters()).device, sae.training) for name, sae in saes.items()}
        model.eval()
        shared = {"clean": 0.0, "zero": 0.0}
        sums = {name: {"spliced": 0.0, "kl": 0.0, "kl_last": 0.0, "agree": 0.0} for name in saes}
        n_tokens = n_prompts = 0
        first_pass = self._kept is None  # the clean and zero-ablated runs happen now: the slow call
        start, total = time.perf_counter(), len(self.input_ids)
        try:
            for sae in saes.values():
                sae.eval().to(device)
            for clean in self._batches(device):
                shared["clean"] += clean.loss_clean
                shared["zero"] += clean.loss_zero
                scored_BT, log_p_BTV = clean.scored_BT, clean.log_p_BTV
                p_BTV = log_p_BTV.exp()
                for name, sae in saes.items():
                    with replace_block_output(model, layer, _splice(sae, clean.where_BT)):
                        spliced_BTV = clean.run()
                    seed_sums = sums[name]
                    seed_sums["spliced"] += float(
                        F.cross_entropy(spliced_BTV[scored_BT], clean.targets_N, reduction="sum")
                    )
                    kl_BT = (p_BTV * (log_p_BTV - spliced_BTV.log_softmax(-1))).sum(-1)
                    seed_sums["kl"] += float(kl_BT[scored_BT].sum())
                    seed_sums["kl_last"] += float(kl_BT[:, -1].sum())
                    seed_sums["agree"] += float((spliced_BTV[:, -1].argmax(-1) == clean.clean_top_B).sum())
                    del spliced_BTV, kl_BT
                n_tokens += int(scored_BT.sum())
                n_prompts += scored_BT.shape[0]
                if first_pass:
                    _log_rate("splice metrics", n_prompts, total, start)
        finally:
            model.train(was_training)
            for name, sae in saes.items():
                sae_device, sae_was_training = states[name]
                sae.train(sae_was_training).to(sae_device)
        n = max(n_tokens, 1)
        clean_loss, zero_loss = shared["clean"] / n, shared["zero"] / n
        gap = zero_loss - clean_loss
        results: dict[str, SpliceMetrics] = {}
        for name, seed_sums in sums.items():
            spliced_loss = seed_sums["spliced"] / n
            results[name] = SpliceMetrics(
                loss_clean=clean_loss,
                loss_spliced=spliced_loss,
                loss_zero=zero_loss,
                loss_recovered=(zero_loss - spliced_loss) / gap if gap > 0 else float("nan"),
                kl=seed_sums["kl"] / n,
                kl_last=seed_sums["kl_last"] / max(n_prompts, 1),
                top1_agree_last=seed_sums["agree"] / max(n_prompts, 1),
                n_tokens=n_tokens,
                positions=self.positions,
            )
        return results


def _log_rate(what: str, done: int, total: int, start: float) -> None:
    """``what: done/total prompts, rate prompts/s, ETA`` on the package log."""
    elapsed = max(time.perf_counter() - start, 1e-9)
    rate = done / elapsed
    eta = (total - done) / rate
    log.info("  %s: %d/%d prompts, %.1f prompts/s, ETA %.0f s", what, done, total, rate, eta)


class SpliceMetricsCallback(L.Callback):
    """Log :func:`splice_metrics` of every seed's SAE on the split being evaluated.

    At the end of a validation epoch (during fit, every ``every_n_epochs``, and in ``validate``) the
    prompts are the first ``n_prompts`` of the data module's ``val`` split and the metrics are logged as
    ``val/seed{n}/splice/<metric>``; at the end of a ``test`` run they are the first ``n_prompts`` of the
    ``test`` split, logged as ``test/seed{n}/splice/<metric>``. The test split is never read during fit.

    The LM is loaded once, on first use, from the data module's ``llm`` config and kept on the callback (it
    is never trained); each split's prompts are tokenized once. Every evaluation scores all seeds in one
    :class:`SplicePrompts` call (clean and zero-ablated runs shared by the seeds); with ``keep_clean_pass``
    (and ``positions: last``) those runs and the KV cache of the prompts are computed at the first evaluation
    only, so later ones run one token per prompt and seed. Runs on global rank zero; skipped during the
    sanity check.

    Args:
        n_prompts: Held-out prompts used (the first ones of the split, in manifest order).
        every_n_epochs: During fit, run every this many validation epochs.
        batch_size: Prompts per forward pass.
        max_length: Most tokens a prompt keeps.
        positions: ``last`` (the position the SAEs are trained on) or ``all``.
        keep_clean_pass: Keep the SAE-independent runs between evaluations (see :class:`SplicePrompts`;
            memory: the KV cache of ``n_prompts`` prompts).
    """

    def __init__(
        self,
        n_prompts: int = 64,
        every_n_epochs: int = 1,
        batch_size: int = 16,
        max_length: int = 256,
        positions: str = "last",
        keep_clean_pass: bool = True,
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
        self.keep_clean_pass = keep_clean_pass
        self._lm: tuple[Any, Any] | None = None
        self._prompts: dict[tuple[str, int], SplicePrompts] = {}
        #: Seconds per evaluation (the first includes loading the LM), for reports.
        self.seconds: list[float] = []

    def _runner(self, trainer: L.Trainer, split: str) -> SplicePrompts:
        from sae_refusal.llm.loading import load_model_and_tokenizer

        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        for attribute in ("llm", "load_prompts", "cache"):
            if not hasattr(datamodule, attribute):
                raise TypeError("SpliceMetricsCallback needs an ActivationDataModule (llm, prompts, layer)")
        layer = datamodule.cache.layers[0] if datamodule.layer is None else datamodule.layer
        if (split, layer) in self._prompts:
            return self._prompts[split, layer]
        if self._lm is None:
            name = datamodule.llm.name_or_path
            log.info("splice metrics: loading %s for the %s prompts (once per fit)", name, split)
            self._lm = load_model_and_tokenizer(datamodule.llm)
        model, tokenizer = self._lm
        prompts = datamodule.load_prompts().split(split)
        if len(prompts) == 0:
            raise ValueError(
                f"SpliceMetricsCallback: split {split!r} has no prompts; check data.split.val_fraction / "
                "data.split.test_fraction"
            )
        cache = datamodule.cache
        input_ids = encode_splice_prompts(
            tokenizer,
            prompts.texts[: self.n_prompts],
            max_length=self.max_length,
            chat_template=cache.chat_template,
            system_prompt=cache.system_prompt,
        )
        runner = SplicePrompts(
            model,
            input_ids,
            layer,
            pad_id=resolve_pad_id(tokenizer),
            batch_size=self.batch_size,
            positions=self.positions,
            keep=self.keep_clean_pass,
        )
        self._prompts[split, layer] = runner
        return runner

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
        start = time.perf_counter()
        runner = self._runner(trainer, split)
        results = runner.metrics(dict(pl_module.named_saes()))  # type: ignore[operator]
        metrics = {
            f"{split}/{name}/splice/{k}": v
            for name, result in results.items()
            for k, v in result.to_dict().items()
        }
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        for key, value in metrics.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        self.seconds.append(time.perf_counter() - start)
        log.info("splice metrics on %d %s prompts: %.1f s", len(runner.input_ids), split, self.seconds[-1])
