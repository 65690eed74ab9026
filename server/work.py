"""The units of work the model worker takes from the event loop, and how answers go back.

A :class:`Ticket` is a request's place in the bounded queue, taken before anything expensive
and released exactly once: when its job starts running, when the job is dropped, or when the
request fails before it submits a job. A :class:`Job` moves QUEUED → RUNNING or QUEUED →
DROPPED under the batcher's lock, so a cancelled request's job never runs and its place is
never released twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

BatchFn = Callable[[torch.Tensor], torch.Tensor]


class Ticket:
    """One place in the queue; :meth:`release` is idempotent and thread-safe."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release: Callable[[], None] | None = release
        self._lock = threading.Lock()

    @property
    def held(self) -> bool:
        return self._release is not None

    def release(self) -> None:
        with self._lock:
            release, self._release = self._release, None
        if release is not None:
            release()


class JobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DROPPED = "dropped"


@dataclass(eq=False)
class Job:
    key: Hashable
    fn: BatchFn
    images: torch.Tensor
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    ticket: Ticket
    state: JobState = JobState.QUEUED
    enqueued: float = field(default_factory=time.perf_counter)
    mix: Any = None  # a planner.MixSpec when the job may ride in a mixed forward
    path: str = "patched"  # the path that answered: "patched" or "mixed"


@dataclass(eq=False)
class Call:
    fn: Callable[[], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    abandoned: bool = False


def _resolve(
    future: asyncio.Future[Any], value: Any = None, error: BaseException | None = None
) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def hand_back(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    value: Any = None,
    error: BaseException | None = None,
) -> None:
    """Resolve ``future`` on its loop from the worker thread (once; a closed loop is ignored:
    nobody is waiting there any more)."""
    with contextlib.suppress(RuntimeError):  # the loop is closed
        loop.call_soon_threadsafe(_resolve, future, value, error)
