"""Splicing an SAE into the residual stream: identity and zero SAEs bound the metrics, padding is neutral,
the KL is ``KL(clean || spliced)``, the shared fast path equals a plain per-SAE computation, and the callback
logs under the split it scored, loading the LM and tokenizing once per fit."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers.logger import Logger

import sae_refusal.sae.splice as splice
from sae_refusal.activations import ActivationDataModule, CacheConfig
from sae_refusal.data.chat import format_prompts
from sae_refusal.data.sources import PromptSetConfig, PromptSourceConfig
from sae_refusal.data.splits import SplitConfig
from sae_refusal.llm import LLMConfig, load_model_and_tokenizer
from sae_refusal.llm.tokenize import encode_prompts
from sae_refusal.sae import TopKSAE
from sae_refusal.sae.base import SAEOutput, SparseAutoencoder
from sae_refusal.sae.splice import (
    SpliceMetrics,
    SpliceMetricsCallback,
    SplicePrompts,
    replace_block_output,
    splice_metrics,
    splice_metrics_per_sae,
)
from sae_refusal.testing import TINY_ARCHITECTURES, build_tiny_model, build_tiny_tokenizer

TEXTS = ["How do I bake bread?", "Tell me a fact about the sea and the number 7, please.", "Hi", "Why?"]


class ScaledSAE(SparseAutoencoder):
    """Reconstructs ``factor * x`` (1: perfect, 0: zero ablation)."""

    architecture = "scaled-test"

    def __init__(self, d_model: int, factor: float) -> None:
        super().__init__(d_model, 1)
        self.W_dec_FD = torch.nn.Parameter(torch.zeros(1, d_model))
        self.factor = factor

    def forward(self, x_BD: torch.Tensor, return_latents: bool = False) -> SAEOutput:
        zero = x_BD.new_zeros(())
        return SAEOutput(
            self.factor * x_BD, None, zero, zero, zero, zero, torch.zeros(1, dtype=torch.bool), {}
        )


@pytest.fixture(scope="module")
def lm(tiny_model_dir: Path) -> tuple[Any, Any]:
    return load_model_and_tokenizer(LLMConfig(name_or_path=str(tiny_model_dir)))


@pytest.mark.parametrize("positions", ["last", "all"])
def test_identity_and_zero_saes_bound_the_metrics(lm: tuple[Any, Any], positions: str) -> None:
    model, tokenizer = lm
    perfect = splice_metrics(model, tokenizer, TEXTS, 1, ScaledSAE(32, 1.0), positions=positions)
    assert perfect.top1_agree_last == 1.0 and perfect.positions == positions
    assert perfect.loss_spliced == pytest.approx(perfect.loss_clean, abs=1e-5)
    assert perfect.kl == pytest.approx(0.0, abs=1e-6) and perfect.kl_last == pytest.approx(0.0, abs=1e-6)
    assert perfect.loss_zero != pytest.approx(perfect.loss_clean)
    # a random-weight model may not get worse when a block's output is zeroed: then the share is undefined
    helps = perfect.loss_zero > perfect.loss_clean
    assert (
        perfect.loss_recovered == pytest.approx(1.0, abs=1e-4)
        if helps
        else math.isnan(perfect.loss_recovered)
    )
    zero = splice_metrics(model, tokenizer, TEXTS, 1, ScaledSAE(32, 0.0), positions=positions)
    assert zero.loss_spliced == pytest.approx(zero.loss_zero, abs=1e-5)
    assert zero.loss_recovered == pytest.approx(0.0, abs=1e-4) if helps else math.isnan(zero.loss_recovered)
    assert zero.kl > 0 and perfect.n_tokens == zero.n_tokens > 0
    assert (perfect.n_tokens == len(TEXTS)) == (positions == "last")


@pytest.mark.parametrize("positions", ["last", "all"])
def test_padding_does_not_change_the_metrics(lm: tuple[Any, Any], positions: str) -> None:
    model, tokenizer = lm
    sae = TopKSAE(32, 64, 4, generator=torch.Generator().manual_seed(0))
    alone = splice_metrics(model, tokenizer, TEXTS, -1, sae, batch_size=1, positions=positions)
    batched = splice_metrics(model, tokenizer, TEXTS, -1, sae, batch_size=4, positions=positions)
    for key, value in alone.to_dict().items():
        assert batched.to_dict()[key] == pytest.approx(value, rel=1e-4, abs=1e-5, nan_ok=True), key
    assert not model.training and next(sae.parameters()).device.type == "cpu"


def test_input_errors(lm: tuple[Any, Any]) -> None:
    model, tokenizer = lm
    with pytest.raises(ValueError, match="no prompts"):
        splice_metrics(model, tokenizer, [], 1, ScaledSAE(32, 1.0))
    with pytest.raises(ValueError, match="width 16"):
        splice_metrics(model, tokenizer, TEXTS, 1, ScaledSAE(16, 1.0))
    with pytest.raises(ValueError, match="positions"):
        splice_metrics(model, tokenizer, TEXTS, 1, ScaledSAE(32, 1.0), positions="first")
    with pytest.raises(ValueError, match="layer"):
        splice_metrics(model, tokenizer, TEXTS, 9, ScaledSAE(32, 1.0))


class ToyLM(torch.nn.Module):
    """Every position's residual is ``e_0``; the head maps ``h`` to logits ``h[0] * LOGITS_V``.

    With an SAE that reconstructs ``factor * h`` spliced into its one block, the clean next-token
    distribution is ``softmax(LOGITS_V)`` and the spliced one ``softmax(factor * LOGITS_V)``, at every
    position.
    """

    def __init__(self, logits_V: torch.Tensor) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(logits_V.shape[0], 2)
        self.layers = torch.nn.ModuleList([torch.nn.Identity()])
        self.head = torch.nn.Linear(2, logits_V.shape[0], bias=False)
        with torch.no_grad():
            self.embed.weight.copy_(torch.tensor([1.0, 0.0]).expand(logits_V.shape[0], 2))
            self.head.weight.zero_()
            self.head.weight[:, 0] = logits_V

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.embed

    def forward(self, input_ids: torch.Tensor, **_: Any) -> SimpleNamespace:
        hidden_BTD = self.embed(input_ids)
        for block in self.layers:
            hidden_BTD = block(hidden_BTD)
        return SimpleNamespace(logits=self.head(hidden_BTD))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return np.asarray(e / e.sum())


@pytest.mark.parametrize("positions", ["last", "all"])
def test_kl_is_clean_to_spliced_and_losses_match_a_hand_computation(
    lm: tuple[Any, Any], positions: str
) -> None:
    tokenizer = lm[1]
    logits_V = np.zeros(len(tokenizer))
    logits_V[:2] = [6.0, 3.0]
    factor = 0.5
    p, q = _softmax(logits_V), _softmax(factor * logits_V)  # clean, spliced
    kl_clean_spliced = float(np.sum(p * np.log(p / q)))
    kl_spliced_clean = float(np.sum(q * np.log(q / p)))
    assert kl_clean_spliced == pytest.approx(0.8451, abs=1e-4)
    assert kl_spliced_clean == pytest.approx(0.5063, abs=1e-4)  # the reversed direction differs clearly
    toy = ToyLM(torch.tensor(logits_V, dtype=torch.float32))
    metrics = splice_metrics(toy, tokenizer, TEXTS, 0, ScaledSAE(2, factor), positions=positions)
    assert metrics.kl == pytest.approx(kl_clean_spliced, rel=1e-4)
    assert metrics.kl_last == pytest.approx(kl_clean_spliced, rel=1e-4)
    assert metrics.top1_agree_last == 1.0
    if positions == "last":  # scored against the clean top token (token 0)
        assert metrics.loss_clean == pytest.approx(-math.log(p[0]), rel=1e-4)
        assert metrics.loss_spliced == pytest.approx(-math.log(q[0]), rel=1e-4)
        assert metrics.loss_zero == pytest.approx(math.log(len(tokenizer)), rel=1e-4)  # uniform


# ------------------------------------------------------------------- fast path == plain computation


@torch.no_grad()
def reference_splice_metrics(
    model: Any, tokenizer: Any, texts: list[str], layer: int, sae: SparseAutoencoder, positions: str
) -> SpliceMetrics:
    """The plain computation: one prompt at a time, three full forwards (clean, spliced, zero) per SAE with
    full-vocabulary logits at every position, nothing shared."""
    sums = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "kl": 0.0, "kl_last": 0.0, "agree": 0.0}
    n_tokens = 0
    formatted = format_prompts(tokenizer, texts)
    for ids in encode_prompts(tokenizer, formatted, max_length=256).input_ids:
        ids_1T = torch.tensor([ids])
        T = ids_1T.shape[1]
        where_T = torch.ones(T, dtype=torch.bool) if positions == "all" else torch.arange(T) == T - 1

        def spliced(h_1TD: torch.Tensor, where_T: torch.Tensor = where_T) -> torch.Tensor:
            out = h_1TD.clone()
            out[0, where_T] = sae(h_1TD[0, where_T]).recon_BD
            return out

        def zeroed(h_1TD: torch.Tensor, where_T: torch.Tensor = where_T) -> torch.Tensor:
            out = h_1TD.clone()
            out[0, where_T] = 0.0
            return out

        clean_TV = model(input_ids=ids_1T).logits[0].float()
        with replace_block_output(model, layer, spliced):
            spliced_TV = model(input_ids=ids_1T).logits[0].float()
        with replace_block_output(model, layer, zeroed):
            zero_TV = model(input_ids=ids_1T).logits[0].float()
        if positions == "all":
            rows, targets = torch.arange(T - 1), ids_1T[0, 1:]
        else:
            rows, targets = torch.tensor([T - 1]), clean_TV[-1:].argmax(-1)
        for name, logits_TV in (("clean", clean_TV), ("spliced", spliced_TV), ("zero", zero_TV)):
            sums[name] += float(F.cross_entropy(logits_TV[rows], targets, reduction="sum"))
        kl_T = F.kl_div(
            spliced_TV.log_softmax(-1), clean_TV.log_softmax(-1), log_target=True, reduction="none"
        )
        kl_T = kl_T.sum(-1)
        sums["kl"] += float(kl_T[rows].sum())
        sums["kl_last"] += float(kl_T[-1])
        sums["agree"] += float(spliced_TV[-1].argmax() == clean_TV[-1].argmax())
        n_tokens += len(rows)
    n, n_prompts = n_tokens, len(texts)
    gap = sums["zero"] / n - sums["clean"] / n
    return SpliceMetrics(
        loss_clean=sums["clean"] / n,
        loss_spliced=sums["spliced"] / n,
        loss_zero=sums["zero"] / n,
        loss_recovered=(sums["zero"] - sums["spliced"]) / n / gap if gap > 0 else float("nan"),
        kl=sums["kl"] / n,
        kl_last=sums["kl_last"] / n_prompts,
        top1_agree_last=sums["agree"] / n_prompts,
        n_tokens=n_tokens,
        positions=positions,
    )


MORE_TEXTS = [*TEXTS, "Write one short poem about dragons and bread.", "Summarise the water cycle in a list."]


@pytest.mark.parametrize("positions", ["last", "all"])
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_shared_fast_path_equals_the_plain_computation_per_seed(arch: str, positions: str) -> None:
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(arch, vocab_size=len(tokenizer))
    saes = {f"seed{s}": TopKSAE(32, 64, 4, generator=torch.Generator().manual_seed(s)) for s in range(3)}
    for sae in saes.values():  # a decoder bias, so the SAEs differ in more than their codes
        torch.nn.init.normal_(sae.b_dec_D, std=0.5, generator=torch.Generator().manual_seed(7))
    fast = splice_metrics_per_sae(model, tokenizer, MORE_TEXTS, 2, saes, batch_size=4, positions=positions)
    assert list(fast) == list(saes)
    values: set[float] = set()
    for name, sae in saes.items():
        ref = reference_splice_metrics(model, tokenizer, MORE_TEXTS, 2, sae, positions)
        got = fast[name].to_dict()
        for key, value in ref.to_dict().items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True), (name, key)
        values.add(round(fast[name].kl, 6))
        # one SAE alone gives its numbers in the shared run
        alone = splice_metrics(model, tokenizer, MORE_TEXTS, 2, sae, batch_size=4, positions=positions)
        assert alone.to_dict() == pytest.approx(got, nan_ok=True)
    assert len(values) == len(saes)  # the seeds really differ: each got its own spliced run


def test_last_position_runs_the_prompt_once_and_one_token_per_sae() -> None:
    """Per batch: one forward over all positions but the last, then one token each for clean, zero and
    every SAE; only the last position's logits are computed."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model("llama", vocab_size=len(tokenizer))
    calls: list[tuple[int, int]] = []  # (input positions, logits positions) per forward

    def record(_module: Any, _args: Any, kwargs: dict[str, Any], output: Any) -> None:
        calls.append((kwargs["input_ids"].shape[1], output.logits.shape[1]))

    handle = model.register_forward_hook(record, with_kwargs=True)
    saes = {f"seed{s}": TopKSAE(32, 64, 4, generator=torch.Generator().manual_seed(s)) for s in range(3)}
    try:
        splice_metrics_per_sae(model, tokenizer, TEXTS, 1, saes, batch_size=len(TEXTS))
    finally:
        handle.remove()
    longest = max(
        len(ids)
        for ids in encode_prompts(tokenizer, format_prompts(tokenizer, TEXTS), max_length=256).input_ids
    )
    assert calls == [(longest - 1, 1)] + [(1, 1)] * (2 + len(saes))


