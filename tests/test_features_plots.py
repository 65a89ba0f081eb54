"""2-D projections and scatter plots (sae_refusal.features.plots)."""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from threadpoolctl import threadpool_limits

from sae_refusal.features import plots
from sae_refusal.features.plots import (
    PROJECTIONS,
    ProjectionPlot,
    project_2d,
    project_2d_labelled,
    scatter_figure,
    write_projection_plots,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAMES = ("benign", "safety", "humanizing")


@pytest.fixture(autouse=True)
def _single_openmp_thread() -> Iterator[None]:
    """One OpenMP thread: t-SNE's spin-waiting threads make 45 points take 10-30 s on a small busy machine."""
    with threadpool_limits(limits=1, user_api="openmp"):
        yield


def blobs(
    n_per_class: int = 15, n_classes: int = 3, dim: int = 6, spread: float = 20.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated Gaussian blobs: class k centred at spread * k on every axis."""
    rng = np.random.default_rng(seed)
    X = np.concatenate([rng.normal(size=(n_per_class, dim)) + spread * k for k in range(n_classes)])
    y = np.repeat(np.arange(n_classes), n_per_class)
    return X, y


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def centroid_gap(points: np.ndarray, y: np.ndarray) -> float:
    """Smallest distance between class centroids over the largest within-class spread (std)."""
    cents = np.stack([points[y == k].mean(0) for k in np.unique(y)])
    spread = max(points[y == k].std(0).max() for k in np.unique(y))
    gaps = [np.linalg.norm(a - b) for i, a in enumerate(cents) for b in cents[i + 1 :]]
    return float(min(gaps) / spread)


def test_projections_tuple() -> None:
    assert PROJECTIONS == ("pca", "tsne", "umap")


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_project_2d_shapes_and_separation(method: str) -> None:
    X, y = blobs()
    points = project_2d(X, method, seed=0)
    assert points.shape == (45, 2)
    assert points.dtype == np.float64
    assert np.isfinite(points).all()
    assert centroid_gap(points, y) > 2.0
    # same seed, same result
    assert np.array_equal(points, project_2d(X, method, seed=0))


def test_project_2d_accepts_torch() -> None:
    gen = torch.Generator().manual_seed(0)
    X_t = torch.randn(20, 4, generator=gen)
    np.testing.assert_allclose(project_2d(X_t, "pca"), project_2d(X_t.numpy(), "pca"), rtol=1e-6, atol=1e-9)
    assert project_2d(X_t.half().requires_grad_(True), "pca").shape == (20, 2)


def test_project_2d_tiny_inputs() -> None:
    rng = np.random.default_rng(1)
    assert project_2d(rng.normal(size=(2, 3)), "pca").shape == (2, 2)
    assert np.isfinite(project_2d(rng.normal(size=(3, 3)), "tsne")).all()


@pytest.mark.parametrize(
    ("X", "method", "match"),
    [
        (np.zeros((5, 3)), "lda", r"'lda'.*pca.*tsne.*umap"),
        (np.zeros((5, 1)), "pca", "at least 2 features, got 1"),
        (np.zeros((1, 4)), "pca", "at least 2 rows, got 1"),
        (np.zeros((2, 4)), "tsne", "at least 3 rows, got 2"),
        (np.zeros((2, 4)), "umap", "at least 3 rows, got 2"),
        (np.zeros((5, 3, 2)), "pca", r"2-D.*\(5, 3, 2\)"),
        (np.array([[0.0, np.inf], [1.0, 2.0]]), "pca", "NaN or infinite"),
    ],
)
def test_project_2d_bad_inputs(X: np.ndarray, method: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        project_2d(X, method)


def test_missing_umap_is_a_clear_import_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "umap", None)  # makes `import umap` fail
    X, y = blobs(n_per_class=5)
    with pytest.raises(ImportError, match="pip install umap-learn, or leave 'umap' out"):
        project_2d(X, "umap")
    out = tmp_path / "plots"
    with pytest.raises(ImportError, match="umap-learn"):
        write_projection_plots(X, y, NAMES, out, prefix="L3", methods=("pca", "umap"))
    assert not out.exists()


def test_scatter_figure() -> None:
    X, y = blobs(n_per_class=8)
    fig = scatter_figure(X[:, :2], y, NAMES, "L3 pca")
    assert isinstance(fig, Figure)
    assert isinstance(fig.canvas, FigureCanvasAgg)
    (ax,) = fig.axes
    assert ax.get_title() == "L3 pca"
    legend = ax.get_legend()
    assert legend is not None
    texts = [t.get_text() for t in legend.get_texts()]
    assert [t.split(" ")[0] for t in texts] == list(NAMES)
    colours = {tuple(np.round(np.asarray(c.get_facecolor())[0], 4)) for c in ax.collections}
    assert len(colours) == 3  # one colour per class
    sizes = [np.asarray(c.get_offsets()).shape[0] for c in ax.collections]
    assert sizes == [8, 8, 8]


def test_pca_axis_labels_give_the_explained_variance() -> None:
    # three orthogonal pairs of points: variances 2 * 3**2, 2 * 2**2, 2 * 1**2 along the axes, so PC1 and PC2
    # explain 9 / 14 and 4 / 14 of the total
    a, b, c = 3.0, 2.0, 1.0
    X = np.array([[a, 0, 0], [-a, 0, 0], [0, b, 0], [0, -b, 0], [0, 0, c], [0, 0, -c]])
    points, labels = project_2d_labelled(X, "pca")
    assert labels == ("PC1 (64.3% var)", "PC2 (28.6% var)")
    assert np.array_equal(points, project_2d(X, "pca"))
    assert project_2d_labelled(blobs()[0], "tsne")[1] == ("t-SNE 1", "t-SNE 2")


def test_scatter_figure_has_axis_labels_ticks_and_a_legend() -> None:
    X, y = blobs(n_per_class=8)
    fig = scatter_figure(X[:, :2], y, NAMES, "title", axis_labels=("PC1 (50.0% var)", "PC2 (20.0% var)"))
    (ax,) = fig.axes
    fig.canvas.draw()
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("PC1 (50.0% var)", "PC2 (20.0% var)")
    assert len(ax.get_xticks()) >= 2 and len(ax.get_yticks()) >= 2
    assert any(t.get_text() for t in ax.get_xticklabels())
    legend = ax.get_legend()
    assert legend is not None and legend.get_title().get_text() == "class (rows)"
    assert [t.get_text() for t in legend.get_texts()] == ["benign (8)", "safety (8)", "humanizing (8)"]


def test_written_plots_are_titled_and_labelled_per_method(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    figures: list[Figure] = []
    real = plots.scatter_figure

    def keep(*args: object, **kwargs: object) -> Figure:
        fig = real(*args, **kwargs)  # type: ignore[arg-type]
        figures.append(fig)
        return fig

    monkeypatch.setattr(plots, "scatter_figure", keep)
    X, y = blobs()
    context = "smollm2 layer 15, test split, epoch 29\nresidual stream"
    write_projection_plots(X, y, NAMES, tmp_path, prefix="r", methods=("pca", "tsne"), title=context)
    write_projection_plots(X, y, NAMES, tmp_path, prefix="s", methods=("pca",), max_rows=20)
    titles = [fig.axes[0].get_title() for fig in figures]
    assert titles == [f"{context} - PCA", f"{context} - t-SNE", "s (20 of 45 rows) - PCA"]
    xlabels = [fig.axes[0].get_xlabel() for fig in figures]
    assert xlabels[0].startswith("PC1 (") and xlabels[0].endswith("% var)") and xlabels[1] == "t-SNE 1"


def test_scatter_figure_classes_absent_and_bad_labels() -> None:
    points = np.random.default_rng(0).normal(size=(6, 2))
    # class 1 absent: still one colour per present class, consistent with the class index
    fig = scatter_figure(points, np.array([0, 0, 2, 2, 2, 0]), NAMES, "t")
    assert len(fig.axes[0].collections) == 2
    with pytest.raises(ValueError, match="label 3 is out of range"):
        scatter_figure(points, np.array([0, 1, 2, 3, 0, 1]), NAMES, "t")
    with pytest.raises(ValueError, match="label -1 is out of range"):
        scatter_figure(points, np.array([0, 1, 2, -1, 0, 1]), NAMES, "t")
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        scatter_figure(np.zeros((6, 3)), np.zeros(6, dtype=int), NAMES, "t")
    with pytest.raises(ValueError, match="6 rows but y has 5"):
        scatter_figure(points, np.zeros(5, dtype=int), NAMES, "t")


def test_write_projection_plots(tmp_path: Path) -> None:
    X, y = blobs()
    out = tmp_path / "nested" / "plots"
    result = write_projection_plots(
        torch.from_numpy(X).float(), torch.from_numpy(y), NAMES, out, prefix="layer3", methods=("pca", "tsne")
    )
    assert [p.method for p in result] == ["pca", "tsne"]
    assert sorted(f.name for f in out.iterdir()) == ["layer3_pca.png", "layer3_tsne.png"]  # no temp files
    for plot in result:
        assert isinstance(plot, ProjectionPlot)
        assert plot.path == out / f"layer3_{plot.method}.png"
        assert plot.path.read_bytes()[:8] == PNG_MAGIC
        image = plot.image_HWC
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert png_size(plot.path) == (image.shape[1], image.shape[0])
        # not blank: white background plus several distinct colours
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 10
    # a second run replaces the files in place, still with no leftovers
    again = write_projection_plots(X, y, NAMES, out, prefix="layer3", methods=["pca"])
    assert np.array_equal(again[0].image_HWC, result[0].image_HWC)
    assert sorted(f.name for f in out.iterdir()) == ["layer3_pca.png", "layer3_tsne.png"]


def test_unknown_method_raises_before_anything_is_written(tmp_path: Path) -> None:
    X, y = blobs(n_per_class=5)
    out = tmp_path / "plots"
    with pytest.raises(ValueError, match="'bogus'"):
        write_projection_plots(X, y, NAMES, out, prefix="L3", methods=("pca", "bogus"))
    assert not out.exists()
    with pytest.raises(ValueError, match="'pcaa'"):
        write_projection_plots(X, y, NAMES, out, prefix="L3", methods="pcaa")
    assert not out.exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prefix": "a/b"}, "prefix"),
        ({"prefix": ""}, "prefix"),
        ({"prefix": "L3", "max_rows": 0}, "max_rows"),
        ({"prefix": "L3", "class_names": ("benign", "safety")}, "label 2 is out of range"),
        ({"prefix": "L3", "methods": ("pca", "tsne"), "max_rows": 2}, "tsne to 2-D needs at least 3 rows"),
    ],
)
def test_write_projection_plots_validates_first(tmp_path: Path, kwargs: dict, match: str) -> None:
    X, y = blobs(n_per_class=5)
    out = tmp_path / "plots"
    args = {"class_names": NAMES, "methods": ("pca",), **kwargs}
    with pytest.raises(ValueError, match=match):
        write_projection_plots(X, y, out_dir=out, **args)
    assert not out.exists()


def test_write_projection_plots_length_mismatch(tmp_path: Path) -> None:
    X, y = blobs(n_per_class=5)
    with pytest.raises(ValueError, match="15 rows but y has 14"):
        write_projection_plots(X, y[:-1], NAMES, tmp_path, prefix="L3", methods=("pca",))


def test_max_rows_subsamples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[np.ndarray] = []
    real = plots.project_2d_labelled

    def spy(X_ND: np.ndarray, method: str, *, seed: int = 0) -> tuple[np.ndarray, tuple[str, str]]:
        seen.append(X_ND)
        return real(X_ND, method, seed=seed)

    monkeypatch.setattr(plots, "project_2d_labelled", spy)
    X, y = blobs()
    first = write_projection_plots(X, y, NAMES, tmp_path, prefix="a", methods=("pca",), max_rows=20, seed=3)
    second = write_projection_plots(X, y, NAMES, tmp_path, prefix="b", methods=("pca",), max_rows=20, seed=3)
    write_projection_plots(X, y, NAMES, tmp_path, prefix="c", methods=("pca",), max_rows=None, seed=3)
    write_projection_plots(X, y, NAMES, tmp_path, prefix="d", methods=("pca",), max_rows=20, seed=4)
    assert [x.shape for x in seen] == [(20, 6), (20, 6), (45, 6), (20, 6)]
    assert np.array_equal(seen[0], seen[1])  # same seed, same subsample
    assert not np.array_equal(seen[0], seen[3])  # another seed, another subsample
    assert np.array_equal(seen[2], X)
    # rows are drawn without replacement and kept in their original order
    rows = [int(np.flatnonzero((row == X).all(1))[0]) for row in seen[0]]
    assert len(set(rows)) == 20 and rows == sorted(rows)
    assert first[0].path.name == "a_pca.png" and second[0].path.name == "b_pca.png"


def test_global_rng_untouched(tmp_path: Path) -> None:
    X, y = blobs(n_per_class=5)
    np.random.seed(99)
    expected = np.random.random(4)
    np.random.seed(99)
    write_projection_plots(X, y, NAMES, tmp_path, prefix="L3", methods=("pca", "tsne"), max_rows=10)
    assert np.array_equal(np.random.random(4), expected)


@pytest.mark.slow
def test_umap_projection_and_plot(tmp_path: Path) -> None:
    X, y = blobs(n_per_class=14, spread=10.0)  # 42 points
    points = project_2d(X, "umap", seed=0)
    assert points.shape == (42, 2) and np.isfinite(points).all()
    assert centroid_gap(points, y) > 1.0
    tiny = project_2d(X[:8], "umap", seed=0)  # random init below 10 rows
    assert tiny.shape == (8, 2) and np.isfinite(tiny).all()
    (plot,) = write_projection_plots(X, y, NAMES, tmp_path, prefix="L3", methods=("umap",))
    assert plot.path.name == "L3_umap.png" and plot.path.read_bytes()[:8] == PNG_MAGIC
    assert plot.image_HWC.dtype == np.uint8 and plot.image_HWC.shape[2] == 3
