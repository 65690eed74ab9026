"""Multi-process training under ``torchrun`` (DistributedDataParallel).

Each rank trains on its own shard of every step's data (its sampler stream is mixed with the
rank), gradients are averaged by DDP, so every rank takes the same optimiser step and therefore
makes the same RST reset. That equality is what the adapter depends on, so it is checked, not
assumed: :func:`assert_replicas_identical` compares a digest of the tower across ranks after
every epoch. Only rank 0 logs, checkpoints, evaluates, writes and registers.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import TrainError


@dataclass(frozen=True)
class Distributed:
    """This process's place in a ``torchrun`` job; the defaults describe a single process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """More than one rank: gradients are averaged and replicas compared."""
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0, the one that logs, checkpoints, evaluates and writes the adapter."""
        return self.rank == 0


def from_environment() -> Distributed:
    """The ``torchrun`` layout (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), initialising the process
    group (NCCL on CUDA, gloo on CPU) when there is more than one rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    info = Distributed(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def rank_device(info: Distributed, device: torch.device) -> torch.device:
    """One GPU per rank on CUDA hosts; CPU ranks share the host."""
    if info.enabled and device.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return device


def tower_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors' keys and float32 bytes, comparable across ranks."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def assert_replicas_identical(
    info: Distributed, tensors: Mapping[str, torch.Tensor], where: str
) -> None:
    """Raise on every rank if the ranks' towers differ (RST must reset identically everywhere)."""
    if not info.enabled:
        return
    digests: list[str | None] = [None] * info.world
    dist.all_gather_object(digests, tower_digest(tensors))
    if len(set(digests)) != 1:
        raise TrainError(f"the ranks' image towers diverged {where}: {digests}")


def barrier(info: Distributed) -> None:
    """Wait for every rank (no-op when not distributed)."""
    if info.enabled:
        dist.barrier()


def shutdown(info: Distributed) -> None:
    """Leave the process group, so ``torchrun`` sees a clean exit (no-op when not distributed)."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
