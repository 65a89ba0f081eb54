"""``sae-refusal transfer``: model A's SAE, steering vectors and gates applied to model B, beside A.

Model A (``source``) brings its artifacts: SAE export(s), optionally a steering-vector artifact and tuned
gates (``sae-refusal steer``). Model B (``target``) is any HF causal LM; it may bring its own vectors, gates
and SAE for comparison. Stages (each prints its time; caching and generation print prompts/s and an ETA):

1. **Activations**: both models' last-token residuals at the layer, for the same prompt set and the same
   split manifest (:class:`~sae_refusal.activations.datamodule.ActivationDataModule`, one cache per model).
2. **Widths**: equal widths are used as they are. Different widths are an error naming both, unless
   ``map.kind: least_squares``: then ``M_AB`` (A -> B) and ``M_BA`` are fitted by least squares on the
   paired train rows (:mod:`sae_refusal.transfer.linear_map`), saved under ``maps/``, scored on the test
   rows, and A's SAE reads B through them (:class:`~sae_refusal.transfer.mapped_sae.MappedSAE`). A map can
   also be asked for between models of the same width.
3. **SAE quality** on held-out rows: FVU, L0 and dead share of A's SAE on A and on B (and of B's own SAE on
   B when given); spliced next-token loss / KL on each model (:mod:`sae_refusal.sae.splice`).
4. **Features**: the feature analysis (:func:`~sae_refusal.features.analysis.analyze_features`) of A's rows
   with A's SAE, and of B's rows with A's SAE (B's codes in A's latent space). Compared: per-category cosine
   of B's CAA vector with A's, and of A's decoded SAS vector with B's CAA vector; overlap (Jaccard) of the
   SAS features and of the L1 heads' top-K features; A's heads scored on B's codes; cluster metrics of B's
   codes (all latents and A's selected latents) beside the label-permutation baseline.
5. **Evaluation** (optional ``eval``): one eval job (:func:`~sae_refusal.eval.job.run_eval_job`) per column
   on B, unsteered first; each column's refusal / over-refusal / capability delta against unsteered is a
   paired bootstrap over the same items (:mod:`sae_refusal.transfer.compare`). A column that cannot apply to
   B (e.g. a refusal-token gate on a model without those tokens) is recorded as skipped with the reason.
6. **Report**: ``metrics.json`` (config, both models' fingerprints, every number), ``report.md``,
   TensorBoard scalars under ``tensorboard/``, the feature analyses (``features/{source,target}/``), the
   vector artifacts the columns used (``vectors/``) and each column's eval folder (``eval/``).

Everything is written into a temporary sibling of ``out_dir`` and renamed at the end (paths recorded inside
are rewritten to the final folder), so a failure leaves nothing half-written; an existing ``out_dir`` is
refused before anything runs.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sae_refusal.progress import Stage
from sae_refusal.transfer.config import (
    ColumnSpec,
    MapSettings,
    ModelSide,
    SpliceSettings,
    TransferData,
    TransferEvalSettings,
    TransferJobConfig,
)
from sae_refusal.transfer.linear_map import LinearMap

__all__ = [
    "ColumnSpec",
    "MapSettings",
    "ModelSide",
    "SpliceSettings",
    "TransferData",
    "TransferEvalSettings",
    "TransferJobConfig",
    "run_transfer_job",
]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ helpers
@dataclass
class _Side:
    """One model's rows and facts, once loaded."""

    spec: ModelSide
    key: str  # "source" | "target"
    layer: int
    splits: dict[str, Any]
    d_model: int
    fingerprint: dict[str, Any]
    texts: dict[str, str]


def _load_side(spec: ModelSide, key: str, data: TransferData, timings: dict[str, float]) -> _Side:
    from sae_refusal.activations.datamodule import ActivationDataModule
    from sae_refusal.llm.loading import model_fingerprint

    layer = data.layer if spec.layer is None else spec.layer
    cache = dataclasses.replace(data.cache, layers=[layer])
    module = ActivationDataModule(
        llm=spec.llm, prompts=data.prompts, split=data.split, cache=cache, layer=layer
    )
    with Stage("transfer", f"activations of {spec.label} ({key}.llm={spec.llm.name_or_path})", timings):
        try:
            module.setup("fit")
        except ValueError as err:
            raise ValueError(f"{key}: {err}") from err
        prompts = module.load_prompts()
    return _Side(
        spec=spec,
        key=key,
        layer=module.served_layer,
        splits=dict(module.splits),
        d_model=module.d_model,
        fingerprint=dict(model_fingerprint(spec.llm)),
        texts={p.id: p.text for p in prompts},
    )


