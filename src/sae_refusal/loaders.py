"""One DataLoader recipe for every map-style data module (DDP-aware, seeded, no global RNG)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

T = TypeVar("T")


def map_style_loader(
    dataset: Dataset[T],
    *,
    trainer: L.Trainer | None,
    batch_size: int,
    train: bool,
    seed: int,
    num_workers: int = 0,
    collate_fn: Callable[[list[T]], Any] | None = None,
) -> DataLoader[T]:
    """A DataLoader that shuffles with its own seeded generator, and under DDP shards by rank.

    Under DDP (``trainer.world_size > 1``) every rank gets a disjoint slice; for training the slices have
    the same length (``drop_last=True``: at most ``world_size - 1`` rows are left out per epoch) and are
    reshuffled per epoch (Lightning calls ``set_epoch``). Lightning keeps a sampler that is already a
    ``DistributedSampler``.

    Args:
        dataset: Map-style dataset.
        trainer: The running trainer, or ``None`` outside a fit.
        batch_size: Rows per batch.
        train: Shuffle (and equalise shards) for training; keep order for evaluation.
        seed: Seed of the shuffle.
        num_workers: DataLoader worker processes.
        collate_fn: Batch collation; default stacking.
    """
    sampler: DistributedSampler[T] | None = None
    if trainer is not None and trainer.world_size > 1:
        sampler = DistributedSampler(
            dataset,
            num_replicas=trainer.world_size,
            rank=trainer.global_rank,
            shuffle=train,
            seed=seed,
            drop_last=train,
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        drop_last=False,
        num_workers=num_workers,
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(seed) if sampler is None else None,
        persistent_workers=num_workers > 0,
    )
