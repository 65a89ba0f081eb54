"""2-D projections (PCA, t-SNE, UMAP) of labelled activations and their scatter plots.

Figures are drawn with a plain :class:`matplotlib.figure.Figure` on an Agg canvas (no pyplot state, no
backend switch), so this works headless and from worker threads. :func:`write_projection_plots` writes one
PNG per projection (atomically: temporary sibling, then ``os.replace``) and returns the same figure as an
``(H, W, 3)`` uint8 RGB array for ``SummaryWriter.add_image(..., dataformats="HWC")``. Every plot has
axis labels and ticks (PCA: ``PC1 (xx.x% var)``; t-SNE and UMAP: ``t-SNE 1`` / ``UMAP 1``, whose scales carry
no meaning beyond neighbourhoods), a legend of class names with their counts, and a title naming what was
projected (the caller's ``title``, e.g. layer, split and epoch) and the method.

UMAP needs the optional ``umap-learn`` package, imported only when asked for.
"""

from __future__ import annotations

import importlib.util
import io
import os
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from sae_refusal.features.arrays import as_labels, as_matrix
from sae_refusal.features.config import PROJECTIONS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "PROJECTIONS",
    "ProjectionPlot",
    "project_2d",
    "project_2d_labelled",
    "scatter_figure",
    "write_projection_plots",
]

#: How each method is named in titles and axis labels.
METHOD_NAMES: dict[str, str] = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}

_UMAP_MISSING = (
    "UMAP needs the umap-learn package: pip install umap-learn, or leave 'umap' out of the projections"
)


@dataclass(frozen=True)
class ProjectionPlot:
    """One written projection plot.

    Attributes:
        method: Projection method (one of :data:`PROJECTIONS`).
        path: The PNG written.
        image_HWC: The same figure as a ``(H, W, 3)`` uint8 RGB array.
    """

    method: str
    path: Path
    image_HWC: np.ndarray


def _check_methods(methods: Sequence[str]) -> list[str]:
    if isinstance(methods, str):
        methods = (methods,)
    unknown = [m for m in methods if m not in PROJECTIONS]
    if unknown:
        raise ValueError(f"unknown projection method(s) {unknown}; choose from {list(PROJECTIONS)}")
    return list(dict.fromkeys(methods))


def _check_size(method: str, n: int, d: int) -> None:
    if d < 2:
        raise ValueError(f"{method} to 2-D needs at least 2 features, got {d}")
    min_rows = 2 if method == "pca" else 3  # t-SNE: perplexity >= 2 must stay below N; UMAP: n_neighbors >= 2
    if n < min_rows:
        raise ValueError(f"{method} to 2-D needs at least {min_rows} rows, got {n}")


def project_2d(X_ND: Any, method: str, *, seed: int = 0) -> npt.NDArray[np.float64]:
    """Project rows to 2-D.

    Args:
        X_ND: ``(N, D)`` numpy array or torch tensor (``D >= 2``).
        method: ``"pca"`` (``N >= 2``), ``"tsne"`` (``N >= 3``; perplexity ``min(30, max(2, (N - 1) / 3))``,
            PCA init) or ``"umap"`` (``N >= 3``; ``n_neighbors = min(15, N - 1)``, random init below 10 rows,
            spectral otherwise; needs ``umap-learn``).
        seed: ``random_state`` of the projection.

    Returns:
        ``(N, 2)`` float64 coordinates.

    Raises:
        ValueError: Unknown method, ``X_ND`` not 2-D or non-finite, or too few rows / features.
        ImportError: ``"umap"`` without ``umap-learn`` installed.
    """
    return project_2d_labelled(X_ND, method, seed=seed)[0]


