"""SAEModule: seeds together equal seeds alone, scaling, per-class metrics, non-finite stop, contrastive."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from sae_refusal.activations.datamodule import CATEGORY_INDEX, LABEL_INDEX, ActivationBatch, ActivationDataset
from sae_refusal.categories import CATEGORY_SHORT_NAMES, COCONOT_CATEGORIES
from sae_refusal.sae import L1, Contrastive, SAEModule, TopK, TopKSAE, load_sae, mean_norm_scale
from sae_refusal.sae.contrastive import batch_classes, mean_separation, supcon_loss
from sae_refusal.sae.module import EVAL_CLASS_NAMES, class_names_of_batch


def make_split(n: int, d: int, seed: int) -> ActivationBatch:
    gen = torch.Generator().manual_seed(seed)
    label = torch.tensor([i % 3 for i in range(n)])  # benign, harmful, ambiguous
    category = torch.where(label == 1, torch.tensor([1 + (i % 5) for i in range(n)]), 0)
    acts = 5.0 * torch.randn(n, d, generator=gen) + 3.0 * category[:, None].float()
    return ActivationBatch(acts, label, category, [f"p{i}" for i in range(n)])


class InMemoryData(L.LightningDataModule):
    def __init__(self, d: int = 8, n: int = 48, batch_size: int = 16):
        super().__init__()
        self.splits = {
            "train": make_split(n, d, 0),
            "val": make_split(24, d, 1),
            "test": make_split(24, d, 2),
        }
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(ActivationDataset(self.splits["train"]), batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader[Any]:
        return DataLoader(ActivationDataset(self.splits["val"]), batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader[Any]:
        return DataLoader(ActivationDataset(self.splits["test"]), batch_size=self.batch_size)


def fit(module: SAEModule, tmp_path: Path, epochs: int = 2, **trainer_kwargs: Any) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="logs"),
        **trainer_kwargs,
    )
    trainer.fit(module, datamodule=InMemoryData())
    return trainer


def split_fvu(sae: Any, split: ActivationBatch, train_mean_D: torch.Tensor) -> dict[str, float]:
    """By hand, in raw units (FVU is scale-free): the split's FVU about its own mean, and per class
    (benign, ambiguous, each harmful category by name) the squared errors over the squared distances to the
    training mean."""
    with torch.no_grad():
        x_ND = split.acts_ND.double()
        err_N = (sae(split.acts_ND).recon_BD.double() - x_ND).pow(2).sum(1)
    out = {"fvu": float(err_N.sum() / (x_ND - x_ND.mean(0)).pow(2).sum())}
    dist_N = (x_ND - train_mean_D.double()).pow(2).sum(1)
    harmful = [CATEGORY_SHORT_NAMES[c] for c in COCONOT_CATEGORIES]
    for i in range(len(split.label_N)):
        label, category = int(split.label_N[i]), int(split.category_N[i])
        name = {0: "benign", 2: "ambiguous"}.get(label) or harmful[category - 1]
        err, dist = out.get(f"{name}/err", 0.0), out.get(f"{name}/dist", 0.0)
        out[f"{name}/err"], out[f"{name}/dist"] = err + float(err_N[i]), dist + float(dist_N[i])
    for name in ["benign", "ambiguous", *harmful]:
        if f"{name}/err" in out:
            out[name] = out[f"{name}/err"] / out[f"{name}/dist"]
    return out


def test_class_index_of_every_kind_of_row_by_hand() -> None:
    harmful, benign, ambiguous = LABEL_INDEX["harmful"], LABEL_INDEX["benign"], LABEL_INDEX["ambiguous"]
    assert (benign, harmful, ambiguous) == (0, 1, 2)
    label = torch.tensor([0, 2, 2, 1, 1, 1, 1, 1])
    category = torch.tensor(
        [0, 0, 3, 1, 2, 3, 4, 5]
    )  # an ambiguous row may carry a category: still ambiguous
    assert class_names_of_batch(label, category).tolist() == [0, 1, 1, 2, 3, 4, 5, 6]
    assert EVAL_CLASS_NAMES == [
        "benign",
        "ambiguous",
        "humanizing",
        "incomplete",
        "indeterminate",
        "safety",
        "unsupported",
    ]
    for canonical, short in CATEGORY_SHORT_NAMES.items():  # the data module's codes -> the metric's name
        index = class_names_of_batch(torch.tensor([harmful]), torch.tensor([CATEGORY_INDEX[canonical]]))
        assert EVAL_CLASS_NAMES[int(index)] == short


def test_seeds_side_by_side_equal_seeds_alone(tmp_path: Path) -> None:
    arch = TopK(k=3, aux_k=4, dead_after_steps=2)
    together = SAEModule(d_model=8, architecture=arch, expansion_factor=4, seeds=[0, 1], lr=1e-2)
    alone = SAEModule(d_model=8, architecture=arch, expansion_factor=4, seeds=[1], lr=1e-2)
    fit(together, tmp_path / "a")
    fit(alone, tmp_path / "b")
    a, b = together.saes["seed1"].state_dict(), alone.saes["seed1"].state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    assert not torch.equal(together.saes["seed0"].W_dec_FD, together.saes["seed1"].W_dec_FD)


def test_fit_sets_scale_and_bias_exports_each_seed_and_logs_per_class(tmp_path: Path) -> None:
    arch = TopK(k=3, dead_after_steps=2)
    module = SAEModule(d_model=8, architecture=arch, expansion_factor=4, seeds=[0, 2], lr=1e-2)
    trainer = fit(module, tmp_path)
    data = InMemoryData().splits["train"].acts_ND
    scale = mean_norm_scale(data)
    for name in ("seed0", "seed2"):
        sae = module.saes[name]
        assert float(sae.input_scale) == pytest.approx(scale)
    log_dir = Path(trainer.log_dir or "")
    for seed in (0, 2):
        sae = load_sae(log_dir / "sae" / f"seed{seed}")
        assert isinstance(sae, TopKSAE) and float(sae.input_scale) == pytest.approx(scale)
        x = data[:4]
        torch.testing.assert_close(sae(x).recon_BD, module.saes[f"seed{seed}"](x).recon_BD)
    metrics = (log_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("train/seed0/mse", "train/seed2/aux", "train/seed0/dead_fraction", "val/seed2/fvu"):
        assert key in metrics, key
    for cls in ("benign", "ambiguous", "humanizing", "safety"):
        assert f"val/seed0/fvu_class/{cls}" in metrics
    scores = trainer.test(module, datamodule=InMemoryData(), verbose=False)[0]
    assert scores["test/seed2/l0"] <= 3
    for name in ("seed0", "seed2"):
        expected = split_fvu(module.saes[name], InMemoryData().splits["test"], data.mean(0))
        assert scores[f"test/{name}/fvu"] == pytest.approx(expected["fvu"], rel=1e-4)
        for cls in EVAL_CLASS_NAMES:
            assert scores[f"test/{name}/fvu_class/{cls}"] == pytest.approx(expected[cls], rel=1e-4), cls
    # test metrics are logged under test/ only (the split FVU is not mistaken for validation)
    assert all(key.startswith("test/") for key in scores) and "test/seed0/mse" in scores


def test_non_finite_loss_names_step_and_seed_and_exports_nothing(tmp_path: Path) -> None:
    module = SAEModule(d_model=8, architecture=TopK(k=3), expansion_factor=2, seeds=[0, 5])

    class Poison(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, idx: int) -> None:
            if trainer.global_step == 2:
                with torch.no_grad():
                    pl_module.saes["seed5"].W_dec_FD[0, 0] = math.nan

    with pytest.raises(FloatingPointError, match=r"step 2 for seed5"):
        fit(module, tmp_path, callbacks=[Poison()])
    assert not list(tmp_path.rglob("sae.safetensors"))


def test_l1_and_contrastive_architectures_train(tmp_path: Path) -> None:
    l1 = SAEModule(d_model=8, architecture=L1(l1_coef=0.1), expansion_factor=2, seeds=[0], lr=1e-2)
    fit(l1, tmp_path / "l1", epochs=1)
    assert load_sae(Path(l1.trainer.log_dir or "") / "sae" / "seed0").architecture == "relu_l1"
    arch = Contrastive(TopK(k=3), supcon_weight=0.5, separation_weight=0.5)
    module = SAEModule(d_model=8, architecture=arch, expansion_factor=2, seeds=[0], lr=1e-2)
    trainer = fit(module, tmp_path / "c", epochs=1)
    header = (Path(trainer.log_dir or "") / "metrics.csv").read_text().splitlines()[0]
    assert "train/seed0/supcon" in header and "train/seed0/separation" in header
    meta = (Path(trainer.log_dir or "") / "sae" / "seed0" / "cfg.json").read_text()
    assert '"Contrastive"' in meta and '"supcon_weight": 0.5' in meta


def test_module_input_errors() -> None:
    with pytest.raises(ValueError, match="seeds"):
        SAEModule(d_model=8, seeds=[1, 1])
    with pytest.raises(ValueError, match="expansion_factor"):
        SAEModule(d_model=8, expansion_factor=0)
    with pytest.raises(ValueError, match=r"architecture\.k"):
        SAEModule(d_model=4, architecture=TopK(k=100), expansion_factor=2)
    with pytest.raises(ValueError, match="Contrastive SAE needs a TopK or L1 base"):
        Contrastive(Contrastive(TopK()))


def test_supcon_matches_hand_computation() -> None:
    codes = torch.tensor([[1.0, 0.0], [0.8, 0.2], [0.0, 1.0], [0.1, 0.9]])
    classes = torch.tensor([0, 0, 1, 1])
    t = 0.5
    z = torch.nn.functional.normalize(codes, dim=1)
    sim = z @ z.T / t
    total = 0.0
    for i in range(4):
        others = [j for j in range(4) if j != i]
        denom = torch.logsumexp(sim[i, others], 0)
        pos = [j for j in others if classes[j] == classes[i]]
        total += -sum(float(sim[i, j] - denom) for j in pos) / len(pos)
    assert supcon_loss(codes, classes, t).item() == pytest.approx(total / 4, rel=1e-5)
    # rows with class -1 are ignored; a lone class contributes no anchor
    ignored = supcon_loss(torch.cat([codes, torch.ones(1, 2)]), torch.tensor([0, 0, 1, 1, -1]), t)
    assert ignored.item() == pytest.approx(total / 4, rel=1e-5)
    assert supcon_loss(codes[:2], torch.tensor([0, 1]), t).item() == 0.0


def test_mean_separation_and_batch_classes() -> None:
    label = torch.tensor([0, 1, 2, 1])
    category = torch.tensor([0, 3, 4, 5])
    assert batch_classes(label, category).tolist() == [0, 3, 0, 5]
    assert batch_classes(label, category, ambiguous_as_benign=False).tolist() == [0, 3, -1, 5]
    codes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 2.0]])
    assert mean_separation(codes, batch_classes(label, category)).item() == pytest.approx(0.0, abs=1e-6)
    assert mean_separation(codes, torch.tensor([0, 0, 0, 0])).item() == 0.0


def test_validation_fvu_is_over_the_whole_split_not_a_mean_of_batches(tmp_path: Path) -> None:
    """With batches of 5 the 24 validation rows end in a 4-row batch; a 1-row batch used to give ~1e10."""
    module = SAEModule(d_model=8, architecture=TopK(k=2), expansion_factor=2, seeds=[0], lr=1e-2)
    data = InMemoryData(batch_size=5)
    data.splits["val"] = make_split(21, 8, 1)  # 4 batches of 5 and one of 1
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
    )
    trainer.fit(module, datamodule=data)
    (result,) = trainer.validate(module, datamodule=data, verbose=False)
    sae = module.saes["seed0"]
    with torch.no_grad():
        x_ND = data.splits["val"].acts_ND
        recon_ND = sae(x_ND).recon_BD
    expected = float((recon_ND - x_ND).pow(2).sum() / (x_ND - x_ND.mean(0)).pow(2).sum())
    assert result["val/seed0/fvu"] == pytest.approx(expected, rel=1e-4)
    assert 0.0 < result["val/seed0/fvu"] < 2.0


def test_training_fvu_of_a_one_row_batch_is_relative_to_the_training_mean(tmp_path: Path) -> None:
    """A 1-row batch has no variance of its own: training FVU divides by the distance to the train mean."""
    module = SAEModule(d_model=8, architecture=TopK(k=2, aux_k=0), expansion_factor=2, seeds=[0], lr=1e-12)
    data = InMemoryData(batch_size=1, n=6)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        logger=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    fvu = float(trainer.callback_metrics["train/seed0/fvu"])
    sae = module.saes["seed0"]
    with torch.no_grad():  # lr 1e-12: the weights are those of the logged step
        x_1D = data.splits["train"].acts_ND[:1]
        err = (sae(x_1D).recon_BD - x_1D).pow(2).sum() * sae.input_scale**2
        var = (x_1D * sae.input_scale - module.data_mean_D).pow(2).sum()
    assert fvu == pytest.approx(float(err / var), rel=1e-4)
    assert 0.0 < fvu < 10.0


class _Collectives:
    """The all-reduce (sum) of a two-rank job, played out in one process: rank 1 runs first and records what
    it contributes to each collective; rank 0 then gets its own value plus rank 1's, matched by call order
    (as real collectives are)."""

    def __init__(self, recorded: list[torch.Tensor] | None = None):
        self.recording = recorded is None
        self.recorded: list[torch.Tensor] = [] if recorded is None else recorded

    def reduce(self, value: torch.Tensor, reduce_op: str = "mean") -> torch.Tensor:
        assert reduce_op == "sum"
        if self.recording:
            self.recorded.append(value.clone())
            return value
        return value + self.recorded.pop(0)


class _RankTrainer:
    """What the evaluation hooks read of a trainer: world size, strategy (its collectives), step."""

    global_step = 0

    def __init__(self, strategy: _Collectives | None):
        self.world_size = 1 if strategy is None else 2
        self.strategy = strategy


def _validate_as_rank(
    module: SAEModule, split: ActivationBatch, rows: range, strategy: _Collectives | None = None
) -> dict[str, float]:
    """Validate ``rows`` of ``split`` on ``module`` (alone, or as one of two ranks); returns what it logs."""
    logged: dict[str, float] = {}
    module.trainer = _RankTrainer(strategy)  # type: ignore[assignment]
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))  # type: ignore[method-assign]
    module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    index = torch.tensor(list(rows))
    for start in range(0, len(index), 5):
        part = index[start : start + 5]
        batch = {
            "acts": split.acts_ND[part],
            "label": split.label_N[part],
            "category": split.category_N[part],
        }
        module.validation_step(batch, start // 5)
    module.on_validation_epoch_end()
    return logged


def test_split_and_class_fvu_of_two_ranks_sum_both_halves(tmp_path: Path) -> None:
    """Each rank validates half of the rows (as a DistributedSampler splits them: every other row); the FVUs
    rank 0 logs must be those of the whole split, so both ranks' sums are added before dividing."""
    trained = SAEModule(d_model=8, architecture=TopK(k=2), expansion_factor=2, seeds=[0, 1], lr=1e-2)
    fit(trained, tmp_path, epochs=1)
    data = InMemoryData()
    split, train_mean_D = data.splits["val"], data.splits["train"].acts_ND.mean(0)
    ranks = []
    for _ in range(2):
        rank = SAEModule(d_model=8, architecture=TopK(k=2), expansion_factor=2, seeds=[0, 1], lr=1e-2)
        rank.load_state_dict(trained.state_dict())
        ranks.append(rank)
    rank_one = _Collectives()
    _validate_as_rank(ranks[1], split, range(1, 24, 2), rank_one)
    assert rank_one.recorded, "the per-rank sums never took part in a collective"
    logged = _validate_as_rank(ranks[0], split, range(0, 24, 2), _Collectives(rank_one.recorded))
    assert rank_one.recorded == []  # every collective of rank 0 was matched by one of rank 1
    for name in ("seed0", "seed1"):
        expected = split_fvu(trained.saes[name], split, train_mean_D)
        assert logged[f"val/{name}/fvu"] == pytest.approx(expected["fvu"], rel=1e-4)
        for cls in EVAL_CLASS_NAMES:
            assert logged[f"val/{name}/fvu_class/{cls}"] == pytest.approx(expected[cls], rel=1e-4), cls


