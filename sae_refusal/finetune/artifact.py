"""Write the small, transferable refusal-token artifact: added tokens, their embedding rows, the LoRA adapter.

The format and its reader live one row down, in :mod:`sae_refusal.llm.artifact` (loading a model with its
adapter needs nothing from ``finetune``); this module only writes: :func:`save_refusal_artifact` after
training, :func:`write_respond_bias` after calibration. Layout (see :mod:`sae_refusal.llm.artifact`)::

    artifact.json               format version, base-model fingerprint, added tokens and ids, vocabulary,
                                tokenizer/embedding sizes, tied or not, LoRA or not, size + sha256 per file
                                [, respond_bias + calibration: a decision threshold chosen after training]
    token_rows.safetensors      token_ids, input_embedding_rows (n_new, d_model)
                                [, output_embedding_rows (n_new, d_model) when untied], in the model dtype
    adapter/                    only for a peft model: adapter_config.json + adapter_model.safetensors

The rows are those of the *base layer* (what the adapter was trained on top of). Under LoRA the recipe trains
the new rows with ``LoraConfig(trainable_token_indices=...)`` (see :mod:`sae_refusal.finetune.lora`), which
keeps the trained rows inside the adapter (a few KB). Without a peft model only the rows are stored: that
reproduces a model in which only the new rows were trained. An adapter that trains whole embedding matrices
(``modules_to_save``) is refused: it would store the full ``vocab x d_model`` matrices.

A calibrated artifact also records a ``respond_bias`` (:func:`write_respond_bias`, chosen on a calibration
split by :func:`~sae_refusal.eval.calibration.choose_respond_bias`) and how it was chosen. Applying it
puts the bias in the model's ``generation_config.sequence_bias``, so ``generate`` and the refusal report
(:func:`~sae_refusal.eval.refusal_tokens.evaluate_refusal_tokens`) both use it.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sae_refusal.atomic import AtomicFolder
from sae_refusal.llm.artifact import (
    ADAPTER_FOLDER,
    ARTIFACT_FILE,
    ARTIFACT_FORMAT,
    ARTIFACT_FORMAT_VERSION,
    ROWS_FILE,
    RefusalArtifactError,
    _is_peft_model,
    read_refusal_artifact,
    verify_artifact_files,
)
from sae_refusal.llm.hashing import file_sha256
from sae_refusal.llm.layers import base_layer, base_weight, embeddings_tied
from sae_refusal.llm.refusal_tokens import RefusalVocabulary, _single_token_id

__all__ = [
    "MAX_FILE_BYTES",
    "save_refusal_artifact",
    "write_respond_bias",
]

#: Files above this size trigger a warning when saving (the GPU machines return at most 16 MiB per file).
MAX_FILE_BYTES = 16 * 2**20

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _describe_files(root: Path) -> dict[str, dict[str, Any]]:
    return {
        path.relative_to(root).as_posix(): {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != ARTIFACT_FILE
    }


def _check_adapter(model: Any) -> str:
    """The single adapter's name; refuses merged adapters and fully trained embedding matrices."""
    names = list(model.peft_config)
    if len(names) != 1:
        raise RefusalArtifactError(
            f"lora: the model carries {len(names)} adapters {names}; expected exactly one"
        )
    name = names[0]
    config = model.peft_config[name]
    base = model.get_base_model()
    embedding_names = {
        module_name
        for module_name, module in base.named_modules()
        if module_name
        and any(
            base_layer(module) is base_layer(candidate)
            for candidate in (base.get_input_embeddings(), base.get_output_embeddings())
            if candidate is not None
        )
    }
    full = [
        target
        for target in (getattr(config, "modules_to_save", None) or [])
        if any(n == target or n.endswith("." + target) for n in embedding_names)
    ]
    if full:
        raise RefusalArtifactError(
            f"lora: the adapter trains whole embedding matrices (modules_to_save={full}); the artifact would "
            "hold the full vocab x d_model matrices. Train the new rows with "
            "LoraConfig(trainable_token_indices=...) (sae_refusal.finetune.lora.wrap_with_lora does) or save "
            "the merged model instead"
        )
    if any(getattr(module, "merged", False) for module in base.modules()):
        raise RefusalArtifactError(
            "lora: the adapter is merged into the weights; save the artifact before merge_and_unload"
        )
    return str(name)


