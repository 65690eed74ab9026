"""Task-grouped dynamic batching on one worker thread that owns the model.

Requests wait in a bounded queue. The worker takes a *round*: everything that is waiting, after
waiting up to ``max_wait`` for a first ``max_batch`` images to arrive. It groups the round's jobs
by key (the adapter digest), runs the group of the adapter that is already patched first, then
each other group in order of arrival with one swap, in forward passes of at most ``max_batch``
images, and hands results back to the event loop. Taking the whole queue rather than its first
``max_batch`` jobs is what keeps batches full when many tasks are busy: with 30 tasks and 480
requests waiting, a round is 30 full batches and 30 swaps, not 30 batches of one image each.
No job waits for one that arrived after its round was taken.

At most ``queue_size`` jobs wait (queued or in the worker's current round, not yet run); one more
is refused at once (503), and jobs whose caller gave up (504) are skipped.

With ``fixed_batch`` (the server's deterministic mode) every forward pass has exactly that many
images, the rest padded with zeros: kernels pick their algorithm and reduction order by shape, so
a varying batch size changes an image's float rounding with its batch companions; at one fixed
shape an image's answer depends on its pixels only (docs/API.md says what is bit-identical).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from .metrics import Metrics

BatchFn = Callable[[torch.Tensor], torch.Tensor]


class QueueFull(Exception):
    """The request queue is at capacity."""


@dataclass(eq=False)
class Job:
    key: Hashable
    fn: BatchFn
    images: torch.Tensor
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    abandoned: bool = False
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass(eq=False)
class _Call:
    fn: Callable[[], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


def _resolve(
    future: asyncio.Future[Any], value: Any = None, error: BaseException | None = None
) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class Batcher:
    def __init__(
        self,
        max_batch: int,
        max_wait_s: float,
        queue_size: int,
        metrics: Metrics,
        current_key: Callable[[], Hashable] = lambda: None,
        fixed_batch: int | None = None,
    ) -> None:
        self.max_batch = max_batch
        self.fixed_batch = fixed_batch
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self._queue: queue.Queue[Job | _Call | None] = queue.Queue()
        self._waiting = 0  # jobs submitted and not yet run or skipped
        self._lock = threading.Lock()
        self._metrics = metrics
        self._current_key = current_key
        self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

    @property
    def depth(self) -> int:
        """Jobs waiting: queued, or taken into the worker's round and not yet run."""
        return self._waiting

    def submit(self, key: Hashable, fn: BatchFn, images: torch.Tensor) -> Job:
        """Queue a job from the event loop; await ``job.future`` for the ``[N, C]`` result."""
        loop = asyncio.get_running_loop()
        job = Job(key, fn, images, loop.create_future(), loop)
        with self._lock:
            if self._waiting >= self.queue_size:
                raise QueueFull
            self._waiting += 1
        self._queue.put_nowait(job)
        self._metrics.queue_depth.set(self._waiting)
        return job

    def _started(self, n: int) -> None:
        with self._lock:
            self._waiting -= n
        self._metrics.queue_depth.set(self._waiting)

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the worker thread between batches (e.g. to read the live weights)."""
        loop = asyncio.get_running_loop()
        item = _Call(fn, loop.create_future(), loop)
        await asyncio.to_thread(self._queue.put, item)
        return await item.future

    # ------------------------------------------------------------------------------ worker

    def _collect(self, first: Job) -> tuple[list[Job], list[_Call], bool]:
        """The round: everything waiting, after up to ``max_wait`` for ``max_batch`` images.

        Terminates: admission keeps at most ``queue_size`` jobs waiting, and the jobs taken here
        still count as waiting, so producers cannot outrun the drain."""
        jobs, calls, stop = [first], [], False
        images = first.images.shape[0]
        deadline = time.perf_counter() + self.max_wait_s
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                timeout = deadline - time.perf_counter()
                if images >= self.max_batch or timeout <= 0:
                    break
                try:
                    item = self._queue.get(timeout=timeout)
                except queue.Empty:
                    break
            if item is None:
                stop = True
                break
            if isinstance(item, _Call):
                calls.append(item)
                continue
            jobs.append(item)
            images += item.images.shape[0]
        return jobs, calls, stop

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, _Call):
                self._run_call(item)
                continue
            jobs, calls, stop = self._collect(item)
            self._run_jobs(jobs)
            for call in calls:
                self._run_call(call)
            if stop:
                return

    def _run_call(self, call: _Call) -> None:
        try:
            value = call.fn()
        except BaseException as exc:  # handed to the awaiting coroutine
            call.loop.call_soon_threadsafe(_resolve, call.future, None, exc)
        else:
            call.loop.call_soon_threadsafe(_resolve, call.future, value)

    def _run_jobs(self, jobs: list[Job]) -> None:
        groups: dict[Hashable, list[Job]] = {}
        for job in jobs:
            groups.setdefault(job.key, []).append(job)
        current = self._current_key()
        order = sorted(groups, key=lambda k: k != current)  # the patched adapter's group first
        for key in order:
            self._run_group(groups[key])

    def _run_group(self, group: list[Job]) -> None:
        """Run one key's jobs in chunks of at most ``max_batch`` images. Abandonment is checked
        as each chunk is formed: a round can be long, and a caller may give up meanwhile."""
        i = 0
        while i < len(group):
            chunk: list[Job] = []
            size = 0
            while i < len(group):
                job = group[i]
                if job.abandoned:
                    self._started(1)
                elif chunk and size + job.images.shape[0] > self.max_batch:
                    break
                else:
                    chunk.append(job)
                    size += job.images.shape[0]
                i += 1
            if chunk:
                self._run_chunk(chunk)

    def _run_chunk(self, chunk: list[Job]) -> None:
        self._started(len(chunk))
        images = torch.cat([j.images for j in chunk]) if len(chunk) > 1 else chunk[0].images
        self._metrics.batch_size.observe(images.shape[0])
        try:
            out = self._forward(chunk[0].fn, images)
        except BaseException as exc:
            for job in chunk:
                job.loop.call_soon_threadsafe(_resolve, job.future, None, exc)
            return
        start = 0
        for job in chunk:
            n = job.images.shape[0]
            job.loop.call_soon_threadsafe(_resolve, job.future, out[start : start + n])
            start += n

    def _forward(self, fn: BatchFn, images: torch.Tensor) -> torch.Tensor:
        """``fn(images)``, or with ``fixed_batch`` in passes of exactly that shape (zero-padded)."""
        size = self.fixed_batch
        if size is None:
            return fn(images)
        outs = []
        for start in range(0, images.shape[0], size):
            part = images[start : start + size]
            n = part.shape[0]
            if n < size:
                part = torch.cat([part, part.new_zeros((size - n, *part.shape[1:]))])
            outs.append(fn(part)[:n])
        return torch.cat(outs)