def identical_rows(row_D: torch.Tensor, n: int = 4) -> ActivationBatch:
    """``n`` benign copies of one row: a split without variance."""
    zeros = torch.zeros(n, dtype=torch.long)
    return ActivationBatch(row_D[None].repeat(n, 1), zeros, zeros.clone(), [f"p{i}" for i in range(n)])


def test_a_split_without_variance_logs_no_split_fvu(tmp_path: Path) -> None:
    """Identical rows have no variance about their mean: no split FVU (not inf, not a crash); the per-class
    FVU, relative to the training mean, is still defined. Small integers, unscaled: the sums are exact."""
    module = SAEModule(
        d_model=8, architecture=TopK(k=2), expansion_factor=2, seeds=[0], lr=1e-2, normalize_inputs=False
    )
    fit(module, tmp_path, epochs=1)
    data = InMemoryData()
    data.splits["val"] = identical_rows(torch.tensor([1.0, -2.0, 3.0, 0.0, 1.0, 2.0, -1.0, 4.0]))
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (result,) = trainer.validate(module, datamodule=data, verbose=False)
    assert "val/seed0/fvu" not in result
    expected = split_fvu(module.saes["seed0"], data.splits["val"], data.splits["train"].acts_ND.mean(0))
    assert result["val/seed0/fvu_class/benign"] == pytest.approx(expected["benign"], rel=1e-4)
    assert not any("fvu_class/ambiguous" in key for key in result)  # no ambiguous rows: nothing to log


