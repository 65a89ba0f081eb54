"""RefusalSFTModule and sft_loss: the decision-token weight, the steps, the schedule and the model set-up,
each checked against a computation written out by hand."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from sae_refusal.finetune.module import RefusalSFTModule, sft_loss
from sae_refusal.llm import LLMConfig
from sae_refusal.testing import build_tiny_model

IGNORE = -100

# The module logs its metrics; outside a Trainer that only warns
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


def hand_loss(logits: torch.Tensor, labels: torch.Tensor, target_pos: torch.Tensor, w: float) -> float:
    """Token ``t`` predicted from position ``t - 1``; the token at ``target_pos`` counted ``w`` times."""
    num = den = 0.0
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            label = int(labels[b, t])
            if label == IGNORE:
                continue
            row = [float(v) for v in logits[b, t - 1]]
            ce = math.log(sum(math.exp(v) for v in row)) - row[label]
            weight = w if t == int(target_pos[b]) else 1.0
            num += weight * ce
            den += weight
    return num / den


def tiny_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows, 5 positions, 4 classes; row 1 has a padded tail; the decision tokens are at 1 and 2."""
    gen = torch.Generator().manual_seed(0)
    logits = 3.0 * torch.randn(2, 5, 4, generator=gen)
    labels = torch.tensor([[IGNORE, 3, 1, 0, 2], [IGNORE, IGNORE, 2, 1, IGNORE]])
    return logits, labels, torch.tensor([1, 2])


def test_sft_loss_of_a_single_labelled_token_is_its_cross_entropy() -> None:
    logits, labels, target_pos = tiny_case()
    labels = torch.full_like(labels, IGNORE)
    labels[0, 1] = 3  # only the decision token of row 0
    ce = torch.nn.functional.cross_entropy(logits[0, 0:1], labels[0, 1:2]).item()
    for w in (1.0, 0.5, 3.0):  # 0.5: the weight sum is below 1 (was scaled by w before the fix)
        assert sft_loss(logits, labels, target_pos, w).item() == pytest.approx(ce)
    nothing = torch.full_like(labels, IGNORE)
    assert sft_loss(logits, nothing, target_pos, 0.5).item() == 0.0  # nothing labelled: 0, not NaN


@pytest.mark.parametrize("w", [1.0, 0.25, 2.0, 4.0, 10.0])
def test_sft_loss_matches_a_hand_computed_weighted_mean(w: float) -> None:
    logits, labels, target_pos = tiny_case()
    assert sft_loss(logits, labels, target_pos, w).item() == pytest.approx(
        hand_loss(logits, labels, target_pos, w)
    )


def test_the_decision_weight_changes_the_loss_and_only_through_the_decision_token() -> None:
    """Kills: the weight ignored, applied to the wrong position (off by one), or to every token."""
    logits, labels, target_pos = tiny_case()
    plain = sft_loss(logits, labels, target_pos, 1.0).item()
    hf = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 4), labels[:, 1:].reshape(-1))
    assert plain == pytest.approx(hf.item())  # weight 1 is the Hugging Face mean
    weighted = sft_loss(logits, labels, target_pos, 10.0).item()
    assert abs(weighted - plain) > 0.1
    # weighting a token w times is the same as the plain mean over a batch where it occurs w times:
    # with all other tokens of the same CE the weighted mean moves towards the decision tokens' CE.
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
    decision = ce[torch.arange(2), target_pos - 1].mean().item()
    assert abs(weighted - decision) < abs(plain - decision)


def test_sft_loss_gradient_is_zero_on_unlabelled_positions() -> None:
    logits, labels, target_pos = tiny_case()
    logits.requires_grad_(True)
    sft_loss(logits, labels, target_pos, 3.0).backward()
    assert logits.grad is not None
    unlabelled = torch.cat([labels[:, 1:] == IGNORE, torch.ones(2, 1, dtype=torch.bool)], dim=1)
    assert not logits.grad[unlabelled].any() and logits.grad[~unlabelled].abs().sum() > 0


def model_batch() -> tuple[Any, dict[str, torch.Tensor]]:
    model = build_tiny_model(vocab_size=40, num_layers=1, hidden_size=16)
    gen = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, 40, (3, 7), generator=gen)
    labels = input_ids.clone()
    labels[:, :3] = IGNORE  # the prompt
    labels[2, 5:] = IGNORE  # padding
    attention = torch.ones_like(input_ids)
    attention[2, 5:] = 0
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": labels,
        "target_pos": torch.tensor([3, 3, 3]),
    }
    return model, batch


class Recorder:
    def __init__(self) -> None:
        self.logged: dict[str, float] = {}
        self.options: dict[str, dict[str, Any]] = {}

    def __call__(self, name: str, value: Any, **kwargs: Any) -> None:
        self.logged[name] = float(value)
        self.options[name] = kwargs


def module_with(model: Any, **kwargs: Any) -> tuple[RefusalSFTModule, Recorder]:
    module = RefusalSFTModule(**kwargs)
    module.model = model
    recorder = Recorder()
    module.log = recorder  # type: ignore[method-assign,assignment]
    return module, recorder


