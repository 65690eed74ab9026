"""The batcher: grouping by key, batch limits, fair rounds, backpressure, dropped jobs, and the
supervised worker (a failing job fails alone; a dead worker fails what waits and is restarted).

No test sleeps to synchronise: the worker's progress is observed through events its job
functions set."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest
import torch

from server.batcher import Batcher, CallTimeout, QueueFull, WorkerDown
from server.metrics import Metrics
from server.work import BatchFn


def make(
    max_batch: int = 8,
    wait: float = 0.05,
    queue_size: int = 64,
    current: object = None,
    on_death: Callable[[str], None] | None = None,
) -> Batcher:
    return Batcher(max_batch, wait, queue_size, Metrics(), lambda: current, on_death=on_death)


def holding(started: threading.Event, release: threading.Event) -> BatchFn:
    """A job function that signals it runs, then holds the worker until released."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        started.set()
        assert release.wait(10), "never released"
        return x

    return fn


async def until(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, 10), "the worker never got there"


def test_groups_by_key_and_splits_results() -> None:
    calls: list[tuple[str, int]] = []

    def fn_for(key: str):  # type: ignore[no-untyped-def]
        def fn(x: torch.Tensor) -> torch.Tensor:
            calls.append((key, x.shape[0]))
            return x * (10 if key == "a" else 100)

        return fn

    async def main() -> list[torch.Tensor]:
        b = make()
        jobs = [b.submit(k, fn_for(k), torch.full((n, 1), float(i))) for i, (k, n) in
                enumerate([("a", 1), ("b", 2), ("a", 3), ("b", 1)])]  # fmt: skip
        b.start()  # everything is already queued: one collection, two groups
        out = await asyncio.gather(*(j.future for j in jobs))
        b.stop()
        return out

    out = asyncio.run(main())
    assert sorted(calls) == [("a", 4), ("b", 3)]
    assert [t.flatten().tolist() for t in out] == [
        [0.0],
        [100.0, 100.0],
        [20.0, 20.0, 20.0],
        [300.0],
    ]


def test_respects_max_batch_and_runs_the_patched_group_first() -> None:
    order: list[tuple[str, int]] = []

    def fn_for(key: str):  # type: ignore[no-untyped-def]
        def fn(x: torch.Tensor) -> torch.Tensor:
            order.append((key, x.shape[0]))
            return x

        return fn

    async def main() -> None:
        b = make(max_batch=4, current="patched")
        jobs = [b.submit("other", fn_for("other"), torch.zeros(1, 1)) for _ in range(2)]
        jobs += [b.submit("patched", fn_for("patched"), torch.zeros(1, 1)) for _ in range(2)]
        b.start()
        await asyncio.gather(*(j.future for j in jobs))
        b.stop()

    asyncio.run(main())
    assert order[0][0] == "patched"
    assert all(n <= 4 for _, n in order)


def test_full_queue_refuses_at_once_and_dropped_jobs_free_their_place_and_never_run() -> None:
    started, release = threading.Event(), threading.Event()
    ran: list[int] = []

    def slow(x: torch.Tensor) -> torch.Tensor:
        started.set()
        assert release.wait(10)
        ran.append(int(x[0, 0]))
        return x

    async def main() -> None:
        b = make(max_batch=1, wait=0, queue_size=2)
        b.start()
        first = b.submit("k", slow, torch.full((1, 1), 1.0))
        await until(started)  # the worker holds the first job (its place is free again)
        second = b.submit("k", slow, torch.full((1, 1), 2.0))
        third = b.submit("k", slow, torch.full((1, 1), 3.0))
        with pytest.raises(QueueFull):
            b.submit("k", slow, torch.full((1, 1), 4.0))
        assert b.drop(second)  # its caller gave up: the place is released now, not when reached
        assert b.depth == 1
        fourth = b.submit("k", slow, torch.full((1, 1), 4.0))
        assert not b.drop(second)  # once only
        release.set()
        await asyncio.gather(first.future, third.future, fourth.future)
        assert not second.future.done()  # never run, never answered
        assert b.depth == 0
        b.stop()

    asyncio.run(main())
    assert ran == [1, 3, 4]


