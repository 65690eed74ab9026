"""Loaders: endless seeded (source, target) batches for training, one ordered pass for evaluation.

Training batches come from :class:`InfiniteBatchSampler`, which makes the data order *and* every
sample's augmentation a pure function of ``(seed, position in the stream)``: a run gives the same
result with 0 or 2 loader processes, and a resumed run continues exactly where it stopped, with
no sampler state to save. Source and target share one loader (one pool of processes), whose size
defaults to ``min(2, cpus)``; ``trainer.execution.thread_budget`` gives the compute the rest.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from .data import ImageDataset

_MASK64 = (1 << 64) - 1


def _mix(*values: int) -> int:
    """A well-spread 63-bit seed from integers (splitmix64 finaliser), stable across runs."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h >> 1


class InfiniteBatchSampler:
    """Endless full batches of ``(index, augmentation seed)``, reshuffled at every pass.

    The stream is the concatenation of seeded permutations of ``range(n)``; batch ``t`` is the
    slice ``[t*B, (t+1)*B)`` of it, so batches never come up short (even when ``n < B``) and
    ``start_step`` resumes at batch ``t`` without replaying the ones before.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int = 0) -> None:
        if n < 1 or batch_size < 1:
            raise ValueError("need at least one sample and a batch size >= 1")
        self.n, self.batch_size, self.seed, self.start_step = n, batch_size, seed, start_step

    def _perm(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(_mix(self.seed, epoch))
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        pos = self.start_step * self.batch_size
        epoch, perm = -1, []
        while True:
            batch = []
            for p in range(pos, pos + self.batch_size):
                if p // self.n != epoch:
                    epoch = p // self.n
                    perm = self._perm(epoch)
                batch.append((perm[p % self.n], _mix(self.seed, 1 << 40, p)))
            yield batch
            pos += self.batch_size


def available_cpus() -> int:
    """The cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """Loader processes by default: ``min(2, cpus)``, leaving the rest to the compute."""
    return min(2, available_cpus())


def _loader_kwargs(num_workers: int, pin_memory: bool) -> dict[str, Any]:
    kw: dict[str, Any] = {"num_workers": num_workers, "pin_memory": pin_memory}
    if num_workers > 0:
        kw.update(persistent_workers=True, prefetch_factor=2)
    return kw


class PairedDataset(Dataset[tuple[int, Any, int]]):
    """Source (domain 0) and target (domain 1) items behind one loader.

    One pool of loader processes then serves both domains, so ``num_workers`` is the whole
    data-loading budget of a run rather than a per-domain one.
    """

    def __init__(self, source: ImageDataset, target: ImageDataset) -> None:
        self.domains = (source, target)

    def __len__(self) -> int:
        return sum(len(d) for d in self.domains)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[int, Any, int]:
        domain, index, seed = key
        image, label = self.domains[domain][(index, seed)]
        return domain, image, label


class PairedBatchSampler:
    """Step ``t``'s batch: ``B`` source items then ``B`` target items, each domain its own stream."""

    def __init__(self, n_source: int, n_target: int, batch_size: int, seed: int, start_step: int):
        self.source = InfiniteBatchSampler(n_source, batch_size, _mix(seed, 0), start_step)
        self.target = InfiniteBatchSampler(n_target, batch_size, _mix(seed, 1), start_step)

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        for src, tgt in zip(self.source, self.target, strict=True):
            yield [(0, i, z) for i, z in src] + [(1, i, z) for i, z in tgt]


def collate_pair(items: list[tuple[int, Any, int]]) -> tuple[Any, Any]:
    """``((source images, labels), (target images, labels))`` from one paired batch."""
    src = [(x, y) for d, x, y in items if d == 0]
    tgt = [(x, y) for d, x, y in items if d == 1]
    return default_collate(src), default_collate(tgt)


def paired_loader(
    source: ImageDataset,
    target: ImageDataset,
    batch_size: int,
    seed: int,
    start_step: int,
    num_workers: int,
    pin_memory: bool = False,
) -> DataLoader[Any]:
    """An endless loader of (source, target) batches from step ``start_step`` on."""
    sampler = PairedBatchSampler(len(source), len(target), batch_size, seed, start_step)
    return DataLoader(
        PairedDataset(source, target),
        batch_sampler=sampler,
        collate_fn=collate_pair,
        **_loader_kwargs(num_workers, pin_memory),
    )


def eval_loader(
    dataset: ImageDataset, batch_size: int, num_workers: int, pin_memory: bool = False
) -> DataLoader[Any]:
    """Every sample once, in order (persistent workers: it is iterated once per epoch)."""
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, **_loader_kwargs(num_workers, pin_memory)
    )
