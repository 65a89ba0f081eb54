"""Per-category steering vectors: CAA in the residual stream, SAS in an SAE's latent space; their artifact.

Classes are integer codes: ``0`` = benign (B), ``c = 1..C`` = harmful category ``c`` (H_c); rows with a
negative code (ambiguous prompts) take part in nothing here.

* **CAA** (contrastive activation addition): ``v_a(c) = mean(a | H_c) - mean(a | B)``.
* **SAS** (sparse activation steering): mean sparse codes per set; a feature is *active* in a set when
  its mean there reaches ``tau`` (``mean >= tau``, as in the seed, which drops only values below ``tau``)
  and it fires at all (``mean > 0``, which matters only for ``tau = 0``: a feature that never fires in a
  set is not active there); inactive means are set to 0; features active in *both* the category mean and
  the benign mean are shared and removed from that category's vector (a feature active in the benign mean
  only stays, as a negative entry, in the vector of every category where it is inactive);
  ``v_z(c) = z_Hc - z_B`` on what is left; optionally only the ``top_k`` features with the largest
  ``|v_z|`` are kept. ``v_z`` mapped through the decoder
  (:meth:`SparseAutoencoder.decode_direction`) is a residual-space vector comparable with (and usable like)
  the CAA vector.

:class:`SteeringVectors` is the saved form: ``vectors.safetensors`` (``caa_CD``; ``sas_CF`` and
``sas_decoded_CD`` when an SAE was used; row ``c - 1`` belongs to category ``c``) and ``vectors.json`` (class
names, layer, model, ``model_fingerprint`` (weights and adapter), ``d_model``, SAE id and seed, ``tau``,
``top_k``, set sizes, and the ``epoch`` and ``global_step`` of the SAE weights the vectors came from, ``None``
when unknown), written atomically; local paths in it (model folder, adapter, the SAE's export) are written
relative to the artifact's folder and read back resolved (:func:`sae_refusal.provenance.relative_paths`).
Non-finite vectors are refused on save and on load (naming the file and
the tensor). Consumers (eval columns, ``sae-refusal generate``) compare :meth:`SteeringVectors.recorded` with
the model they steer (:func:`sae_refusal.provenance.provenance_mismatches`) and refuse an all-zero vector
(:func:`require_nonzero`) unless told to allow it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sae_refusal.atomic import AtomicFolder
from sae_refusal.errors import ArtifactError
from sae_refusal.provenance import relative_paths, resolve_paths
from sae_refusal.sae.files import non_finite_tensor

__all__ = [
    "SASResult",
    "SteeringVectors",
    "caa_vectors",
    "class_means",
    "require_nonzero",
    "sas_vectors",
]

VECTORS_FILE = "vectors.safetensors"
META_FILE = "vectors.json"


def require_nonzero(vector: torch.Tensor, what: str, allow: str) -> None:
    """Refuse an all-zero steering vector (a category without training rows gets one): it steers nothing.

    Args:
        vector: The vector about to steer.
        what: Names it in the message: the artifact, the category and the space.
        allow: The config key or flag that allows it on purpose.

    Raises:
        ArtifactError: If every entry is zero.
    """
    if not bool(torch.any(vector != 0)):
        raise ArtifactError(
            f"{what} is all zeros (a category without training rows gets one), so steering with it changes "
            f"nothing; choose another category or artifact, or set {allow} to run it anyway"
        )


def _check_rows(X_ND: torch.Tensor, y_N: torch.Tensor, n_classes: int, what: str) -> None:
    if X_ND.ndim != 2:
        raise ValueError(f"{what} must be 2-D (rows, width), got shape {tuple(X_ND.shape)}")
    if y_N.ndim != 1 or y_N.shape[0] != X_ND.shape[0]:
        raise ValueError(
            f"labels must be 1-D with one entry per row of {what}: {tuple(y_N.shape)} vs {X_ND.shape[0]}"
        )
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2 (benign + at least one category), got {n_classes}")
    if int(y_N.max()) >= n_classes:
        raise ValueError(f"label {int(y_N.max())} is out of range for n_classes={n_classes}")


def class_means(X_ND: torch.Tensor, y_N: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class means ``(n_classes, D)`` in float32 and row counts ``(n_classes,)``; empty classes are 0.

    Rows with a negative label are ignored.
    """
    _check_rows(X_ND, y_N, n_classes, "X_ND")
    keep = y_N >= 0
    X, y = X_ND[keep].float(), y_N[keep].long()
    sums_KD = torch.zeros(n_classes, X.shape[1], dtype=torch.float64, device=X.device)
    sums_KD.index_add_(0, y, X.double())
    counts_K = torch.bincount(y, minlength=n_classes)
    means_KD = sums_KD / counts_K.clamp_min(1)[:, None]
    return means_KD.float(), counts_K


