"""The BatchTopK, Matryoshka-BatchTopK and trained JumpReLU SAEs through the workflows of the TopK, L1 and
contrastive SAEs: resume from a checkpoint, several seeds side by side, export and ``load_sae``, the feature
analysis, latent steering and ablation, an eval-job column, and DDP (the BatchTopK threshold the same on every
rank).

Data and trainer: the in-memory activations and helpers of ``tests/test_sae_resume_ddp.py`` (no LLM, no
cache; the shipped training loader).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from sae_refusal.features import FeatureAnalysisCallback, FeatureAnalysisConfig
from sae_refusal.sae import (
    BatchTopK,
    BatchTopKSAE,
    MatryoshkaBatchTopK,
    MatryoshkaBatchTopKSAE,
    SAEModule,
    SparseAutoencoder,
    load_sae,
)
from sae_refusal.sae.architectures import SAEArchitecture
from sae_refusal.sae.jumprelu_train import JumpReLU, TrainableJumpReLUSAE
from tests.test_sae_resume_ddp import (
    BATCH,
    D_MODEL,
    STEPS_PER_EPOCH,
    Crash,
    CrashAt,
    InMemoryActivations,
    make_splits,
    make_trainer,
)

# Trainer(deterministic=True) and ddp_spawn change process-wide settings; undo them after each test
pytestmark = pytest.mark.usefixtures("lightning_globals_restored")

#: Each new architecture, small; AuxK on after 2 silent steps, so the dead-latent counters matter.
ARCHITECTURES: dict[str, Callable[[], SAEArchitecture]] = {
    "batchtopk": lambda: BatchTopK(k=4, aux_k=8, aux_coef=0.5, dead_after_steps=2, threshold_momentum=0.9),
    "matryoshka_batchtopk": lambda: MatryoshkaBatchTopK(
        k=4,
        prefix_fractions=[0.125, 0.5, 1.0],
        aux_k=8,
        aux_coef=0.5,
        dead_after_steps=2,
        threshold_momentum=0.9,
    ),
    "jumprelu_trained": lambda: JumpReLU(l0_coef=0.05, bandwidth=0.05, init_threshold=0.05),
}
SAE_CLASSES = {
    "batchtopk": BatchTopKSAE,
    "matryoshka_batchtopk": MatryoshkaBatchTopKSAE,
    "jumprelu_trained": TrainableJumpReLUSAE,
}
BATCHTOPK = ("batchtopk", "matryoshka_batchtopk")


def make_module(arch: str, seeds: list[int] | None = None) -> SAEModule:
    """Two SAEs (64 latents) of ``arch``."""
    return SAEModule(
        d_model=D_MODEL,
        architecture=ARCHITECTURES[arch](),
        expansion_factor=4,
        seeds=seeds or [0, 1],
        lr=1e-2,
    )


def fit(root: Path, arch: str, seeds: list[int] | None = None, **kwargs: Any) -> tuple[SAEModule, L.Trainer]:
    L.seed_everything(0)
    module = make_module(arch, seeds)
    trainer = make_trainer(root, **kwargs)
    trainer.fit(module, datamodule=InMemoryActivations())
    return module, trainer


def assert_same_state(
    got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], exact: bool = True
) -> None:
    assert got.keys() == expected.keys()
    tolerance = 0.0 if exact else 1e-6
    for key in expected:
        torch.testing.assert_close(
            got[key], expected[key], atol=tolerance, rtol=0.0, msg=lambda m, k=key: f"{k}: {m}"
        )


def held_out_rows() -> torch.Tensor:
    return make_splits(seed=5)["train"].acts_ND[:40]


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_resume_equals_uninterrupted_fit(arch: str, tmp_path: Path) -> None:
    """Killed at step 19 with a checkpoint every 5 steps, resumed from ``last.ckpt`` (epoch 1, batch 3):
    the same parameters, buffers (the BatchTopK threshold, the dead-latent counters) and Adam state, bit for
    bit."""
    reference, ref_trainer = fit(tmp_path / "ref", arch)
    ckpts = tmp_path / "ckpt"
    saver = ModelCheckpoint(dirpath=ckpts, every_n_train_steps=5, save_top_k=-1, save_last=True)
    L.seed_everything(0)
    with pytest.raises(Crash):
        make_trainer(tmp_path / "run", [saver, CrashAt(19)]).fit(
            make_module(arch), datamodule=InMemoryActivations()
        )
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 15
    L.seed_everything(123)  # nothing may depend on the global RNG at the restart
    resumed = make_module(arch)
    trainer = make_trainer(tmp_path / "resumed")
    trainer.fit(resumed, datamodule=InMemoryActivations(), ckpt_path=str(ckpts / "last.ckpt"))
    assert trainer.global_step == ref_trainer.global_step == 2 * STEPS_PER_EPOCH
    state = reference.state_dict()
    if arch in BATCHTOPK:
        for seed in (0, 1):
            assert state[f"saes.seed{seed}.threshold"] > 0
            assert f"saes.seed{seed}.steps_since_fired_F" in state
    else:
        assert "saes.seed0.log_threshold_F" in state
    assert_same_state(resumed.state_dict(), state)
    adam_a = ref_trainer.optimizers[0].state_dict()["state"]
    adam_b = trainer.optimizers[0].state_dict()["state"]
    assert adam_a.keys() == adam_b.keys() and adam_a
    for index in adam_a:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(adam_b[index][name], adam_a[index][name], atol=0.0, rtol=0.0)


# ---------------------------------------------------------------------------------------------- seeds
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_seeds_side_by_side_train_as_each_alone(arch: str, tmp_path: Path) -> None:
    """Seeds 0 and 1 in one module end as seed 1 trained alone (same batches), threshold included; the two
    seeds differ."""
    both, _ = fit(tmp_path / "both", arch, seeds=[0, 1], max_epochs=1)
    alone, _ = fit(tmp_path / "alone", arch, seeds=[1], max_epochs=1)
    seed1 = {k: v for k, v in both.state_dict().items() if k.startswith("saes.seed1.")}
    assert_same_state(
        {k: v for k, v in alone.state_dict().items() if k.startswith("saes.")}, seed1, exact=False
    )
    assert not torch.equal(both.saes["seed0"].W_dec_FD, both.saes["seed1"].W_dec_FD)


# ---------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_export_loads_in_eval_mode_with_the_same_codes_and_the_features_run(
    arch: str, tmp_path: Path
) -> None:
    """The fit's exports load (eval mode) as the trained SAEs: same class, config, tensors and eval-mode
    codes; the feature analysis ran on both seeds at the last epoch."""
    analysis = FeatureAnalysisConfig(projections=[], n_permutations=2, top_k_features=2)
    callbacks: list[L.Callback] = [FeatureAnalysisCallback(analysis=analysis, every_n_epochs=2)]
    module, _ = fit(tmp_path, arch, callbacks=callbacks)
    report = json.loads((tmp_path / "features" / "epoch1" / "report.json").read_text())
    assert set(report["seeds"]) == {"seed0", "seed1"}
    x = held_out_rows()
    for seed in (0, 1):
        trained: SparseAutoencoder = module.saes[f"seed{seed}"]
        loaded = load_sae(tmp_path / "sae" / f"seed{seed}")
        assert type(loaded) is SAE_CLASSES[arch] and loaded.config() == trained.config()
        assert not loaded.training  # a loaded SAE is for inference (BatchTopK: its threshold, not the batch)
        assert_same_state(loaded.state_dict(), trained.state_dict())
        trained.eval()
        with torch.no_grad():
            codes = loaded.encode(x)
            torch.testing.assert_close(codes, trained.encode(x), atol=0.0, rtol=0.0)
            assert bool((codes > 0).any())
            torch.testing.assert_close(
                loaded.encode(x[:3]), codes[:3], atol=1e-6, rtol=0.0
            )  # no batch effect
        if arch in BATCHTOPK:
            assert isinstance(loaded, BatchTopKSAE) and loaded.threshold.item() > 0


# ---------------------------------------------------------------------------------------------- steering
def exported_sae(root: Path, arch: str) -> Path:
    fit(root, arch, seeds=[0], max_epochs=1)
    return root / "sae" / "seed0"


@pytest.fixture(scope="module")
def tiny_lm() -> Any:
    from sae_refusal.testing import build_tiny_model

    return build_tiny_model("llama", vocab_size=200, num_layers=3, hidden_size=D_MODEL, seed=3)


def prompts() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 200, (2, 6), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_latent_steering_and_ablation_with_a_loaded_sae(arch: str, tiny_lm: Any, tmp_path: Path) -> None:
    """A loaded SAE steers and ablates: each row as when run alone (the codes do not depend on the batch),
    the error term kept (a zero vector is the identity), the SAE's buffers untouched."""
    from sae_refusal.sae.base import mean_norm_scale
    from sae_refusal.steer.interventions import Intervention, LatentAblation, LatentSteering

    sae = load_sae(exported_sae(tmp_path, arch))
    inputs = prompts()
    with torch.no_grad():  # the tiny model's residuals at layer 1, scaled as the training rows were
        residuals = tiny_lm(**inputs, output_hidden_states=True).hidden_states[2].reshape(-1, D_MODEL)
    sae.set_input_scale(mean_norm_scale(residuals))
    with torch.no_grad():
        assert bool((sae.encode(residuals) > 0).any())  # latents fire: the ablation below does something
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    alone = {k: v[:1] for k, v in inputs.items()}

    def logits(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return tiny_lm(**batch).logits

    plain = logits(inputs)
    vector = torch.zeros(sae.n_latents)
    with Intervention(tiny_lm, {1: LatentSteering(sae, vector, alpha=5.0)}):
        torch.testing.assert_close(logits(inputs), plain, atol=1e-5, rtol=1e-5)
    vector[3] = 1.0
    for edit in (
        LatentSteering(sae, vector, alpha=5.0),
        LatentAblation(sae, latents=list(range(sae.n_latents))),
    ):
        with Intervention(tiny_lm, {1: edit}):
            batched, single = logits(inputs), logits(alone)
        torch.testing.assert_close(batched[:1], single, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched, plain, atol=1e-4)  # the ablation of latents that fire does something
    assert_same_state(sae.state_dict(), before)


@pytest.mark.parametrize("arch", BATCHTOPK)
def test_an_eval_column_with_a_batchtopk_sae(arch: str, tiny_lm: Any, tmp_path: Path) -> None:
    """``kind: latent`` with ``sae:`` an export: the column's SAE is in eval mode and steers."""
    from sae_refusal.eval.interventions import InterventionConfig, load_intervention
    from sae_refusal.features.analysis import CLASS_NAMES
    from sae_refusal.features.vectors import SteeringVectors

    folder = exported_sae(tmp_path / "fit", arch)
    gen = torch.Generator().manual_seed(1)
    n_categories = len(CLASS_NAMES) - 1
    vectors = SteeringVectors(
        CLASS_NAMES,
        torch.randn(n_categories, D_MODEL, generator=gen),
        sas_CF=torch.rand(n_categories, 4 * D_MODEL, generator=gen),
        metadata={"layer": 1},
    ).save(tmp_path / "vectors")
    cfg = InterventionConfig(kind="latent", vectors=str(vectors), space="sas", sae=str(folder), alpha=2.0)
    loaded = load_intervention(cfg, tiny_lm)
    assert isinstance(loaded.sae, SAE_CLASSES[arch]) and not loaded.sae.training
    threshold = loaded.sae.threshold.clone()
    plan = loaded.plan(None, ["a", "b"])
    assert plan.around is not None
    with torch.no_grad():
        plain = tiny_lm(**prompts()).logits
        with plan.around([0, 1]):
            steered = tiny_lm(**prompts()).logits
    assert not torch.allclose(steered, plain, atol=1e-4)
    assert torch.equal(loaded.sae.threshold, threshold)


# ---------------------------------------------------------------------------------------------- DDP
class _MeanWithAnotherRank:
    """A 2-rank ``rank_mean``: the other rank holds ``other``; counts its calls."""

    def __init__(self, other: torch.Tensor):
        self.other, self.calls = other, 0

    def __call__(self, value: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return (value + self.other) / 2


def test_the_threshold_statistic_is_the_mean_over_ranks() -> None:
    """Under DDP each rank's update uses the ranks' mean smallest kept activation (so the buffer stays equal
    on every rank); a rank whose batch kept nothing positive still takes part in the collective."""
    gen = torch.Generator().manual_seed(0)
    sae = BatchTopKSAE(8, 16, k=2, aux_k=0, threshold_momentum=0.5, generator=gen)
    x = torch.randn(6, 8, generator=gen)
    z = sae(x, return_latents=True).latents_BF
    assert z is not None
    own = z[z > 0].min()
    sae.threshold.fill_(-1.0)
    sae.rank_mean = _MeanWithAnotherRank(torch.tensor([2.0, 1.0]))
    sae(x)
    assert sae.threshold.item() == pytest.approx((own.item() + 2.0) / 2)
    nothing = _MeanWithAnotherRank(torch.tensor([3.0, 1.0]))
    sae.rank_mean = nothing
    with torch.no_grad():
        sae.b_enc_F.fill_(-100.0)  # no positive pre-activation on this rank
    sae(x)
    assert nothing.calls == 1
    assert sae.threshold.item() == pytest.approx(0.5 * (own.item() + 2.0) / 2 + 0.5 * 3.0)
    silent = _MeanWithAnotherRank(torch.tensor([0.0, 0.0]))  # no rank kept anything: no update
    sae.rank_mean = silent
    before = sae.threshold.item()
    sae(x)
    assert silent.calls == 1 and sae.threshold.item() == before


class ThresholdProbe(L.Callback):
    """Writes each rank's thresholds after the fit into ``folder/thresholds_rank{r}.json``."""

    def __init__(self, folder: Path):
        self.folder = folder

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        values = {name: float(sae.threshold) for name, sae in pl_module.named_saes()}
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"thresholds_rank{trainer.global_rank}.json").write_text(json.dumps(values))


@pytest.mark.slow
@pytest.mark.parametrize("arch", BATCHTOPK)
def test_ddp_ranks_keep_the_same_threshold_and_rank_zero_exports_it(arch: str, tmp_path: Path) -> None:
    """2 ``ddp_spawn`` ranks x 4 rows: after the fit both ranks hold the same threshold (the mean over ranks
    of the smallest kept activation), and it is the exported one."""
    L.seed_everything(0)
    trainer = make_trainer(
        tmp_path, [ThresholdProbe(tmp_path)], devices=2, strategy="ddp_spawn", max_epochs=1
    )
    trainer.fit(make_module(arch), datamodule=InMemoryActivations(batch_size=BATCH // 2))
    ranks = [json.loads((tmp_path / f"thresholds_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    for seed in (0, 1):
        exported = load_sae(tmp_path / "sae" / f"seed{seed}")
        assert isinstance(exported, BatchTopKSAE)
        assert exported.threshold.item() == ranks[0][f"seed{seed}"] > 0
