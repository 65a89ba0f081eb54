"""Splicing an SAE into the residual stream: identity and zero SAEs bound the metrics, padding is neutral,
the KL is ``KL(clean || spliced)``, and the callback logs under the split it scored."""

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
from lightning.pytorch.loggers.logger import Logger

import sae_refusal.sae.splice as splice
from sae_refusal.activations import ActivationDataModule, CacheConfig
from sae_refusal.data.sources import PromptSetConfig, PromptSourceConfig
from sae_refusal.data.splits import SplitConfig
from sae_refusal.llm import LLMConfig, load_model_and_tokenizer
from sae_refusal.sae import TopKSAE
from sae_refusal.sae.base import SAEOutput, SparseAutoencoder
from sae_refusal.sae.splice import SpliceMetricsCallback, splice_metrics

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
    scored: list[list[str]] = []
    real = splice.splice_metrics

    def recording(model: Any, tokenizer: Any, texts: list[str], *args: Any, **kwargs: Any) -> Any:
        scored.append(list(texts))
        return real(model, tokenizer, texts, *args, **kwargs)

    monkeypatch.setattr(splice, "splice_metrics", recording)
    dm = _datamodule(tiny_model_dir, prompt_file, val_fraction=0.2)
    by_split = {name: set(dm.load_prompts().split(name).texts) for name in ("val", "test")}
    assert by_split["val"] and by_split["test"] and not by_split["val"] & by_split["test"]
    logger = RecordingLogger()
    trainer = _trainer(prompt_file / "run", SpliceMetricsCallback(n_prompts=3, every_n_epochs=2), logger)
    trainer.fit(TwoSAEs(), datamodule=dm)
    assert len(scored) == 2  # one validation epoch of two (every_n_epochs=2), two seeds
    assert all(set(texts) <= by_split["val"] for texts in scored)  # never the test split during fit
    keys = {k for row in logger.logged for k in row if "/splice/" in k}
    assert {"val/seed0/splice/kl", "val/seed1/splice/loss_recovered"} <= keys
    assert not any(k.startswith("test/") for k in keys)
    assert float(trainer.callback_metrics["val/seed0/splice/kl"]) == pytest.approx(0.0, abs=1e-6)
    assert float(trainer.callback_metrics["val/seed1/splice/kl"]) > 0

    scored.clear()
    trainer.test(TwoSAEs(), datamodule=dm)
    assert len(scored) == 2 and all(set(texts) <= by_split["test"] for texts in scored)
    tested = {k for k in trainer.callback_metrics if "/splice/" in k}
    assert {"test/seed0/splice/kl", "test/seed1/splice/top1_agree_last"} <= tested
    assert not any(k.startswith("val/") for k in tested)


def test_fit_without_a_val_split_raises_instead_of_validating_on_test(
    tiny_model_dir: Path, prompt_file: Path
) -> None:
    dm = _datamodule(tiny_model_dir, prompt_file, val_fraction=0.0)
    trainer = _trainer(prompt_file / "run", SpliceMetricsCallback(n_prompts=3))
    with pytest.raises(
        ValueError, match=r"validation split is empty.*data\.split\.val_fraction.*limit_val_batches"
    ):
        trainer.fit(TwoSAEs(), datamodule=dm)
