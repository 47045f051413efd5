"""Data-parallel training under torchrun, by hand: the process group, gradient averaging, agreement.

Every rank computes gradients on its own slice of the batch; they are averaged across ranks before
each optimiser step. That is what DistributedDataParallel does; it is done by hand because DDP's
reducer does not support the double backward of the matching-aware gradient penalty. A run not
started by torchrun is a world of one, and every function here is then a no-op.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def world_and_rank() -> tuple[int, int]:
    """(number of processes, this one's rank): torchrun sets WORLD_SIZE and RANK."""
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))


def join_world(device: torch.device, world: int, rank: int) -> tuple[torch.device, bool]:
    """(this rank's device, whether this call opened the process group; its caller then closes it)."""
    if world == 1:
        return device, False
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device, False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **_attempt_store(rank, world))
    return device, True


def _attempt_store(rank: int, world: int) -> dict[str, Any]:
    """init_process_group arguments that keep the attempts of a torchrun job apart.

    torchrun's workers rendezvous through its agent's key-value store, and every restart
    (--max-restarts) reuses that store without a prefix per attempt: a restarted worker can read
    the address a dead worker of the previous attempt published and fail to connect to it ("Gloo
    connectFullMesh failed ... Connection refused"; NCCL's id is kept the same way). Under the
    agent's store, the keys of each attempt go under its restart count; otherwise env:// as usual.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    import torch.distributed as dist

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False)
    return {"store": dist.PrefixStore(f"flowercli/attempt-{attempt}", store), "rank": rank, "world_size": world}


def all_reduce_grads(module: torch.nn.Module, world: int) -> None:
    """Average gradients over ranks (one flattened all-reduce per model)."""
    if world == 1:
        return
    import torch.distributed as dist

    grads = [p.grad for p in module.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def max_over_ranks(value: int, world: int, device: torch.device) -> int:
    """The largest of every rank's `value`, on every rank (e.g. whether any rank was asked to stop)."""
    if world == 1:
        return value
    import torch.distributed as dist

    flag = torch.tensor([value], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def barrier() -> None:
    """Wait for every rank of the process group."""
    import torch.distributed as dist

    dist.barrier()


def leave_world() -> None:
    # Gloo's threads outliving the interpreter abort the process at exit ("terminate called
    # without an active exception"): a process closes the group it opened.
    import torch.distributed as dist

    dist.destroy_process_group()
