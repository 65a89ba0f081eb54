"""The eval side of a transfer job: the columns on model B (A's artifacts vs B's own) and their deltas.

:func:`vectors_for_columns` fixes the vector artifacts each owner's columns read (A's carried into B's space
when a map is used); :func:`evaluate_columns` runs one eval job per column on B, unsteered first, and adds
each column's paired deltas against unsteered (:mod:`sae_refusal.transfer.compare`).
"""

from __future__ import annotations

import gc
import json
import re
from pathlib import Path
from typing import Any

from sae_refusal.transfer.config import ColumnSpec, TransferJobConfig

__all__ = ["check_columns", "evaluate_columns", "vectors_for_columns"]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_")[:80] or "column"


def vectors_for_columns(
    cfg: TransferJobConfig,
    a: Any,
    b: Any,
    analysis_a: Any,
    analysis_b: Any,
    seed_name: str,
    a_to_b: Any,
    out: Path,
) -> dict[str, Path]:
    """The vector artifacts the columns read, by owner (A's carried into B's space when mapped)."""
    from sae_refusal.features.vectors import SteeringVectors

    found: dict[str, Path] = {}
    if cfg.source.vectors:
        given = Path(cfg.source.vectors)
        if not given.is_dir():
            raise FileNotFoundError(f"source.vectors: {given} is not a folder")
        if a_to_b is not None:
            if not (given / "vectors.json").is_file():
                raise ValueError(
                    f"source.vectors: {given} must be a vectors.json artifact when a map is used"
                )
            a_vectors = SteeringVectors.load(given)
        else:
            found["source"] = given
    else:
        a_vectors = analysis_a.vectors[seed_name]
        if a_to_b is None:
            found["source"] = a_vectors.save(out / "vectors" / "source")
    if "source" not in found:
        mapped = SteeringVectors(
            class_names=a_vectors.class_names,
            caa_CD=a_to_b.direction(a_vectors.caa_CD.float()),
            sas_CF=None,
            sas_decoded_CD=None
            if a_vectors.sas_decoded_CD is None
            else a_to_b.direction(a_vectors.sas_decoded_CD.float()),
            metadata={
                **a_vectors.metadata,
                "layer": b.layer,
                "d_model": b.d_model,
                "carried_by_map": "maps/a_to_b",
                "model_fingerprint": a.fingerprint,
            },
        )
        found["source"] = mapped.save(out / "vectors" / "source_mapped")
    if cfg.target.vectors:
        found["target"] = Path(cfg.target.vectors)
        if not found["target"].is_dir():
            raise FileNotFoundError(f"target.vectors: {found['target']} is not a folder")
    else:
        found["target"] = analysis_b.vectors[seed_name].save(out / "vectors" / "target")
    return found


def _intervention(
    cfg: TransferJobConfig,
    column: ColumnSpec,
    index: int,
    vectors: dict[str, Path],
    sae_folder: Path,
    mapped: bool,
) -> Any:
    from sae_refusal.eval.interventions import InterventionConfig

    key = f"eval.columns[{index}]"
    side = cfg.source if column.owner == "source" else cfg.target
    if mapped and column.kind in ("latent", "gate") and column.owner == "source":
        raise ValueError(
            f"{key}: a {column.kind} column carries A's artifact across a linear map, which is not supported "
            "(use kind residual with space caa or sas_decoded)"
        )
    name = column.name or (
        f"{side.label} {column.kind} {column.gate}"
        if column.kind == "gate"
        else f"{side.label} {column.kind} {column.space} {column.category} {column.alpha:+g}"
    )
    gate = None
    if column.kind == "gate":
        by_name = {Path(g).name: g for g in side.gates}
        if column.gate not in by_name:
            raise ValueError(
                f"{key}: gate {column.gate!r} is not among {column.owner}.gates {sorted(by_name)}"
            )
        gate = by_name[column.gate]
    try:
        return InterventionConfig(
            kind=column.kind,
            name=name,
            vectors=None if column.kind == "gate" else str(vectors[column.owner]),
            space=column.space,
            category=column.category,
            alpha=column.alpha,
            layer=None,
            positions=column.positions,
            unit_norm=column.unit_norm,
            sae=str(sae_folder) if column.kind == "latent" else None,  # a gate reads its own recorded SAE
            gate=gate,
            allow_other_model=column.owner == "source",
        )
    except ValueError as err:
        raise ValueError(f"{key}: {err}") from err


