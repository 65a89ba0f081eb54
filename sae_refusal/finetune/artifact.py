"""The small, transferable refusal-token artifact: added tokens, their embedding rows, and the LoRA adapter.

A refusal-token fine-tune changes a base model in three places: the tokenizer (six added tokens), the
embedding rows of those tokens (input embedding and, when untied, LM head), and the LoRA matrices. The
artifact stores only those, so it stays a few MB even for a model of several GB and can be applied to the
base model loaded anywhere (``LLMConfig(adapter_path=...)``). Layout::

    artifact.json               format version, base-model fingerprint, added tokens and ids, vocabulary,
                                tokenizer/embedding sizes, tied or not, LoRA or not, size + sha256 per file
                                [, respond_bias + calibration: a decision threshold chosen after training]
    token_rows.safetensors      token_ids, input_embedding_rows (n_new, d_model)
                                [, output_embedding_rows (n_new, d_model) when untied], in the model dtype
    adapter/                    only for a peft model: adapter_config.json + adapter_model.safetensors

The rows are those of the *base layer* (what the adapter was trained on top of). Under LoRA the recipe trains
the new rows with ``LoraConfig(trainable_token_indices=...)`` (see :mod:`sae_refusal.finetune.lora`), which
keeps the trained rows inside the adapter (a few KB); applying the artifact copies the base rows in, then
loads the adapter, whose trainable rows replace them, and merges. Without a peft model only the rows are
stored: that reproduces a model in which only the new rows were trained. An adapter that trains whole
embedding matrices (``modules_to_save``) is refused: it would store the full ``vocab x d_model`` matrices.

Applying re-adds the tokens in the stored order and refuses a tokenizer on which they get other ids, or that
ends up with another size, so the rows land where they were trained.

A calibrated artifact also records a ``respond_bias`` (:func:`write_respond_bias`, chosen on a calibration
split by :func:`~sae_refusal.finetune.calibration.choose_respond_bias`) and how it was chosen. Applying it
puts the bias in the model's ``generation_config.sequence_bias``, so ``generate`` and the refusal report
(:func:`~sae_refusal.finetune.evaluate.evaluate_refusal_tokens`) both use it.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sae_refusal.atomic import AtomicFolder
from sae_refusal.finetune.tokens import add_token_strings, base_layer, base_weight, embeddings_tied
from sae_refusal.llm.refusal_tokens import RefusalVocabulary, _single_token_id, set_respond_bias

__all__ = [
    "ADAPTER_FOLDER",
    "ARTIFACT_FILE",
    "ARTIFACT_FORMAT",
    "ARTIFACT_FORMAT_VERSION",
    "MAX_FILE_BYTES",
    "ROWS_FILE",
    "RefusalArtifact",
    "RefusalArtifactError",
    "add_artifact_tokens",
    "apply_refusal_artifact",
    "artifact_hash",
    "read_refusal_artifact",
    "save_refusal_artifact",
    "write_respond_bias",
]

ARTIFACT_FORMAT = "sae_refusal.refusal_token_artifact"
ARTIFACT_FORMAT_VERSION = 1
ARTIFACT_FILE = "artifact.json"
ROWS_FILE = "token_rows.safetensors"
ADAPTER_FOLDER = "adapter"
#: Files above this size trigger a warning when saving (the GPU machines return at most 16 MiB per file).
MAX_FILE_BYTES = 16 * 2**20

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class RefusalArtifactError(ValueError):
    """A refusal-token artifact is malformed, of another format version, or does not fit the model."""


@dataclass(frozen=True)
class RefusalArtifact:
    """The parsed ``artifact.json`` of a refusal-token artifact.

    Args:
        folder: The artifact folder.
        base: Fingerprint of the base model it was trained on (:func:`~sae_refusal.llm.model_fingerprint`).
        tokens: The token strings added to the base tokenizer, in id order.
        token_ids: The id of each added token.
        vocabulary: Refusal token -> CoCoNot category (``None`` = respond), all of them, added or not.
        tokenizer_size: ``len(tokenizer)`` after adding the tokens.
        embedding_rows: Rows of the input embedding after resizing.
        hidden_size: Width of the embedding rows.
        tied_embeddings: Whether the LM head shares the input embedding.
        lora: Whether a peft adapter is stored.
        adapter_folder: Relative folder of the adapter (``adapter``), or ``None`` without LoRA.
        files: Relative path -> ``{"bytes": int, "sha256": str}`` of every other file of the artifact.
        respond_bias: Added to the respond logit when the artifact is applied (0: the model's own argmax).
        calibration: How ``respond_bias`` was chosen (split, limits, candidates), or ``None``.
    """

    folder: Path
    base: dict[str, str]
    tokens: tuple[str, ...]
    token_ids: tuple[int, ...]
    vocabulary: dict[str, str | None]
    tokenizer_size: int
    embedding_rows: int
    hidden_size: int
    tied_embeddings: bool
    lora: bool
    adapter_folder: str | None
    files: dict[str, dict[str, Any]]
    respond_bias: float = 0.0
    calibration: dict[str, Any] | None = None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _describe_files(root: Path) -> dict[str, dict[str, Any]]:
    return {
        path.relative_to(root).as_posix(): {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != ARTIFACT_FILE
    }


def _peft_model_class() -> type | None:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency of the finetune extra
        return None
    return PeftModel


def _is_peft_model(model: Any) -> bool:
    cls = _peft_model_class()
    return cls is not None and isinstance(model, cls)


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


def read_refusal_artifact(folder: str | Path) -> RefusalArtifact:
    """Read and validate ``artifact.json`` of a refusal-token artifact (files are checked when applied).

    Args:
        folder: The artifact folder.

    Raises:
        FileNotFoundError: If the folder or its ``artifact.json`` is missing.
        RefusalArtifactError: If the file is not an artifact of a supported format version.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter_path: refusal-token artifact folder {str(folder)!r} does not exist")
    path = folder / ARTIFACT_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"adapter_path: {str(folder)!r} has no {ARTIFACT_FILE}; is it a refusal-token artifact folder?"
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RefusalArtifactError(f"adapter_path: {path} is not valid JSON: {err}") from err
    if not isinstance(record, dict) or record.get("format") != ARTIFACT_FORMAT:
        raise RefusalArtifactError(
            f"adapter_path: {path} is not a refusal-token artifact (format != {ARTIFACT_FORMAT!r})"
        )
    version = record.get("format_version")
    if version != ARTIFACT_FORMAT_VERSION:
        raise RefusalArtifactError(
            f"adapter_path: {path} has format_version {version!r}; this sae_refusal reads version "
            f"{ARTIFACT_FORMAT_VERSION}"
        )
    try:
        added = record["added_tokens"]
        artifact = RefusalArtifact(
            folder=folder,
            base={str(k): str(v) for k, v in record["base"].items()},
            tokens=tuple(str(entry["token"]) for entry in added),
            token_ids=tuple(int(entry["id"]) for entry in added),
            vocabulary={str(k): (None if v is None else str(v)) for k, v in record["vocabulary"].items()},
            tokenizer_size=int(record["tokenizer_size"]),
            embedding_rows=int(record["embedding_rows"]),
            hidden_size=int(record["hidden_size"]),
            tied_embeddings=bool(record["tied_embeddings"]),
            lora=bool(record["lora"]),
            adapter_folder=None if record.get("adapter_folder") is None else str(record["adapter_folder"]),
            files={str(k): dict(v) for k, v in record["files"].items()},
            respond_bias=float(record.get("respond_bias", 0.0)),
            calibration=None if record.get("calibration") is None else dict(record["calibration"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise RefusalArtifactError(f"adapter_path: {path} is malformed: missing or bad field {err}") from err
    if not math.isfinite(artifact.respond_bias):
        raise RefusalArtifactError(
            f"adapter_path: {path}: respond_bias must be finite, got {artifact.respond_bias}"
        )
    if artifact.respond_bias != 0.0 and None not in artifact.vocabulary.values():
        raise RefusalArtifactError(
            f"adapter_path: {path}: respond_bias set but the vocabulary has no respond token"
        )
    return artifact


def artifact_hash(folder: str | Path) -> str:
    """Identity of an artifact for cache manifests: sha256 of ``artifact.json`` and each file's size.

    ``artifact.json`` records the sha256 of every file, so this changes whenever any weight changes.

    Args:
        folder: The artifact folder.

    Raises:
        FileNotFoundError: If the folder, ``artifact.json`` or a listed file is missing.
    """
    artifact = read_refusal_artifact(folder)
    digest = hashlib.sha256((artifact.folder / ARTIFACT_FILE).read_bytes())
    for name in sorted(artifact.files):
        path = artifact.folder / name
        if not path.is_file():
            raise FileNotFoundError(f"adapter_path: {str(artifact.folder)!r} lacks {name}")
        digest.update(f"\0{name}\0{path.stat().st_size}".encode())
    return digest.hexdigest()


def _verify_files(artifact: RefusalArtifact) -> None:
    for name, info in artifact.files.items():
        path = artifact.folder / name
        if not path.is_file():
            raise FileNotFoundError(f"adapter_path: {str(artifact.folder)!r} lacks {name}")
        if path.stat().st_size != info.get("bytes") or _sha256(path) != info.get("sha256"):
            raise RefusalArtifactError(
                f"adapter_path: {path} differs from the size/sha256 recorded in {ARTIFACT_FILE} "
                "(truncated or altered); copy the artifact again"
            )
    if ROWS_FILE not in artifact.files:
        raise FileNotFoundError(f"adapter_path: {str(artifact.folder)!r} lacks {ROWS_FILE}")


def add_artifact_tokens(tokenizer: Any, artifact: RefusalArtifact | str | Path) -> list[int]:
    """Add the artifact's tokens to ``tokenizer`` in the stored order and check they get the stored ids.

    Idempotent: a tokenizer that already has them (with the stored ids) is left unchanged.

    Args:
        tokenizer: The base model's tokenizer (modified in place).
        artifact: A parsed artifact or its folder.

    Returns:
        The ids of the added tokens.

    Raises:
        RefusalArtifactError: If the ids or the tokenizer size differ from the artifact's, i.e. the
            tokenizer is not the one the artifact was trained with.
    """
    if not isinstance(artifact, RefusalArtifact):
        artifact = read_refusal_artifact(artifact)
    add_token_strings(tokenizer, artifact.tokens)
    ids = [_single_token_id(tokenizer, token) for token in artifact.tokens]
    if ids != list(artifact.token_ids):
        raise RefusalArtifactError(
            f"adapter_path: the tokens of artifact {str(artifact.folder)!r} get ids {ids} in this tokenizer "
            f"but were trained as {list(artifact.token_ids)} ({list(artifact.tokens)}); load the base "
            "tokenizer the artifact was made with"
        )
    if len(tokenizer) != artifact.tokenizer_size:
        raise RefusalArtifactError(
            f"adapter_path: vocab-size mismatch: artifact {str(artifact.folder)!r} was trained with a "
            f"tokenizer of {artifact.tokenizer_size} tokens, this one has {len(tokenizer)}"
        )
    RefusalVocabulary(dict(artifact.vocabulary)).resolve(tokenizer)
    return [int(i) for i in ids if i is not None]


def _fingerprint_differences(stored: Mapping[str, str], given: Mapping[str, str]) -> list[str]:
    """Differing fingerprint fields; none when both carry the same weights hash (same file, other path)."""
    if stored.get("weights_hash") and stored.get("weights_hash") == given.get("weights_hash"):
        return []
    keys = sorted(set(stored) | set(given))
    return [f"{k}: {stored.get(k)!r} != {given.get(k)!r}" for k in keys if stored.get(k) != given.get(k)]


@torch.no_grad()
def _copy_rows(model: nn.Module, artifact: RefusalArtifact) -> None:
    tensors = load_file(str(artifact.folder / ROWS_FILE))
    stored_ids = tensors.get("token_ids")
    if stored_ids is None or stored_ids.tolist() != list(artifact.token_ids):
        raise RefusalArtifactError(
            f"adapter_path: {ROWS_FILE} of {str(artifact.folder)!r} lists other token ids"
        )
    targets = [("input_embedding_rows", model.get_input_embeddings())]  # type: ignore[operator]
    if not artifact.tied_embeddings:
        targets.append(("output_embedding_rows", model.get_output_embeddings()))  # type: ignore[operator]
    for key, module in targets:
        weight = base_weight(module)
        rows = tensors.get(key)
        if rows is None or tuple(rows.shape) != (len(artifact.token_ids), int(weight.shape[1])):
            raise RefusalArtifactError(
                f"adapter_path: {ROWS_FILE} of {str(artifact.folder)!r}: {key} has shape "
                f"{None if rows is None else tuple(rows.shape)}, expected "
                f"{(len(artifact.token_ids), int(weight.shape[1]))}"
            )
        if artifact.token_ids:
            index = torch.tensor(artifact.token_ids, dtype=torch.long, device=weight.device)
            weight.index_copy_(0, index, rows.to(device=weight.device, dtype=weight.dtype))


def apply_refusal_artifact(
    model: Any,
    tokenizer: Any,
    folder: str | Path,
    *,
    merge: bool = True,
    base: Mapping[str, str] | None = None,
) -> tuple[Any, Any]:
    """Turn a loaded base model and tokenizer into the fine-tuned refusal-token model.

    Re-adds the tokens (checking their ids), resizes the embeddings, copies the stored rows in, then loads
    the adapter with ``peft.PeftModel.from_pretrained`` and, if ``merge``, merges it
    (``merge_and_unload``).

    Args:
        model: The base causal LM the artifact was trained on (modified in place).
        tokenizer: Its tokenizer (modified in place).
        folder: The artifact folder.
        merge: Merge the adapter into the weights and return a plain model; else return the ``PeftModel``.
        base: Fingerprint of the loaded base model; a difference from the stored one is a warning (the
            weights may still fit, e.g. the same model from another path).

    Returns:
        ``(model, tokenizer)``.

    Raises:
        FileNotFoundError: If the folder or one of its files is missing.
        RefusalArtifactError: On another format version, altered files, other token ids, a vocab-size
            mismatch, a model with more embedding rows, another hidden size or another tying.
    """
    artifact = read_refusal_artifact(folder)
    _verify_files(artifact)
    if base is not None:
        differences = _fingerprint_differences(artifact.base, base)
        if differences:
            warnings.warn(
                f"adapter_path: artifact {str(artifact.folder)!r} was trained on another base model "
                f"({'; '.join(differences)}); applying it anyway",
                stacklevel=2,
            )
    if _is_peft_model(model):
        raise RefusalArtifactError(
            "adapter_path: the model already carries a peft adapter; pass the base model"
        )
    weight = base_weight(model.get_input_embeddings())
    rows, hidden = int(weight.shape[0]), int(weight.shape[1])
    if hidden != artifact.hidden_size:
        raise RefusalArtifactError(
            f"adapter_path: artifact {str(artifact.folder)!r} has rows of width {artifact.hidden_size}, the "
            f"model {hidden}; it was made for another model"
        )
    if rows > artifact.embedding_rows:
        raise RefusalArtifactError(
            f"adapter_path: vocab-size mismatch: the model has {rows} embedding rows, artifact "
            f"{str(artifact.folder)!r} was trained with {artifact.embedding_rows}"
        )
    if embeddings_tied(model) != artifact.tied_embeddings:
        raise RefusalArtifactError(
            f"adapter_path: artifact {str(artifact.folder)!r} was trained with "
            f"{'tied' if artifact.tied_embeddings else 'untied'} embeddings, the model's are not"
        )
    add_artifact_tokens(tokenizer, artifact)
    if rows < artifact.embedding_rows:
        model.resize_token_embeddings(artifact.embedding_rows, mean_resizing=False)
    _copy_rows(model, artifact)
    if artifact.respond_bias != 0.0:
        respond = next(token for token, category in artifact.vocabulary.items() if category is None)
        respond_id = _single_token_id(tokenizer, respond)
        if respond_id is None:
            raise RefusalArtifactError(
                f"adapter_path: respond token {respond!r} of {str(artifact.folder)!r} is not a single token"
            )
        set_respond_bias(model, respond_id, artifact.respond_bias)  # kept by PeftModel / merge_and_unload
    if not artifact.lora:
        return model, tokenizer
    from peft import PeftModel

    adapter_dir = artifact.folder / (artifact.adapter_folder or ADAPTER_FOLDER)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"adapter_path: {str(artifact.folder)!r} lacks {adapter_dir.name}/adapter_config.json"
        )
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    if merge:
        return peft_model.merge_and_unload(), tokenizer
    return peft_model, tokenizer


def write_respond_bias(
    folder: str | Path,
    respond_bias: float,
    calibration: Mapping[str, Any],
    *,
    out: str | Path | None = None,
) -> Path:
    """Record a calibrated respond bias in an artifact (a copy at ``out``, or in place), atomically.

    The weights are untouched (their sha256 are checked first); only ``artifact.json`` gains
    ``respond_bias`` and ``calibration``, so :func:`artifact_hash` (and every cache keyed on it) changes.

    Args:
        folder: The artifact folder.
        respond_bias: The bias to record (0 removes it).
        calibration: How it was chosen: calibration split, limits, candidates (JSON-serialisable).
        out: Where to write the calibrated artifact; ``None`` rewrites ``folder`` itself.

    Returns:
        The calibrated artifact folder.

    Raises:
        FileNotFoundError, RefusalArtifactError: As :func:`read_refusal_artifact`, or when a file is altered.
        ValueError: If ``respond_bias`` is not finite or ``calibration`` is not JSON-serialisable.
    """
    if not math.isfinite(respond_bias):
        raise ValueError(f"respond_bias must be finite, got {respond_bias}")
    artifact = read_refusal_artifact(folder)
    _verify_files(artifact)
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