def test_errors_reach_the_caller_and_the_worker_survives() -> None:
    def boom(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("kaput")

    async def main() -> torch.Tensor:
        b = make(wait=0)
        b.start()
        with pytest.raises(RuntimeError, match="kaput"):
            await b.submit("a", boom, torch.zeros(1, 1)).future
        ok = await b.submit("b", lambda x: x + 1, torch.zeros(1, 1)).future
        assert await b.call(lambda: 42, timeout=10) == 42
        b.stop()
        return ok

    assert asyncio.run(main()).item() == 1.0


def test_a_round_takes_the_whole_queue_so_interleaved_tasks_get_full_batches() -> None:
    calls: list[tuple[str, int]] = []

    def fn_for(key: str):  # type: ignore[no-untyped-def]
        def fn(x: torch.Tensor) -> torch.Tensor:
            calls.append((key, x.shape[0]))
            return x

        return fn

    async def main() -> None:
        b = make(max_batch=4, wait=0)
        keys = ["a", "b", "c"] * 5  # 15 jobs, interleaved: the first 4 hold three tasks
        jobs = [b.submit(k, fn_for(k), torch.zeros(1, 1)) for k in keys]
        assert b.depth == 15
        b.start()
        await asyncio.gather(*(j.future for j in jobs))
        assert b.depth == 0
        b.stop()

    asyncio.run(main())
    # One round: per task a full batch of 4, then the remaining 1 each, each forward going to
    # the group whose oldest waiting job is oldest.
    assert calls == [("a", 4), ("b", 4), ("c", 4), ("a", 1), ("b", 1), ("c", 1)]


def test_jobs_taken_into_a_round_still_count_against_the_queue_limit() -> None:
    started, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def fn_for(key: str):  # type: ignore[no-untyped-def]
        def fn(x: torch.Tensor) -> torch.Tensor:
            if key == "slow":
                started.set()
                assert release.wait(10)
            ran.append(key)
            return x

        return fn

    async def main() -> None:
        b = make(max_batch=1, wait=0, queue_size=3)
        first = [b.submit(k, fn_for(k), torch.zeros(1, 1)) for k in ("slow", "b", "c")]
        b.start()
        await until(started)  # the round [slow, b, c] is taken; "slow" runs
        assert b.depth == 2  # b and c wait in the worker's round, not in the queue
        d = b.submit("d", fn_for("d"), torch.zeros(1, 1))
        with pytest.raises(QueueFull):
            b.submit("e", fn_for("e"), torch.zeros(1, 1))
        assert b.drop(first[2])  # c's caller gives up while the round is running
        release.set()
        await asyncio.gather(first[0].future, first[1].future, d.future)
        b.stop()
        assert b.depth == 0

    asyncio.run(main())
    assert ran == ["slow", "b", "d"]


def test_rounds_are_fair_a_rare_task_is_not_run_behind_a_flood_of_later_jobs() -> None:
    """A, C, then 63 more A: C's forward is the second, not the last (issue 24)."""
    calls: list[tuple[str, int]] = []

    def fn_for(key: str) -> BatchFn:
        def fn(x: torch.Tensor) -> torch.Tensor:
            calls.append((key, x.shape[0]))
            return x

        return fn

    async def main() -> None:
        b = make(max_batch=16, wait=0, queue_size=128)
        keys = ["A", "C"] + ["A"] * 63
        jobs = [b.submit(k, fn_for(k), torch.zeros(1, 1)) for k in keys]
        b.start()  # one round holds all 65 jobs
        await asyncio.gather(*(j.future for j in jobs))
        b.stop()

    asyncio.run(main())
    assert calls == [("A", 16), ("C", 1), ("A", 16), ("A", 16), ("A", 16)]


def test_a_failing_job_fails_alone_even_inside_a_shared_forward() -> None:
    def picky(x: torch.Tensor) -> torch.Tensor:
        if (x < 0).any():
            raise ValueError("negative input")
        return x * 2

    async def main() -> list[object]:
        b = make(max_batch=8, wait=0)
        jobs = [b.submit("k", picky, torch.full((1, 1), v)) for v in (1.0, -1.0, 3.0)]
        b.start()  # one chunk of three: the forward fails, then each job is run alone
        out = await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)
        b.stop()
        return out

    good, bad, other = asyncio.run(main())
    assert isinstance(bad, ValueError)
    assert isinstance(good, torch.Tensor) and good.item() == 2.0
    assert isinstance(other, torch.Tensor) and other.item() == 6.0


