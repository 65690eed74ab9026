"""Where and how a run executes: device choice, seeding, determinism and the CPU thread budget."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from adapters_store.config import StoreSettings

from .errors import TrainError
from .loaders import available_cpus


def resolve_device(requested: str | None, settings: StoreSettings | None = None) -> torch.device:
    """``requested``, else ``DELTACLIP_DEVICE`` when it is set, else CUDA when present, else CPU.

    Raises:
        TrainError: a CUDA device was asked for on a machine without one.
    """
    if requested is None and settings is not None and "device" in settings.model_fields_set:
        requested = settings.device
    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(str(requested))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"device {requested!r} was requested but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators: a run's draws depend on its seed only."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic kernels for the duration of a run, then the caller's settings again.

    CPU runs with one seed are bit-for-bit repeatable; on CUDA the few ops without a
    deterministic kernel warn rather than fail.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[2:]


@contextmanager
def thread_budget(
    device: torch.device, num_workers: int, threads: int | None = None
) -> Iterator[int]:
    """Give the compute the cores the loader processes leave free, so none is oversubscribed.

    On CPU the model gets ``max(1, cpus − workers)`` intra-op threads unless ``threads`` says
    otherwise (each loader process runs one, as PyTorch sets in workers); on CUDA the count is
    left alone. Restored on exit. On a machine shared with other busy processes, fewer threads
    than cores is much faster for small models: OpenMP threads that wait for a descheduled
    sibling spin, so ``threads=1`` can beat 2 by an order of magnitude there.
    """
    previous = torch.get_num_threads()
    if threads is None:
        threads = max(1, available_cpus() - num_workers) if device.type == "cpu" else previous
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(previous)


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """bfloat16 autocast on CUDA when ``enabled`` (mixed precision is CUDA-only); else a no-op."""
    if enabled and device.type != "cuda":
        raise TrainError("mixed precision (--amp) is only supported on CUDA devices")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)