def project_2d_labelled(
    X_ND: Any, method: str, *, seed: int = 0
) -> tuple[npt.NDArray[np.float64], tuple[str, str]]:
    """:func:`project_2d` and the two axis labels: ``PC1 (xx.x% var)`` / ``PC2 (..)`` for PCA (the share of
    the total variance each component explains), ``t-SNE 1`` / ``t-SNE 2`` and ``UMAP 1`` / ``UMAP 2``.

    Same arguments and errors as :func:`project_2d`.
    """
    if method not in PROJECTIONS:
        raise ValueError(f"unknown projection method {method!r}; choose from {list(PROJECTIONS)}")
    X = as_matrix(X_ND)
    n, d = X.shape
    _check_size(method, n, d)
    name = METHOD_NAMES[method]
    labels = (f"{name} 1", f"{name} 2")
    if method == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, random_state=seed)
        out = pca.fit_transform(X)
        share = np.nan_to_num(np.asarray(pca.explained_variance_ratio_, dtype=np.float64))
        labels = (f"PC1 ({100 * share[0]:.1f}% var)", f"PC2 ({100 * share[1]:.1f}% var)")
    elif method == "tsne":
        from sklearn.manifold import TSNE
        from threadpoolctl import threadpool_limits

        perplexity = min(30.0, max(2.0, (n - 1) / 3))
        # one OpenMP thread: the Barnes-Hut loop of a few thousand points gains little from more, and
        # on a busy 2-core machine spinning OpenMP workers slowed it down: 45 rows took 10-30 s instead of
        # 0.3 s, 400 real rows 4.4 s instead of 2.6 s
        with threadpool_limits(1, "openmp"):
            tsne = TSNE(n_components=2, random_state=seed, init="pca", perplexity=perplexity)
            out = tsne.fit_transform(X)
    else:
        try:
            import umap
        except ImportError as err:
            raise ImportError(_UMAP_MISSING) from err
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*random_state.*")
            warnings.filterwarnings("ignore", message=".*n_jobs.*")
            reducer = umap.UMAP(
                n_components=2,
                random_state=seed,
                n_neighbors=min(15, n - 1),
                init="random" if n < 10 else "spectral",
            )
            out = reducer.fit_transform(X)
    return np.asarray(out, dtype=np.float64).reshape(n, 2), labels


def _class_colours(n_classes: int) -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    if n_classes <= 10:
        cmap = colormaps["tab10"]
        return [cmap(i) for i in range(n_classes)]
    if n_classes <= 20:
        cmap = colormaps["tab20"]
        return [cmap(i) for i in range(n_classes)]
    cmap = colormaps["turbo"]
    return [cmap(i / (n_classes - 1)) for i in range(n_classes)]