def _resolve_dtype(adapter_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    if adapter_dtype == "auto":
        return model_dtype if model_dtype in _DTYPES.values() else torch.float32
    if adapter_dtype not in _DTYPES:
        raise ValueError(
            f"adapter_dtype: unknown value {adapter_dtype!r}; expected 'auto' or one of {tuple(_DTYPES)}"
        )
    return _DTYPES[adapter_dtype]


def _cast_safetensors(path: Path, dtype: torch.dtype) -> None:
    """Cast the floating LoRA tensors of a safetensors file; trainable token rows keep their dtype (tiny)."""
    tensors = load_file(str(path))

    def castable(key: str, tensor: torch.Tensor) -> bool:
        return tensor.is_floating_point() and tensor.dtype != dtype and "trainable_tokens" not in key

    if not any(castable(k, t) for k, t in tensors.items()):
        return
    cast = {k: (t.to(dtype) if castable(k, t) else t).contiguous() for k, t in tensors.items()}
    save_file(cast, str(path), metadata={"format": "pt"})


def save_refusal_artifact(
    model: Any,
    tokenizer: Any,
    vocab: RefusalVocabulary,
    added: Sequence[str],
    folder: str | Path,
    *,
    base: Mapping[str, str],
    adapter_dtype: str = "auto",
) -> Path:
    """Write the refusal-token artifact of a fine-tuned model, atomically.

    Args:
        model: The fine-tuned model: a ``peft.PeftModel`` (adapter unmerged) or a plain causal LM whose only
            change from the base is the new token rows.
        tokenizer: Its tokenizer, with the refusal tokens added.
        vocab: The refusal-token vocabulary.
        added: The strings :func:`~sae_refusal.finetune.tokens.add_refusal_tokens` returned, in order.
        folder: Artifact folder (replaced if it exists).
        base: Fingerprint of the base model (:func:`~sae_refusal.llm.model_fingerprint` of its config).
        adapter_dtype: dtype of the stored adapter tensors: ``auto`` (the model's dtype, e.g. bfloat16 when
            trained in bf16; float32 for fp32 models, but bfloat16 with a warning when a float32 adapter file
            would exceed :data:`MAX_FILE_BYTES`), ``float32``, ``bfloat16`` or ``float16``.

    Returns:
        The artifact folder.

    Raises:
        RefusalArtifactError: If the adapter trains whole embedding matrices, is merged, or there are
            several adapters; if the embeddings were not resized to the tokenizer.
        RefusalTokenError: If a vocabulary token is not a single token of ``tokenizer``.
        ValueError: If ``adapter_dtype`` is unknown or an ``added`` string is not a single token.
    """
    vocab.resolve(tokenizer)
    is_peft = _is_peft_model(model)
    adapter_name = _check_adapter(model) if is_peft else None
    base_model: nn.Module = model.get_base_model() if is_peft else model
    ids: list[int] = []
    for token in added:
        token_id = _single_token_id(tokenizer, token)
        if token_id is None:
            raise ValueError(f"refusal_tokens: added token {token!r} is not a single token of the tokenizer")
        ids.append(token_id)
    input_weight = base_weight(base_model.get_input_embeddings())  # type: ignore[operator]
    rows, hidden = int(input_weight.shape[0]), int(input_weight.shape[1])
    if len(tokenizer) > rows:
        raise RefusalArtifactError(
            f"refusal_tokens: the tokenizer has {len(tokenizer)} tokens but the embedding only {rows} rows; "
            "call init_refusal_embeddings before saving"
        )
    tied = embeddings_tied(base_model)
    index = torch.tensor(ids, dtype=torch.long)
    tensors = {
        "token_ids": index,
        "input_embedding_rows": input_weight.detach()[index.to(input_weight.device)].cpu().contiguous(),
    }
    if not tied:
        output_weight = base_weight(base_model.get_output_embeddings())  # type: ignore[operator]
        tensors["output_embedding_rows"] = (
            output_weight.detach()[index.to(output_weight.device)].cpu().contiguous()
        )
    dtype = _resolve_dtype(adapter_dtype, input_weight.dtype)
    with AtomicFolder(folder) as out:
        save_file(tensors, str(out.tmp / ROWS_FILE), metadata={"format": "pt"})
        if adapter_name is not None:
            # save_embedding_layers=False: peft would otherwise store the whole resized embedding matrices.
            model.save_pretrained(
                str(out.tmp / ADAPTER_FOLDER), selected_adapters=[adapter_name], save_embedding_layers=False
            )
            weight_files = sorted((out.tmp / ADAPTER_FOLDER).rglob("*.safetensors"))
            for weights in weight_files:
                _cast_safetensors(weights, dtype)
            too_large = any(w.stat().st_size > MAX_FILE_BYTES for w in weight_files)
            if adapter_dtype == "auto" and dtype == torch.float32 and too_large:
                dtype = torch.bfloat16
                for weights in weight_files:
                    _cast_safetensors(weights, dtype)
                warnings.warn(
                    f"refusal-token artifact {folder}: the float32 adapter is over {MAX_FILE_BYTES // 2**20} "
                    "MiB; stored in bfloat16 instead (pass adapter_dtype='float32' to keep float32)",
                    stacklevel=2,
                )
        files = _describe_files(out.tmp)
        adapter_configs = sorted((out.tmp / ADAPTER_FOLDER).rglob("adapter_config.json"))
        record = {
            "format": ARTIFACT_FORMAT,
            "format_version": ARTIFACT_FORMAT_VERSION,
            "base": {str(k): str(v) for k, v in base.items()},
            "added_tokens": [{"token": t, "id": i} for t, i in zip(added, ids, strict=True)],
            "vocabulary": dict(vocab.tokens),
            "tokenizer_size": len(tokenizer),
            "embedding_rows": rows,
            "hidden_size": hidden,
            "tied_embeddings": tied,
            "lora": adapter_name is not None,
            "adapter_folder": (
                adapter_configs[0].parent.relative_to(out.tmp).as_posix() if adapter_configs else None
            ),
            "rows_dtype": str(input_weight.dtype).removeprefix("torch."),
            "adapter_dtype": str(dtype).removeprefix("torch.") if adapter_name is not None else None,
            "files": files,
        }
        (out.tmp / ARTIFACT_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        path = out.commit()
    large = {name: info["bytes"] for name, info in files.items() if info["bytes"] > MAX_FILE_BYTES}
    if large:
        warnings.warn(
            f"refusal-token artifact {path}: "
            + ", ".join(f"{n} is {b / 2**20:.1f} MiB" for n, b in large.items())
            + f" (over {MAX_FILE_BYTES // 2**20} MiB); use a lower lora.r, fewer lora.target_modules or "
            "adapter_dtype='bfloat16'",
            stacklevel=2,
        )
    return path


def write_respond_bias(
    folder: str | Path,
    respond_bias: float,
    calibration: Mapping[str, Any],
    *,
    out: str | Path | None = None,
) -> Path:
    """Record a calibrated respond bias in an artifact (a copy at ``out``, or in place), atomically.

    The weights are untouched (their sha256 are checked first); only ``artifact.json`` gains
    ``respond_bias`` and ``calibration``, so :func:`~sae_refusal.llm.artifact.artifact_hash` (and every cache
    keyed on it) changes.

    Args:
        folder: The artifact folder.
        respond_bias: The bias to record (0 removes it).
        calibration: How it was chosen: calibration split, limits, candidates (JSON-serialisable).
        out: Where to write the calibrated artifact; ``None`` rewrites ``folder`` itself.

    Returns:
        The calibrated artifact folder.

    Raises:
        FileNotFoundError, RefusalArtifactError: As :func:`~sae_refusal.llm.artifact.read_refusal_artifact`,
            or when a file is altered.
        ValueError: If ``respond_bias`` is not finite or ``calibration`` is not JSON-serialisable.
    """
    if not math.isfinite(respond_bias):
        raise ValueError(f"respond_bias must be finite, got {respond_bias}")
    artifact = read_refusal_artifact(folder)
    verify_artifact_files(artifact)
    record = json.loads((artifact.folder / ARTIFACT_FILE).read_text(encoding="utf-8"))
    record.pop("respond_bias", None)
    record.pop("calibration", None)
    if respond_bias != 0.0:
        record["respond_bias"] = float(respond_bias)
        record["calibration"] = dict(calibration)
    try:
        text = json.dumps(record, indent=2, ensure_ascii=False) + "\n"
    except TypeError as err:
        raise ValueError(f"calibration: not JSON-serialisable: {err}") from err
    with AtomicFolder(artifact.folder if out is None else out) as dest:
        shutil.copytree(artifact.folder, dest.tmp, dirs_exist_ok=True)
        (dest.tmp / ARTIFACT_FILE).write_text(text, encoding="utf-8")
        return dest.commit()
