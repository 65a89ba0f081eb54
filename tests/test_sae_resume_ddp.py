"""SAEModule across interruptions and processes, plus the DDP and sweep config fragments.

* Resume: a fit killed mid-epoch and resumed from ``last.ckpt`` ends with the same SAE parameters, buffers
  (``steps_since_fired_F``, ``input_scale``) and Adam state as an uninterrupted fit, bit for bit.
* DDP: two ``ddp_spawn`` processes with per-rank batch B/2 export the same SAEs as one process with batch B
  that sees the same global batches.
* The fragments in ``lightning_configs/trainer`` and ``lightning_configs/sweeps`` parse on ``default.yaml``.

Data: a small in-memory :class:`ActivationDataModule` (no LLM, no cache) with the shipped training loader
(`EpochSampler`: order from ``(seed, epoch)``, the trained batches of an epoch kept in checkpoints).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from sae_refusal.activations.datamodule import ActivationBatch, ActivationDataModule
from sae_refusal.cli import SAERefusalCLI
from sae_refusal.features import FeatureAnalysisCallback, FeatureAnalysisConfig
from sae_refusal.sae import SAEModule, TopK, TopKSAE, load_sae

# Trainer(deterministic=True) and ddp_spawn change process-wide settings; undo them after each test
pytestmark = pytest.mark.usefixtures("lightning_globals_restored")

D_MODEL, N_TRAIN, BATCH = 16, 96, 8
STEPS_PER_EPOCH = N_TRAIN // BATCH  # 12
REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "lightning_configs"


# ---------------------------------------------------------------------------------------------- data
def make_splits(seed: int = 0) -> dict[str, ActivationBatch]:
    """Sparse mixtures of 48 directions plus an offset (so the decoder bias matters), labelled at random."""
    gen = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(48, D_MODEL, generator=gen)
    offset = torch.randn(D_MODEL, generator=gen)

    def split(n: int) -> ActivationBatch:
        codes = torch.rand(n, 48, generator=gen) * (torch.rand(n, 48, generator=gen) < 0.15)
        label = torch.randint(0, 3, (n,), generator=gen)
        category = torch.where(label == 1, torch.randint(1, 3, (n,), generator=gen), 0)
        return ActivationBatch(
            3.0 * (codes @ dictionary + offset), label, category, [str(i) for i in range(n)]
        )

    return {"train": split(N_TRAIN), "val": split(16), "test": split(16)}


class InMemoryActivations(ActivationDataModule):
    """``ActivationDataModule`` over :func:`make_splits` (nothing to prepare, no model).

    Args:
        batch_size: Rows per training batch (per rank under DDP).
        shuffle_seed: Seed of the training order.
    """

    def __init__(self, batch_size: int = BATCH, shuffle_seed: int = 7):
        super().__init__(batch_size=batch_size, shuffle_seed=shuffle_seed)

    def prepare_data(self) -> None:
        pass

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            self.splits = make_splits()
            self._d_model = D_MODEL


# ---------------------------------------------------------------------------------------------- model
def make_module(aux: bool = True) -> SAEModule:
    """Two TopK SAEs (64 latents, k 4); AuxK kicks in after 2 silent steps unless ``aux`` is off."""
    architecture = TopK(k=4, aux_k=8, aux_coef=0.5, dead_after_steps=2) if aux else TopK(k=4, aux_k=0)
    return SAEModule(d_model=D_MODEL, architecture=architecture, expansion_factor=4, seeds=[0, 1], lr=1e-2)


class Crash(RuntimeError):
    """Raised by :class:`CrashAt` to simulate a killed job."""


class CrashAt(L.Callback):
    """Raise at the end of training step ``step`` (checkpoints of earlier steps are on disk)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            raise Crash(f"killed at step {trainer.global_step}")


class AuxSteps(L.Callback):
    """Counts the training steps whose forward had dead latents, i.e. ran the AuxK loss."""

    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        self.steps += int(any(bool(sae.dead_F.any()) for _, sae in pl_module.named_saes()))


def make_trainer(root: Path, callbacks: list[L.Callback] | None = None, **kwargs: Any) -> L.Trainer:
    callbacks = callbacks or []
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 2,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": any(isinstance(c, ModelCheckpoint) for c in callbacks),
        "limit_val_batches": 0,
        "deterministic": True,
        "default_root_dir": str(root),
        "callbacks": callbacks,
    }
    return L.Trainer(**{**options, **kwargs})


Run = tuple[SAEModule, L.Trainer]


def fit_uninterrupted(root: Path, aux_steps: AuxSteps | None = None) -> Run:
    L.seed_everything(0)
    module = make_module()
    trainer = make_trainer(root, [aux_steps] if aux_steps else None)
    trainer.fit(module, datamodule=InMemoryActivations())
    return module, trainer


