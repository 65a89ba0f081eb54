"""SAE exports and SAE checkpoints checked against the activations they are about to read.

An SAE reads one model's residual stream at one layer and width. Its export records them in ``cfg.json``
``metadata`` (``layer``, ``model``, ``model_fingerprint``: weights and adapter), its Lightning checkpoint
under :data:`CHECKPOINT_KEY` (written by :class:`~sae_refusal.sae.module.SAEModule`; its width is also the
checkpoint's ``d_model`` hyperparameter). Evaluating or analysing it on what another ``data`` section serves
gives numbers for the wrong pairing (a layer-2 SAE on layer-1 activations has FVU near 2), so the consumers
(``sae-refusal features``, ``validate|test|predict|fit --ckpt_path``) refuse it here, naming ``data.layer`` /
``data.llm`` and both values. The comparison itself is :func:`sae_refusal.provenance.provenance_mismatches`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from sae_refusal.errors import ArtifactError
from sae_refusal.provenance import provenance_mismatches

log = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_KEY",
    "DATA_KEYS",
    "check_checkpoint_matches_data",
    "check_exports_match_data",
    "served_by",
]

#: Key of a Lightning checkpoint holding what the SAEs were trained on (``layer``, ``d_model``, ``model``,
#: ``model_fingerprint``).
CHECKPOINT_KEY = "sae_refusal_data"
#: The config keys of a fit config's ``data`` section that serve each fact.
DATA_KEYS = {"layer": "data.layer", "model": "data.llm"}


def served_by(datamodule: Any) -> dict[str, Any]:
    """The facts a data module serves (``model_fingerprint`` a callable: weights are hashed only if needed).

    Args:
        datamodule: An :class:`~sae_refusal.activations.datamodule.ActivationDataModule` (``served_layer``,
            ``llm`` and, when compared, ``d_model``).
    """
    from sae_refusal.llm.loading import model_fingerprint

    llm = datamodule.llm
    served: dict[str, Any] = {
        "layer": datamodule.served_layer,
        "model": getattr(llm, "name_or_path", None),
        "model_fingerprint": lambda: dict(model_fingerprint(llm)),
        "d_model": lambda: getattr(datamodule, "d_model", None),
    }
    return served


def check_exports_match_data(
    metadata: Mapping[str, Mapping[str, Any]],
    datamodule: Any,
    *,
    flag: str = "--sae_dir",
    keys: Mapping[str, str] = DATA_KEYS,
    allow: str = "--allow_other_model",
) -> None:
    """Refuse SAE exports trained at another layer or on another model than the data module serves.

    The model is compared by weights fingerprint (weights content hash or hub revision, adapter,
    quantization) when the export records one, else by ``name_or_path``; a foreign SAE that names no model
    (sparsify) is checked by layer only. An export without a recorded layer (nor a hookpoint that maps to
    one) is refused too.

    Args:
        metadata: Each export's metadata (:func:`sae_refusal.sae.formats.sae_metadata`), by export name.
        datamodule: The data module the exports are analysed with.
        flag: The flag or config key that named the exports.
        keys: The keys serving ``layer`` and ``model`` (``data.layer``, ``data.llm``).
        allow: The flag or setting that allows a mismatch on purpose.

    Raises:
        ArtifactError: Naming each export, what it records and what ``keys`` serve.
    """
    served = {k: v for k, v in served_by(datamodule).items() if k != "d_model"}
    problems = []
    for name, meta in metadata.items():
        if meta.get("layer") is None:
            problems.append(
                f"{name} records no layer (nor a hookpoint naming one), {keys['layer']} serves "
                f"{served['layer']}"
            )
        problems += [f"{name} was {p}" for p in provenance_mismatches(meta, served, keys, made="trained")]
    if problems:
        raise ArtifactError(
            f"{flag}: {'; '.join(problems)}. Use the run's own config, or {allow} to use an SAE on another "
            "model's or layer's activations on purpose"
        )


def check_checkpoint_matches_data(
    checkpoint: Mapping[str, Any], datamodule: Any, ckpt: Any, *, warn: bool = True
) -> None:
    """Refuse a checkpoint of SAEs trained on another layer, model or width than ``datamodule`` serves.

    Args:
        checkpoint: The loaded checkpoint (its :data:`CHECKPOINT_KEY` record and ``d_model``
            hyperparameter).
        datamodule: The data module the checkpoint is about to be evaluated (or resumed) on.
        ckpt: The checkpoint's path, named in messages.
        warn: Warn when the checkpoint predates the record (only its width can be checked then).

    Raises:
        ArtifactError: Naming ``--ckpt_path``, each differing fact with both values and the ``data`` key
            serving it.
    """
    record = checkpoint.get(CHECKPOINT_KEY)
    recorded = dict(record) if isinstance(record, Mapping) else {}
    hparams = checkpoint.get("hyper_parameters") or {}
    if recorded.get("d_model") is None and hparams.get("d_model") is not None:
        recorded["d_model"] = hparams["d_model"]
    problems = provenance_mismatches(recorded, served_by(datamodule), DATA_KEYS, made="trained")
    if problems:
        raise ArtifactError(
            f"--ckpt_path {ckpt}: the checkpoint's SAEs were {'; and '.join(problems)}. Evaluate it with the "
            "run's own data section (its saved config.yaml beside the checkpoints folder)"
        )
    if warn and record is None:
        log.warning(
            "--ckpt_path %s: the checkpoint records no layer or model (written before they were kept); only "
            "its width was checked against the data section",
            ckpt,
        )
