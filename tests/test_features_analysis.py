"""The feature analysis end to end: report, artifacts, plots, consensus; the epoch-end callback."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from sae_refusal.activations.datamodule import ActivationBatch, ActivationDataset
from sae_refusal.features import (
    CLASS_NAMES,
    FeatureAnalysisCallback,
    FeatureAnalysisConfig,
    SteeringVectors,
    analysis,
    analyze_features,
)
from sae_refusal.features.analysis import class_codes
from sae_refusal.features.clusters import cluster_metrics
from sae_refusal.provenance import resolve_paths
from sae_refusal.sae import SAEModule, TopK, TopKSAE, load_sae

D = 12


def make_split(n: int, seed: int) -> ActivationBatch:
    """Benign, ambiguous and all five categories; each category shifts its own coordinate."""
    gen = torch.Generator().manual_seed(seed)
    label = torch.tensor([0 if i % 7 == 0 else (2 if i % 7 == 6 else 1) for i in range(n)])
    category = torch.where(label == 1, torch.tensor([i % 7 for i in range(n)]), 0)  # 1..5 for harmful
    acts = torch.randn(n, D, generator=gen)
    acts[torch.arange(n), category] += 6.0 * (category > 0)
    return ActivationBatch(acts, label, category, [f"p{seed}-{i}" for i in range(n)])


def splits() -> dict[str, ActivationBatch]:
    return {"train": make_split(140, 0), "val": make_split(35, 1), "test": make_split(70, 2)}


FAST = FeatureAnalysisConfig(projections=["pca"], n_permutations=5, top_k_features=3)


def test_class_codes_map_benign_categories_and_drop_ambiguous() -> None:
    batch = make_split(14, 0)
    codes = class_codes(batch)
    assert codes[0] == 0 and codes[6] == -1 and codes[3] == 3


def test_analysis_writes_report_vectors_and_plots(tmp_path: Path) -> None:
    saes = {f"seed{s}": TopKSAE(D, 48, k=4, generator=torch.Generator().manual_seed(s)) for s in (0, 1)}
    result = analyze_features(splits(), saes, FAST, out_dir=tmp_path / "f", metadata={"layer": 3})
    report = json.loads((tmp_path / "f" / "report.json").read_text())
    assert report["class_names"] == CLASS_NAMES and report["metadata"] == {"layer": 3}
    assert report["set_sizes"]["train"]["benign"] == 20 and report["set_sizes"]["train"]["safety"] == 20
    residual = report["residual"]["clusters"]
    assert residual["silhouette"] > residual["silhouette_perm_mean"]  # the categories really are separated
    assert set(report["seeds"]) == {"seed0", "seed1"}
    head = report["seeds"]["seed0"]["head"]
    assert len(head["confusion"]) == 6 and 0.0 <= head["accuracy"] <= 1.0
    across = report["across_seeds"]
    assert across["summary"]["head_accuracy"]["n"] == 2
    assert set(across["consensus"]["stability"]) <= set(CLASS_NAMES)
    # CAA: category c's vector points along coordinate c (the planted shift)
    vec = SteeringVectors.load(tmp_path / "f" / "seed0")
    for c in range(1, 6):
        assert int(vec.vector(c).abs().argmax()) == c
    assert vec.metadata["sae"]["name"] == "seed0" and vec.metadata["set_sizes"]["benign"] == 20
    torch.testing.assert_close(vec.sas_CF, result.vectors["seed0"].sas_CF)
    assert vec.metadata["epoch"] is None and vec.metadata["global_step"] is None  # not given: unknown
    assert sorted(p.name for p in (tmp_path / "f" / "plots").iterdir()) == [
        "residual_pca.png",
        "seed0_sparse_full_pca.png",
        "seed0_sparse_topk_pca.png",
        "seed1_sparse_full_pca.png",
        "seed1_sparse_topk_pca.png",
    ]
    assert set(result.plots) == {p.removesuffix(".png") for p in os.listdir(tmp_path / "f" / "plots")}
    scalars = result.scalars()
    assert scalars and all(math.isfinite(v) for v in scalars.values())
    assert "seeds/seed1/head/accuracy" in scalars and not any("/share/" in k for k in scalars)
    for variant in ("full", "topk"):
        assert f"across_seeds/summary/sparse_{variant}_silhouette/mean" in scalars
        assert f"seeds/seed0/clusters_{variant}/davies_bouldin_p" in scalars
    # the old summary name still reads the whole-vector numbers, but is not logged twice
    summary = report["across_seeds"]["summary"]
    assert summary["sparse_silhouette"] == summary["sparse_full_silhouette"]
    assert "across_seeds/summary/sparse_silhouette/mean" not in scalars


def test_topk_cluster_metrics_and_plots_use_only_the_selected_columns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drawn: dict[str, np.ndarray] = {}
    real_write = analysis.write_projection_plots

    def spy(X: Any, y: Any, *args: Any, prefix: str, **kwargs: Any) -> Any:
        drawn[prefix] = np.asarray(X).copy()
        return real_write(X, y, *args, prefix=prefix, **kwargs)

    monkeypatch.setattr(analysis, "write_projection_plots", spy)
    sae = TopKSAE(D, 48, k=4, generator=torch.Generator().manual_seed(0))
    report = analyze_features(splits(), {"seed0": sae}, FAST, out_dir=tmp_path).report["seeds"]["seed0"]
    # independently: the held-out codes and the union of the head's top features per class
    test = splits()["test"]
    codes = class_codes(test)
    with torch.no_grad():
        Z_eval = sae.encode(test.acts_ND[codes >= 0]).float()
    chosen = sorted({int(f) for pairs in report["head"]["top_features"].values() for f, _ in pairs})
    assert report["topk_source"] == "head" and report["topk_features"] == chosen
    assert 2 <= len(chosen) < 48
    expected = cluster_metrics(Z_eval[:, chosen], codes[codes >= 0], n_permutations=5, seed=0, max_rows=2000)
    assert report["clusters_topk"] == pytest.approx(expected.to_dict())
    full = cluster_metrics(Z_eval, codes[codes >= 0], n_permutations=5, seed=0, max_rows=2000)
    assert report["clusters_full"] == pytest.approx(full.to_dict())
    assert report["clusters_topk"]["silhouette"] != pytest.approx(report["clusters_full"]["silhouette"])
    np.testing.assert_array_equal(drawn["seed0_sparse_topk"], Z_eval[:, chosen].numpy())
    np.testing.assert_array_equal(drawn["seed0_sparse_full"], Z_eval.numpy())


def test_topk_metrics_are_skipped_with_a_reason_when_undefined() -> None:
    sae = TopKSAE(D, 24, k=3, generator=torch.Generator().manual_seed(0))
    # a head that selects nothing: C so small that every weight is zero
    config = dataclasses.replace(FAST, projections=[], head_c=1e-6)
    result = analyze_features(splits(), {"seed0": sae}, config)
    seed = result.report["seeds"]["seed0"]
    assert seed["topk_features"] == [] and seed["clusters_topk"] is None
    assert seed["clusters_topk_skipped"] == "no selected features"
    assert result.report["across_seeds"]["summary"]["sparse_topk_silhouette"]["n"] == 0


def test_a_collapsed_sae_gets_its_report_not_an_error(tmp_path: Path) -> None:
    """Every latent dead on the held-out rows (a fit whose sparsity penalty won): the cluster metrics of its
    codes are undefined, said so with the reason, and nothing is drawn for them; the rest of the report
    (head, vectors, the residual's metrics) is written."""
    from sae_refusal.sae.jumprelu import JumpReLUSAE

    dead = JumpReLUSAE(D, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dead.threshold_F.fill_(1e6)  # no pre-activation reaches it
    config = dataclasses.replace(FAST, n_permutations=0)
    result = analyze_features(splits(), {"seed0": dead}, config, out_dir=tmp_path)
    seed = result.report["seeds"]["seed0"]
    assert seed["clusters_full"] is None
    assert seed["clusters_full_skipped"] == "the codes are constant on the selected features"
    assert "seed0_sparse_full_pca" not in result.plots and "residual_pca" in result.plots
    assert result.report["residual"]["clusters"]["silhouette"] is not None
    assert (tmp_path / "report.json").is_file()


def test_analysis_is_deterministic_and_config_errors_name_the_key(tmp_path: Path) -> None:
    sae = {"seed0": TopKSAE(D, 24, k=3, generator=torch.Generator().manual_seed(0))}
    a = analyze_features(splits(), sae, FAST).report
    b = analyze_features(splits(), sae, FAST).report
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    with pytest.raises(ValueError, match=r"features\.projections"):
        FeatureAnalysisConfig(projections=["pca", "mds"])
    with pytest.raises(ValueError, match=r"features\.head"):
        FeatureAnalysisConfig(head="svm")
    with pytest.raises(ValueError, match=r"features\.eval_split='nope'"):
        analyze_features(splits(), sae, FeatureAnalysisConfig(eval_split="nope"))


def test_torch_head_and_sas_consensus_options() -> None:
    saes = {f"seed{s}": TopKSAE(D, 24, k=3, generator=torch.Generator().manual_seed(s)) for s in (0, 1, 2)}
    config = FeatureAnalysisConfig(
        projections=[], n_permutations=0, head="torch", head_steps=50, consensus_source="sas", sas_top_k=4
    )
    report = analyze_features(splits(), saes, config).report
    assert report["seeds"]["seed2"]["head"]["method"] == "torch"
    assert all(n <= 4 for n in report["seeds"]["seed0"]["sas"]["n_features"].values())
    assert report["across_seeds"]["consensus_source"] == "sas"
    assert report["across_seeds"]["summary"]["head_macro_f1"]["n"] == 3


class InMemoryData(L.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.splits = splits()

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(ActivationDataset(self.splits["train"]), batch_size=35)

    def val_dataloader(self) -> DataLoader[Any]:
        return DataLoader(ActivationDataset(self.splits["val"]), batch_size=35)


def test_callback_runs_at_due_epochs_only_and_logs_to_tensorboard(tmp_path: Path) -> None:
    callback = FeatureAnalysisCallback(analysis=FAST, every_n_epochs=2)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=3,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        num_sanity_val_steps=1,
        logger=L.pytorch.loggers.TensorBoardLogger(tmp_path, name="tb"),
        callbacks=[callback],
    )
    module = SAEModule(d_model=D, architecture=TopK(k=4), expansion_factor=4, seeds=[0, 1])
    trainer.fit(module, datamodule=InMemoryData())
    log_dir = Path(trainer.log_dir or "")
    assert sorted(p.name for p in (log_dir / "features").iterdir()) == [
        "epoch1",
        "epoch2",
    ]  # every 2nd + last
    report = json.loads((log_dir / "features" / "epoch2" / "report.json").read_text())
    assert report["metadata"]["epoch"] == 2
    # the SAE's export, relative to the report's folder (no path of this machine), back in place when read
    assert report["metadata"]["sae_paths"]["seed1"] == "../../sae/seed1"
    resolved = resolve_paths(report["metadata"], log_dir / "features" / "epoch2")
    assert resolved["sae_paths"]["seed1"] == str(log_dir / "sae" / "seed1")
    raw = json.loads((log_dir / "features" / "epoch2" / "seed1" / "vectors.json").read_text())
    assert raw["metadata"]["sae"]["path"] == "../../../sae/seed1"
    vectors = SteeringVectors.load(log_dir / "features" / "epoch2" / "seed1")
    assert vectors.metadata["sae"]["path"] == str(log_dir / "sae" / "seed1")
    # each vector artifact names the epoch and optimiser step of its weights: 140 train rows in batches
    # of 35 = 4 steps per epoch, so 8 after epoch 1 (the second) and 12 after epoch 2
    for epoch, step in ((1, 8), (2, 12)):
        for name in ("seed0", "seed1"):
            meta = json.loads((log_dir / "features" / f"epoch{epoch}" / name / "vectors.json").read_text())
            assert (meta["metadata"]["epoch"], meta["metadata"]["global_step"]) == (epoch, step)
    assert (
        json.loads((log_dir / "features" / "epoch1" / "report.json").read_text())["metadata"]["global_step"]
        == 8
    )
    # the last analysis used the trained weights that were then exported: the analysis of the exports,
    # computed here independently, gives the same numbers (and differs from epoch 1's)
    exported = {name: load_sae(log_dir / "sae" / name) for name in ("seed0", "seed1")}
    again = json.loads(json.dumps(analyze_features(splits(), exported, FAST).report))
    for section in ("residual", "seeds", "across_seeds"):
        assert again[section] == report[section], section
    earlier = json.loads((log_dir / "features" / "epoch1" / "report.json").read_text())
    assert earlier["seeds"] != again["seeds"]
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert "features/seeds/seed0/head/macro_f1" in events.Tags()["scalars"]
    assert "features/across_seeds/summary/sparse_topk_silhouette/mean" in events.Tags()["scalars"]
    assert "features/residual_pca" in events.Tags()["images"]
    assert "features/seed0_sparse_topk_pca" in events.Tags()["images"]
    assert "features/seed1/head_confusion/text_summary" in events.Tags()["tensors"]
    with pytest.raises(ValueError, match="every_n_epochs"):
        FeatureAnalysisCallback(every_n_epochs=0)


def test_confusion_markdown_table() -> None:
    from sae_refusal.features.callback import confusion_markdown

    table = confusion_markdown([[3, 1], [0, 2]], ["benign", "safety"])
    assert table.splitlines()[2] == "| benign | 3 | 1 |" and table.count("\n") == 3
