"""On-disk activation cache: sharded safetensors plus a JSON manifest.

Layout of one cache folder::

    manifest.json               identity (what produced it), shapes, shard list with sizes and sha256
    prompts.jsonl               one row of prompt metadata per activation row, in row order
    shard-00000.safetensors     {"layer_<l>": (rows, d_model)} for every cached layer
    ...

Guarantees:

* **Identity.** A cache is reused only when its :class:`CacheIdentity` (every input that changes the
  numbers: weights, adapter, tokenizer, compute dtype, quantization, attention kernel, chat template, system
  prompt, prompt set, layers, storage dtype, tokenisation policy) matches what the caller asks for;
  :meth:`ActivationCache.open` with ``expect=`` raises :class:`CacheMismatchError` naming every field that
  differs. Nothing is reused silently.
* **Atomic writes.** :class:`ActivationCacheWriter` (one writer) and the build of
  :mod:`~sae_refusal.activations.build` (shards of several processes, staged by
  :mod:`~sae_refusal.activations.staging`) write into a hidden sibling folder and rename it into place only
  after the manifest is complete, so an interrupt leaves either the old cache or the new one, never half of
  either. Both write shards and manifest with :func:`save_shard` and :func:`write_manifest`.
* **Finite numbers only.** The writer refuses a batch holding ``inf`` or ``nan`` (nothing is written), and
  reading a shard with a non-finite value raises :class:`NonFiniteActivationsError`.
* **Corruption is detected.** By default (``verify="hash"``) every file's sha256 is checked against the
  manifest on open and every shard is checked for non-finite values; ``verify="size"`` checks only byte
  sizes. A truncated or altered file raises :class:`CacheCorruptError` naming it. Hashing costs about as
  much as reading the shards once (``benchmarks/cache_verify_cost.py``), which the caller does next anyway.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sae_refusal.activations.config import VERIFY_MODES
from sae_refusal.atomic import AtomicFolder
from sae_refusal.errors import UserError

#: Version 2 added ``adapter_hash``, ``tokenizer_hash``, ``system_prompt_hash``, ``attn_implementation`` and
#: ``trust_remote_code`` to the identity and hashes whole weight files; version-1 caches are not read.
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
PROMPTS_NAME = "prompts.jsonl"


class CacheError(UserError, RuntimeError):
    """Base class of activation-cache errors (user-facing: the CLI prints them as one line)."""


class CacheNotFoundError(CacheError, FileNotFoundError):
    """The folder has no activation cache (no manifest)."""


class CacheMismatchError(CacheError):
    """The cache was produced by another model, layer set, prompt set, template or dtype."""


class CacheCorruptError(CacheError):
    """A shard or the manifest is missing, truncated or altered.

    The message ends with what to do: remove the whole cache folder (its other files are no longer
    trustworthy either), and the next run recomputes it (:func:`corrupt`).
    """


def corrupt(folder: str | os.PathLike[str], detail: str) -> CacheCorruptError:
    """A :class:`CacheCorruptError` of the cache in ``folder``: ``detail`` and the advice that works."""
    return CacheCorruptError(
        f"{detail}; this activation cache cannot be used: remove its folder (rm -r {folder}) and run again "
        "to recompute it"
    )


class NonFiniteActivationsError(CacheError, ValueError):
    """Activations hold ``inf`` or ``nan``; such a cache is never written or served."""


@dataclass(frozen=True)
class CacheIdentity:
    """Everything that determines the cached numbers; two caches are interchangeable iff these match.

    Left out on purpose: the device and the batch size (they change results only at round-off level) and
    the row order of batches (the cache is always in prompt-set order).

    Args:
        model: Model id or path as configured (``#<gguf file>`` appended for GGUF sources).
        revision: Hub revision / commit hash, or ``"local"``.
        weights_hash: Content fingerprint of the weight files (whole-file sha256 of local folders and GGUF
            files, plus ``config.json``); ``""`` for hub ids (identified by ``revision``).
        adapter_hash: :func:`~sae_refusal.llm.artifact.artifact_hash` of the refusal-token artifact applied
            on top (``LLMConfig.adapter_path``): ``artifact.json`` and the content (sha256) of every adapter
            file it lists, so an adapter file changed in place gives a new cache; ``""`` for the base model.
        model_dtype: Compute dtype the model was loaded in (as configured, e.g. ``"auto"``).
        quantization: ``"none"``, ``"4bit"`` or ``"8bit"``.
        attn_implementation: Attention kernel as configured (``""`` lets transformers choose).
        trust_remote_code: Whether model code from the hub repo ran instead of transformers' own.
        tokenizer_hash: :func:`~sae_refusal.llm.tokenize.tokenizer_fingerprint` of the tokenizer as loaded
            (vocabulary, merges, normalisation, added tokens).
        chat_template_hash: sha256 of the effective chat template (configured or the tokenizer's).
        system_prompt_hash: sha256 of the system prompt (of ``null`` when there is none).
        layers: Cached layers (residual stream after decoder block ``l``, 0-based), sorted.
        prompt_set_hash: :meth:`PromptSet.content_hash` of the prompts, in row order.
        dtype: dtype the activations are stored in (``"float32"``, ``"bfloat16"``, ...).
        max_length: Token budget per prompt.
        overflow: Policy for longer prompts (``"truncate_left"`` or ``"error"``).
    """

    model: str
    revision: str
    weights_hash: str
    adapter_hash: str
    model_dtype: str
    quantization: str
    attn_implementation: str
    trust_remote_code: bool
    tokenizer_hash: str
    chat_template_hash: str
    system_prompt_hash: str
    layers: tuple[int, ...]
    prompt_set_hash: str
    dtype: str
    max_length: int
    overflow: str

    def to_json(self) -> dict[str, Any]:
        row = asdict(self)
        row["layers"] = list(self.layers)
        return row

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> CacheIdentity:
        known = {f.name for f in fields(cls)}
        missing = known - set(row)
        if missing:
            raise CacheCorruptError(
                f"manifest identity lacks fields {sorted(missing)}; remove that cache folder to recompute it"
            )
        return cls(**{**{k: row[k] for k in known}, "layers": tuple(int(x) for x in row["layers"])})

    def key(self) -> str:
        """Short stable hash of the identity, used in folder names."""
        blob = json.dumps(self.to_json(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def differences(self, other: CacheIdentity) -> list[str]:
        """Human-readable ``field: ours != theirs`` lines for each differing field."""
        ours, theirs = self.to_json(), other.to_json()
        return [f"{name}: {ours[name]!r} != {theirs[name]!r}" for name in ours if ours[name] != theirs[name]]

    def covers(self, wanted: CacheIdentity) -> bool:
        """True when this cache holds everything ``wanted`` asks for (same identity, superset of layers)."""
        same_rest = {**self.to_json(), "layers": None} == {**wanted.to_json(), "layers": None}
        return same_rest and set(wanted.layers) <= set(self.layers)


def _layer_key(layer: int) -> str:
    return f"layer_{layer}"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def first_non_finite(acts_BD: torch.Tensor) -> int | None:
    """Index of the first row of ``acts_BD`` holding ``inf`` or ``nan``, or ``None`` if all are finite."""
    # A float32 sum is several times faster than an elementwise isfinite (float16 above all) and is finite
    # whenever every value is; only a non-finite sum (a bad value, or an overflow) needs the exact check.
    if bool(torch.isfinite(acts_BD.sum(dtype=torch.float32))):
        return None
    bad_B = ~torch.isfinite(acts_BD).all(dim=-1)
    if not bool(bad_B.any()):
        return None
    return int(bad_B.nonzero()[0, 0])


def shard_name(index: int) -> str:
    """File name of shard ``index`` of a cache (``shard-00000.safetensors``, ...)."""
    return f"shard-{index:05d}.safetensors"


def save_shard(path: Path, acts_by_layer: dict[int, torch.Tensor]) -> dict[str, Any]:
    """Write one shard file, ``{"layer_<l>": (rows, d_model)}``; returns its manifest entry.

    The bytes depend only on the tensors (and their layers), so the same rows give the same file whoever
    writes them.

    Returns:
        ``{"file", "rows", "bytes", "sha256"}`` as the manifest lists shards.
    """
    tensors = {_layer_key(layer): acts.contiguous() for layer, acts in acts_by_layer.items()}
    rows = {int(t.shape[0]) for t in tensors.values()}
    if len(rows) != 1:
        raise ValueError(f"layers disagree on the rows of shard {path.name}: {sorted(rows)}")
    n_rows = rows.pop()
    save_file(tensors, str(path), metadata={"rows": str(n_rows)})
    return {"file": path.name, "rows": n_rows, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def write_manifest(
    folder: Path,
    identity: CacheIdentity,
    d_model: int,
    shards: Sequence[dict[str, Any]],
    prompt_rows: Sequence[dict[str, Any]],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write ``prompts.jsonl`` and ``manifest.json`` of the shards already in ``folder``.

    Args:
        folder: The (not yet committed) cache folder holding the shards.
        identity: What produced the activations.
        d_model: Width of the residual stream.
        shards: Manifest entries of the shards in row order (:func:`save_shard`).
        prompt_rows: One metadata dict per activation row, in row order.
        extra: Additional JSON-serialisable facts to keep in the manifest (e.g. ``n_truncated``).

    Raises:
        ValueError: If the prompt rows do not match the shards' rows.
    """
    n_rows = sum(int(entry["rows"]) for entry in shards)
    if len(prompt_rows) != n_rows:
        raise ValueError(f"{len(prompt_rows)} prompt rows for {n_rows} activation rows")
    with (folder / PROMPTS_NAME).open("w", encoding="utf-8") as fh:
        for row in prompt_rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    manifest = {
        "format_version": FORMAT_VERSION,
        "identity": identity.to_json(),
        "n_rows": n_rows,
        "d_model": d_model,
        "shards": list(shards),
        "prompts_sha256": file_sha256(folder / PROMPTS_NAME),
        "extra": extra or {},
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2), encoding="utf-8")


class ActivationCacheWriter:
    """Writes a cache atomically: shards go to a temporary sibling folder renamed into place on commit.

    Use as a context manager; leaving the block with an exception removes the temporary folder and leaves
    any existing cache at ``folder`` untouched.

    Args:
        folder: Final cache folder. An existing cache there is replaced only at commit.
        identity: What produced the activations.
        d_model: Width of the residual stream.
        shard_rows: Rows per shard file.
    """

    def __init__(
        self, folder: str | os.PathLike[str], identity: CacheIdentity, d_model: int, shard_rows: int = 4096
    ):
        if shard_rows < 1:
            raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
        self.folder = Path(folder)
        self.identity = identity
        self.d_model = d_model
        self.shard_rows = shard_rows
        self._out = AtomicFolder(self.folder)
        self._tmp = self._out.tmp
        self._buffers: dict[int, list[torch.Tensor]] = {layer: [] for layer in identity.layers}
        self._buffered_rows = 0
        self._shards: list[dict[str, Any]] = []
        self._rows = 0

    def __enter__(self) -> ActivationCacheWriter:
        self._out.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._out.__exit__(exc_type, exc, tb)

    def add(self, acts_by_layer: dict[int, torch.Tensor]) -> None:
        """Append one batch: ``{layer: (B, d_model)}`` for every cached layer, same B for all."""
        if set(acts_by_layer) != set(self.identity.layers):
            raise ValueError(
                f"batch has layers {sorted(acts_by_layer)}, cache expects {list(self.identity.layers)}"
            )
        sizes = {t.shape[0] for t in acts_by_layer.values()}
        if len(sizes) != 1:
            raise ValueError(f"layers disagree on batch size: {sizes}")
        stored: dict[int, torch.Tensor] = {}
        for layer, acts_BD in acts_by_layer.items():
            if acts_BD.ndim != 2 or acts_BD.shape[1] != self.d_model:
                raise ValueError(f"layer {layer}: expected (B, {self.d_model}), got {tuple(acts_BD.shape)}")
            # Checked after the cast: a float32 value beyond the float16 range becomes inf there.
            stored[layer] = acts_BD.detach().to("cpu", getattr(torch, self.identity.dtype))
            bad = first_non_finite(stored[layer])
            if bad is not None:
                raise NonFiniteActivationsError(
                    f"layer {layer}, row {self._rows + self._buffered_rows + bad}: non-finite activation "
                    f"(stored as {self.identity.dtype}); the cache is not written"
                )
        for layer, acts_BD in stored.items():
            self._buffers[layer].append(acts_BD)
        self._buffered_rows += sizes.pop()
        while self._buffered_rows >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, rows: int) -> None:
        tensors: dict[int, torch.Tensor] = {}
        for layer, parts in self._buffers.items():
            stacked = torch.cat(parts)
            tensors[layer] = stacked[:rows]
            self._buffers[layer] = [stacked[rows:]] if stacked.shape[0] > rows else []
        self._buffered_rows -= rows
        self._shards.append(save_shard(self._tmp / shard_name(len(self._shards)), tensors))
        self._rows += rows

    def commit(
        self, prompt_rows: Sequence[dict[str, Any]], extra: dict[str, Any] | None = None
    ) -> ActivationCache:
        """Write the remaining rows, the prompt metadata and the manifest, then move the cache into place.

        Args:
            prompt_rows: One metadata dict per activation row, in row order.
            extra: Additional JSON-serialisable facts to keep in the manifest (e.g. ``n_truncated``).
        """
        if self._buffered_rows:
            self._flush(self._buffered_rows)
        write_manifest(self._tmp, self.identity, self.d_model, self._shards, prompt_rows, extra)
        return ActivationCache.open(self._out.commit(), verify="none")


