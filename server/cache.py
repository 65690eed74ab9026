"""Prepared adapters in memory: LRU by bytes, keyed by digest, loaded off the request path.

A cold adapter is read from the store (checksum-verified), validated against the serving base,
and prepared on a small loader pool by the cache's own :class:`AdapterLoader` (given at
construction, so the cache depends on the store and the engine, never back on its owner), so a slow load never holds up requests for other tasks or
the model worker. Concurrent requests for the same cold digest share one load. Entries are
keyed by digest only: a new version or a moved alias resolves to a new digest, and a request
that already holds a prepared adapter finishes with it even if it is evicted meanwhile.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections import OrderedDict

import torch

from adapters_store.records import AdapterRecord
from adapters_store.registry import Registry
from adapters_store.serving_base import ServingBase

from .engine import Engine, PreparedAdapter
from .metrics import Metrics


class ServingWeights:
    """The serving base's weights as the servability checks read them: the patcher's pristine
    host copy (the weights as served, never the live, possibly patched ones; thread-safe)."""

    def __init__(self, engine: Engine) -> None:
        self.patcher = engine.patcher

    def base_values(self, key: str, indices: torch.Tensor) -> torch.Tensor:
        dtype, start, _ = self.patcher.offsets[key]
        return self.patcher.pristine[dtype].index_select(0, indices.to(torch.int64) + start)


class AdapterLoader:
    """Store → prepared adapter: read and checksum-verify the blob, decode it within the
    registry's limits, check it against the serving base's signature and weights (the same
    servability checks as registration: the store may hold files from before them), prepare it.

    Thread-safe: it only reads the store and the engine's pristine host copy of the base.
    """

    def __init__(self, registry: Registry, engine: Engine) -> None:
        self.registry = registry
        self.engine = engine
        self.weights = ServingWeights(engine)
        self.base = ServingBase(engine.signature, self.weights)

    def __call__(self, record: AdapterRecord) -> PreparedAdapter:
        adapter = self.registry.load(record, self.base)
        return self.engine.prepare(record, adapter)


class AdapterCache:
    """Prepared adapters by digest, LRU by bytes, with one load per digest in flight.

    Atomic: a finished load enters the cache in the same locked step that retires its flight, so
    no request sees neither (and starts a duplicate load). :meth:`evict` (a delete) also cancels
    the entry a load in flight would make: the load's waiters still get their adapter, but it is
    not cached. Pins are per task: :meth:`pin` moves a task's pin to its current digest.
    """

    def __init__(
        self, loader: AdapterLoader, max_bytes: int, metrics: Metrics, workers: int = 2
    ) -> None:
        self._loader = loader
        self.max_bytes = max_bytes
        self._metrics = metrics
        self._entries: OrderedDict[str, PreparedAdapter] = OrderedDict()
        self._pins: dict[str, str] = {}  # task -> the digest pinned for it
        self._loading: dict[str, concurrent.futures.Future[PreparedAdapter]] = {}
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="adapter-load"
        )
        self.bytes = 0

    @property
    def base(self) -> ServingBase:
        """The serving base, for registration's checks (the loader applies the same)."""
        return self._loader.base

    def __contains__(self, digest: str) -> bool:
        with self._lock:
            return digest in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def digests(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def loading(self) -> list[str]:
        """Digests with a load in flight."""
        with self._lock:
            return list(self._loading)

    async def get(self, record: AdapterRecord) -> PreparedAdapter:
        """The prepared adapter for ``record`` (a catalog record with ``digest``).

        Shielded: a waiter that is cancelled stops waiting, but the shared load goes on for the
        others (and for the cache)."""
        return await asyncio.shield(asyncio.wrap_future(self.get_future(record)))

    def get_future(self, record: AdapterRecord) -> concurrent.futures.Future[PreparedAdapter]:
        with self._lock:
            entry = self._entries.get(record.digest)
            if entry is not None:
                self._entries.move_to_end(record.digest)
                self._metrics.cache_hits.inc()
                done: concurrent.futures.Future[PreparedAdapter] = concurrent.futures.Future()
                done.set_result(entry)
                return done
            future = self._loading.get(record.digest)
            if future is None:
                self._metrics.cache_misses.inc()
                future = concurrent.futures.Future()
                future.set_running_or_notify_cancel()  # nobody can cancel a shared load
                self._loading[record.digest] = future
                try:
                    self._pool.submit(self._load, record, future)
                except RuntimeError as exc:  # the pool is shut down (closing)
                    del self._loading[record.digest]
                    future.set_exception(exc)
            return future

    def _load(
        self, record: AdapterRecord, future: concurrent.futures.Future[PreparedAdapter]
    ) -> None:
        start = time.perf_counter()
        try:
            prepared = self._loader(record)
        except BaseException as exc:
            with self._lock:
                if self._loading.get(record.digest) is future:
                    del self._loading[record.digest]
            _settle(future, error=exc)
            return
        self._metrics.cold_load.observe(time.perf_counter() - start)
        with self._lock:  # one step: the flight retires and the entry appears together
            if self._loading.get(record.digest) is future:  # not evicted (deleted) meanwhile
                del self._loading[record.digest]
                if record.digest not in self._entries:
                    self._entries[record.digest] = prepared
                    self.bytes += prepared.nbytes
                    self._evict_locked()
        _settle(future, prepared)

    def preload(self, record: AdapterRecord) -> bool:
        """Prepare ``record`` now (on this thread) and keep it if it fits in the budget beside
        what is cached, never evicting anything for it; False when it does not fit. For start-up
        (``--preload``): each one kept goes in front of the others in the LRU order, so the
        first preloaded (the most used) are the last to be evicted."""
        if record.digest in self:
            return True
        start = time.perf_counter()
        prepared = self._loader(record)
        self._metrics.cold_load.observe(time.perf_counter() - start)
        with self._lock:
            if record.digest in self._entries:
                return True
            if self.bytes + prepared.nbytes > self.max_bytes:
                return False
            self._entries[record.digest] = prepared
            self._entries.move_to_end(record.digest, last=False)
            self.bytes += prepared.nbytes
            self._gauges_locked()
        return True

    def _gauges_locked(self) -> None:
        self._metrics.cache_bytes.set(self.bytes)
        self._metrics.cache_resident.set(len(self._entries))

    def _evict_locked(self) -> None:
        pinned = set(self._pins.values())
        for digest in list(self._entries):
            if self.bytes <= self.max_bytes:
                break
            if digest in pinned:
                continue
            self.bytes -= self._entries.pop(digest).nbytes
            self._metrics.cache_evictions.inc()
        self._gauges_locked()

    def pin(self, task: str, digest: str) -> str | None:
        """Pin ``task`` to ``digest`` (its current resolution); the digest it was pinned to
        before, if another, is no longer pinned (and becomes evictable). Returns that one."""
        with self._lock:
            old = self._pins.get(task)
            self._pins[task] = digest
            if old is not None and old != digest:
                self._evict_locked()
        return old if old != digest else None

    def pins(self) -> dict[str, str]:
        with self._lock:
            return dict(self._pins)

    def evict(self, digest: str) -> bool:
        """Drop one digest now (e.g. after its adapter was deleted), and the entry a load in
        flight for it would make; requests already holding it, or waiting on that load, finish
        with it. A pin on it stays (the task's pin moves when it is re-resolved)."""
        with self._lock:
            self._loading.pop(digest, None)
            entry = self._entries.pop(digest, None)
            if entry is not None:
                self.bytes -= entry.nbytes
                self._metrics.cache_evictions.inc()
                self._gauges_locked()
            return entry is not None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            flights, self._loading = list(self._loading.values()), {}
        for future in flights:  # a load the shutdown cancelled would leave its waiters hanging
            if not future.done():
                future.set_exception(RuntimeError("the adapter cache is closing"))


def _settle(
    future: concurrent.futures.Future[PreparedAdapter],
    value: PreparedAdapter | None = None,
    error: BaseException | None = None,
) -> None:
    """Resolve a load's future unless :meth:`AdapterCache.close` already failed it."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)  # type: ignore[arg-type]
