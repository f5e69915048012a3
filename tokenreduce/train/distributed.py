"""Distributed data parallel under ``torchrun``: one process per device, DDP on the student only.

    torchrun --standalone --nproc_per_node=2 -m tokenreduce.cli finetune --dataset mnist5k ...
    torchrun --nnodes=2 --node_rank=0 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        --nproc_per_node=8 -m tokenreduce.cli finetune ...      # multi-node: the same on every node

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous; :func:`init` reads them.
NCCL on CUDA, gloo on CPU. Each rank keeps its own frozen teacher in eval mode (no DDP wrapper:
it has no gradients to reduce).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init", "all_reduce_sum", "barrier", "shutdown"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """This process's place: ``rank`` of ``world_size``, its ``device``; ``enabled`` under torchrun."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    enabled: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str | torch.device | None = None) -> DistInfo:
    """Join the process group torchrun set up (a no-op in a plain process).

    ``device``: None picks ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU. A CUDA device
    uses NCCL, the CPU gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and world > 1:
        if device.index is None:
            device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if world <= 1:
        return DistInfo(0, 1, 0, device, False)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        log.info("distributed: rank %d of %d on %s (%s)", rank, world, device, backend)
    return DistInfo(rank, world, local, device, True)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``t`` over the ranks (in place); unchanged in a plain process."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