class ActivationCache:
    """A read-only view of a committed cache folder. Open it with :meth:`open`."""

    def __init__(self, folder: Path, manifest: dict[str, Any], prompts: list[dict[str, Any]]):
        self.folder = folder
        self.manifest = manifest
        self.identity = CacheIdentity.from_json(manifest["identity"])
        self.prompts = prompts

    @classmethod
    def open(
        cls,
        folder: str | os.PathLike[str],
        *,
        expect: CacheIdentity | None = None,
        verify: str = "hash",
    ) -> ActivationCache:
        """Open and check a cache.

        Args:
            folder: Cache folder.
            expect: If given, the cache must cover it (same identity, superset of layers).
            verify: ``"hash"`` (sha256 of every file and a finiteness check of every shard; about the
                cost of reading the cache once), ``"size"`` (byte sizes only) or ``"none"``.

        Raises:
            CacheNotFoundError: No manifest in ``folder``.
            CacheMismatchError: The cache does not cover ``expect``; the message lists the differing fields.
            CacheCorruptError: A file is missing, truncated or altered; the message names it.
            NonFiniteActivationsError: Under ``verify="hash"``, a shard holds ``inf`` or ``nan``.
        """
        if verify not in VERIFY_MODES:
            raise ValueError(f"cache.verify must be one of {VERIFY_MODES}, got {verify!r}")
        folder = Path(folder)
        manifest_path = folder / MANIFEST_NAME
        if not manifest_path.is_file():
            raise CacheNotFoundError(f"no activation cache at {folder} (missing {MANIFEST_NAME})")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise corrupt(folder, f"{manifest_path}: unreadable manifest ({err})") from err
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CacheMismatchError(
                f"{manifest_path}: cache format {manifest.get('format_version')!r}, "
                f"this version reads {FORMAT_VERSION}"
            )
        identity = CacheIdentity.from_json(manifest["identity"])
        if expect is not None and not identity.covers(expect):
            diffs = identity.differences(expect)
            raise CacheMismatchError(
                f"activation cache at {folder} was produced differently (cached != requested):\n  "
                + "\n  ".join(diffs)
            )
        files = [*manifest["shards"], {"file": PROMPTS_NAME, "sha256": manifest["prompts_sha256"]}]
        for entry in files if verify != "none" else []:
            path = folder / entry["file"]
            if not path.is_file():
                raise corrupt(folder, f"activation cache file missing: {path}")
            if "bytes" in entry and path.stat().st_size != entry["bytes"]:
                raise corrupt(
                    folder,
                    f"activation cache file {path} has {path.stat().st_size} bytes, manifest says "
                    f"{entry['bytes']} (truncated or overwritten)",
                )
            if verify == "hash" and file_sha256(path) != entry["sha256"]:
                raise corrupt(folder, f"activation cache file {path} fails its sha256 check (altered)")
        with (folder / PROMPTS_NAME).open(encoding="utf-8") as fh:
            prompts = [json.loads(line) for line in fh if line.strip()]
        if len(prompts) != manifest["n_rows"]:
            rows = f"{len(prompts)} rows, manifest says {manifest['n_rows']}"
            raise corrupt(folder, f"{folder / PROMPTS_NAME}: {rows}")
        cache = cls(folder, manifest, prompts)
        if verify == "hash":  # the shards are in the page cache now: checking them is cheap
            for layer in cache.layers:
                for _ in cache.iter_shards(layer):
                    pass
        return cache

    def __len__(self) -> int:
        return int(self.manifest["n_rows"])

    def __repr__(self) -> str:
        layers = list(self.layers)
        return f"ActivationCache({self.folder}, rows={len(self)}, layers={layers}, d_model={self.d_model})"

    @property
    def layers(self) -> tuple[int, ...]:
        return self.identity.layers

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    def iter_shards(self, layer: int) -> Iterator[torch.Tensor]:
        """Yield ``(rows, d_model)`` tensors of one layer, shard by shard.

        Raises:
            CacheCorruptError: A shard is unreadable or has the wrong shape.
            NonFiniteActivationsError: A shard holds ``inf`` or ``nan`` (naming the row and its prompt id).
        """
        if layer not in self.layers:
            raise KeyError(f"layer {layer} is not cached here (cached: {list(self.layers)})")
        start = 0
        for entry in self.manifest["shards"]:
            path = self.folder / entry["file"]
            try:
                with safe_open(str(path), framework="pt") as fh:
                    acts = fh.get_tensor(_layer_key(layer))
            except Exception as err:  # safetensors raises its own error types for bad headers
                raise corrupt(self.folder, f"cannot read activation cache shard {path}: {err}") from err
            if acts.shape != (entry["rows"], self.d_model):
                raise corrupt(self.folder, f"{path}: {_layer_key(layer)} has shape {tuple(acts.shape)}")
            bad = first_non_finite(acts)
            if bad is not None:
                row = self.prompts[start + bad] if start + bad < len(self.prompts) else {}
                raise NonFiniteActivationsError(
                    f"activation cache shard {path}: {_layer_key(layer)} row {start + bad} "
                    f"(prompt {row.get('id')!r}) is not finite; remove the folder (rm -r {self.folder}) "
                    "and run again to recompute it"
                )
            start += entry["rows"]
            yield acts

    def load(self, layer: int) -> torch.Tensor:
        """All rows of one layer as a ``(n_rows, d_model)`` tensor in the stored dtype."""
        return torch.cat(list(self.iter_shards(layer)))


def find_cache(root: str | os.PathLike[str], wanted: CacheIdentity) -> Path | None:
    """A folder under ``root`` whose manifest covers ``wanted`` (exact key first), or ``None``."""
    root = Path(root)
    exact = root / wanted.key()
    candidates = [exact, *sorted(p for p in root.glob("*") if p != exact)] if root.is_dir() else []
    for folder in candidates:
        manifest_path = folder / MANIFEST_NAME
        if folder.name.startswith(".") or not manifest_path.is_file():
            continue
        try:
            identity = CacheIdentity.from_json(json.loads(manifest_path.read_text())["identity"])
        except (json.JSONDecodeError, KeyError, CacheCorruptError, TypeError, ValueError):
            continue
        if identity.covers(wanted):
            return folder
    return None
