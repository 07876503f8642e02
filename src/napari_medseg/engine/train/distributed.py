"""torchrun / DistributedDataParallel support for the training loop.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the loop wraps its loss module in DDP: NCCL on CUDA,
gloo on CPU. Each process samples from its own shard of the labeled data; only rank 0 writes
checkpoints and logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    """Process-group facts for this process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that saves and logs)."""
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device) -> DistContext:
        """Join the process group torchrun describes in the environment (or stay single)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend)
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def device_for(self, device: torch.device) -> torch.device:
        """One GPU per process under torchrun."""
        if device.type == "cuda" and self.world > 1:
            return torch.device("cuda", self.local_rank)
        return device

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """DDP-wrap ``module`` when running distributed."""
        if self.world <= 1:
            return module
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)

    def mean(self, value: float) -> float:
        """Average a float over all processes (validation Dice)."""
        if self.world <= 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def broadcast_state(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every process.

        DDP keeps parameters in step, but BatchNorm statistics from each process's last
        forward pass differ; validating and snapshotting after this keeps ranks identical.
        """
        if self.world <= 1:
            return
        with torch.no_grad():
            for t in module.state_dict().values():
                dist.broadcast(t, 0)

    def barrier(self) -> None:
        """Wait for every process."""
        if self.world > 1:
            dist.barrier()


def shutdown() -> None:
    """Leave the process group together: wait for every rank, then destroy it.

    Without the barrier one rank can tear down while another is still inside
    ``destroy_process_group``; when the first one hosts the rendezvous store (rank 0 of a plain
    ``env://`` start; under torchrun the agent hosts it), gloo's threads in the other lose their
    peer and that process aborts ("terminate called without an active exception"). A no-op
    when no group was started.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