def _require_benign(counts_K: torch.Tensor) -> None:
    if int(counts_K[0]) == 0:
        raise ValueError("no benign rows (label 0): the vectors are differences from the benign mean")


def caa_vectors(
    acts_ND: torch.Tensor, y_N: torch.Tensor, n_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """CAA vectors ``(n_classes - 1, D)``: row ``c - 1`` is ``mean(H_c) - mean(B)``; also the row counts.

    A category without rows gets a zero vector (its count says so).
    """
    means_KD, counts_K = class_means(acts_ND, y_N, n_classes)
    _require_benign(counts_K)
    vectors_CD = means_KD[1:] - means_KD[:1]
    vectors_CD[counts_K[1:] == 0] = 0.0
    return vectors_CD, counts_K


@dataclass(frozen=True)
class SASResult:
    """SAE-space steering vectors and how they were derived.

    Args:
        vectors_CF: ``v_z(c)`` per category (row ``c - 1``), zero outside the kept features.
        means_KF: Mean codes per class (row 0 benign) before thresholding.
        active_KF: Features whose class mean reaches ``tau`` (``>= tau``) and is above 0.
        shared_CF: Features removed because both the category and benign means have them active.
        counts_K: Rows per class.
        tau: The activity threshold used.
        top_k: Features kept per category (``None`` = all that survive).
    """

    vectors_CF: torch.Tensor
    means_KF: torch.Tensor
    active_KF: torch.Tensor
    shared_CF: torch.Tensor
    counts_K: torch.Tensor
    tau: float
    top_k: int | None

    def features(self, category: int) -> list[int]:
        """Feature indices with a non-zero entry in category ``category``'s vector (1-based category code)."""
        return torch.nonzero(self.vectors_CF[category - 1]).flatten().tolist()


def sas_vectors(
    latents_NF: torch.Tensor,
    y_N: torch.Tensor,
    n_classes: int,
    *,
    tau: float = 0.0,
    top_k: int | None = None,
    remove_shared: bool = True,
) -> SASResult:
    """SAS vectors from sparse codes (see the module docstring).

    Args:
        latents_NF: SAE codes of the rows (dense ``(N, F)``, non-negative).
        y_N: Class codes (0 benign, 1..C categories, negative = ignored).
        n_classes: ``C + 1``.
        tau: A feature is active in a set when its mean code there is ``>= tau`` and ``> 0`` (``tau = 0``:
            fires at all).
        top_k: Keep only the ``top_k`` features with the largest ``|v_z|`` per category.
        remove_shared: Drop features active in both the category mean and the benign mean.
    """
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    means_KF, counts_K = class_means(latents_NF, y_N, n_classes)
    _require_benign(counts_K)
    active_KF = (means_KF >= tau) & (means_KF > 0)
    kept_means_KF = torch.where(active_KF, means_KF, torch.zeros_like(means_KF))
    vectors_CF = kept_means_KF[1:] - kept_means_KF[:1]
    shared_CF = active_KF[1:] & active_KF[:1]
    if remove_shared:
        vectors_CF = vectors_CF.masked_fill(shared_CF, 0.0)
    if top_k is not None and top_k < vectors_CF.shape[1]:
        order_CF = vectors_CF.abs().argsort(dim=1, descending=True, stable=True)
        keep_CF = torch.zeros_like(vectors_CF, dtype=torch.bool).scatter_(1, order_CF[:, :top_k], True)
        vectors_CF = vectors_CF.masked_fill(~keep_CF, 0.0)
    vectors_CF[counts_K[1:] == 0] = 0.0
    return SASResult(vectors_CF, means_KF, active_KF, shared_CF, counts_K, float(tau), top_k)


@dataclass
class SteeringVectors:
    """Per-category steering vectors at one layer, as saved for the intervention code.

    Args:
        class_names: Names of classes ``0..C`` (``class_names[0]`` is benign).
        caa_CD: Residual-space CAA vectors (row ``c - 1`` for category ``c``).
        sas_CF: SAE-space SAS vectors, if an SAE was used.
        sas_decoded_CD: ``sas_CF`` mapped through the SAE decoder (raw residual space).
        metadata: JSON facts: model, layer, SAE path / seed / architecture, tau, top_k, set sizes, and the
            ``epoch`` / ``global_step`` of the SAE weights (``None`` when unknown, e.g. a plain export).
    """

    class_names: list[str]
    caa_CD: torch.Tensor
    sas_CF: torch.Tensor | None = None
    sas_decoded_CD: torch.Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n_categories = len(self.class_names) - 1
        for name in ("caa_CD", "sas_CF", "sas_decoded_CD"):
            tensor = getattr(self, name)
            if tensor is not None and (tensor.ndim != 2 or tensor.shape[0] != n_categories):
                raise ValueError(
                    f"{name} must have one row per category ({n_categories}), got shape {tuple(tensor.shape)}"
                )

    def vector(self, category: int | str, space: str = "caa") -> torch.Tensor:
        """One category's vector (code ``1..C`` or name); ``space``: ``caa``, ``sas`` or ``sas_decoded``."""
        index = self.class_names.index(category) if isinstance(category, str) else int(category)
        if not 1 <= index < len(self.class_names):
            raise ValueError(f"category {category!r} is not one of {self.class_names[1:]}")
        tensor = {"caa": self.caa_CD, "sas": self.sas_CF, "sas_decoded": self.sas_decoded_CD}.get(space)
        if tensor is None:
            raise ValueError(f"no {space!r} vectors in this artifact (spaces: caa, sas, sas_decoded)")
        return tensor[index - 1]

    def recorded(self) -> dict[str, Any]:
        """What the vectors were made on, as :func:`sae_refusal.provenance.provenance_mismatches` compares it:
        ``layer``, ``model``, ``model_fingerprint`` (``None`` in artifacts written before it was recorded) and
        ``d_model`` (the residual width of the CAA vectors)."""
        return {
            "layer": self.metadata.get("layer"),
            "model": self.metadata.get("model"),
            "model_fingerprint": self.metadata.get("model_fingerprint"),
            "d_model": self.metadata.get("d_model", int(self.caa_CD.shape[-1])),
        }

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``vectors.safetensors`` + ``vectors.json`` into ``folder`` atomically; returns the folder.

        Raises:
            ArtifactError: If a vector holds inf / nan (e.g. from an SAE with non-finite weights); nothing is
                written.
            TypeError: If the metadata is not JSON-serialisable; nothing is written.
        """
        tensors = {"caa_CD": self.caa_CD.detach().float().cpu().contiguous()}
        for name in ("sas_CF", "sas_decoded_CD"):
            tensor = getattr(self, name)
            if tensor is not None:
                tensors[name] = tensor.detach().float().cpu().contiguous()
        bad = non_finite_tensor(tensors)
        if bad is not None:
            raise ArtifactError(
                f"{Path(folder) / VECTORS_FILE}: tensor {bad!r} holds inf/nan; nothing written"
            )
        metadata = relative_paths(self.metadata, folder)  # names no path of this machine
        record = {"class_names": self.class_names, "tensors": sorted(tensors), "metadata": metadata}
        text = json.dumps(record, indent=2)  # fails before anything is written if metadata is not JSON
        with AtomicFolder(folder) as out:
            save_file(tensors, str(out.tmp / VECTORS_FILE), metadata={"format": "sae_refusal.vectors/1"})
            (out.tmp / META_FILE).write_text(text)
            return out.commit()

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> SteeringVectors:
        """Read an artifact written by :meth:`save`.

        Raises:
            FileNotFoundError: If ``vectors.json`` or ``vectors.safetensors`` is missing.
            ArtifactError: If a file does not parse, or a vector holds inf / nan (naming the file and tensor).
        """
        from sae_refusal.jsonfile import read_json_object

        folder = Path(folder)
        meta_path, tensor_path = folder / META_FILE, folder / VECTORS_FILE
        for path in (meta_path, tensor_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist: not a steering-vector artifact folder")
        try:
            record = read_json_object(meta_path)
            tensors = load_file(str(tensor_path))
        except Exception as err:  # bad JSON, or safetensors' own errors on an empty / garbled file
            raise ArtifactError(f"{folder}: not a readable steering-vector artifact ({err})") from err
        bad = non_finite_tensor(tensors)
        if bad is not None:
            raise ArtifactError(
                f"{tensor_path}: tensor {bad!r} holds inf/nan; recompute the vectors (sae-refusal features)"
            )
        if "caa_CD" not in tensors or "class_names" not in record:
            raise ArtifactError(f"{folder}: not a steering-vector artifact (no caa_CD tensor or class_names)")
        return cls(
            class_names=list(record["class_names"]),
            caa_CD=tensors["caa_CD"],
            sas_CF=tensors.get("sas_CF"),
            sas_decoded_CD=tensors.get("sas_decoded_CD"),
            metadata=resolve_paths(dict(record.get("metadata", {})), folder),
        )
