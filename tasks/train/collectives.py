"""What the ranks of one training share through torch.distributed: sums, batch-norm statistics,
the checkpoint they resume from and the wrapped network. With no process group (one process) each
is a no-op, so the training loop reads the same either way."""

from __future__ import annotations

from typing import Optional, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def world_size() -> int:
    """Processes in the training's group; 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the group; 0 without one."""
    return dist.get_rank() if world_size() > 1 else 0


def backend_name() -> str:
    """The group's backend (gloo, nccl), or none without a group."""
    return dist.get_backend() if dist.is_available() and dist.is_initialized() else "none"


def global_sum(values: torch.Tensor) -> torch.Tensor:
    """`values` summed over every rank (in place when there are several)."""
    if world_size() > 1:
        dist.all_reduce(values)
    return values


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (batch-norm statistics) on every rank: each rank's last step updated its own."""
    if world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def distribute(model: nn.Module, device: torch.device, sync_batchnorm: bool) -> nn.Module:
    """`model` wrapped for data-parallel steps (gradients averaged over the ranks in each backward),
    its batch norm synchronised across ranks when asked; unchanged in one process."""
    if world_size() == 1:
        return model
    if sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a data-parallel wrapper (its forward passes need no other rank)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def sync_batchnorm_runs_on(device: torch.device) -> bool:
    """torch's SyncBatchNorm synchronises on GPUs only; with gloo on CPU it refuses to run."""
    return device.type == "cuda"


class Checkpoints(Protocol):
    """Where the last checkpoint is read from and written to."""

    origin: str  # named in errors

    def load(self) -> Optional[dict]: ...

    def save(self, state: dict) -> None: ...


class SharedCheckpoints:
    """Rank 0 reads and writes `checkpoints`; every rank resumes from what rank 0 read, so the ranks
    need no shared folder."""

    def __init__(self, checkpoints: Optional[Checkpoints]) -> None:
        self.checkpoints = checkpoints  # rank 0's; None on the others
        self.origin = checkpoints.origin if checkpoints else "rank 0's checkpoint"

    def load(self) -> Optional[dict]:
        state = [self.checkpoints.load() if rank() == 0 else None]
        if world_size() > 1:
            dist.broadcast_object_list(state, src=0)  # pickled between this training's own processes
        return state[0]

    def save(self, state: dict) -> None:
        if rank() == 0:
            self.checkpoints.save(state)