def fit_killed_then_resumed(root: Path, every: int, crash_at: int) -> tuple[Run, dict[str, Any]]:
    """Checkpoint every ``every`` steps, die at step ``crash_at``, resume a fresh fit from ``last.ckpt``."""
    ckpts = root / "ckpt"
    L.seed_everything(0)
    saver = ModelCheckpoint(dirpath=ckpts, every_n_train_steps=every, save_top_k=-1, save_last=True)
    with pytest.raises(Crash):
        make_trainer(root, [saver, CrashAt(crash_at)]).fit(make_module(), datamodule=InMemoryActivations())
    last = ckpts / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    L.seed_everything(123)  # nothing may depend on the global RNG at the restart
    module = make_module()
    trainer = make_trainer(root / "resumed")
    trainer.fit(module, datamodule=InMemoryActivations(), ckpt_path=str(last))
    return (module, trainer), checkpoint


def assert_same_training_state(reference: Run, other: Run) -> None:
    """Bit-identical module state (parameters and buffers), Adam state and step count."""
    (module_a, trainer_a), (module_b, trainer_b) = reference, other
    assert trainer_b.global_step == trainer_a.global_step == 2 * STEPS_PER_EPOCH
    state_a, state_b = module_a.state_dict(), module_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in ("saes.seed0.steps_since_fired_F", "saes.seed1.input_scale", "stats_ready"):
        assert key in state_a
    for key in state_a:
        torch.testing.assert_close(
            state_b[key], state_a[key], atol=0.0, rtol=0.0, msg=lambda m, k=key: f"{k}: {m}"
        )
    adam_a = trainer_a.optimizers[0].state_dict()["state"]
    adam_b = trainer_b.optimizers[0].state_dict()["state"]
    assert adam_a.keys() == adam_b.keys() and adam_a
    for index in adam_a:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(adam_b[index][name], adam_a[index][name], atol=0.0, rtol=0.0)


# ---------------------------------------------------------------------------------------------- resume
CRASHES = {
    # (checkpoint every n steps, crash at step): CrashAt runs before ModelCheckpoint, so the crash step is
    # lost and the fit resumes from the last checkpoint before it
    "mid_epoch1": (5, 19),  # resumes at step 15: epoch 1, batch 3 of 12
    "mid_epoch0_every_step": (1, 7),  # resumes at step 6: epoch 0, batch 6
    "end_of_epoch0": (12, 14),  # resumes at step 12: the checkpoint of epoch 0's last batch
}


@pytest.mark.parametrize(("every", "crash_at"), CRASHES.values(), ids=CRASHES.keys())
def test_resume_equals_uninterrupted_fit(tmp_path: Path, every: int, crash_at: int) -> None:
    aux_steps = AuxSteps()
    reference = fit_uninterrupted(tmp_path / "ref", aux_steps)
    assert aux_steps.steps > 0  # the AuxK path (and its dead-latent counters) is exercised
    resumed, checkpoint = fit_killed_then_resumed(tmp_path / "run", every, crash_at)
    assert checkpoint["global_step"] == (crash_at - 1) // every * every  # saved before the crash step
    assert_same_training_state(reference, resumed)


def test_checkpoints_hold_the_renormalised_decoder(tmp_path: Path) -> None:
    L.seed_everything(0)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    trainer = make_trainer(tmp_path, [saver], max_steps=5)
    trainer.fit(make_module(), datamodule=InMemoryActivations())
    state = torch.load(next((tmp_path / "ckpt").glob("*.ckpt")), weights_only=False)["state_dict"]
    for seed in (0, 1):
        norms = state[f"saes.seed{seed}.W_dec_FD"].norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-6, rtol=0.0)


# ---------------------------------------------------------------------------------------------- DDP
class _RankOneTrainer:
    """What ``on_fit_end`` sees on a non-zero DDP rank; counts reads of the (collective) ``log_dir``."""

    is_global_zero = False

    def __init__(self) -> None:
        self.log_dir_reads = 0

    @property
    def log_dir(self) -> str | None:
        self.log_dir_reads += 1
        return None