def test_kept_clean_pass_gives_the_same_numbers_and_runs_one_token_per_sae_later() -> None:
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model("qwen2", vocab_size=len(tokenizer))
    ids = encode_prompts(tokenizer, format_prompts(tokenizer, MORE_TEXTS), max_length=256).input_ids
    first = {"seed0": TopKSAE(32, 64, 4, generator=torch.Generator().manual_seed(0))}
    second = {"seed0": TopKSAE(32, 64, 4, generator=torch.Generator().manual_seed(1))}  # "later weights"
    kept = SplicePrompts(model, ids, 1, pad_id=0, batch_size=4, keep=True)
    assert kept.metrics(first) == SplicePrompts(model, ids, 1, pad_id=0, batch_size=4).metrics(first)
    lengths: list[int] = []
    handle = model.register_forward_hook(
        lambda _m, _a, kwargs, _o: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        again = kept.metrics(second)
    finally:
        handle.remove()
    assert lengths == [1, 1]  # two batches, one SAE: the last position only, nothing recomputed
    fresh = SplicePrompts(model, ids, 1, pad_id=0, batch_size=4).metrics(second)
    for key, value in fresh["seed0"].to_dict().items():
        assert again["seed0"].to_dict()[key] == pytest.approx(value, rel=1e-5, abs=1e-7, nan_ok=True), key
    assert again["seed0"].kl != pytest.approx(kept.metrics(first)["seed0"].kl)


# ----------------------------------------------------------------------------------- callback


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.logged.append(dict(metrics))


class TwoSAEs(L.LightningModule):
    """The least a module needs for the callback: ``named_saes`` and (empty) eval steps."""

    def __init__(self) -> None:
        super().__init__()
        self.saes = torch.nn.ModuleDict({"seed0": ScaledSAE(32, 1.0), "seed1": ScaledSAE(32, 0.5)})
        self.probe = torch.nn.Linear(32, 1)

    def named_saes(self) -> list[tuple[str, SparseAutoencoder]]:
        return [(name, sae) for name, sae in self.saes.items()]  # type: ignore[misc]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.probe(batch["acts"]).pow(2).mean()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        pass

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _datamodule(model_dir: Path, root: Path, val_fraction: float) -> ActivationDataModule:
    prompts = PromptSetConfig(
        data_root=str(root),
        sources=[
            PromptSourceConfig(
                name="h", label="harmful", path="harmful.jsonl", id_column="id", category_column="category"
            ),
            PromptSourceConfig(name="b", label="benign", path="benign.json", text_column="instruction"),
        ],
    )
    return ActivationDataModule(
        llm=LLMConfig(name_or_path=str(model_dir)),
        prompts=prompts,
        split=SplitConfig(test_fraction=0.25, val_fraction=val_fraction, seed=0),
        cache=CacheConfig(root=str(root / "cache"), layers=(1,), batch_size=8),
        batch_size=8,
    )


def _trainer(root: Path, callback: SpliceMetricsCallback, logger: Logger | None = None) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        limit_train_batches=1,
        num_sanity_val_steps=0,
        logger=logger or False,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
    )


