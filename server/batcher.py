"""Task-grouped dynamic batching on one supervised worker thread that owns the model.

Requests wait in a bounded queue. The worker takes a *round*: everything that is waiting, after
waiting up to ``max_wait`` for a first ``max_batch`` images to arrive. It groups the round's jobs
by key (the adapter digest) and runs them in forward passes of at most ``max_batch`` images.
Taking the whole queue rather than its first ``max_batch`` jobs is what keeps batches full when
many tasks are busy: with 30 tasks and 480 requests waiting, a round is 30 full batches and 30
swaps, not 30 batches of one image each. No job waits for one that arrived after its round was
taken.

Rounds are fair: the group of the adapter that is already patched runs one forward first (it
saves a swap), then each forward goes to the group whose oldest waiting job is oldest, one
``max_batch`` chunk at a time, so a long group is split and a task waits at most one forward per
earlier-arriving group, never behind a flood of later jobs for another task.

Admission (:meth:`Batcher.admit`) is the first thing a request does: at most ``queue_size``
requests hold a place (admitted, queued, or in the worker's current round and not yet run); one
more is refused at once (503) before any lookup, load or decode. A job whose caller gave up
(timeout, cancellation, disconnect) is dropped with :meth:`Batcher.drop`: its place is released
at once and the worker never runs it.

Supervision: everything a round does sits inside error handling, and a failing job fails alone
(a failed forward of several jobs is retried job by job). If the worker thread dies anyway, it
records why (:attr:`Batcher.down`), fails every waiting job and call at once with
:class:`WorkerDown`, and reports to ``on_death``; the owner restarts it (:meth:`Batcher.restart`)
once the base is verified. Every call onto the worker (:meth:`Batcher.call`) has a timeout.

With ``fixed_batch`` (the server's deterministic mode) every forward pass has exactly that many
images, the rest padded with zeros: kernels pick their algorithm and reduction order by shape, so
a varying batch size changes an image's float rounding with its batch companions; at one fixed
shape an image's answer depends on its pixels only (docs/API.md says what is bit-identical).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

import torch

from .metrics import Metrics
from .planner import MIXED, Planner
from .work import BatchFn, Call, Job, JobState, Ticket, hand_back

log = logging.getLogger("deltaclip.server")

IDLE_TICK_S = 0.5  # how often an idle worker wakes up for its between-rounds duties


class QueueFull(Exception):
    """The request queue is at capacity."""


class WorkerDown(Exception):
    """The model worker died; it is being restarted (the message says why it is down)."""


class CallTimeout(TimeoutError):
    """A call onto the worker got no answer within its timeout."""


class Batcher:
    def __init__(
        self,
        max_batch: int,
        max_wait_s: float,
        queue_size: int,
        metrics: Metrics,
        current_key: Callable[[], Hashable] = lambda: None,
        fixed_batch: int | None = None,
        between_rounds: Callable[[], None] | None = None,
        on_death: Callable[[str], None] | None = None,
        planner: Planner | None = None,  # mixed-task forwards (server/planner.py)
    ) -> None:
        self.max_batch = max_batch
        self._planner = planner
        self.fixed_batch = fixed_batch
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self._queue: queue.Queue[Job | Call | None] = queue.Queue()
        self._waiting = 0  # places held: admitted and not yet run or dropped
        self._lock = threading.Lock()
        self._metrics = metrics
        self._current_key = current_key
        self._between_rounds = between_rounds
        self._on_death = on_death
        self._round: list[Job] = []  # the worker's current round (to fail it if the worker dies)
        self.down: str | None = None  # why the worker is down, while it is
        self.deaths = 0
        self._thread = self._new_thread()

    def _new_thread(self) -> threading.Thread:
        return threading.Thread(target=self._main, name="model-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

    def join(self, timeout: float) -> None:
        """Wait for the worker thread to end (after :meth:`stop`, or after it died)."""
        self._thread.join(timeout)

    def restart(self) -> None:
        """Start a fresh worker thread after a death (the owner has verified the base)."""
        if self._thread.is_alive():
            raise RuntimeError("the worker is still running")
        self._thread = self._new_thread()
        with self._lock:
            self.down = None
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def depth(self) -> int:
        """Places held: requests admitted, queued, or in the worker's round and not yet run."""
        return self._waiting

    # ------------------------------------------------------------------------------ event loop

    def admit(self) -> Ticket:
        """A place in the queue, taken before the request does anything expensive.

        Raises:
            WorkerDown: the worker is down (fail fast rather than wait for a timeout).
            QueueFull: ``queue_size`` places are held.
        """
        with self._lock:
            if self.down is not None:
                raise WorkerDown(self.down)
            if self._waiting >= self.queue_size:
                raise QueueFull
            self._waiting += 1
        self._metrics.queue_depth.set(self._waiting)
        return Ticket(self._release)

    def _release(self) -> None:
        with self._lock:
            self._waiting -= 1
        self._metrics.queue_depth.set(self._waiting)

    def submit(
        self,
        key: Hashable,
        fn: BatchFn,
        images: torch.Tensor,
        ticket: Ticket | None = None,
        mix: Any = None,
    ) -> Job:
        """Queue a job from the event loop; await ``job.future`` for the ``[N, C]`` result.

        ``ticket`` is the place :meth:`admit` gave; without one, a place is taken here."""
        ticket = ticket if ticket is not None else self.admit()
        loop = asyncio.get_running_loop()
        job = Job(key, fn, images, loop.create_future(), loop, ticket, mix=mix)
        if self.down is not None:
            ticket.release()
            raise WorkerDown(self.down)
        self._queue.put_nowait(job)
        return job

    def drop(self, job: Job) -> bool:
        """Drop a job its caller gave up on: if it has not started, the worker never runs it and
        its place is released now. True when it was dropped, False when it had already started."""
        with self._lock:
            if job.state is not JobState.QUEUED:
                return False
            job.state = JobState.DROPPED
        job.ticket.release()
        return True

    async def call(self, fn: Callable[[], Any], timeout: float) -> Any:
        """Run ``fn`` on the worker thread between rounds (e.g. to read the live weights).

        Raises:
            WorkerDown: the worker is down.
            CallTimeout: no answer within ``timeout`` seconds (the call is then skipped if it
                has not started).
        """
        loop = asyncio.get_running_loop()
        item = Call(fn, loop.create_future(), loop)
        if self.down is not None:
            raise WorkerDown(self.down)
        self._queue.put_nowait(item)
        try:
            return await asyncio.wait_for(asyncio.shield(item.future), timeout)
        except TimeoutError:
            item.abandoned = True
            raise CallTimeout(f"the model worker did not answer within {timeout:g}s") from None

    # ------------------------------------------------------------------------------ worker

    def _main(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # the supervisor: record, fail everything waiting, report
            self._died(exc)

    def _loop(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=IDLE_TICK_S)
            except queue.Empty:
                self._idle()
                continue
            if item is None:
                return
            if isinstance(item, Call):
                self._run_call(item)
                continue
            self._round = [item]  # a dying worker fails the round's jobs too
            jobs, calls, stop = self._collect(item)
            self._run_round(jobs)
            for call in calls:
                self._run_call(call)
            self._idle()
            if stop:
                return

    def _idle(self) -> None:
        if self._between_rounds is None:
            return
        try:
            self._between_rounds()
        except Exception:
            log.exception("the worker's between-rounds duty failed")

    def _died(self, exc: BaseException) -> None:
        reason = f"the model worker failed ({type(exc).__name__}) and is restarting"
        log.critical("model worker died: %s: %s", type(exc).__name__, exc, exc_info=exc)
        with self._lock:
            self.down = reason
            self.deaths += 1
        error = WorkerDown(reason)
        for job in self._round:  # taken into the dead round and not answered
            self.drop(job)
            hand_back(job.loop, job.future, error=error)
        self._round = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Job):
                if self.drop(item):
                    hand_back(item.loop, item.future, error=error)
            elif isinstance(item, Call):
                hand_back(item.loop, item.future, error=error)
        if self._on_death is not None:
            self._on_death(reason)

    def _collect(self, first: Job) -> tuple[list[Job], list[Call], bool]:
        """The round: everything waiting, after up to ``max_wait`` for ``max_batch`` images.

        Terminates: admission keeps at most ``queue_size`` jobs waiting, and the jobs taken here
        still count as waiting, so producers cannot outrun the drain."""
        jobs: list[Job] = [first]
        calls: list[Call] = []
        stop = False
        self._round = jobs
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
            if isinstance(item, Call):
                calls.append(item)
                continue
            jobs.append(item)
            images += item.images.shape[0]
        return jobs, calls, stop

    def _run_call(self, call: Call) -> None:
        if call.abandoned:
            return
        try:
            value = call.fn()
        except Exception as exc:  # handed to the awaiting coroutine
            hand_back(call.loop, call.future, error=exc)
        else:
            hand_back(call.loop, call.future, value)

    def _run_round(self, jobs: list[Job]) -> None:
        """One round, fairly ordered; an error outside any one job fails the round's unanswered
        jobs (never the worker)."""
        self._round = jobs
        try:
            self._schedule(jobs)
        except Exception as exc:
            log.exception("a round failed outside any one job")
            for job in jobs:
                if self.drop(job) or job.state is JobState.RUNNING:
                    hand_back(job.loop, job.future, error=exc)
        self._round = []

    def _schedule(self, jobs: list[Job]) -> None:
        groups: dict[Hashable, deque[Job]] = {}
        for job in jobs:
            groups.setdefault(job.key, deque()).append(job)
        current = self._current_key()
        if self._planner is not None:
            self._planner.split(groups, current)  # the groups cheaper mixed go under MIXED
        key: Hashable = current
        if current not in groups:  # the patched group first (one chunk saves a swap), then fair
            key = min(groups, key=lambda k: groups[k][0].enqueued)
        while groups:
            chunk = self._take_chunk(groups[key])
            if not groups[key]:
                del groups[key]
            if chunk and key == MIXED and self._planner is not None:
                self._planner.run(chunk, self._run_chunk, self._metrics.batch_size.observe)
            elif chunk:
                self._run_chunk(chunk)
            if groups:
                key = min(groups, key=lambda k: groups[k][0].enqueued)

    def _take_chunk(self, pending: deque[Job]) -> list[Job]:
        """Up to ``max_batch`` images of one group's jobs, oldest first. Dropped jobs are passed
        over as the chunk is formed: a round can be long, and a caller may give up meanwhile."""
        chunk: list[Job] = []
        size = 0
        while pending:
            job = pending[0]
            n = job.images.shape[0]
            if chunk and size + n > self.max_batch:
                break
            pending.popleft()
            with self._lock:
                if job.state is not JobState.QUEUED:
                    continue
                job.state = JobState.RUNNING
            job.ticket.release()
            chunk.append(job)
            size += n
        return chunk

    def _run_chunk(self, chunk: list[Job]) -> None:
        """One forward pass for the chunk's jobs; if it fails, each job is retried alone, so a
        failing job fails alone."""
        try:
            images = torch.cat([j.images for j in chunk]) if len(chunk) > 1 else chunk[0].images
            self._metrics.batch_size.observe(images.shape[0])
            out = self._forward(chunk[0].fn, images)
            if out.shape[0] != images.shape[0]:
                raise RuntimeError(f"{out.shape[0]} answers for {images.shape[0]} images")
        except Exception as exc:
            if len(chunk) == 1:
                hand_back(chunk[0].loop, chunk[0].future, error=exc)
            else:
                for job in chunk:
                    self._run_chunk([job])
            return
        start = 0
        for job in chunk:
            n = job.images.shape[0]
            hand_back(job.loop, job.future, out[start : start + n])
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
