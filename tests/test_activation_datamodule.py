"""ActivationDataModule + cached_activations on a tiny model: reuse, recompute, splits, DDP sharding."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

import sae_refusal.activations.build as build
import sae_refusal.activations.datamodule as datamodule
from sae_refusal.activations import ActivationCache, ActivationDataModule, CacheConfig, CacheMismatchError
from sae_refusal.activations.build import request_identity
from sae_refusal.data import Label, Prompt, PromptSet
from sae_refusal.data.chat import format_prompts
from sae_refusal.data.sources import PromptSetConfig, PromptSourceConfig, load_prompt_set
from sae_refusal.data.splits import SplitConfig
from sae_refusal.llm import LLMConfig, last_token_residuals, load_model, load_tokenizer
from sae_refusal.llm.tokenize import pad_left


def prompts_cfg(root: Path) -> PromptSetConfig:
    return PromptSetConfig(
        data_root=str(root),
        sources=[
            PromptSourceConfig(
                name="h", label="harmful", path="harmful.jsonl", id_column="id", category_column="category"
            ),
            PromptSourceConfig(name="b", label="benign", path="benign.json", text_column="instruction"),
        ],
    )


def make_dm(
    model_dir: Path, root: Path, layers: tuple[int, ...] = (1, 2), **kwargs: Any
) -> ActivationDataModule:
    return ActivationDataModule(
        llm=LLMConfig(name_or_path=str(model_dir)),
        prompts=prompts_cfg(root),
        split=SplitConfig(test_fraction=0.25, val_fraction=0.0, seed=0),
        cache=CacheConfig(root=str(root / "cache"), layers=layers, batch_size=5),
        batch_size=4,
        **kwargs,
    )


def test_init_loads_nothing(tmp_path: Path) -> None:
    dm = ActivationDataModule(
        llm=LLMConfig(name_or_path=str(tmp_path / "no-such-model")),
        cache=CacheConfig(root=str(tmp_path / "cache")),  # the split manifest is written before the model
    )
    assert dm.splits == {}  # the missing model is only noticed when something needs it
    dm.prepare_data()  # the split manifest only (the cache is filled in setup, by every rank)
    assert len(list((tmp_path / "cache").glob("splits-*.json"))) == 1
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        dm.setup()


def test_setup_serves_cached_activations_by_split(tiny_model_dir: Path, prompt_file: Path) -> None:
    dm = make_dm(tiny_model_dir, prompt_file, layer=2)
    dm.prepare_data()
    dm.setup("fit")
    train, test = dm.splits["train"], dm.splits["test"]
    assert train.acts_ND.shape[0] + test.acts_ND.shape[0] == 24 and dm.d_model == 32
    assert set(train.ids).isdisjoint(test.ids)
    assert {int(c) for c in test.category_N} >= {0}  # benign present in the held-out split
    # The cached activation equals a direct single-prompt extraction.
    prompt_set = load_prompt_set(prompts_cfg(prompt_file))
    llm = LLMConfig(name_or_path=str(tiny_model_dir))
    tokenizer, model = load_tokenizer(llm), load_model(llm)
    index = [p.id for p in prompt_set].index(test.ids[0])
    text = format_prompts(tokenizer, [prompt_set[index].text])[0]
    ids, mask = pad_left([tokenizer(text, add_special_tokens=False).input_ids], tokenizer.pad_token_id)
    expected = last_token_residuals(model, ids, mask, [2])[2][0]
    torch.testing.assert_close(test.acts_ND[0], expected, atol=1e-5, rtol=1e-5)
    batch = next(iter(dm.train_dataloader()))
    assert batch["acts"].shape == (4, 32) and batch["acts"].dtype == torch.float32


def test_rerun_reuses_and_layer_change_recomputes(
    tiny_model_dir: Path, prompt_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = make_dm(tiny_model_dir, prompt_file).build_cache()
    calls: list[str] = []
    real_compute = build.compute_cache

    def counting_compute(*args: Any, **kwargs: Any) -> ActivationCache:
        calls.append("compute")
        return real_compute(*args, **kwargs)

    monkeypatch.setattr(build, "compute_cache", counting_compute)
    again = make_dm(tiny_model_dir, prompt_file).build_cache()
    assert calls == [] and again.folder == first.folder
    subset = make_dm(tiny_model_dir, prompt_file, layers=(2,)).build_cache()
    assert calls == [] and subset.folder == first.folder  # a superset of layers covers a subset
    other = make_dm(tiny_model_dir, prompt_file, layers=(0, 3)).build_cache()
    assert calls == ["compute"] and other.folder != first.folder
    assert ActivationCache.open(first.folder).layers == (1, 2)  # the old cache is kept


def test_cache_from_another_model_is_never_reused(tmp_path: Path, prompt_file: Path) -> None:
    from sae_refusal.testing import save_tiny_model

    model_a = save_tiny_model(tmp_path / "a", "llama")
    model_b = save_tiny_model(tmp_path / "b", "llama", seed=1)
    cache_a = make_dm(model_a, prompt_file).build_cache()
    dm_b = make_dm(model_b, prompt_file)
    identity_b = request_identity(dm_b.load_prompts(), dm_b.llm, dm_b.cache)
    with pytest.raises(CacheMismatchError, match="weights_hash"):
        ActivationCache.open(cache_a.folder, expect=identity_b)
    cache_b = dm_b.build_cache()
    assert cache_b.folder != cache_a.folder
    assert not torch.equal(cache_a.load(1), cache_b.load(1))


def test_bad_layer_and_bad_data_layer(tiny_model_dir: Path, prompt_file: Path) -> None:
    with pytest.raises(ValueError, match=r"cache\.layers"):
        make_dm(tiny_model_dir, prompt_file, layers=(1, 9)).build_cache()
    with pytest.raises(ValueError, match=r"data\.layer"):
        make_dm(tiny_model_dir, prompt_file, layer=3)


def test_truncation_is_counted_and_error_policy_raises(tiny_model_dir: Path, prompt_file: Path) -> None:
    dm = make_dm(tiny_model_dir, prompt_file)
    dm.cache = CacheConfig(root=str(prompt_file / "cache"), layers=(1,), max_length=12)
    cache = dm.build_cache()
    assert cache.manifest["extra"]["n_truncated"] == 24
    dm.cache = CacheConfig(root=str(prompt_file / "cache"), layers=(1,), max_length=12, overflow="error")
    with pytest.raises(ValueError, match="max_length"):
        dm.build_cache()


def test_split_manifest_is_written_and_reused(tiny_model_dir: Path, prompt_file: Path) -> None:
    dm = make_dm(tiny_model_dir, prompt_file, manifest_path=str(prompt_file / "splits.json"))
    dm.setup()
    manifest = json.loads((prompt_file / "splits.json").read_text())
    assert sorted(manifest["splits"]["test"]) == sorted(dm.splits["test"].ids)
    dm2 = make_dm(tiny_model_dir, prompt_file, manifest_path=str(prompt_file / "splits.json"))
    dm2.setup()
    assert dm2.splits["test"].ids == dm.splits["test"].ids


class _RecordIndices(L.LightningModule):
    """Records which training rows each rank sees."""

    def __init__(self, out_dir: str):
        super().__init__()
        self.out_dir = out_dir
        self.layer = torch.nn.Linear(32, 1)
        self.seen: list[list[int]] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen.append(batch["index"].tolist())
        return self.layer(batch["acts"]).pow(2).mean()

    def on_train_epoch_end(self) -> None:
        path = Path(self.out_dir) / f"rank{self.global_rank}-epoch{self.current_epoch}.json"
        path.write_text(json.dumps(self.seen))
        self.seen = []

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.usefixtures("lightning_globals_restored")  # ddp_spawn leaves MASTER_PORT set
def test_ddp_ranks_get_disjoint_equal_shards(tiny_model_dir: Path, prompt_file: Path) -> None:
    dm = make_dm(tiny_model_dir, prompt_file)
    dm.build_cache()  # fill the cache once, outside the spawned workers
    probe = make_dm(tiny_model_dir, prompt_file)
    probe.setup()
    n_train = probe.splits["train"].acts_ND.shape[0]
    out = prompt_file / "seen"
    out.mkdir()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(_RecordIndices(str(out)), datamodule=dm)
    for epoch in range(2):
        per_rank = [json.loads((out / f"rank{r}-epoch{epoch}.json").read_text()) for r in range(2)]
        assert len(per_rank[0]) == len(per_rank[1])  # equal batch counts
        rows = [{i for batch in batches for i in batch} for batches in per_rank]
        assert rows[0].isdisjoint(rows[1])
        assert len(rows[0]) == len(rows[1]) == n_train // 2  # drop_last trims at most one row per rank


def test_val_loader_serves_only_val_and_refuses_to_stand_in_with_test(
    tiny_model_dir: Path, prompt_file: Path
) -> None:
    no_val = make_dm(tiny_model_dir, prompt_file)  # val_fraction 0
    no_val.setup()
    assert len(no_val.splits["val"].ids) == 0 and len(no_val.splits["test"].ids) > 0
    with pytest.raises(
        ValueError,
        match=r"validation split is empty \(data\.split\.val_fraction=0\.0\).*trainer\.limit_val_batches=0",
    ):
        no_val.val_dataloader()
    with_val = make_dm(tiny_model_dir, prompt_file)
    with_val.split = SplitConfig(test_fraction=0.25, val_fraction=0.2, seed=0)
    with_val.setup()
    served = [with_val.splits["val"].ids[i] for b in with_val.val_dataloader() for i in b["index"].tolist()]
    assert sorted(served) == sorted(with_val.splits["val"].ids)
    assert set(served).isdisjoint(with_val.splits["test"].ids)


def test_harmful_prompts_without_a_category_are_refused_before_any_encoding(
    tiny_model_dir: Path, prompt_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A prompt set that bypassed the source loaders (e.g. the built-in path): the data module checks it too.
    prompts = [Prompt(f"b:{i}", f"benign {i}", Label.BENIGN, source="b") for i in range(6)]
    prompts.append(Prompt("h:9", "Do something bad", Label.HARMFUL, source="h"))
    monkeypatch.setattr(datamodule, "load_builtin", lambda: PromptSet(prompts))
    dm = ActivationDataModule(
        llm=LLMConfig(name_or_path=str(tiny_model_dir)),
        cache=CacheConfig(root=str(prompt_file / "cache"), layers=(1,)),
    )
    with pytest.raises(
        ValueError,
        match=r"built-in prompt set: 1 prompts .* row 6 id 'h:9' \(source 'h'\): harmful prompt without",
    ):
        dm.setup()
    assert not (prompt_file / "cache").exists()  # refused before the LLM ran
    # Through configured sources, the loader names the file, row and id.
    (prompt_file / "harmful.jsonl").write_text(
        (prompt_file / "harmful.jsonl").read_text() + json.dumps({"id": "x", "prompt": "Hurt them"}) + "\n"
    )
    with pytest.raises(ValueError, match=r"source 'h': harmful row 12 \(id 'h:x'\) of .*harmful\.jsonl"):
        make_dm(tiny_model_dir, prompt_file).prepare_data()


def test_served_layer_is_resolved_without_loading_weights(tiny_model_dir: Path, prompt_file: Path) -> None:
    assert make_dm(tiny_model_dir, prompt_file).served_layer == 1  # the first cached layer
    assert make_dm(tiny_model_dir, prompt_file, layer=2).served_layer == 2
    assert make_dm(tiny_model_dir, prompt_file, layers=(-1,)).served_layer == 3  # 4 blocks
