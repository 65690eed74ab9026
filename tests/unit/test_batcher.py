"""The batcher: grouping by key, batch limits, patched-first ordering, backpressure, abandonment."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from server.batcher import Batcher, QueueFull
from server.metrics import Metrics


def make(
    max_batch: int = 8, wait: float = 0.05, queue_size: int = 64, current: object = None
) -> Batcher:
    return Batcher(max_batch, wait, queue_size, Metrics(), lambda: current)


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


def test_full_queue_refuses_at_once_and_abandoned_jobs_are_skipped() -> None:
    release = threading.Event()
    ran: list[int] = []

    def slow(x: torch.Tensor) -> torch.Tensor:
        release.wait(5)
        ran.append(int(x[0, 0]))
        return x

    async def main() -> None:
        b = make(max_batch=1, wait=0, queue_size=2)
        b.start()
        first = b.submit("k", slow, torch.full((1, 1), 1.0))
        await asyncio.sleep(0.1)  # the worker holds the first job
        second = b.submit("k", slow, torch.full((1, 1), 2.0))
        third = b.submit("k", slow, torch.full((1, 1), 3.0))
        with pytest.raises(QueueFull):
            b.submit("k", slow, torch.full((1, 1), 4.0))
        second.abandoned = True  # its caller timed out
        release.set()
        await asyncio.gather(first.future, third.future)
        b.stop()

    asyncio.run(main())
    assert ran == [1, 3]


def test_errors_reach_the_caller_and_the_worker_survives() -> None:
    def boom(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("kaput")

    async def main() -> torch.Tensor:
        b = make(wait=0)
        b.start()
        with pytest.raises(RuntimeError, match="kaput"):
            await b.submit("a", boom, torch.zeros(1, 1)).future
        ok = await b.submit("b", lambda x: x + 1, torch.zeros(1, 1)).future
        assert await b.call(lambda: 42) == 42
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
    # One round: per task a full batch of 4 and the remaining 1, tasks in order of arrival.
    assert calls == [("a", 4), ("a", 1), ("b", 4), ("b", 1), ("c", 4), ("c", 1)]


def test_jobs_taken_into_a_round_still_count_against_the_queue_limit() -> None:
    release = threading.Event()
    ran: list[str] = []

    def fn_for(key: str):  # type: ignore[no-untyped-def]
        def fn(x: torch.Tensor) -> torch.Tensor:
            if key == "slow":
                release.wait(5)
            ran.append(key)
            return x

        return fn

    async def main() -> None:
        b = make(max_batch=1, wait=0, queue_size=3)
        first = [b.submit(k, fn_for(k), torch.zeros(1, 1)) for k in ("slow", "b", "c")]
        b.start()
        await asyncio.sleep(0.1)  # the round [slow, b, c] is taken; "slow" runs
        assert b.depth == 2  # b and c wait in the worker's round, not in the queue
        d = b.submit("d", fn_for("d"), torch.zeros(1, 1))
        with pytest.raises(QueueFull):
            b.submit("e", fn_for("e"), torch.zeros(1, 1))
        first[2].abandoned = True  # c's caller gives up while the round is running
        release.set()
        await asyncio.gather(first[0].future, first[1].future, d.future)
        b.stop()
        assert b.depth == 0

    asyncio.run(main())
    assert ran == ["slow", "b", "d"]
