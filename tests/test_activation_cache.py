"""The activation cache: identity, reuse rules, atomic writes, corruption detection."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sae_refusal.activations.cache import (
    ActivationCache,
    ActivationCacheWriter,
    CacheCorruptError,
    CacheIdentity,
    CacheMismatchError,
    CacheNotFoundError,
    find_cache,
)

D = 8


def identity(**overrides: object) -> CacheIdentity:
    base = CacheIdentity(
        model="tiny",
        revision="local",
        weights_hash="abc",
        model_dtype="float32",
        quantization="none",
        layers=(1, 3),
        chat_template_hash="tmpl",
        prompt_set_hash="prompts",
        dtype="float32",
        max_length=64,
        overflow="truncate_left",
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


def write_cache(
    folder: Path, ident: CacheIdentity, n: int = 10, shard_rows: int = 4
) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    acts = {layer: torch.randn(n, D, generator=gen) for layer in ident.layers}
    with ActivationCacheWriter(folder, ident, d_model=D, shard_rows=shard_rows) as writer:
        for start in range(0, n, 3):  # batches that do not line up with shards
            writer.add({layer: a[start : start + 3] for layer, a in acts.items()})
        writer.commit([{"id": f"p{i}"} for i in range(n)])
    return acts


def test_round_trip_across_shards(tmp_path: Path) -> None:
    ident = identity()
    acts = write_cache(tmp_path / "c", ident, n=10, shard_rows=4)
    cache = ActivationCache.open(tmp_path / "c", expect=ident, verify="hash")
    assert len(cache) == 10 and cache.d_model == D and cache.layers == (1, 3)
    assert [s["rows"] for s in cache.manifest["shards"]] == [4, 4, 2]
    for layer in ident.layers:
        torch.testing.assert_close(cache.load(layer), acts[layer])
    assert [p["id"] for p in cache.prompts] == [f"p{i}" for i in range(10)]
    with pytest.raises(KeyError, match="layer 2 is not cached"):
        cache.load(2)


def test_storage_dtype_is_applied(tmp_path: Path) -> None:
    ident = identity(dtype="bfloat16")
    write_cache(tmp_path / "c", ident)
    assert ActivationCache.open(tmp_path / "c").load(1).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model", "other-model"),
        ("weights_hash", "zzz"),
        ("chat_template_hash", "t2"),
        ("prompt_set_hash", "p2"),
        ("dtype", "bfloat16"),
        ("max_length", 32),
        ("layers", (5,)),
        ("model_dtype", "bfloat16"),
        ("quantization", "4bit"),
    ],
)
def test_mismatch_names_the_field(tmp_path: Path, field: str, value: object) -> None:
    write_cache(tmp_path / "c", identity())
    with pytest.raises(CacheMismatchError, match=field):
        ActivationCache.open(tmp_path / "c", expect=identity(**{field: value}))


def test_superset_of_layers_covers_a_subset(tmp_path: Path) -> None:
    write_cache(tmp_path / "root" / "anything", identity(layers=(1, 3)))
    assert find_cache(tmp_path / "root", identity(layers=(3,))) == tmp_path / "root" / "anything"
    assert find_cache(tmp_path / "root", identity(layers=(2,))) is None
    assert find_cache(tmp_path / "root", identity(model="other")) is None
    assert find_cache(tmp_path / "missing-root", identity()) is None


def test_truncated_shard_is_detected(tmp_path: Path) -> None:
    write_cache(tmp_path / "c", identity())
    shard = tmp_path / "c" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-5])
    with pytest.raises(CacheCorruptError, match="shard-00001"):
        ActivationCache.open(tmp_path / "c")


def test_altered_shard_fails_hash_check_and_unreadable_shard_fails_load(tmp_path: Path) -> None:
    write_cache(tmp_path / "c", identity())
    shard = tmp_path / "c" / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match="sha256"):
        ActivationCache.open(tmp_path / "c", verify="hash")
    shard.write_bytes(b"garbage" * 10)
    cache = ActivationCache.open(tmp_path / "c", verify="none")
    with pytest.raises(CacheCorruptError, match="shard-00000"):
        cache.load(1)


def test_missing_shard_and_missing_manifest(tmp_path: Path) -> None:
    write_cache(tmp_path / "c", identity())
    (tmp_path / "c" / "shard-00002.safetensors").unlink()
    with pytest.raises(CacheCorruptError, match="missing"):
        ActivationCache.open(tmp_path / "c")
    with pytest.raises(CacheNotFoundError, match="no activation cache"):
        ActivationCache.open(tmp_path / "nothing")


def test_interrupted_write_leaves_old_cache_and_no_debris(tmp_path: Path) -> None:
    old = identity()
    acts = write_cache(tmp_path / "c", old)
    new = identity(weights_hash="new")
    with (
        pytest.raises(RuntimeError, match="interrupt"),
        ActivationCacheWriter(tmp_path / "c", new, D, 4) as writer,
    ):
        writer.add({layer: torch.zeros(5, D) for layer in new.layers})
        raise RuntimeError("interrupt")
    cache = ActivationCache.open(tmp_path / "c", expect=old, verify="hash")
    torch.testing.assert_close(cache.load(3), acts[3])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_commit_replaces_an_old_cache_atomically(tmp_path: Path) -> None:
    write_cache(tmp_path / "c", identity())
    write_cache(tmp_path / "c", identity(weights_hash="new"), n=6)
    cache = ActivationCache.open(tmp_path / "c", expect=identity(weights_hash="new"))
    assert len(cache) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_writer_rejects_bad_batches(tmp_path: Path) -> None:
    ident = identity()
    with ActivationCacheWriter(tmp_path / "c", ident, D) as writer:
        with pytest.raises(ValueError, match="expects"):
            writer.add({1: torch.zeros(2, D)})
        with pytest.raises(ValueError, match=r"expected \(B, 8\)"):
            writer.add({1: torch.zeros(2, D + 1), 3: torch.zeros(2, D + 1)})
        with pytest.raises(ValueError, match="prompt rows"):
            writer.add({1: torch.zeros(2, D), 3: torch.zeros(2, D)})
            writer.commit([{"id": "only-one"}])


def test_corrupt_manifest_and_wrong_format(tmp_path: Path) -> None:
    write_cache(tmp_path / "c", identity())
    manifest = tmp_path / "c" / "manifest.json"
    payload = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**payload, "format_version": 999}))
    with pytest.raises(CacheMismatchError, match="format"):
        ActivationCache.open(tmp_path / "c")
    manifest.write_text("{not json")
    with pytest.raises(CacheCorruptError, match="unreadable manifest"):
        ActivationCache.open(tmp_path / "c")
