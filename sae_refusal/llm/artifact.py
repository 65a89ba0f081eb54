"""Read and apply a refusal-token artifact: added tokens, their embedding rows, and the LoRA adapter.

A refusal-token fine-tune changes a base model in three places: the tokenizer (six added tokens), the
embedding rows of those tokens (input embedding and, when untied, LM head), and the LoRA matrices. The
artifact stores only those, so it stays a few MB even for a model of several GB and can be applied to the
base model loaded anywhere (``LLMConfig(adapter_path=...)``). The finetune recipe writes it
(:func:`sae_refusal.finetune.artifact.save_refusal_artifact`); this module, below it, reads it, so loading a
fine-tuned model needs nothing from ``finetune``. Layout::

    artifact.json               format version, base-model fingerprint, added tokens and ids, vocabulary,
                                tokenizer/embedding sizes, tied or not, LoRA or not, size + sha256 per file
                                [, respond_bias + calibration: a decision threshold chosen after training]
    token_rows.safetensors      token_ids, input_embedding_rows (n_new, d_model)
                                [, output_embedding_rows (n_new, d_model) when untied], in the model dtype
    adapter/                    only for a peft model: adapter_config.json + adapter_model.safetensors

Files not listed in ``artifact.json`` (a model card ``README.md`` beside it, say) are neither checked nor
part of :func:`artifact_hash`.

The rows are those of the *base layer* (what the adapter was trained on top of). Under LoRA the adapter
keeps the trained rows itself (``LoraConfig(trainable_token_indices=...)``, a few KB); applying the artifact
copies the base rows in, then loads the adapter, whose trainable rows replace them, and merges. Without a
peft model only the rows are stored: that reproduces a model in which only the new rows were trained.

Applying re-adds the tokens in the stored order and refuses a tokenizer on which they get other ids, or that
ends up with another size, so the rows land where they were trained. A calibrated artifact also records a
``respond_bias``; applying it puts the bias in the model's ``generation_config.sequence_bias``, so
``generate`` and the refusal report both use it.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from sae_refusal.llm.hashing import file_sha256
from sae_refusal.llm.layers import base_weight, embeddings_tied
from sae_refusal.llm.refusal_tokens import (
    RefusalVocabulary,
    _single_token_id,
    add_token_strings,
    set_respond_bias,
)

__all__ = [
    "ADAPTER_FOLDER",
    "ARTIFACT_FILE",
    "ARTIFACT_FORMAT",
    "ARTIFACT_FORMAT_VERSION",
    "ROWS_FILE",
    "RefusalArtifact",
    "RefusalArtifactError",
    "add_artifact_tokens",
    "apply_refusal_artifact",
    "artifact_hash",
    "read_refusal_artifact",
    "verify_artifact_files",
]

ARTIFACT_FORMAT = "sae_refusal.refusal_token_artifact"
ARTIFACT_FORMAT_VERSION = 1
ARTIFACT_FILE = "artifact.json"
ROWS_FILE = "token_rows.safetensors"
ADAPTER_FOLDER = "adapter"


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


def _peft_model_class() -> type | None:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency of the finetune extra
        return None
    return PeftModel


def _is_peft_model(model: Any) -> bool:
    cls = _peft_model_class()
    return cls is not None and isinstance(model, cls)


def read_refusal_artifact(folder: str | Path) -> RefusalArtifact:
    """Read and validate ``artifact.json`` of a refusal-token artifact (files are checked when applied).

    Args:
        folder: The artifact folder.

    Returns:
        The parsed artifact.

    Raises:
        FileNotFoundError: If the folder or its ``artifact.json`` is missing.
        RefusalArtifactError: If the file is not an artifact of a supported format version.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        where = "" if folder.is_absolute() else f" (relative to the working directory {str(Path.cwd())!r})"
        raise FileNotFoundError(
            f"adapter_path: refusal-token artifact folder {str(folder)!r} does not exist{where}"
        )
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
    """Identity of an artifact for cache manifests: ``artifact.json`` and the content of every file it lists.

    Each listed file (the LoRA adapter's weights and config, the token rows) enters by name, size and
    whole-file sha256 (:func:`~sae_refusal.llm.hashing.file_sha256`, memoised per process by path, size,
    mtime and inode, so a multi-MB adapter is read once), so an adapter file changed in place gives another
    identity even when ``artifact.json`` is unchanged (loading such an artifact is then refused by
    :func:`verify_artifact_files`; a cache of it is never reused).

    Args:
        folder: The artifact folder.

    Returns:
        The hex digest.

    Raises:
        FileNotFoundError: If the folder, ``artifact.json`` or a listed file is missing.
    """
    artifact = read_refusal_artifact(folder)
    digest = hashlib.sha256((artifact.folder / ARTIFACT_FILE).read_bytes())
    for name in sorted(artifact.files):
        path = artifact.folder / name
        if not path.is_file():
            raise FileNotFoundError(f"adapter_path: {str(artifact.folder)!r} lacks {name}")
        digest.update(f"\0{name}\0{path.stat().st_size}\0{file_sha256(path)}".encode())
    return digest.hexdigest()


def verify_artifact_files(artifact: RefusalArtifact) -> None:
    """Check every file ``artifact.json`` lists against its recorded size and sha256.

    Files the record does not list (a model card beside it, say) are ignored.

    Args:
        artifact: The parsed artifact.

    Raises:
        FileNotFoundError: If a listed file, or the token rows file, is missing.
        RefusalArtifactError: If a file differs from its recorded size or sha256.
    """
    for name, info in artifact.files.items():
        path = artifact.folder / name
        if not path.is_file():
            raise FileNotFoundError(f"adapter_path: {str(artifact.folder)!r} lacks {name}")
        if path.stat().st_size != info.get("bytes") or file_sha256(path) != info.get("sha256"):
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
    verify_artifact_files(artifact)
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

    from sae_refusal.llm.compat import quiet_peft_wrap

    adapter_dir = artifact.folder / (artifact.adapter_folder or ADAPTER_FOLDER)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"adapter_path: {str(artifact.folder)!r} lacks {adapter_dir.name}/adapter_config.json"
        )
    with quiet_peft_wrap():
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    if merge:
        return peft_model.merge_and_unload(), tokenizer
    return peft_model, tokenizer
