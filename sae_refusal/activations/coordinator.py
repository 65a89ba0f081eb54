"""The processes that build one activation cache together: who each one is, and the collectives they need.

* :class:`Coordinator` is one process alone (rank 0 of 1): every collective is the identity.
* :class:`TorchCoordinator` works over an initialised ``torch.distributed`` default group, whoever set it up
  (Lightning's DDP strategies, :func:`launch` for ``sae-refusal cache``, ``torchrun``). Its collectives run
  on a gloo group of their own, created with a long timeout: object collectives on CPU work under any
  default backend (NCCL included), and ranks that finish their share early wait for a slow one (up to
  :data:`WAIT_TIMEOUT`) instead of timing out after the default group's 10-30 minutes. A rank whose process
  dies closes its sockets, so the others' pending collectives fail at once (seen with gloo) rather than
  wait that long.
* :func:`current_coordinator` picks one of the two; :func:`launch` starts the processes a Lightning trainer
  section describes (``accelerator``, ``devices``, ``num_nodes``) with Lightning Fabric.

No rank is left waiting at a collective because another raised: work that may fail runs inside
:meth:`Coordinator.on_rank0` (rank 0's work; its status is broadcast) or is followed by
:meth:`Coordinator.all_succeeded` (every rank's status gathered); then every rank raises if any failed, the
failing rank its own exception, the others a :class:`RankFailedError` naming it and its message.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import Any, TypeVar

import torch

from sae_refusal.errors import UserError

__all__ = [
    "WAIT_TIMEOUT",
    "Coordinator",
    "Launched",
    "RankFailedError",
    "RankStatus",
    "TorchCoordinator",
    "current_coordinator",
    "launch",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long a rank waits at a collective of :class:`TorchCoordinator` (for the slowest rank's share).
WAIT_TIMEOUT = timedelta(days=7)


class RankFailedError(UserError, RuntimeError):
    """Another process of the run failed; the message names its rank and its error.

    The CLI prints it as one line: the failed process reports its own error (with its traceback if it is
    not a user error) itself.
    """


@dataclass(frozen=True)
class RankStatus:
    """What one rank reports after a step.

    Args:
        rank: Its global rank.
        error: ``"<ExceptionType>: <message>"`` if it failed, else ``None``.
        info: What it reports on success (e.g. rows done and seconds).
    """

    rank: int
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


def describe(error: BaseException) -> str:
    """``"<ExceptionType>: <message>"`` of an exception, as other ranks report it."""
    return f"{type(error).__name__}: {error}"


class Coordinator:
    """One process alone: rank 0 of a world of 1 (the base of :class:`TorchCoordinator`).

    Use as a context manager (:meth:`close` on exit). Attributes: ``rank`` (global), ``world_size``,
    ``local_rank`` (on its node) and ``device`` (the device its launcher gave it, ``None`` if unknown).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None

    def __enter__(self) -> Coordinator:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release what the collectives hold (nothing for one process)."""

    def barrier(self) -> None:
        """Wait until every rank gets here."""

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable)."""
        return obj

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, by rank."""
        return [obj]

    def on_rank0(self, fn: Callable[[], T], what: str, *, share: bool = False) -> T | None:
        """Run ``fn`` on rank 0 while the others wait; an error there raises on every rank.

        Args:
            fn: The work (only rank 0 calls it).
            what: What it does, for the other ranks' error message (``"while <what>"``).
            share: Return rank 0's result on every rank (it is pickled); else the others get ``None``.

        Raises:
            Exception: On rank 0, what ``fn`` raised.
            RankFailedError: On the other ranks, if ``fn`` raised on rank 0.
        """
        value: T | None = None
        error: Exception | None = None
        if self.rank == 0:
            try:
                value = fn()
            except Exception as err:  # reported to every rank, then raised here
                error = err
        if self.world_size > 1:
            failed, shared = self.broadcast_object(
                (None if error is None else describe(error), value if share else None)
            )
            if error is None and failed is not None:
                raise RankFailedError(f"rank 0 failed while {what}: {failed}")
            if self.rank != 0:
                value = shared
        if error is not None:
            raise error
        return value

    def all_succeeded(
        self, error: Exception | None, what: str, info: dict[str, Any] | None = None
    ) -> list[RankStatus]:
        """Gather every rank's status after a step; raise on every rank if any failed.

        Args:
            error: This rank's exception, or ``None`` if its part succeeded.
            what: The step, for the other ranks' error message (``"while <what>"``).
            info: What this rank reports on success.

        Returns:
            Every rank's status, by rank (all succeeded).

        Raises:
            Exception: ``error`` itself, on the rank that failed.
            RankFailedError: On the other ranks, naming the first failed rank and its message.
        """
        mine = RankStatus(self.rank, None if error is None else describe(error), info or {})
        statuses: list[RankStatus] = self.all_gather_object(mine)
        if error is not None:
            raise error
        failed = [s for s in statuses if s.error is not None]
        if failed:
            others = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
            raise RankFailedError(f"rank {failed[0].rank} failed while {what}{others}: {failed[0].error}")
        return statuses


class TorchCoordinator(Coordinator):
    """The ranks of an initialised ``torch.distributed`` default group; see the module notes.

    Every rank must construct it at the same point (it creates a process group) and :meth:`close` it.

    Args:
        local_rank: This process's rank on its node; default ``$LOCAL_RANK``, else the global rank.
        device: The device its launcher gave this process (Lightning's ``root_device``, Fabric's
            ``device``); ``None`` if unknown.
    """

    def __init__(self, local_rank: int | None = None, device: torch.device | None = None) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("TorchCoordinator needs an initialised torch.distributed process group")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        if local_rank is None:
            local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.local_rank = local_rank
        self.device = device
        self._group: Any = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)

    def close(self) -> None:
        import torch.distributed as dist

        if self._group is not None and dist.is_initialized():
            dist.destroy_process_group(self._group)
        self._group = None

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self._group)

    def broadcast_object(self, obj: Any) -> Any:
        import torch.distributed as dist

        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._group)
        return out


def current_coordinator(local_rank: int | None = None, device: torch.device | None = None) -> Coordinator:
    """The ranks of this run: a :class:`TorchCoordinator` when a process group of more than one rank is
    initialised (every rank must call this at the same point), else one process alone.

    Args:
        local_rank: This process's rank on its node (see :class:`TorchCoordinator`).
        device: The device its launcher gave this process, if known.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchCoordinator(local_rank=local_rank, device=device)
    return Coordinator()