def scatter_figure(
    points_N2: Any,
    y_N: Any,
    class_names: Sequence[str],
    title: str,
    *,
    axis_labels: tuple[str, str] = ("dimension 1", "dimension 2"),
) -> Figure:
    """Scatter plot of 2-D points, one colour per class, with axis labels, ticks and a legend of class names.

    The figure has an Agg canvas attached (``fig.canvas``), so it can be drawn or saved without pyplot.

    Args:
        points_N2: ``(N, 2)`` coordinates (numpy or torch).
        y_N: ``(N,)`` class indices in ``0..len(class_names) - 1`` (0 is benign by convention).
        class_names: Name of each class index, shown in the legend with its row count.
        title: Figure title.
        axis_labels: Labels of the x and y axes.

    Returns:
        The figure.

    Raises:
        ValueError: ``points_N2`` not ``(N, 2)``, a length mismatch, no class names or a label out of range.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not class_names:
        raise ValueError("class_names must name at least one class")
    points = as_matrix(points_N2)
    if points.shape[1] != 2:
        raise ValueError(f"points must have shape (N, 2), got {tuple(points.shape)}")
    y = as_labels(y_N, len(class_names))
    if y.shape[0] != points.shape[0]:
        raise ValueError(f"points has {points.shape[0]} rows but y has {y.shape[0]} labels")

    fig = Figure(figsize=(7.0, 5.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = _class_colours(len(class_names))
    marker_size = 12.0 if points.shape[0] <= 500 else 5.0
    for k, name in enumerate(class_names):
        rows = y == k
        if not rows.any():
            continue
        ax.scatter(
            points[rows, 0],
            points[rows, 1],
            s=marker_size,
            color=colours[k],
            label=f"{name} ({int(rows.sum())})",
            alpha=0.75,
            linewidths=0,
        )
    ax.set_title(title, fontsize="medium")
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.tick_params(labelsize="small")
    ax.grid(True, linewidth=0.4, alpha=0.4)
    if ax.collections:
        ax.legend(
            title="class (rows)",
            loc="center left",
            bbox_to_anchor=(1.01, 0.5),
            fontsize="small",
            title_fontsize="small",
            markerscale=2.0,
            frameon=False,
        )
    return fig


def _render_rgb(fig: Figure) -> npt.NDArray[np.uint8]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _write_png_atomic(image_HWC: npt.NDArray[np.uint8], path: Path) -> None:
    """Write an RGB image (the figure rendered once, by :func:`_render_rgb`) as a PNG, atomically."""
    from matplotlib.image import imsave

    buf = io.BytesIO()
    imsave(buf, image_HWC, format="png")
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with tmp.open("xb") as fh:
            fh.write(buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_projection_plots(
    X_ND: Any,
    y_N: Any,
    class_names: Sequence[str],
    out_dir: str | Path,
    *,
    prefix: str,
    methods: Sequence[str] = PROJECTIONS,
    seed: int = 0,
    max_rows: int | None = 2000,
    title: str | None = None,
) -> list[ProjectionPlot]:
    """Project labelled rows with each method and write one scatter plot PNG per method.

    Everything is validated (methods, shapes, labels, ``umap-learn`` when ``"umap"`` is asked for) before any
    projection is computed or file written.

    Args:
        X_ND: ``(N, D)`` numpy array or torch tensor.
        y_N: ``(N,)`` class indices in ``0..len(class_names) - 1`` (0 is benign by convention).
        class_names: Name of each class index, shown in the legend.
        out_dir: Folder for the PNGs (created if missing).
        prefix: File-name prefix: writes ``<out_dir>/<prefix>_<method>.png``.
        methods: Projection methods, a subset of :data:`PROJECTIONS` (duplicates are done once).
        seed: Seed of the subsample (``numpy.random.default_rng``) and of each projection.
        max_rows: When set and ``N > max_rows``, plot a random subset of ``max_rows`` rows.
        title: What the rows are (e.g. ``"layer 15, test split, epoch 29: residual stream"``); each plot is
            titled ``"<title> - <method>"`` (``prefix`` stands in when ``None``), with the subsample size when
            rows were left out.

    Returns:
        One :class:`ProjectionPlot` per method, in the order given.

    Raises:
        ValueError: Unknown method, bad shapes or labels, a prefix that is not a plain file-name part, or
            ``max_rows < 1``.
        ImportError: ``"umap"`` asked for without ``umap-learn`` installed.
    """
    todo = _check_methods(methods)
    if not prefix or Path(prefix).name != prefix or "/" in prefix or "\\" in prefix:
        raise ValueError(f"prefix must be a non-empty file-name part without folders, got {prefix!r}")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
    if not class_names:
        raise ValueError("class_names must name at least one class")
    X = as_matrix(X_ND)
    y = as_labels(y_N, len(class_names))
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but y has {y.shape[0]} labels")
    if "umap" in todo and importlib.util.find_spec("umap") is None:
        raise ImportError(_UMAP_MISSING)

    subject = title if title is not None else prefix
    if max_rows is not None and X.shape[0] > max_rows:
        subject += f" ({max_rows} of {X.shape[0]} rows)"
        keep = np.sort(np.random.default_rng(seed).choice(X.shape[0], size=max_rows, replace=False))
        X, y = X[keep], y[keep]
    for method in todo:
        _check_size(method, X.shape[0], X.shape[1])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots: list[ProjectionPlot] = []
    for method in todo:
        points, axis_labels = project_2d_labelled(X, method, seed=seed)
        fig = scatter_figure(
            points, y, class_names, f"{subject} - {METHOD_NAMES[method]}", axis_labels=axis_labels
        )
        path = out / f"{prefix}_{method}.png"
        image_HWC = _render_rgb(fig)  # drawn once: the same pixels go to the PNG and to TensorBoard
        _write_png_atomic(image_HWC, path)
        plots.append(ProjectionPlot(method=method, path=path, image_HWC=image_HWC))
    return plots
