"""One DataLoader recipe for every map-style data module (DDP-aware, seeded, resumable, no global RNG)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import lightning as L
from torch.utils.data import DataLoader, Dataset, DistributedSampler

T = TypeVar("T")

__all__ = ["EpochSampler", "empty_validation_error", "map_style_loader"]


class EpochSampler(DistributedSampler[Any]):
    """The training order as a function of ``(seed, epoch)`` only, sharded by rank, resumable mid-epoch.

    One process gets the global order that DDP ranks split between them (rank ``r`` of ``w`` gets
    ``perm[r::w]``), so a run resumed from a checkpoint sees the same batches as an uninterrupted one.
    :meth:`skip` makes the first pass over one epoch start after the batches already trained.

    Args:
        dataset: The dataset.
        num_replicas: World size.
        rank: This process's global rank.
        seed: Seed of the shuffle (the epoch is added by ``set_epoch``, which Lightning calls).
        batch_size: Rows per batch (to turn skipped batches into rows).
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        num_replicas: int,
        rank: int,
        seed: int,
        batch_size: int,
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batch_size = batch_size
        self._skip_epoch, self._skip_batches = -1, 0

    def skip(self, epoch: int, batches: int) -> None:
        """On the next pass over ``epoch``, leave out its first ``batches`` batches (once)."""
        self._skip_epoch, self._skip_batches = epoch, max(batches, 0)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self.epoch == self._skip_epoch:
            indices = indices[self._skip_batches * self.batch_size :]
            self._skip_epoch = -1
        return iter(indices)


def map_style_loader(
    dataset: Dataset[T],
    *,
    trainer: L.Trainer | None,
    batch_size: int,
    train: bool,
    seed: int,
    num_workers: int = 0,
    collate_fn: Callable[[list[T]], Any] | None = None,
    resume: tuple[int, int] | None = None,
) -> DataLoader[T]:
    """A DataLoader whose order depends only on ``(seed, epoch)``; under DDP it shards by rank.

    Training uses an :class:`EpochSampler` at any world size: every rank gets a disjoint slice of the same
    length (``drop_last``: at most ``world_size - 1`` rows are left out per epoch), reshuffled per epoch
    (Lightning calls ``set_epoch``). Evaluation keeps the dataset order (sharded under DDP).

    Args:
        dataset: Map-style dataset.
        trainer: The running trainer, or ``None`` outside a fit.
        batch_size: Rows per batch.
        train: Shuffle (and equalise shards) for training; keep order for evaluation.
        seed: Seed of the shuffle.
        num_workers: DataLoader worker processes.
        collate_fn: Batch collation; default stacking.
        resume: ``(epoch, batches)``: skip the first ``batches`` batches of ``epoch`` (a mid-epoch resume).
    """
    world = trainer.world_size if trainer is not None else 1
    rank = trainer.global_rank if trainer is not None else 0
    sampler: DistributedSampler[T] | None = None
    if train:
        sampler = EpochSampler(dataset, world, rank, seed, batch_size)
        if resume is not None:
            sampler.skip(*resume)
    elif world > 1:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False, drop_last=False)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=False,
        num_workers=num_workers,
        collate_fn=collate_fn,
        persistent_workers=num_workers > 0,
    )


def empty_validation_error(val_fraction: float, job: str = "fit") -> ValueError:
    """The error of a data module asked for validation batches when its manifest has no ``val`` split.

    Both data modules raise it: the test split never stands in for validation.

    Args:
        val_fraction: The configured ``data.split.val_fraction``.
        job: What runs without validation when ``trainer.limit_val_batches=0`` (e.g. ``fit``, ``fine-tune``).
    """
    return ValueError(
        f"the validation split is empty (data.split.val_fraction={val_fraction}); set "
        f"data.split.val_fraction > 0, or {job} without validation with trainer.limit_val_batches=0 "
        "(the test split is never used for validation)"
    )
