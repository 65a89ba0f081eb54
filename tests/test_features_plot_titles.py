"""Plots of a feature analysis say what they show: model, layer, split, epoch and subject in the title, the
method's axes on the axes, and the PNG holds the pixels logged to TensorBoard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from sae_refusal.activations.datamodule import ActivationBatch
from sae_refusal.features import FeatureAnalysisConfig, analyze_features, plots
from sae_refusal.features.analysis import plot_title_context
from sae_refusal.sae import TopKSAE

D = 12


def _split(n: int, seed: int) -> ActivationBatch:
    """Benign and the five categories (no ambiguous rows), each category shifting its own coordinate."""
    gen = torch.Generator().manual_seed(seed)
    category = torch.tensor([i % 6 for i in range(n)])
    label = torch.where(category > 0, 1, 0)
    acts = torch.randn(n, D, generator=gen)
    acts[torch.arange(n), category] += 6.0 * (category > 0)
    return ActivationBatch(acts, label, category, [f"p{seed}-{i}" for i in range(n)])


def test_plot_title_context() -> None:
    meta = {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "layer": 15, "epoch": 29}
    assert plot_title_context(meta, "test") == "SmolLM2-135M-Instruct layer 15, test split, epoch 29"
    assert plot_title_context({"layer": 0, "epoch": 0}, "val") == "layer 0, val split, epoch 0"
    assert plot_title_context({}, "test") == "test split"


def test_analysis_plots_are_titled_and_labelled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figures: list[Figure] = []
    real = plots.scatter_figure

    def keep(*args: Any, **kwargs: Any) -> Figure:
        fig = real(*args, **kwargs)
        figures.append(fig)
        return fig

    monkeypatch.setattr(plots, "scatter_figure", keep)
    splits = {"train": _split(60, 0), "val": _split(12, 1), "test": _split(30, 2)}
    sae = TopKSAE(D, 48, k=4, generator=torch.Generator().manual_seed(0))
    config = FeatureAnalysisConfig(projections=["pca"], n_permutations=2, top_k_features=2)
    result = analyze_features(
        splits,
        {"seed0": sae},
        config,
        out_dir=tmp_path,
        metadata={"model": "smollm2", "layer": 15, "epoch": 29},
    )
    titles = {fig.axes[0].get_title() for fig in figures}
    context = "smollm2 layer 15, test split, epoch 29"
    assert f"{context}\nresidual stream ({D} dims) - PCA" in titles
    assert f"{context}\nseed0 SAE codes, all 48 latents - PCA" in titles
    n_topk = len(result.report["seeds"]["seed0"]["topk_features"])
    assert f"{context}\nseed0 SAE codes, {n_topk} selected latents (head) - PCA" in titles
    assert len(figures) == len(result.plots) == 3
    for fig in figures:
        ax = fig.axes[0]
        assert ax.get_xlabel().startswith("PC1 (") and ax.get_ylabel().startswith("PC2 (")
        legend = ax.get_legend()
        assert legend is not None and len(legend.get_texts()) == 6  # benign + five categories
    for plot in result.plots.values():  # the PNG is the image logged to TensorBoard, pixel for pixel
        png = np.asarray(Image.open(plot.path).convert("RGB"))
        assert np.array_equal(png, plot.image_HWC)