def test_round_off_never_turns_a_split_without_variance_into_a_huge_fvu(tmp_path: Path) -> None:
    """Regression: sums of squares minus the squared sum leave a round-off residue of either sign for
    identical rows (in float32 batch sums about half the splits logged an FVU of ~1e7)."""
    module = SAEModule(d_model=8, architecture=TopK(k=2), expansion_factor=2, seeds=[0], lr=1e-2)
    fit(module, tmp_path, epochs=1)
    gen = torch.Generator().manual_seed(0)
    logged = {}
    for i in range(20):  # 3 to 7 rows: counts whose sums round (in float64 too, a third of the time)
        magnitude = 5.0 * 10 ** (i % 3)  # the residue scales with the squared norm, any threshold must too
        split = identical_rows(magnitude * torch.randn(8, generator=gen), n=3 + i % 5)
        logged[i] = _validate_as_rank(module, split, range(len(split.ids))).get("val/seed0/fvu")
    assert logged == dict.fromkeys(range(20))


def test_a_split_with_a_large_mean_and_little_spread_still_gets_its_fvu(tmp_path: Path) -> None:
    """Residual streams have a large common mean: a split whose variance is a small fraction of its squared
    norm (here about 1e-3) is not mistaken for one without variance."""
    module = SAEModule(d_model=8, architecture=TopK(k=2), expansion_factor=2, seeds=[0], lr=1e-2)
    fit(module, tmp_path, epochs=1)
    gen = torch.Generator().manual_seed(1)
    split = make_split(24, 8, 3)
    split.acts_ND = 20.0 + 0.5 * torch.randn(24, 8, generator=gen)
    x_ND = split.acts_ND.double()
    assert 1e-4 < float((x_ND - x_ND.mean(0)).pow(2).sum() / x_ND.pow(2).sum()) < 1e-2
    logged = _validate_as_rank(module, split, range(24))
    expected = split_fvu(module.saes["seed0"], split, InMemoryData().splits["train"].acts_ND.mean(0))
    assert logged["val/seed0/fvu"] == pytest.approx(expected["fvu"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.usefixtures("lightning_globals_restored")
def test_split_and_class_fvu_under_ddp_sum_both_ranks(tmp_path: Path) -> None:
    """Two ``ddp_spawn`` ranks each validate half of the rows (12 of 24, every class on both): the logged
    FVUs must be those of the whole split, so every rank's sums are added before dividing."""
    module = SAEModule(d_model=8, architecture=TopK(k=2), expansion_factor=2, seeds=[0], lr=1e-2)
    fit(module, tmp_path / "fit", epochs=1)
    data = InMemoryData()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        default_root_dir=tmp_path / "ddp",
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
    )
    (result,) = trainer.validate(module, datamodule=data, verbose=False)
    expected = split_fvu(module.saes["seed0"], data.splits["val"], data.splits["train"].acts_ND.mean(0))
    assert result["val/seed0/fvu"] == pytest.approx(expected["fvu"], rel=1e-4)
    for cls in EVAL_CLASS_NAMES:
        assert result[f"val/seed0/fvu_class/{cls}"] == pytest.approx(expected[cls], rel=1e-4), cls