@dataclass
class Launched:
    """The processes :func:`launch` started, from this process's point of view.

    Args:
        coordinator: This process's coordinator (one process alone when nothing was launched).
        children: On the launching process (local rank 0), the other local ranks it started.
    """

    coordinator: Coordinator
    children: list[Any] = field(default_factory=list)

    def wait_for_children(self) -> None:
        """Wait for the local ranks this process started (after a successful run; they exit on their own)."""
        for child in self.children:
            child.wait()


def launch(accelerator: str, devices: Any, num_nodes: int) -> Launched:
    """Start the processes a trainer section asks for (``trainer.accelerator/devices/num_nodes``).

    With one process in all, nothing is started and no process group made. Otherwise Lightning Fabric
    (``strategy="ddp"``) re-runs this command line once per further local rank and every process joins one
    process group (NCCL on GPUs, gloo on CPU). Under ``torchrun`` (its environment variables present), the
    processes exist already: ``devices`` and ``num_nodes`` are taken from ``torchrun``'s
    ``--nproc-per-node`` and ``--nnodes``, whatever the config says.

    Args:
        accelerator: ``trainer.accelerator`` (``auto``, ``cpu``, ``gpu``, ``cuda``, ...).
        devices: ``trainer.devices`` (a count, a list of device indices, ``"auto"`` or ``-1``).
        num_nodes: ``trainer.num_nodes``.
    """
    from lightning.fabric import Fabric
    from lightning.fabric.plugins.environments import TorchElasticEnvironment

    from sae_refusal.distributed import destroy_process_group_at_exit

    if TorchElasticEnvironment.detect():
        local_world = int(os.environ["LOCAL_WORLD_SIZE"])
        devices, num_nodes = local_world, int(os.environ["WORLD_SIZE"]) // local_world
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy="ddp")
    if fabric.world_size == 1:
        return Launched(Coordinator())
    fabric.launch()
    destroy_process_group_at_exit()
    launcher = fabric.strategy.launcher
    children = list(getattr(launcher, "procs", [])) if fabric.local_rank == 0 else []
    coordinator = TorchCoordinator(local_rank=fabric.local_rank, device=fabric.device)
    log.info(
        "process %d of %d (local rank %d, %s)",
        coordinator.rank,
        coordinator.world_size,
        coordinator.local_rank,
        fabric.device,
    )
    return Launched(coordinator, children)
