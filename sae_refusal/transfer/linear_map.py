"""Affine maps between two models' residual spaces, fitted by least squares on paired prompts' activations.

A :class:`LinearMap` carries model A's residual (width ``D``) to model B's (width ``E``):
``y = x @ W_DE + b_E``. :func:`fit_linear_map` fits one from rows ``X_ND``/``Y_NE`` of the *same* prompts
run through both models; :func:`map_fit_quality` scores it on (held-out) pairs.

Design notes:

* **Float64 normal equations, in row chunks.** The fit accumulates the column means, then the Gram matrix
  ``Xc^T Xc`` ``(D, D)`` and the cross term ``Xc^T Yc`` ``(D, E)`` in float64 over chunks of rows, so memory
  is ``O(D^2 + D E)`` plus one chunk, never a float64 copy of all rows, and everything stays on ``X_ND``'s
  device. With ``center`` the bias is ``b = mean_Y - mean_X @ W``; without it the map is linear (``b = 0``)
  and the Gram is of the raw rows.
* **Relative ridge.** ``lambda = ridge * trace(G) / D`` (the mean eigenvalue of the Gram ``G``) is added to
  its diagonal. Scaling ``X`` by ``c`` scales ``G`` and ``lambda`` by ``c^2`` and ``W`` by ``1/c``, so the
  predictions do not change: one ``ridge`` suits models whose residual norms differ by orders of magnitude.
* **Cholesky, or a clear error.** ``G + lambda I`` is symmetric positive definite whenever ``ridge > 0`` and
  ``X`` varies at all; it is factored with ``torch.linalg.cholesky_ex`` and solved with ``cholesky_solve``.
  Without a ridge a rank-deficient ``X`` (a constant column, e.g. coordinates a model never uses, or
  exactly dependent columns) makes the factorisation fail, or leaves a pivot at round-off level (squared,
  below ``d_in * 1000 * eps64`` of the largest diagonal), and that is a ``ValueError`` asking for a ridge,
  not a silently enormous ``W``. An underdetermined fit (``N <= D``) is refused up front without a ridge.
* **Directions vs points.** :meth:`LinearMap.__call__` maps points (activations, with the bias);
  :meth:`LinearMap.direction` maps differences of points (steering vectors, CAA/SAS directions, decoder
  rows), for which the bias cancels: ``(x1 - x0) @ W``.
* **Artifact.** :meth:`LinearMap.save` writes ``map.safetensors`` (``W_DE``, ``b_E``, float32) and
  ``map.json`` (format tag, widths, tensor shapes, metadata) through
  :class:`~sae_refusal.atomic.AtomicFolder`, so a folder holds a whole map or none; :meth:`LinearMap.load`
  checks the two files agree.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sae_refusal.atomic import AtomicFolder
from sae_refusal.jsonfile import read_json_object

__all__ = ["MAP_FILE", "META_FILE", "LinearMap", "fit_linear_map", "map_fit_quality"]

MAP_FILE = "map.safetensors"
META_FILE = "map.json"
FORMAT = "sae_refusal.linear_map/1"

#: Rows per chunk of the float64 accumulations (bounds the temporary memory of a fit or a score).
_CHUNK_ROWS = 4096


@dataclass
class LinearMap:
    """``y = x @ W_DE + b_E``: model A's residual (width ``D``) -> model B's (width ``E``).

    Tensors are stored as float32 (converted on construction, detached).

    Args:
        W_DE: Linear part, ``(D, E)``.
        b_E: Bias, ``(E,)``.
        metadata: JSON-ready provenance: models, layer, split, ``n_rows``, ``ridge``, ``center``, fit quality.

    Raises:
        ValueError: If ``W_DE`` is not 2-D or ``b_E`` is not ``(E,)``.
    """

    W_DE: torch.Tensor
    b_E: torch.Tensor
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.W_DE.ndim != 2:
            raise ValueError(f"W_DE must be 2-D (d_in, d_out), got shape {tuple(self.W_DE.shape)}")
        if self.b_E.ndim != 1 or self.b_E.shape[0] != self.W_DE.shape[1]:
            raise ValueError(
                f"b_E must have shape ({self.W_DE.shape[1]},) to match W_DE {tuple(self.W_DE.shape)}, "
                f"got {tuple(self.b_E.shape)}"
            )
        self.W_DE = self.W_DE.detach().float()
        self.b_E = self.b_E.detach().to(device=self.W_DE.device, dtype=torch.float32)

    @property
    def d_in(self) -> int:
        """Width ``D`` of the source residual."""
        return int(self.W_DE.shape[0])

    @property
    def d_out(self) -> int:
        """Width ``E`` of the target residual."""
        return int(self.W_DE.shape[1])

    def _check_width(self, x: torch.Tensor, name: str) -> None:
        if x.ndim == 0 or x.shape[-1] != self.d_in:
            raise ValueError(
                f"{name} must end in the map's input width {self.d_in}, got shape {tuple(x.shape)}"
            )

    def __call__(self, x_ND: torch.Tensor) -> torch.Tensor:
        """Map points (activations): ``x @ W + b``; any leading shape, result in ``x_ND``'s dtype and device.

        Raises:
            ValueError: If the last dimension of ``x_ND`` is not ``d_in``.
        """
        self._check_width(x_ND, "x_ND")
        W_DE = self.W_DE.to(x_ND.device)
        y_NE = torch.addmm(self.b_E.to(x_ND.device), x_ND.reshape(-1, self.d_in).float(), W_DE)
        return y_NE.reshape(*x_ND.shape[:-1], self.d_out).to(x_ND.dtype)

    def direction(self, v_KD: torch.Tensor) -> torch.Tensor:
        """Map directions (differences of points, e.g. steering vectors): ``v @ W``, no bias.

        Any leading shape (a single ``(D,)`` vector too); result in ``v_KD``'s dtype and device.

        Raises:
            ValueError: If the last dimension of ``v_KD`` is not ``d_in``.
        """
        self._check_width(v_KD, "v_KD")
        return (v_KD.float() @ self.W_DE.to(v_KD.device)).to(v_KD.dtype)

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``map.safetensors`` + ``map.json`` into ``folder`` atomically; returns the folder.

        Raises:
            ValueError: If ``metadata`` is not JSON-serialisable (nothing is written then).
        """
        tensors = {
            "W_DE": self.W_DE.detach().float().cpu().contiguous(),
            "b_E": self.b_E.detach().float().cpu().contiguous(),
        }
        record = {
            "format": FORMAT,
            "d_in": self.d_in,
            "d_out": self.d_out,
            "shapes": {name: list(t.shape) for name, t in tensors.items()},
            "metadata": self.metadata,
        }
        try:
            text = json.dumps(record, indent=2)
        except (TypeError, ValueError) as err:
            raise ValueError(f"metadata is not JSON-serialisable: {err}") from err
        with AtomicFolder(folder) as out:
            save_file(tensors, str(out.tmp / MAP_FILE), metadata={"format": FORMAT})
            (out.tmp / META_FILE).write_text(text)
            return out.commit()

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> LinearMap:
        """Read a map written by :meth:`save`.

        Raises:
            FileNotFoundError: If ``map.json`` or ``map.safetensors`` is missing (naming it).
            ValueError: If a file is unreadable, lacks a tensor, or the shapes disagree (naming the file).
        """
        folder = Path(folder)
        meta_path, tensor_path = folder / META_FILE, folder / MAP_FILE
        for path in (meta_path, tensor_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist: not a linear-map artifact folder")
        record = read_json_object(meta_path)
        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{tensor_path} is not a readable safetensors file: {err}") from err
        missing = [name for name in ("W_DE", "b_E") if name not in tensors]
        if missing:
            raise ValueError(f"{tensor_path} lacks tensor(s) {missing}")
        W_DE, b_E = tensors["W_DE"], tensors["b_E"]
        if W_DE.ndim != 2 or b_E.shape != (W_DE.shape[1],):
            raise ValueError(
                f"{tensor_path}: inconsistent shapes W_DE {tuple(W_DE.shape)} and b_E {tuple(b_E.shape)}"
            )
        expected = (record.get("d_in"), record.get("d_out"))
        if expected != tuple(W_DE.shape):
            raise ValueError(
                f"{meta_path} says d_in, d_out = {expected} but {tensor_path} holds W_DE of shape "
                f"{tuple(W_DE.shape)}"
            )
        return cls(W_DE=W_DE, b_E=b_E, metadata=dict(record.get("metadata") or {}))


def _check_rows(X_ND: torch.Tensor, Y_NE: torch.Tensor) -> None:
    for name, t in (("X_ND", X_ND), ("Y_NE", Y_NE)):
        if t.ndim != 2:
            raise ValueError(f"{name} must be 2-D (rows, width), got shape {tuple(t.shape)}")
        if t.shape[1] == 0:
            raise ValueError(f"{name} has zero columns")
        if t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if Y_NE.shape[0] != X_ND.shape[0]:
        raise ValueError(
            f"Y_NE has {Y_NE.shape[0]} rows but X_ND has {X_ND.shape[0]}: the rows must be paired"
        )


def _chunks(X_ND: torch.Tensor, Y_NE: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield float64 row chunks ``(x, y)`` of both tensors on ``X_ND``'s device."""
    for start in range(0, X_ND.shape[0], _CHUNK_ROWS):
        stop = start + _CHUNK_ROWS
        yield (
            X_ND[start:stop].to(dtype=torch.float64),
            Y_NE[start:stop].to(device=X_ND.device, dtype=torch.float64),
        )


def fit_linear_map(
    X_ND: torch.Tensor,
    Y_NE: torch.Tensor,
    *,
    ridge: float = 1e-6,
    center: bool = True,
    metadata: dict[str, Any] | None = None,
) -> LinearMap:
    """Least-squares affine map from rows ``X_ND`` (model A) to the paired rows ``Y_NE`` (model B).

    Minimises ``||Xc W - Yc||^2 + lambda ||W||^2`` with ``lambda = ridge * trace(Xc^T Xc) / D`` (relative,
    hence scale-free; see the module notes), in float64.

    Args:
        X_ND: Source rows ``(N, D)``, any real dtype, any device (the fit runs there).
        Y_NE: Target rows ``(N, E)``, row ``i`` from the same prompt as ``X_ND[i]``.
        ridge: Relative ridge, ``>= 0``; ``0`` is plain least squares (needs ``N > D`` and full-rank ``X``).
        center: Fit on centred rows and set ``b = mean_Y - mean_X @ W``; ``False``: a linear map, ``b = 0``.
        metadata: Provenance merged into the map's metadata; the fit's own keys ``n_rows``, ``ridge``,
            ``center`` and ``train_fvu`` (the FVU on the fitting rows) take precedence.

    Returns:
        The fitted map (float32 tensors on ``X_ND``'s device).

    Raises:
        ValueError: Naming the argument, on non-2-D input, different row counts, fewer than 2 rows,
            NaN/inf values, ``ridge < 0`` (or not finite), ``N <= D`` without a ridge, rank-deficient or
            constant ``X_ND`` without a ridge, or ``X_ND`` without any variance.
    """
    if isinstance(ridge, bool) or not isinstance(ridge, int | float) or not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
    _check_rows(X_ND, Y_NE)
    n_rows, d_in = X_ND.shape
    d_out = Y_NE.shape[1]
    if n_rows < 2:
        raise ValueError(f"X_ND needs at least 2 rows to fit a map, got {n_rows}")
    if n_rows <= d_in and ridge == 0:
        raise ValueError(
            f"X_ND has {n_rows} rows for {d_in} columns: the fit is underdetermined; set ridge > 0 "
            "(e.g. 1e-6) or give more rows"
        )
    device, f64 = X_ND.device, torch.float64

    sum_x_D = torch.zeros(d_in, dtype=f64, device=device)
    sum_y_E = torch.zeros(d_out, dtype=f64, device=device)
    for x, y in _chunks(X_ND, Y_NE):
        for name, t in (("X_ND", x), ("Y_NE", y)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or inf values")
        sum_x_D += x.sum(0)
        sum_y_E += y.sum(0)
    mean_x_D = sum_x_D / n_rows if center else torch.zeros_like(sum_x_D)
    mean_y_E = sum_y_E / n_rows if center else torch.zeros_like(sum_y_E)

    gram_DD = torch.zeros(d_in, d_in, dtype=f64, device=device)
    cross_DE = torch.zeros(d_in, d_out, dtype=f64, device=device)
    for x, y in _chunks(X_ND, Y_NE):
        xc, yc = x - mean_x_D, y - mean_y_E
        gram_DD += xc.T @ xc
        cross_DE += xc.T @ yc
    trace = float(gram_DD.diagonal().sum())
    if trace == 0.0:
        raise ValueError("X_ND has no variance (all rows equal" + (")" if center else ", or all zero)"))
    lam = ridge * trace / d_in
    system_DD = gram_DD + lam * torch.eye(d_in, dtype=f64, device=device)
    chol_DD, info = torch.linalg.cholesky_ex(system_DD)
    if int(info) == 0 and ridge == 0:
        # Without a ridge, a dependent column can leave a pivot that is round-off, not zero: the factorisation
        # "succeeds" and W is enormous along that direction. A squared pivot below the float64 round-off of
        # the Gram (d_in * 1000 * eps relative to its largest diagonal) is singular.
        pivot = float(chol_DD.diagonal().min()) ** 2 / float(system_DD.diagonal().max())
        if pivot < d_in * 1e3 * torch.finfo(f64).eps:
            info = torch.tensor(1)
    if int(info) != 0:
        hint = (
            "X_ND is rank-deficient (a constant or linearly dependent column); set ridge > 0 (e.g. 1e-6)"
            if ridge == 0
            else f"X_ND's Gram matrix is numerically singular even with ridge={ridge}; raise the ridge"
        )
        raise ValueError(hint)
    W_DE = torch.cholesky_solve(cross_DE, chol_DD)
    b_E = mean_y_E - mean_x_D @ W_DE if center else torch.zeros(d_out, dtype=f64, device=device)
    fitted = LinearMap(W_DE=W_DE.float(), b_E=b_E.float(), metadata=dict(metadata or {}))
    quality = map_fit_quality(fitted, X_ND, Y_NE)
    fitted.metadata.update(
        {"n_rows": int(n_rows), "ridge": float(ridge), "center": bool(center), "train_fvu": quality["fvu"]}
    )
    return fitted


@torch.no_grad()
def map_fit_quality(m: LinearMap, X_ND: torch.Tensor, Y_NE: torch.Tensor) -> dict[str, float]:
    """How well ``m`` predicts ``Y_NE`` from ``X_ND`` (float64, in row chunks, on ``X_ND``'s device).

    Returns:
        ``fvu``: ``sum ||Y - m(X)||^2 / sum ||Y - mean Y||^2`` (``0`` for a perfect fit of constant rows,
        ``inf`` for an imperfect one); ``r2``: ``1 - fvu``; ``mean_cosine``: mean over rows of
        ``cos(m(X)_i, Y_i)``; ``n``: the row count.

    Raises:
        ValueError: On non-2-D input, no rows, unpaired rows, or widths other than ``m.d_in`` / ``m.d_out``.
    """
    _check_rows(X_ND, Y_NE)
    if X_ND.shape[1] != m.d_in:
        raise ValueError(f"X_ND has width {X_ND.shape[1]} but the map reads width {m.d_in}")
    if Y_NE.shape[1] != m.d_out:
        raise ValueError(f"Y_NE has width {Y_NE.shape[1]} but the map writes width {m.d_out}")
    n_rows = X_ND.shape[0]
    if n_rows == 0:
        raise ValueError("X_ND has no rows")
    device = X_ND.device
    W_DE = m.W_DE.to(device=device, dtype=torch.float64)
    b_E = m.b_E.to(device=device, dtype=torch.float64)
    sum_y_E = torch.zeros(m.d_out, dtype=torch.float64, device=device)
    for _, y in _chunks(X_ND, Y_NE):
        sum_y_E += y.sum(0)
    mean_y_E = sum_y_E / n_rows
    sse = sst = cos_sum = 0.0
    for x, y in _chunks(X_ND, Y_NE):
        pred = x @ W_DE + b_E
        sse += float((y - pred).square().sum())
        sst += float((y - mean_y_E).square().sum())
        cos_sum += float(torch.nn.functional.cosine_similarity(pred, y, dim=1, eps=1e-12).sum())
    fvu = sse / sst if sst > 0 else (0.0 if sse == 0 else math.inf)
    return {"fvu": fvu, "r2": 1.0 - fvu, "mean_cosine": cos_sum / n_rows, "n": n_rows}
