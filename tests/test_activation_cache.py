"""The activation cache: identity, reuse rules, atomic writes, corruption detection."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_refusal.activations.cache import (
    ActivationCache,
    ActivationCacheWriter,
    CacheCorruptError,
    CacheIdentity,
    CacheMismatchError,
    CacheNotFoundError,
    NonFiniteActivationsError,
    find_cache,
    first_non_finite,
)

D = 8


def identity(**overrides: object) -> CacheIdentity:
    base = CacheIdentity(
        model="tiny",
        revision="local",
        weights_hash="abc",
        adapter_hash="",
        model_dtype="float32",
        quantization="none",
        attn_implementation="",
        trust_remote_code=False,
        tokenizer_hash="tok",
        chat_template_hash="tmpl",
        system_prompt_hash="sys",
        layers=(1, 3),
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
        ("adapter_hash", "artifact"),
        ("attn_implementation", "sdpa"),
        ("trust_remote_code", True),
        ("tokenizer_hash", "tok2"),
        ("system_prompt_hash", "sys2"),
        ("overflow", "error"),
        ("revision", "v2"),
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


def test_flipped_byte_of_same_size_fails_the_default_check(tmp_path: Path) -> None:
    write_cache(tmp_path / "c", identity())
    shard = tmp_path / "c" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # a mantissa bit in the middle of the tensor data: still finite
    shard.write_bytes(bytes(data))
    ActivationCache.open(tmp_path / "c", verify="size")  # same size: the cheap check cannot see it
    with pytest.raises(CacheCorruptError, match=r"shard-00001.*sha256"):
        ActivationCache.open(tmp_path / "c")


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_writer_refuses_non_finite_rows_and_writes_nothing(tmp_path: Path, bad: float) -> None:
    ident = identity()
    acts = torch.zeros(5, D)
    acts[3, 2] = bad
    with (
        pytest.raises(NonFiniteActivationsError, match=r"layer 3, row 7: non-finite"),
        ActivationCacheWriter(tmp_path / "c", ident, D, 4) as writer,
    ):
        writer.add({1: torch.zeros(4, D), 3: torch.zeros(4, D)})
        writer.add({1: torch.zeros(5, D), 3: acts})
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_values_beyond_the_storage_dtype(tmp_path: Path) -> None:
    acts = torch.zeros(2, D)
    acts[1, 0] = 1e6  # finite in float32, inf in float16
    with (
        pytest.raises(NonFiniteActivationsError, match=r"row 1.*float16"),
        ActivationCacheWriter(tmp_path / "c", identity(dtype="float16"), D) as writer,
    ):
        writer.add({1: acts, 3: torch.zeros(2, D)})


def test_first_non_finite_is_exact() -> None:
    assert first_non_finite(torch.zeros(3, D)) is None
    huge = torch.full((4, D), 3e38)  # finite values whose float32 sum overflows
    assert first_non_finite(huge) is None
    huge[2, 5] = float("-inf")
    assert first_non_finite(huge) == 2
    half = torch.zeros(3, D, dtype=torch.float16)
    half[1, 1] = float("nan")
    assert first_non_finite(half) == 1


def test_cache_with_non_finite_values_is_refused_on_open_and_load(tmp_path: Path) -> None:
    """A cache written before the writer checked (valid hashes, inf inside) is still never served."""
    write_cache(tmp_path / "c", identity(), n=10, shard_rows=4)
    shard = tmp_path / "c" / "shard-00001.safetensors"
    tensors = load_file(shard)
    tensors["layer_3"][2, 0] = float("inf")  # row 4 + 2 = 6 of the cache
    save_file(tensors, shard, metadata={"rows": "4"})
    manifest_path = tmp_path / "c" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entry = manifest["shards"][1]
    entry["bytes"], entry["sha256"] = shard.stat().st_size, hashlib.sha256(shard.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(NonFiniteActivationsError, match=r"shard-00001.*layer_3 row 6 \(prompt 'p6'\)"):
        ActivationCache.open(tmp_path / "c")
    cache = ActivationCache.open(tmp_path / "c", verify="size")
    assert cache.load(1).shape == (10, D)  # the other layer is fine
    with pytest.raises(NonFiniteActivationsError, match="row 6"):
        cache.load(3)


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
    # Version-1 caches left the adapter, tokenizer and system prompt out of the identity: never reused.
    manifest.write_text(json.dumps({**payload, "format_version": 1}))
    with pytest.raises(CacheMismatchError, match="cache format 1, this version reads 2"):
        ActivationCache.open(tmp_path / "c")
    manifest.write_text("{not json")
    with pytest.raises(CacheCorruptError, match="unreadable manifest"):
        ActivationCache.open(tmp_path / "c")


def test_key_is_a_short_stable_hash_of_the_whole_identity() -> None:
    key = identity().key()
    assert len(key) == 16 and int(key, 16) >= 0
    assert identity().key() == key  # stable
    assert len({identity(**{"layers": (1,)}).key(), identity(max_length=32).key(), key}) == 3


def test_manifest_identity_missing_a_field_is_corrupt_and_extra_fields_are_ignored(tmp_path: Path) -> None:
    write_cache(tmp_path / "c", identity())
    manifest_path = tmp_path / "c" / "manifest.json"
    payload = json.loads(manifest_path.read_text())
    payload["identity"]["note"] = "written by a later version"
    manifest_path.write_text(json.dumps(payload))
    assert ActivationCache.open(tmp_path / "c", expect=identity()).identity == identity()
    del payload["identity"]["tokenizer_hash"], payload["identity"]["overflow"]
    manifest_path.write_text(json.dumps(payload))
    with pytest.raises(CacheCorruptError, match=r"lacks fields \['overflow', 'tokenizer_hash'\]"):
        ActivationCache.open(tmp_path / "c")


def test_find_cache_skips_hidden_and_broken_folders(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write_cache(root / ".in-progress", identity())  # a temporary folder of a write: never served
    assert find_cache(root, identity()) is None
    (root / "a-bad-json").mkdir()
    (root / "a-bad-json" / "manifest.json").write_text("{not json")
    for name, manifest in {
        "b-no-identity": {"format_version": 2},
        "c-short-identity": {"identity": {"model": "tiny"}},
        "d-identity-not-a-dict": {"identity": ["tiny"]},
        "e-bad-layers": {"identity": {**identity().to_json(), "layers": ["x"]}},
    }.items():
        (root / name).mkdir()
        (root / name / "manifest.json").write_text(json.dumps(manifest))
    write_cache(root / "z-good", identity())
    assert find_cache(root, identity()) == root / "z-good"


def test_non_finite_value_in_a_later_shard_names_its_row(tmp_path: Path) -> None:
    write_cache(tmp_path / "c", identity(), n=10, shard_rows=4)
    shard = tmp_path / "c" / "shard-00002.safetensors"  # rows 8 and 9
    tensors = load_file(shard)
    tensors["layer_1"][1, 3] = float("nan")
    save_file(tensors, shard, metadata={"rows": "2"})
    with pytest.raises(NonFiniteActivationsError, match=r"layer_1 row 9 \(prompt 'p9'\)"):
        ActivationCache.open(tmp_path / "c", verify="none").load(1)


def test_one_row_shards_and_extra_manifest_facts(tmp_path: Path) -> None:
    ident = identity()
    with pytest.raises(ValueError, match="shard_rows must be >= 1, got 0"):
        ActivationCacheWriter(tmp_path / "bad", ident, d_model=D, shard_rows=0)
    acts = torch.arange(3 * D, dtype=torch.float32).reshape(3, D)
    with ActivationCacheWriter(tmp_path / "c", ident, d_model=D, shard_rows=1) as writer:
        writer.add({1: acts, 3: -acts})
        cache = writer.commit([{"id": f"p{i}"} for i in range(3)], extra={"n_truncated": 2, "note": "x"})
    assert [s["rows"] for s in cache.manifest["shards"]] == [1, 1, 1]
    assert cache.manifest["extra"] == {"n_truncated": 2, "note": "x"}
    reopened = ActivationCache.open(tmp_path / "c", expect=ident)
    assert reopened.manifest["extra"] == {"n_truncated": 2, "note": "x"}
    assert torch.equal(reopened.load(1), acts) and torch.equal(reopened.load(3), -acts)
