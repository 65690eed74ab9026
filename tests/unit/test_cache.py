"""The adapter cache is atomic: one load per digest, inserted in the step that retires it; a
waiter's cancel never poisons a shared load; a delete during a load is honoured; pins follow
their task. A real :class:`AdapterCache` with a loader the test holds at a gate."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any

import pytest

from server.cache import AdapterCache
from server.metrics import Metrics


@dataclass(frozen=True)
class Record:
    task: str
    digest: str


@dataclass(eq=False)
class Prepared:
    digest: str
    nbytes: int = 100


class GatedLoader:
    """Counts loads; each load signals it started and waits for the gate."""

    weights = None

    def __init__(self, fail: bool = False) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()
        self.calls: list[str] = []
        self.fail = fail

    def __call__(self, record: Record) -> Prepared:
        self.calls.append(record.digest)
        self.started.set()
        assert self.gate.wait(10), "the test never opened the gate"
        if self.fail:
            raise ValueError("unreadable blob")
        return Prepared(record.digest)


def make(loader: GatedLoader, max_bytes: int = 10_000) -> AdapterCache:
    return AdapterCache(loader, max_bytes, Metrics())  # type: ignore[arg-type]


async def until(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, 10), "the loader never started"


def test_one_load_per_digest_and_the_entry_exists_when_the_waiters_wake() -> None:
    loader = GatedLoader()
    cache = make(loader)
    seen_on_wake: list[tuple[bool, bool]] = []

    async def main() -> list[Any]:
        waiters = [asyncio.ensure_future(cache.get(Record("t", "d1"))) for _ in range(5)]
        await until(loader.started)
        cache.get_future(Record("t", "d1")).add_done_callback(
            lambda _: seen_on_wake.append(("d1" in cache, "d1" in cache.loading()))
        )
        loader.gate.set()
        return await asyncio.gather(*waiters)

    out = asyncio.run(main())
    assert len(out) == 5 and all(p is out[0] for p in out)
    assert loader.calls == ["d1"]
    assert seen_on_wake == [(True, False)]  # cached and retired in one step, before any wake-up
    cache.close()


def test_a_request_arriving_as_a_load_finishes_joins_it_and_never_starts_a_second() -> None:
    """The window the old two-step insert left: after the loader returned, before the entry was
    cached. A request arriving there (injected at that exact step: the cold-load timing is
    observed in it) must join the load or hit the entry."""
    loader = GatedLoader()
    loader.gate.set()
    cache = make(loader)
    late: list[Any] = []
    metrics_observe = cache._metrics.cold_load.observe

    def observe(seconds: float) -> None:
        late.append(cache.get_future(Record("t", "d1")))
        metrics_observe(seconds)

    cache._metrics.cold_load.observe = observe  # type: ignore[method-assign]
    first = cache.get_future(Record("t", "d1")).result(10)
    assert len(late) == 1 and late[0].result(10) is first
    assert loader.calls == ["d1"]
    cache.close()


def test_a_cancelled_waiter_does_not_cancel_the_shared_load() -> None:
    loader = GatedLoader()
    cache = AdapterCache(loader, 10_000, Metrics(), workers=1)  # type: ignore[arg-type]

    async def main() -> Prepared:
        busy = asyncio.ensure_future(cache.get(Record("u", "d0")))  # holds the one loader
        await until(loader.started)
        first = asyncio.ensure_future(cache.get(Record("t", "d1")))  # d1's load is queued
        second = asyncio.ensure_future(cache.get(Record("t", "d1")))
        await asyncio.sleep(0)  # both waiters are waiting
        first.cancel()  # e.g. its client went away
        with pytest.raises(asyncio.CancelledError):
            await first
        loader.gate.set()
        await busy
        return await asyncio.wait_for(second, 10)

    prepared = asyncio.run(main())
    assert prepared.digest == "d1" and "d1" in cache
    assert loader.calls == ["d0", "d1"]  # and no later request re-loads or fails
    assert cache.get_future(Record("t", "d1")).result() is prepared
    cache.close()


def test_a_delete_during_a_load_is_honoured() -> None:
    loader = GatedLoader()
    cache = make(loader)

    async def main() -> Prepared:
        waiter = asyncio.ensure_future(cache.get(Record("t", "d1")))
        await until(loader.started)
        cache.evict("d1")  # the version is deleted while its cold load runs
        loader.gate.set()
        return await asyncio.wait_for(waiter, 10)

    prepared = asyncio.run(main())
    assert prepared.digest == "d1"  # the waiter, which resolved before the delete, is answered
    assert "d1" not in cache and cache.loading() == []  # but nothing was cached
    cache.get_future(Record("t", "d1")).result(10)  # a later request loads afresh
    assert loader.calls == ["d1", "d1"]
    cache.close()


def test_a_failed_load_reaches_every_waiter_and_the_next_request_retries() -> None:
    loader = GatedLoader(fail=True)
    cache = make(loader)

    async def main() -> list[Any]:
        waiters = [asyncio.ensure_future(cache.get(Record("t", "d1"))) for _ in range(3)]
        await until(loader.started)  # all three are waiting on the one load
        loader.gate.set()
        return await asyncio.gather(*waiters, return_exceptions=True)

    out = asyncio.run(main())
    assert len(out) == 3 and all(isinstance(e, ValueError) for e in out)
    assert cache.loading() == [] and "d1" not in cache
    loader.fail = False
    assert cache.get_future(Record("t", "d1")).result(10).digest == "d1"
    assert loader.calls == ["d1", "d1"]
    cache.close()


def test_a_pin_follows_its_task_and_the_old_digest_becomes_evictable() -> None:
    loader = GatedLoader()
    loader.gate.set()
    cache = make(loader, max_bytes=150)  # room for one entry of 100 bytes
    assert cache.pin("t", "d1") is None
    cache.get_future(Record("t", "d1")).result(10)
    cache.get_future(Record("u", "u1")).result(10)
    assert cache.digests() == ["d1"]  # the pinned one survives the budget, the other is evicted
    assert cache.pin("t", "d2") == "d1"  # the alias moved: the pin moves with it
    cache.get_future(Record("t", "d2")).result(10)
    assert cache.digests() == ["d2"] and cache.pins() == {"t": "d2"}
    assert cache.pin("t", "d2") is None  # re-pinning the same digest moves nothing
    cache.close()


def test_close_fails_a_load_that_never_started_instead_of_leaving_it_hanging() -> None:
    loader = GatedLoader()
    cache = AdapterCache(loader, 10_000, Metrics(), workers=1)  # type: ignore[arg-type]
    running = cache.get_future(Record("t", "d1"))
    assert loader.started.wait(10)
    queued = cache.get_future(Record("t", "d2"))  # waits for the one loader thread
    cache.close()
    with pytest.raises(RuntimeError, match="closing"):
        queued.result(10)
    loader.gate.set()
    with pytest.raises(RuntimeError, match="closing"):
        running.result(10)
