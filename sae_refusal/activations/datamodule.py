"""``ActivationDataModule``: cached last-token activations with labels, served to Lightning.

Lifecycle (see the Lightning pitfalls in docs/ARCHITECTURE.md):

* ``__init__`` stores configs only (no model, no file I/O); the module is pickled to spawned workers.
* ``prepare_data`` (one process per node) loads the prompt set and writes the split manifest. It sets no
  state.
* ``setup`` (every process) fills the activation cache when no matching one exists, every process of a
  multi-process run extracting its share of the prompts (:mod:`sae_refusal.activations.build`; the LLM is
  loaded only then), then reads the prompt set, manifest and cache into memory-resident tensors.
* ``val_dataloader`` serves the ``val`` split and nothing else: with ``split.val_fraction: 0`` it raises
  (fit without validation with ``trainer.limit_val_batches: 0``); the test split never stands in for it.

The training order depends only on ``(shuffle_seed, epoch)`` (:class:`~sae_refusal.loaders.EpochSampler`);
under DDP each rank gets a disjoint slice of it with the same number of batches. Checkpoints keep how far
into its epoch training got (:meth:`ActivationDataModule.state_dict`), so a fit resumed mid-epoch trains on
exactly the batches an uninterrupted one would have.

Validation and test under DDP serve :class:`PaddedEvalDataset`: the split repeated up to a multiple of the
world size, so every rank runs the same number of batches (DDP syncs buffers in each forward), with a
``valid`` flag, false on the repeats, which the SAE module leaves out: its metrics are those of the whole
split, each row counted once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from sae_refusal.activations.build import CacheConfig, cached_activations
from sae_refusal.activations.cache import ActivationCache
from sae_refusal.activations.coordinator import Coordinator, current_coordinator
from sae_refusal.categories import COCONOT_CATEGORIES
from sae_refusal.data.prompt_set import Label, PromptSet
from sae_refusal.data.sources import PromptSetConfig, load_builtin, load_prompt_set
from sae_refusal.data.splits import SplitConfig, split_prompt_set
from sae_refusal.llm.layers import validate_layers
from sae_refusal.llm.loading import LLMConfig, load_model_config, model_fingerprint
from sae_refusal.loaders import empty_validation_error, map_style_loader

#: Integer codes of :class:`Label` in batches.
LABEL_INDEX: dict[str, int] = {str(Label.BENIGN): 0, str(Label.HARMFUL): 1, str(Label.AMBIGUOUS): 2}
#: Category codes: 0 = none (benign), ``i + 1`` = ``COCONOT_CATEGORIES[i]``. A harmful prompt always has a
#: code >= 1: :meth:`ActivationDataModule.load_prompts` refuses harmful prompts without a category.
CATEGORY_INDEX: dict[str | None, int] = {None: 0, **{c: i + 1 for i, c in enumerate(COCONOT_CATEGORIES)}}


@dataclass
class ActivationBatch:
    """Tensors of one split.

    Args:
        acts_ND: Activations, float32, (N, d_model).
        label_N: Label codes (:data:`LABEL_INDEX`).
        category_N: Category codes (:data:`CATEGORY_INDEX`).
        ids: Prompt ids, row-aligned.
    """

    acts_ND: torch.Tensor
    label_N: torch.Tensor
    category_N: torch.Tensor
    ids: list[str]


class ActivationDataset(Dataset[dict[str, torch.Tensor]]):
    """Map-style dataset over an :class:`ActivationBatch`; items are dicts of tensors."""

    def __init__(self, batch: ActivationBatch):
        self.batch = batch

    def __len__(self) -> int:
        return int(self.batch.acts_ND.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "acts": self.batch.acts_ND[index],
            "label": self.batch.label_N[index],
            "category": self.batch.category_N[index],
            "index": torch.tensor(index),
        }


class PaddedEvalDataset(ActivationDataset):
    """An evaluation split padded to a multiple of ``multiple`` rows by repeating rows from its start.

    Items carry ``valid``: true for the split's own rows, false for the repeats. Sharded without padding of
    its own by a ``DistributedSampler`` (its length is a multiple of the world size), every rank gets the
    same number of rows and the split's rows are served once in all.

    Args:
        batch: The split.
        multiple: The world size.
    """

    def __init__(self, batch: ActivationBatch, multiple: int):
        super().__init__(batch)
        if multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {multiple}")
        self.n_rows = int(batch.acts_ND.shape[0])
        self.multiple = multiple

    def __len__(self) -> int:
        return -(-self.n_rows // self.multiple) * self.multiple

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(index % self.n_rows)
        item["valid"] = torch.tensor(index < self.n_rows)
        return item


class ActivationDataModule(L.LightningDataModule):
    """Cached last-token residual activations of a prompt set at one layer, split by a held-out manifest.

    Args:
        llm: The causal LM whose residual stream is read.
        prompts: Prompt sources; ``None`` uses the small labelled set shipped with the package.
        split: Held-out split settings (fraction, seed, strata).
        manifest_path: Where the split manifest is written / read; default
            ``<cache.root>/splits-<prompt-set hash>-<split-config hash>.json``.
        cache: Activation cache settings (root folder, layers, dtype, batch size, token budget).
        layer: Layer served to training (must be in ``cache.layers``); default the first cached layer.
        batch_size: Rows per training batch.
        num_workers: DataLoader workers.
        shuffle_seed: Seed of the per-epoch shuffle (each epoch reshuffles with ``seed + epoch``).
    """

    def __init__(
        self,
        llm: LLMConfig | None = None,
        prompts: PromptSetConfig | None = None,
        split: SplitConfig | None = None,
        manifest_path: str | None = None,
        cache: CacheConfig | None = None,
        layer: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        shuffle_seed: int = 0,
    ) -> None:
        super().__init__()
        self.llm = llm or LLMConfig()
        self.prompts = prompts
        self.split = split or SplitConfig()
        self.manifest_path = manifest_path
        self.cache = cache or CacheConfig()
        if layer is not None and layer not in self.cache.layers:
            raise ValueError(f"data.layer={layer} is not among cache.layers={list(self.cache.layers)}")
        self.layer = layer
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_seed = shuffle_seed
        self._d_model: int | None = None
        self.splits: dict[str, ActivationBatch] = {}
        self.activation_cache: ActivationCache | None = None
        self._resume: tuple[int, int] | None = None

    # ---------------------------------------------------------------- facts linked to the model
    @property
    def d_model(self) -> int:
        """Residual width, read from the model config (no weights loaded)."""
        if self._d_model is None:
            self._d_model = int(load_model_config(self.llm).hidden_size)
        return self._d_model

    @property
    def served_layer(self) -> int:
        """The layer served to training (``layer``, else the first of ``cache.layers``), 0-based, >= 0.

        Reads the model config (no weights) to resolve a negative index.

        Raises:
            ValueError: If the layer is out of range for the model (the message names ``data.layer``).
        """
        layer = self.cache.layers[0] if self.layer is None else self.layer
        n_layers = int(load_model_config(self.llm).num_hidden_layers)
        (resolved,) = validate_layers([layer], n_layers, key="data.layer")
        return resolved

    def provenance(self) -> dict[str, Any]:
        """What the activations served are of, as artifacts made from them record it.

        Returns:
            ``{"model": data.llm's name, "model_fingerprint": its weights fingerprint (adapter included),
            "layer": the served layer, "d_model": the residual width}``; compared with what an artifact
            records by :func:`sae_refusal.provenance.provenance_mismatches`. Reads the model config and
            hashes the weight files once per process (no weights are loaded).
        """
        return {
            "model": self.llm.name_or_path,
            "model_fingerprint": dict(model_fingerprint(self.llm)),
            "layer": self.served_layer,
            "d_model": self.d_model,
        }

    # ---------------------------------------------------------------- preparation
    def load_prompts(self) -> PromptSet:
        """The full prompt set (all splits), with each prompt's split set from the manifest.

        Raises:
            ValueError: If a harmful prompt has no category or a prompt an unknown one (it would be encoded
                as benign, class 0, in the contrastive loss and the feature analysis); the prompt is named.
        """
        prompt_set = load_builtin() if self.prompts is None else load_prompt_set(self.prompts)
        prompt_set.check_categories("built-in prompt set" if self.prompts is None else "data.prompts")
        return split_prompt_set(prompt_set, self.split, self.manifest_path, root=self.cache.root)

    def build_cache(self, coordinator: Coordinator | None = None) -> ActivationCache:
        """Write the split manifest and fill (or reuse) the activation cache; returns the cache.

        Args:
            coordinator: The processes that build it together (every one calls this); default: the ranks of
                an initialised ``torch.distributed`` group, else this process alone.
        """
        return self._prompts_and_cache(coordinator)[1]

    def _prompts_and_cache(self, coordinator: Coordinator | None) -> tuple[PromptSet, ActivationCache]:
        if coordinator is None:
            trainer = self.trainer
            local_rank = trainer.local_rank if trainer is not None else None
            device = trainer.strategy.root_device if trainer is not None else None
            with current_coordinator(local_rank=local_rank, device=device) as own:
                return self._prompts_and_cache(own)
        # rank 0 first: it writes the split manifest when there is none, the others then read it
        prompt_set = coordinator.on_rank0(self.load_prompts, "loading the prompts and their split manifest")
        if prompt_set is None:
            prompt_set = self.load_prompts()
        return prompt_set, cached_activations(prompt_set, self.llm, self.cache, coordinator=coordinator)

    def prepare_data(self) -> None:
        """Write the split manifest (one process per node). The cache is filled in :meth:`setup`, where
        every process of a multi-process run takes its share of the prompts."""
        self.load_prompts()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        prompt_set, cache = self._prompts_and_cache(None)
        acts_ND = cache.load(self.served_layer).float()
        split_of = {p.id: p.split for p in prompt_set}
        rows = cache.prompts
        for name in ("train", "val", "test"):
            index = [i for i, row in enumerate(rows) if split_of[row["id"]] == name]
            self.splits[name] = ActivationBatch(
                acts_ND=acts_ND[index],
                label_N=torch.tensor([LABEL_INDEX[rows[i]["label"]] for i in index], dtype=torch.long),
                category_N=torch.tensor(
                    [CATEGORY_INDEX[rows[i]["category"]] for i in index], dtype=torch.long
                ),
                ids=[rows[i]["id"] for i in index],
            )
        self.activation_cache = cache
        self._d_model = cache.d_model

    # ---------------------------------------------------------------- loaders
    def _loader(self, name: str, train: bool) -> DataLoader[dict[str, torch.Tensor]]:
        if not self.splits:
            raise RuntimeError("ActivationDataModule.setup() has not run")
        dataset = ActivationDataset(self.splits[name])
        if len(dataset) == 0:
            raise ValueError(f"split {name!r} is empty; check split.test_fraction / split.val_fraction")
        world = self.trainer.world_size if self.trainer is not None else 1
        if not train and world > 1:
            # equal shards without counting a row twice (a DistributedSampler pads by repeating rows)
            dataset = PaddedEvalDataset(self.splits[name], world)
        resume, self._resume = (self._resume, None) if train else (None, self._resume)
        return map_style_loader(
            dataset,
            trainer=self.trainer,
            batch_size=self.batch_size,
            train=train,
            seed=self.shuffle_seed,
            num_workers=self.num_workers,
            resume=resume,
        )

    def train_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        return self._loader("train", train=True)

    # ---------------------------------------------------------------- mid-epoch resume
    def state_dict(self) -> dict[str, int]:
        """Where training stands in its epoch; kept in checkpoints, so a resumed fit skips trained batches."""
        trainer = self.trainer
        if trainer is None:
            return {}
        loop = trainer.fit_loop
        # progress trackers are typed by their base class; at run time they count `processed`
        done = int(getattr(loop.epoch_loop.batch_progress.current, "processed", 0))
        if done >= trainer.num_training_batches:
            done = 0  # an end-of-epoch checkpoint: the next epoch starts at its first batch
        return {"epoch": int(getattr(loop.epoch_progress.current, "processed", 0)), "batches": done}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Skip the already trained batches of ``state_dict['epoch']`` in the next training loader."""
        if state_dict:
            self._resume = (int(state_dict["epoch"]), int(state_dict["batches"]))

    def val_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        """The validation split; never the test split in its place.

        Raises:
            ValueError: If the validation split is empty (``data.split.val_fraction`` is 0).
        """
        if self.splits and len(self.splits["val"].ids) == 0:
            raise empty_validation_error(self.split.val_fraction, "fit")
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        return self._loader("test", train=False)