@pytest.mark.parametrize("w", [1.0, 6.0])
def test_training_and_validation_steps_use_the_configured_decision_weight(w: float) -> None:
    """Kills: the module's loss (training or validation) computed without its ``decision_weight``."""
    model, batch = model_batch()
    module, recorder = module_with(model, decision_weight=w)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = hand_loss(logits.detach(), batch["labels"], batch["target_pos"], w)
    loss = module.training_step(batch, 0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert loss.requires_grad
    assert recorder.logged["train/loss"] == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        module.validation_step(batch, 0)
    assert recorder.logged["val/loss"] == pytest.approx(expected, rel=1e-5)
    # per-batch sizes weight the epoch means; validation metrics are averaged over DDP ranks
    assert recorder.options["train/loss"]["batch_size"] == 3
    for name in ("val/loss", "val/token_acc"):
        assert recorder.options[name]["batch_size"] == 3 and recorder.options[name]["sync_dist"] is True
    if w != 1.0:
        assert abs(expected - hand_loss(logits.detach(), batch["labels"], batch["target_pos"], 1.0)) > 1e-3


def test_first_token_accuracy_reads_the_position_before_the_decision_token() -> None:
    model, batch = model_batch()
    module, recorder = module_with(model)
    logits = torch.zeros(3, 7, 40)
    targets = batch["input_ids"][:, 3]
    logits[0, 2, targets[0]] = 5.0  # right, at target_pos - 1
    logits[1, 3, targets[1]] = 5.0  # at the decision position itself: too late, wrong
    logits[2, 2, (targets[2] + 1) % 40] = 5.0  # wrong token
    assert module._first_token_accuracy(batch, logits).item() == pytest.approx(1 / 3)
    logits[1, 2, targets[1]] = 6.0
    assert module._first_token_accuracy(batch, logits).item() == pytest.approx(2 / 3)
    module.forward = lambda batch: logits  # type: ignore[method-assign]
    module.validation_step(batch, 0)
    assert recorder.logged["val/token_acc"] == pytest.approx(2 / 3)


def test_training_step_stops_on_a_non_finite_loss() -> None:
    model, batch = model_batch()
    module, _ = module_with(model)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = math.nan
    with pytest.raises(FloatingPointError, match="non-finite fine-tuning loss at step 0"):
        module.training_step(batch, 0)


def test_optimizer_trains_only_trainable_parameters_with_warmup_then_cosine_to_ten_percent() -> None:
    model, _ = model_batch()
    model.requires_grad_(True)
    model.model.norm.weight.requires_grad_(False)
    module, _ = module_with(model, lr=0.1, weight_decay=0.05, warmup_steps=4)
    module._trainer = SimpleNamespace(estimated_stepping_batches=14)  # type: ignore[assignment]
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert group["weight_decay"] == 0.05
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in group["params"]} == trainable and id(model.model.norm.weight) not in trainable
    lrs = []
    for _ in range(16):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.1 * (s + 1) / 4 for s in range(4)]
    expected += [0.1 * (0.1 + 0.45 * (1 + math.cos(math.pi * min((s - 4) / 10, 1.0)))) for s in range(4, 16)]
    assert lrs == pytest.approx(expected)
    assert lrs[3] == pytest.approx(0.1) and lrs[14] == pytest.approx(0.01) and lrs[15] == pytest.approx(0.01)

    module._trainer = SimpleNamespace(estimated_stepping_batches=0)  # type: ignore[assignment]
    no_warmup, _ = module_with(model, lr=0.1, warmup_steps=0)
    no_warmup._trainer = SimpleNamespace(estimated_stepping_batches=1)  # type: ignore[assignment]
    config = no_warmup.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)  # full lr from the first step
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)  # one step: the whole decay

    one_step_warmup, _ = module_with(model, lr=0.1, warmup_steps=1)
    one_step_warmup._trainer = SimpleNamespace(estimated_stepping_batches=5)  # type: ignore[assignment]
    optimizer = one_step_warmup.configure_optimizers()["optimizer"]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)  # warm-up of one step: full lr at once

    model.requires_grad_(False)
    with pytest.raises(RuntimeError, match=r"^no trainable parameters: check model\.lora settings$"):
        module.configure_optimizers()


def test_defaults_and_a_custom_vocabulary() -> None:
    module = RefusalSFTModule()
    assert (module.lr, module.weight_decay, module.warmup_steps) == (2e-4, 0.0, 20)
    assert module.decision_weight == 1.0 and module.token_init == "category_words"
    assert module.gradient_checkpointing is False and module.lora is None
    assert module.model is None and module.tokenizer is None and module.added_tokens == []
    custom = {" [no]": "Requests with safety concerns", " [yes]": None}
    assert RefusalSFTModule(refusal_tokens=custom).vocab.tokens == custom
    assert RefusalSFTModule(gradient_checkpointing=True).gradient_checkpointing is True


