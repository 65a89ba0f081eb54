"""The work units of a cache build: one final shard each, and their share-out among processes.

A cache of ``N`` prompts with ``shard_rows`` rows per shard is the shards ``i = 0, 1, ...`` of rows
``[i * shard_rows, min((i + 1) * shard_rows, N))`` in prompt order (:func:`shard_plan`). Every shard is
extracted alone (its own length-sorting windows and forward passes), so its bytes do not depend on which
process computed it or how many there were. :func:`assign_longest_first` shares the shards still to do among
the processes by their cost (the prompts' token counts): pure and deterministic.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ShardSpec", "assign_longest_first", "shard_costs", "shard_plan"]


@dataclass(frozen=True)
class ShardSpec:
    """One shard of a cache: the prompt rows ``[first_row, first_row + rows)``.

    Args:
        index: Shard number (its file is ``shard-{index:05d}.safetensors``).
        first_row: Row (prompt) index of its first row.
        rows: How many rows it holds.
    """

    index: int
    first_row: int
    rows: int

    @property
    def stop(self) -> int:
        """One past its last row."""
        return self.first_row + self.rows


def shard_plan(n_rows: int, shard_rows: int) -> list[ShardSpec]:
    """The shards of a cache of ``n_rows`` rows, ``shard_rows`` each (the last one may be shorter).

    Raises:
        ValueError: If ``shard_rows`` is not positive (``data.cache.shard_rows``) or ``n_rows`` negative.
    """
    if shard_rows < 1:
        raise ValueError(f"data.cache.shard_rows must be >= 1, got {shard_rows}")
    if n_rows < 0:
        raise ValueError(f"n_rows must be >= 0, got {n_rows}")
    return [
        ShardSpec(index=i, first_row=start, rows=min(shard_rows, n_rows - start))
        for i, start in enumerate(range(0, n_rows, shard_rows))
    ]


def assign_longest_first(costs: dict[int, int], world_size: int) -> list[list[int]]:
    """Share shards among ``world_size`` processes by greedy longest-processing-time.

    The costliest shard goes first, each to the process with the least cost so far (ties: the lower shard
    index first, the lower rank first); the most any process gets is within the largest shard's cost of
    the best possible share-out (at most 4/3 of it).

    Args:
        costs: Shard index -> cost (e.g. the sum of its prompts' token counts).
        world_size: Number of processes.

    Returns:
        One list per rank of its shard indices, ascending.

    Raises:
        ValueError: If ``world_size`` < 1 or a cost is negative.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    negative = sorted(i for i, cost in costs.items() if cost < 0)
    if negative:
        raise ValueError(f"shard costs must be >= 0; shards {negative} have negative costs")
    loads = [(0, rank) for rank in range(world_size)]  # a heap of (cost so far, rank)
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for index in sorted(costs, key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(loads)
        shares[rank].append(index)
        heapq.heappush(loads, (load + costs[index], rank))
    return [sorted(share) for share in shares]


def shard_costs(lengths: Sequence[int], shards: Sequence[ShardSpec]) -> dict[int, int]:
    """Cost of each shard: the sum of its prompts' token counts (``lengths`` in prompt order)."""
    return {shard.index: sum(lengths[shard.first_row : shard.stop]) for shard in shards}