def test_an_error_outside_any_job_fails_that_round_only_and_the_worker_survives() -> None:
    async def main() -> None:
        b = make(wait=0)
        broken = {"on": True}

        def current_key() -> object:  # read once per round, outside every job
            if broken.pop("on", False):
                raise RuntimeError("the round's bookkeeping failed")
            return None

        b._current_key = current_key
        first = b.submit("a", lambda x: x, torch.zeros(1, 1))
        b.start()
        with pytest.raises(RuntimeError, match="bookkeeping"):
            await first.future
        assert b.alive and b.down is None and b.depth == 0
        later = await b.submit("a", lambda x: x + 1, torch.zeros(1, 1)).future
        assert later.item() == 1.0
        b.stop()

    asyncio.run(main())


class Fatal(BaseException):
    """Escapes every ``except Exception``: what kills a worker thread."""


def test_a_dead_worker_fails_what_waits_at_once_reports_and_can_be_restarted() -> None:
    died: list[str] = []
    reported = threading.Event()

    def on_death(reason: str) -> None:
        died.append(reason)
        reported.set()

    started, release = threading.Event(), threading.Event()

    def fatal(x: torch.Tensor) -> torch.Tensor:
        started.set()
        assert release.wait(10)
        raise Fatal

    async def main() -> None:
        b = make(max_batch=1, wait=0, on_death=on_death)
        b.start()
        killer = b.submit("k", fatal, torch.zeros(1, 1))
        await until(started)
        waiting = [b.submit("k", lambda x: x, torch.zeros(1, 1)) for _ in range(3)]
        call = asyncio.ensure_future(b.call(lambda: 1, timeout=30))
        await asyncio.sleep(0)  # the call is queued
        release.set()
        await until(reported)
        assert died and "restarting" in died[0] and b.down == died[0]
        assert not b.alive
        for job in [killer, *waiting]:  # all answered at once, none left to time out
            with pytest.raises(WorkerDown):
                await asyncio.wait_for(job.future, 5)
        with pytest.raises(WorkerDown):
            await asyncio.wait_for(call, 5)
        assert b.depth == 0
        with pytest.raises(WorkerDown):  # fail fast while down
            b.admit()
        with pytest.raises(WorkerDown):
            await b.call(lambda: 1, timeout=5)
        b.join(10)
        b.restart()
        assert b.down is None
        assert (await b.submit("k", lambda x: x + 5, torch.zeros(1, 1)).future).item() == 5.0
        b.stop()

    asyncio.run(main())


def test_every_call_onto_the_worker_times_out_and_a_timed_out_call_never_runs() -> None:
    started, release = threading.Event(), threading.Event()
    ran: list[str] = []

    async def main() -> None:
        b = make(max_batch=1, wait=0)
        b.start()
        busy = b.submit("k", holding(started, release), torch.zeros(1, 1))
        await until(started)
        with pytest.raises(CallTimeout):
            await b.call(lambda: ran.append("late"), timeout=0.05)
        release.set()
        await busy.future
        assert await b.call(lambda: "now", timeout=10) == "now"
        b.stop()

    asyncio.run(main())
    assert ran == []


def test_admission_reserves_a_place_before_any_job_exists() -> None:
    async def main() -> None:
        b = make(queue_size=2)
        t1, t2 = b.admit(), b.admit()
        with pytest.raises(QueueFull):
            b.admit()
        t1.release()
        t1.release()  # idempotent: the place is freed once
        assert b.depth == 1
        job = b.submit("k", lambda x: x, torch.zeros(1, 1), t2)
        assert b.depth == 1  # the job holds the ticket's place, not a second one
        b.start()
        await job.future
        assert b.depth == 0
        b.stop()

    asyncio.run(main())


def test_a_batch_that_cannot_be_stacked_is_run_job_by_job() -> None:
    """Stacking a chunk's images used to sit outside the worker's error handling: one odd shape
    killed the worker. Now the stacking fails the chunk, and each job runs alone."""
    shapes: list[tuple[int, ...]] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(x.shape))
        return x.sum(dim=1, keepdim=True)

    async def main() -> list[torch.Tensor]:
        b = make(max_batch=8, wait=0)
        jobs = [b.submit("k", fn, torch.ones(1, n)) for n in (2, 3)]  # torch.cat cannot stack
        b.start()
        out = await asyncio.gather(*(j.future for j in jobs))
        assert b.alive and b.depth == 0
        b.stop()
        return out

    out = asyncio.run(main())
    assert [t.item() for t in out] == [2.0, 3.0]
    assert shapes == [(1, 2), (1, 3)]