def test_fit_end_takes_part_in_the_log_dir_broadcast_on_every_rank() -> None:
    module = make_module()
    trainer = _RankOneTrainer()
    module.trainer = trainer  # type: ignore[assignment]
    module.on_fit_end()
    assert trainer.log_dir_reads == 1


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_with_the_same_global_batches(tmp_path: Path) -> None:
    """2 ranks x 4 rows (the shipped EpochSampler) vs 1 process x 8 rows in the same global order.

    Each global batch is the same 8 rows in both runs; the loss is a mean over rows, so DDP's mean of the
    per-rank gradients is the single-process gradient, and the dead-latent flags are OR-ed over ranks. The
    AuxK term is off: it is normalised per batch, so each rank would normalise its own half differently.
    """
    analysis = FeatureAnalysisConfig(projections=[], n_permutations=2, top_k_features=2)

    def features() -> list[L.Callback]:  # the feature analysis at the last epoch, on rank zero only
        return [FeatureAnalysisCallback(analysis=analysis, every_n_epochs=2)]

    L.seed_everything(0)
    single = make_trainer(tmp_path / "single", callbacks=features())
    single.fit(make_module(aux=False), datamodule=InMemoryActivations(batch_size=BATCH))
    L.seed_everything(0)
    ddp = make_trainer(tmp_path / "ddp", devices=2, strategy="ddp_spawn", callbacks=features())
    ddp.fit(make_module(aux=False), datamodule=InMemoryActivations(batch_size=BATCH // 2))
    reports = {}
    for run in ("single", "ddp"):
        assert [p.name for p in (tmp_path / run / "features").iterdir()] == ["epoch1"]
        reports[run] = json.loads((tmp_path / run / "features" / "epoch1" / "report.json").read_text())
    assert reports["ddp"]["residual"] == reports["single"]["residual"]  # same data, written once
    assert set(reports["ddp"]["seeds"]) == {"seed0", "seed1"}
    initial = make_module(aux=False)
    for seed in (0, 1):
        one = load_sae(tmp_path / "single" / "sae" / f"seed{seed}")
        two = load_sae(tmp_path / "ddp" / "sae" / f"seed{seed}")
        assert isinstance(two, TopKSAE) and two.config() == one.config()
        one_state, two_state = one.state_dict(), two.state_dict()
        assert set(one_state) >= {
            "W_dec_FD",
            "W_enc_FD",
            "b_enc_F",
            "b_dec_D",
            "input_scale",
            "steps_since_fired_F",
        }
        for key in one_state:
            torch.testing.assert_close(two_state[key], one_state[key], atol=1e-5, rtol=0.0, msg=key)
        untrained = initial.saes[f"seed{seed}"].W_enc_FD
        assert (one.W_enc_FD - untrained).abs().max() > 1e-2  # it did train


# ---------------------------------------------------------------------------------------------- configs
TRAINER_FRAGMENTS = sorted((CONFIGS / "trainer").glob("*.yaml"))
SWEEP_FRAGMENTS = sorted((CONFIGS / "sweeps").glob("*.yaml"))


class _ParseOnlyCLI(SAERefusalCLI):
    """The ``sae-refusal`` parser and type checks, without instantiating anything (as in test_cli.py)."""

    def instantiate_classes(self) -> None:
        pass


def parse(*args: str) -> Any:
    """``default.yaml`` then ``args``, as ``sae-refusal fit --config lightning_configs/default.yaml ...``."""
    args_ = ["--config", str(CONFIGS / "default.yaml"), *args]
    cli = _ParseOnlyCLI(SAEModule, ActivationDataModule, subclass_mode_model=True, args=args_, run=False)
    return cli.config


def test_the_fragments_exist() -> None:
    names = {p.name for p in [*TRAINER_FRAGMENTS, *SWEEP_FRAGMENTS]}
    assert "ddp.yaml" in names and "all_layers.yaml" in names
    assert {f"layer_{n:02d}.yaml" for n in (4, 6, 8, *range(10, 20))} <= names
    assert {f"expansion_{n:02d}.yaml" for n in (8, 12, 16, 32)} <= names


@pytest.mark.parametrize(
    "fragment", [*TRAINER_FRAGMENTS, *SWEEP_FRAGMENTS], ids=lambda p: f"{p.parent.name}/{p.name}"
)
def test_fragment_parses_on_the_default_config(fragment: Path) -> None:
    default = parse()
    cfg = parse("--config", str(fragment))
    assert cfg.model.init_args.architecture == default.model.init_args.architecture  # merged, not replaced
    assert cfg.model.init_args.seeds == default.model.init_args.seeds
    stem = fragment.stem
    if stem == "ddp":
        assert (cfg.trainer.accelerator, cfg.trainer.strategy) == ("gpu", "ddp")
        assert cfg.trainer.max_epochs == default.trainer.max_epochs
    elif stem.startswith("layer_"):
        layer = int(stem.removeprefix("layer_"))
        assert cfg.data.layer == layer and list(cfg.data.cache.layers) == [layer]
        assert layer in parse("--config", str(CONFIGS / "sweeps" / "all_layers.yaml")).data.cache.layers
        assert cfg.data.cache.root == default.data.cache.root
    elif stem.startswith("expansion_"):
        assert cfg.model.init_args.expansion_factor == int(stem.removeprefix("expansion_"))
        assert cfg.data == default.data
    else:
        assert stem == "all_layers"
        assert sorted(cfg.data.cache.layers) == [4, 6, 8, *range(10, 20)]


def test_the_sweep_loop_command_parses() -> None:
    """One iteration of the loop in all_layers.yaml, with the DDP fragment added."""
    sweeps = CONFIGS / "sweeps"
    cfg = parse(
        "--config",
        str(sweeps / "layer_12.yaml"),
        "--config",
        str(sweeps / "expansion_16.yaml"),
        "--config",
        str(CONFIGS / "trainer" / "ddp.yaml"),
        "--trainer.logger.init_args.save_dir",
        "runs/sweeps",
        "--trainer.logger.init_args.name",
        "layer12_x16",
    )
    assert (cfg.data.layer, cfg.model.init_args.expansion_factor, cfg.trainer.strategy) == (12, 16, "ddp")
    assert cfg.trainer.logger.init_args.name == "layer12_x16"
    assert cfg.trainer.logger.init_args.save_dir == "runs/sweeps"