def test_callback_scores_val_during_fit_and_test_in_test_under_their_own_names(
    tiny_model_dir: Path, prompt_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scored: list[tuple[list[list[int]], list[str]]] = []
    real = splice.SplicePrompts.metrics

    def recording(self: SplicePrompts, saes: Any) -> Any:
        scored.append((self.input_ids, list(saes)))
        return real(self, saes)

    monkeypatch.setattr(splice.SplicePrompts, "metrics", recording)
    dm = _datamodule(tiny_model_dir, prompt_file, val_fraction=0.2)
    by_split = {name: dm.load_prompts().split(name).texts for name in ("val", "test")}
    assert by_split["val"] and by_split["test"] and not set(by_split["val"]) & set(by_split["test"])
    tokenizer = load_model_and_tokenizer(LLMConfig(name_or_path=str(tiny_model_dir)))[1]
    encoded = {
        name: encode_prompts(tokenizer, format_prompts(tokenizer, texts[:3]), max_length=256).input_ids
        for name, texts in by_split.items()
    }
    logger = RecordingLogger()
    trainer = _trainer(prompt_file / "run", SpliceMetricsCallback(n_prompts=3, every_n_epochs=2), logger)
    trainer.fit(TwoSAEs(), datamodule=dm)
    # one validation epoch of two (every_n_epochs=2), both seeds in one shared run, the val prompts only
    assert scored == [(encoded["val"], ["seed0", "seed1"])]
    keys = {k for row in logger.logged for k in row if "/splice/" in k}
    assert {"val/seed0/splice/kl", "val/seed1/splice/loss_recovered"} <= keys
    assert not any(k.startswith("test/") for k in keys)
    assert float(trainer.callback_metrics["val/seed0/splice/kl"]) == pytest.approx(0.0, abs=1e-6)
    assert float(trainer.callback_metrics["val/seed1/splice/kl"]) > 0

    scored.clear()
    trainer.test(TwoSAEs(), datamodule=dm)
    assert scored == [(encoded["test"], ["seed0", "seed1"])]
    tested = {k for k in trainer.callback_metrics if "/splice/" in k}
    assert {"test/seed0/splice/kl", "test/seed1/splice/top1_agree_last"} <= tested
    assert not any(k.startswith("val/") for k in tested)


def test_callback_loads_the_lm_and_tokenizes_once_per_fit(
    tiny_model_dir: Path, prompt_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sae_refusal.llm.loading as loading

    loads: list[str] = []
    encodes: list[int] = []
    real_load, real_encode = loading.load_model_and_tokenizer, splice.encode_splice_prompts

    def counting_load(config: LLMConfig) -> Any:
        loads.append(config.name_or_path)
        return real_load(config)

    def counting_encode(tokenizer: Any, texts: Any, **kwargs: Any) -> list[list[int]]:
        encodes.append(len(texts))
        return real_encode(tokenizer, texts, **kwargs)

    monkeypatch.setattr(loading, "load_model_and_tokenizer", counting_load)
    monkeypatch.setattr(splice, "encode_splice_prompts", counting_encode)
    dm = _datamodule(tiny_model_dir, prompt_file, val_fraction=0.2)
    logger = RecordingLogger()
    callback = SpliceMetricsCallback(n_prompts=3, every_n_epochs=1)
    trainer = _trainer(prompt_file / "run", callback, logger)
    trainer.fit(TwoSAEs(), datamodule=dm)
    steps = [row for row in logger.logged if "val/seed0/splice/kl" in row]
    assert len(steps) == 2 and len(callback.seconds) == 2  # two evaluations ...
    assert loads == [str(tiny_model_dir)] and encodes == [3]  # ... one load, one tokenization


def test_fit_without_a_val_split_raises_instead_of_validating_on_test(
    tiny_model_dir: Path, prompt_file: Path
) -> None:
    dm = _datamodule(tiny_model_dir, prompt_file, val_fraction=0.0)
    trainer = _trainer(prompt_file / "run", SpliceMetricsCallback(n_prompts=3))
    with pytest.raises(
        ValueError, match=r"validation split is empty.*data\.split\.val_fraction.*limit_val_batches"
    ):
        trainer.fit(TwoSAEs(), datamodule=dm)
