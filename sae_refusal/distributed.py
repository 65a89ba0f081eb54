"""Process-group hygiene for multi-process fits.

Lightning destroys the default process group at exit only for NCCL. A gloo group (DDP on CPU, and every
``ddp_spawn`` test) left alive until interpreter finalisation can abort the process: gloo's worker threads
still hold finished work objects whose tensors reference Python objects, and releasing them while the
interpreter is torn down ends in ``terminate called without an active exception`` (SIGABRT) after a fit
that itself succeeded. Destroying the group from an ``atexit`` handler, while the interpreter is still
alive, avoids it.
"""

from __future__ import annotations

import atexit

import torch.distributed as dist

_registered = False


def _destroy_default_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def destroy_process_group_at_exit() -> bool:
    """Registers (once per process) an exit handler that destroys the default process group.

    Returns:
        True when the handler is registered (now or before), False when no process group is initialised.
    """
    global _registered
    if not (dist.is_available() and dist.is_initialized()):
        return False
    if not _registered:
        atexit.register(_destroy_default_group)
        _registered = True
    return True