def test_forward_passes_the_attention_mask() -> None:
    model, batch = model_batch()
    batch["attention_mask"][0, :2] = 0  # a left-padded row: the mask changes every later logit
    module, _ = module_with(model)
    with torch.no_grad():
        got = module(batch)
        masked = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        unmasked = model(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(got, masked)
    assert not torch.allclose(got[0, 2:], unmasked[0, 2:], atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0.0}, r"model\.lr must be > 0"),
        ({"warmup_steps": -1}, r"model\.warmup_steps must be >= 0"),
        ({"decision_weight": math.inf}, r"model\.decision_weight must be a finite number > 0"),
        ({"decision_weight": math.nan}, r"model\.decision_weight must be a finite number > 0"),
        ({"decision_weight": -1.0}, r"model\.decision_weight must be a finite number > 0"),
    ],
)
def test_invalid_settings_name_their_key(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RefusalSFTModule(**kwargs)  # type: ignore[arg-type]
    RefusalSFTModule(lr=1e-9, warmup_steps=0, decision_weight=1e-3)  # the edges are valid


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_configure_model_adds_tokens_and_freezes_what_lora_does_not_train(
    tiny_model_dir: Path, lora: bool
) -> None:
    from sae_refusal.finetune.lora import LoraSettings

    module = RefusalSFTModule(
        llm=LLMConfig(name_or_path=str(tiny_model_dir)),
        lora=LoraSettings(r=2, alpha=4) if lora else None,
    )
    module.configure_model()
    model, tokenizer = module.model, module.tokenizer
    assert model.training and len(module.added_tokens) == 6
    ids = [int(tokenizer.convert_tokens_to_ids(t)) for t in module.added_tokens]
    assert model.get_input_embeddings().weight.shape[0] >= max(ids) + 1
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if lora:
        assert trainable and all("lora_" in n or "trainable_tokens" in n for n in trainable), trainable
        assert any("trainable_tokens" in n for n in trainable)
    else:
        assert len(trainable) == len(list(model.parameters()))
    same = module.model
    module.configure_model()  # a second call (e.g. a resumed fit) keeps the model
    assert module.model is same


def test_mean_token_init_and_gradient_checkpointing_with_lora(tiny_model_dir: Path) -> None:
    """``token_init="mean"`` reaches the embedding initialisation; with gradient checkpointing and LoRA the
    adapters still get gradients (the input embeddings must require grad for checkpointed blocks)."""
    from sae_refusal.finetune.lora import LoraSettings

    llm = LLMConfig(name_or_path=str(tiny_model_dir))
    base = RefusalSFTModule(llm=llm)
    base.configure_model()
    module = RefusalSFTModule(
        llm=llm, token_init="mean", lora=LoraSettings(r=2, alpha=4), gradient_checkpointing=True
    )
    module.configure_model()
    model, tokenizer = module.model, module.tokenizer
    ids = [int(tokenizer.convert_tokens_to_ids(t)) for t in module.added_tokens]
    old_rows = min(ids)
    base_weight = base.model.get_input_embeddings().weight.detach()
    mean_row = base_weight[:old_rows].float().mean(0)
    embedding = model.get_input_embeddings()
    rows = embedding(torch.tensor(ids)).detach()  # peft's view of the rows as the model reads them
    torch.testing.assert_close(rows, mean_row.expand(len(ids), -1))
    assert not torch.allclose(base_weight[ids], rows)  # category_words differs from the mean
    assert model.is_gradient_checkpointing
    input_ids = torch.tensor([[1, 2, 3, ids[0]]])
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    lora = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)


def test_export_writes_the_artifact_and_the_merged_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    from sae_refusal.finetune.lora import LoraSettings
    from sae_refusal.llm import load_model_and_tokenizer

    module = RefusalSFTModule(
        llm=LLMConfig(name_or_path=str(tiny_model_dir)), lora=LoraSettings(r=2, alpha=4)
    )
    module.configure_model()
    with torch.no_grad():  # a trained adapter and token row, so merging matters
        for name, p in module.model.named_parameters():
            if "lora_B" in name or "trainable_tokens" in name:
                p.add_(0.05)
    ids = torch.tensor([[1, 2, 3, int(module.tokenizer.convert_tokens_to_ids(module.added_tokens[0]))]])
    module.model.eval()  # no LoRA dropout
    with torch.no_grad():
        expected = module.model(input_ids=ids).logits
    written = module.export(tmp_path / "out")
    assert written == {"artifact": tmp_path / "out" / "artifact", "model": tmp_path / "out" / "model"}
    merged, _ = load_model_and_tokenizer(LLMConfig(name_or_path=str(written["model"])))
    applied, _ = load_model_and_tokenizer(
        LLMConfig(name_or_path=str(tiny_model_dir), adapter_path=str(written["artifact"]))
    )
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(applied(input_ids=ids).logits, expected, atol=1e-4, rtol=0)
    full = RefusalSFTModule(llm=LLMConfig(name_or_path=str(tiny_model_dir)))
    full.configure_model()
    assert set(full.export(tmp_path / "full")) == {"model"}  # no artifact without LoRA