def _check_sae_provenance(spec: ModelSide, key: str, data: TransferData) -> None:
    """Refuse ``spec.sae`` exports recorded for another layer or model than the side reads, before any
    activation is computed (unless ``{key}.allow_other_model``).

    Raises:
        ArtifactError: Naming ``{key}.sae``, the layer key (``data.layer`` or ``{key}.layer``), ``{key}.llm``
            and both values.
    """
    if not spec.sae or spec.allow_other_model:
        return
    from sae_refusal.activations.datamodule import ActivationDataModule
    from sae_refusal.sae.formats import sae_metadata
    from sae_refusal.sae.loading import find_sae_exports
    from sae_refusal.sae.provenance import check_exports_match_data

    layer = data.layer if spec.layer is None else spec.layer
    module = ActivationDataModule(
        llm=spec.llm, cache=dataclasses.replace(data.cache, layers=[layer]), layer=layer
    )
    try:
        folders = find_sae_exports(spec.sae)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{key}.sae: {err}") from err
    check_exports_match_data(
        {name: sae_metadata(folder) for name, folder in folders.items()},
        module,
        flag=f"{key}.sae",
        keys={"layer": "data.layer" if spec.layer is None else f"{key}.layer", "model": f"{key}.llm"},
        allow=f"{key}.allow_other_model: true",
    )