def check_columns(cfg: TransferJobConfig) -> None:
    """Refuse a bad column or a missing artifact folder before any model runs (naming the config key).

    Raises:
        FileNotFoundError: If a ``gates`` or ``vectors`` folder of either side does not exist.
        ValueError: If a column names an unknown gate or a bad space, or needs what a map cannot carry.
    """
    for key, side in (("source", cfg.source), ("target", cfg.target)):
        for i, gate in enumerate(side.gates):
            if not Path(gate).is_dir():
                raise FileNotFoundError(
                    f"{key}.gates[{i}]: {gate} is not a folder (a gate saved by sae-refusal steer)"
                )
        if side.vectors and not Path(side.vectors).is_dir():
            raise FileNotFoundError(f"{key}.vectors: {side.vectors} is not a folder")
    if cfg.eval is None:
        return
    placeholders = {"source": Path("source-vectors"), "target": Path("target-vectors")}
    for i, column in enumerate(cfg.eval.columns):
        _intervention(cfg, column, i, placeholders, Path("source-sae"), cfg.map.kind != "none")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def evaluate_columns(
    cfg: TransferJobConfig, vectors: dict[str, Path], sae_folder: Path, mapped: bool, out: Path
) -> list[dict[str, Any]]:
    from sae_refusal.eval.interventions import InterventionConfig
    from sae_refusal.eval.job import EvalJobConfig, run_eval_job
    from sae_refusal.llm.loading import load_model_and_tokenizer
    from sae_refusal.transfer.compare import capability_deltas, refusal_deltas

    settings = cfg.eval
    if settings is None:
        return []
    planned = [InterventionConfig(kind="none", name=f"{cfg.target.label} unsteered")]
    owners = ["target"]
    for i, column in enumerate(settings.columns):
        planned.append(_intervention(cfg, column, i, vectors, sae_folder, mapped))
        owners.append(column.owner)
    results: list[dict[str, Any]] = []
    baseline: dict[str, Any] | None = None
    model, tokenizer = load_model_and_tokenizer(cfg.target.llm)  # once for every column
    try:
        for intervention, owner in zip(planned, owners, strict=True):
            folder = out / "eval" / _slug(intervention.label)
            job = EvalJobConfig(
                llm=cfg.target.llm,
                sets=settings.sets,
                intervention=intervention,
                generation=settings.generation,
                judges=settings.judges,
                capability=settings.capability,
                out_dir=str(folder),
                chat_template=cfg.data.cache.chat_template,
                system_prompt=cfg.data.cache.system_prompt,
                n_boot=cfg.n_boot,
                seed=cfg.seed,
            )
            print(f"[transfer] eval column {intervention.label!r} on {cfg.target.label}", flush=True)
            try:
                metrics = run_eval_job(job, preloaded=(model, tokenizer))
            except (ValueError, KeyError) as err:  # the column does not apply to B (e.g. its tokens)
                if baseline is None:
                    raise
                print(f"[transfer] column {intervention.label!r} skipped: {err}", flush=True)
                results.append({"name": intervention.label, "owner": owner, "skipped": str(err)})
                continue
            row: dict[str, Any] = {
                "name": intervention.label,
                "owner": owner,
                "kind": intervention.kind,
                "folder": str(folder),
                "judge": metrics["judges"]["primary"],
                "refusal": metrics["refusal"],
                "capability": metrics["capability"],
            }
            records = _read_jsonl(folder / "generations.jsonl")
            capability_records = _read_jsonl(folder / "capability.jsonl")
            if baseline is None:
                baseline = {"records": records, "capability": capability_records, "judge": row["judge"]}
            else:
                row["delta"] = {
                    "refusal": refusal_deltas(
                        records, baseline["records"], baseline["judge"], n_boot=cfg.n_boot, seed=cfg.seed
                    ),
                    "capability": capability_deltas(
                        capability_records, baseline["capability"], n_boot=cfg.n_boot, seed=cfg.seed
                    ),
                }
            results.append(row)
    finally:
        del model
        gc.collect()
    return results
