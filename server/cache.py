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
    def __init__(
        self, loader: AdapterLoader, max_bytes: int, metrics: Metrics, workers: int = 2
    ) -> None:
        self._loader = loader
        self.max_bytes = max_bytes
        self._metrics = metrics
        self._entries: OrderedDict[str, PreparedAdapter] = OrderedDict()
        self._pinned: set[str] = set()
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

    async def get(self, record: AdapterRecord) -> PreparedAdapter:
        """The prepared adapter for ``record`` (a catalog record with ``digest``)."""
        return await asyncio.wrap_future(self.get_future(record))

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
                future = self._pool.submit(self._load, record)
                self._loading[record.digest] = future
            return future

    def _load(self, record: AdapterRecord) -> PreparedAdapter:
        start = time.perf_counter()
        try:
            prepared = self._loader(record)
        finally:
            with self._lock:
                self._loading.pop(record.digest, None)
        self._metrics.cold_load.observe(time.perf_counter() - start)
        with self._lock:
            if record.digest not in self._entries:
                self._entries[record.digest] = prepared
                self.bytes += prepared.nbytes
                self._evict_locked()
        return prepared

    def _evict_locked(self) -> None:
        for digest in list(self._entries):
            if self.bytes <= self.max_bytes:
                break
            if digest in self._pinned:
                continue
            self.bytes -= self._entries.pop(digest).nbytes
            self._metrics.cache_evictions.inc()
        self._metrics.cache_bytes.set(self.bytes)

    def pin(self, digest: str) -> None:
        with self._lock:
            self._pinned.add(digest)

    def evict(self, digest: str) -> bool:
        """Drop one entry now (e.g. after its adapter was deleted); running requests keep theirs."""
        with self._lock:
            self._pinned.discard(digest)
            entry = self._entries.pop(digest, None)
            if entry is not None:
                self.bytes -= entry.nbytes
                self._metrics.cache_evictions.inc()
                self._metrics.cache_bytes.set(self.bytes)
            return entry is not None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