def _load_saes(
    path: str, key: str, width: int, model_label: str, *, verify: bool = True
) -> tuple[dict[str, Any], dict[str, Path]]:
    from sae_refusal.sae.loading import find_sae_exports, load_sae

    try:
        folders = find_sae_exports(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{key}: {err}") from err
    saes = {name: load_sae(folder, verify=verify) for name, folder in folders.items()}
    wrong = {name: sae.d_model for name, sae in saes.items() if sae.d_model != width}
    if wrong:
        raise ValueError(f"{key}: SAE width {wrong} != the residual width {width} of model {model_label}")
    return saes, folders


def _release_memory() -> None:
    """Return the memory of a model the caller has just deleted (its last reference) to the allocator."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ stages
def _fit_maps(
    cfg: TransferJobConfig, a: _Side, b: _Side, out: Path
) -> tuple[LinearMap, LinearMap, dict[str, Any]]:
    from sae_refusal.transfer.linear_map import fit_linear_map, map_fit_quality

    fit_a, fit_b = a.splits[cfg.map.fit_split].acts_ND.float(), b.splits[cfg.map.fit_split].acts_ND.float()
    test_a, test_b = a.splits["test"].acts_ND.float(), b.splits["test"].acts_ND.float()
    common = {
        "layer": {"source": a.layer, "target": b.layer},
        "fit_split": cfg.map.fit_split,
        "source_fingerprint": a.fingerprint,
        "target_fingerprint": b.fingerprint,
    }
    maps = {}
    record: dict[str, Any] = {"kind": cfg.map.kind, "ridge": cfg.map.ridge, "fit_split": cfg.map.fit_split}
    for name, (x, y, tx, ty, direction) in {
        "a_to_b": (fit_a, fit_b, test_a, test_b, f"{a.spec.label} -> {b.spec.label}"),
        "b_to_a": (fit_b, fit_a, test_b, test_a, f"{b.spec.label} -> {a.spec.label}"),
    }.items():
        fitted = fit_linear_map(x, y, ridge=cfg.map.ridge, metadata={**common, "direction": direction})
        quality = map_fit_quality(fitted, tx, ty)
        fitted.metadata["test"] = quality
        fitted.save(out / "maps" / name)
        maps[name] = fitted
        record[name] = {
            "direction": direction,
            "test": quality,
            "train_fvu": fitted.metadata.get("train_fvu"),
        }
        print(f"[transfer] map {direction}: test R^2 {quality['r2']:.4f} (n={int(quality['n'])})", flush=True)
    return maps["a_to_b"], maps["b_to_a"], record


def _splice(cfg: TransferJobConfig, side: _Side, saes: dict[str, Any]) -> dict[str, Any]:
    from sae_refusal.llm.layers import input_device
    from sae_refusal.llm.loading import load_model_and_tokenizer
    from sae_refusal.sae.splice import splice_metrics_per_sae

    ids = side.splits["test"].ids[: cfg.splice.n_prompts]
    texts = [side.texts[i] for i in ids]
    model, tokenizer = load_model_and_tokenizer(side.spec.llm)
    model.eval()
    device = input_device(model)
    try:
        metrics = splice_metrics_per_sae(
            model,
            tokenizer,
            texts,
            side.layer,
            {name: sae.to(device) for name, sae in saes.items()},
            batch_size=cfg.splice.batch_size,
            max_length=cfg.splice.max_length,
            chat_template=cfg.data.cache.chat_template,
            system_prompt=cfg.data.cache.system_prompt,
        )
    finally:
        for sae in saes.values():
            sae.cpu()
        del model  # the last reference: the next model loads into its memory
        _release_memory()
    return {name: {**m.to_dict(), "n_prompts": len(texts)} for name, m in metrics.items()}


def _rewrite_paths(folder: Path, old: str, new: str) -> None:
    """Replace the temporary folder's path by the final one in every JSON / Markdown file written."""
    for path in folder.rglob("*"):
        if path.suffix in (".json", ".jsonl", ".md") and path.is_file():
            text = path.read_text()
            if old in text:
                path.write_text(text.replace(old, new))


def run_transfer_job(cfg: TransferJobConfig) -> dict[str, Any]:
    """Run the job (see the module notes); returns its metrics (also in ``metrics.json``).

    Raises:
        FolderClaimedError: If ``out_dir`` exists or another job is writing it (naming it).
        ValueError: On a width mismatch without a map (naming both models and widths), or a bad artifact
            (naming its config key).
    """
    from sae_refusal.atomic import FolderClaim

    with FolderClaim(cfg.out_dir, key="out_dir"):  # owned from start to commit: a second job fails at once
        return _run_transfer_job(cfg)


def _run_transfer_job(cfg: TransferJobConfig) -> dict[str, Any]:
    from sae_refusal.atomic import AtomicFolder
    from sae_refusal.llm.hashing import file_sha256
    from sae_refusal.transfer.columns import check_columns, evaluate_columns, vectors_for_columns
    from sae_refusal.transfer.compare import sae_quality
    from sae_refusal.transfer.features import compare_features
    from sae_refusal.transfer.mapped_sae import MappedSAE
    from sae_refusal.transfer.report import headline, write_report

    out_dir = Path(cfg.out_dir)
    check_columns(cfg)
    if cfg.eval is not None:  # a bad set spec fails here, before any model loads
        from sae_refusal.steer.sets import build_steer_sets

        build_steer_sets(cfg.eval.sets)
    _check_sae_provenance(cfg.source, "source", cfg.data)
    _check_sae_provenance(cfg.target, "target", cfg.data)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    a = _load_side(cfg.source, "source", cfg.data, timings)
    b = _load_side(cfg.target, "target", cfg.data, timings)
    for split in ("train", "val", "test"):
        if a.splits[split].ids != b.splits[split].ids:
            raise ValueError(
                f"the {split} split holds other prompts for the two models (data config differs?)"
            )
    if a.d_model != b.d_model and cfg.map.kind == "none":
        raise ValueError(
            f"map.kind: model A (source.llm={a.spec.llm.name_or_path!r}) has width {a.d_model}, model B "
            f"(target.llm={b.spec.llm.name_or_path!r}) has width {b.d_model}; A's SAE and vectors cannot "
            "read B as they are. Set map.kind: least_squares to fit a linear map between them on paired "
            "prompts"
        )
    saes_a, folders = _load_saes(
        str(cfg.source.sae), "source.sae", a.d_model, f"A ({a.spec.label})", verify=cfg.source.verify_sae
    )
    saes_b_own: dict[str, Any] = {}
    if cfg.target.sae:
        saes_b_own, _ = _load_saes(
            cfg.target.sae, "target.sae", b.d_model, f"B ({b.spec.label})", verify=cfg.target.verify_sae
        )
    seed_name = (cfg.eval.sae_seed if cfg.eval else None) or next(iter(saes_a))
    if seed_name not in saes_a:
        raise ValueError(f"eval.sae_seed: {seed_name!r} is not among source.sae's exports {sorted(saes_a)}")
    with AtomicFolder(out_dir, replace=False) as atomic:
        out = atomic.tmp
        a_to_b: LinearMap | None = None
        b_to_a: LinearMap | None = None
        map_record: dict[str, Any] = {"kind": "none"}
        if cfg.map.kind == "least_squares":
            with Stage("transfer", "linear maps", timings):
                a_to_b, b_to_a, map_record = _fit_maps(cfg, a, b, out)
        saes_on_b: dict[str, Any] = dict(saes_a)
        if a_to_b is not None and b_to_a is not None:
            saes_on_b = {name: MappedSAE(sae, b_to_a, a_to_b) for name, sae in saes_a.items()}
        with Stage("transfer", "SAE quality", timings):
            quality: dict[str, Any] = {
                name: {
                    "a_on_a": sae_quality(sae, a.splits["test"].acts_ND),
                    "a_on_b": sae_quality(saes_on_b[name], b.splits["test"].acts_ND),
                }
                for name, sae in saes_a.items()
            }
            for name, sae in saes_b_own.items():
                quality.setdefault(name, {})["b_own_on_b"] = sae_quality(sae, b.splits["test"].acts_ND)
        splice: dict[str, Any] = {}
        if cfg.splice.n_prompts:
            with Stage(
                "transfer", f"splice metrics ({cfg.splice.n_prompts} test prompts per model)", timings
            ):
                splice["a_on_a"] = _splice(cfg, a, saes_a)
                splice["a_on_b"] = _splice(cfg, b, saes_on_b)
                if saes_b_own:
                    splice["b_own_on_b"] = _splice(cfg, b, saes_b_own)
        with Stage("transfer", "feature analyses and comparisons", timings):
            features, analysis_a, analysis_b = compare_features(
                cfg, a, b, saes_a, saes_on_b, a_to_b, folders, out
            )
        vectors = vectors_for_columns(cfg, a, b, analysis_a, analysis_b, seed_name, a_to_b, out)
        columns: list[dict[str, Any]] = []
        if cfg.eval is not None:
            with Stage("transfer", f"eval on {b.spec.label} ({1 + len(cfg.eval.columns)} columns)", timings):
                columns = evaluate_columns(cfg, vectors, folders[seed_name], a_to_b is not None, out)
        metrics: dict[str, Any] = {
            "source": {
                "label": a.spec.label,
                "llm": asdict(a.spec.llm),
                "fingerprint": a.fingerprint,
                "layer": a.layer,
                "d_model": a.d_model,
            },
            "target": {
                "label": b.spec.label,
                "llm": asdict(b.spec.llm),
                "fingerprint": b.fingerprint,
                "layer": b.layer,
                "d_model": b.d_model,
            },
            "sae": {
                "paths": {k: str(v) for k, v in folders.items()},
                "sha256": {
                    k: {f.name: file_sha256(f) for f in sorted(v.iterdir()) if f.is_file()}
                    for k, v in folders.items()
                },
                "eval_seed": seed_name,
            },
            "n_rows": {s: len(a.splits[s].ids) for s in ("train", "val", "test")},
            "map": map_record,
            "sae_quality": quality,
            "splice": splice,
            "features": features,
            "vectors": {k: str(v) for k, v in vectors.items()},
            "eval": columns,
            "config": json.loads(json.dumps(asdict(cfg), default=str)),
        }
        with Stage("transfer", "report", timings):
            metrics["timings"] = {**timings, "total": round(time.perf_counter() - start, 2)}
            write_report(out, metrics)
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
            _rewrite_paths(out, str(out), str(out_dir))
        atomic.commit()
    metrics = json.loads((out_dir / "metrics.json").read_text())
    print(headline(metrics, out_dir), flush=True)
    return metrics
