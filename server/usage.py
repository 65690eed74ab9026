"""Usage counting on one replica: requests, images, errors and the last serve per version,
counted in memory on the request path (a lock and a few additions) and added to the catalog in
batches off it (:meth:`UsageRecorder.flush`, every ``USAGE_FLUSH_S`` and at shutdown), where
every replica's batches add up (:func:`adapters_store.usage.add_usage`).

A batch that fails to reach the catalog (the database is down) is put back and added to the
next one, so no count is lost or counted twice while the replica lives.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading

from adapters_store.registry import Registry
from adapters_store.usage import UsageDelta

from .metrics import Metrics

log = logging.getLogger("deltaclip.server")

Key = tuple[str, int]


class UsageRecorder:
    def __init__(self, registry: Registry, metrics: Metrics) -> None:
        self._registry = registry
        self._metrics = metrics
        self._pending: dict[Key, UsageDelta] = {}
        self._served: set[Key] = set()
        self._lock = threading.Lock()
        self._flushing = threading.Lock()  # one batch in flight at a time

    def served(self, task: str, version: int, images: int) -> None:
        """One request answered by ``task`` v``version`` with ``images`` images."""
        now = dt.datetime.now(dt.UTC)
        with self._lock:
            delta = self._pending.setdefault((task, version), UsageDelta())
            delta.merge(UsageDelta(requests=1, images=images, last_served_at=now))
            self._served.add((task, version))
            self._metrics.adapters_served.set(len(self._served))

    def failed(self, task: str, version: int) -> None:
        """One request resolved to ``task`` v``version`` that did not get its answer."""
        with self._lock:
            self._pending.setdefault((task, version), UsageDelta()).errors += 1

    def pending(self) -> dict[Key, UsageDelta]:
        """What has not reached the catalog yet (a copy)."""
        with self._lock:
            return {key: UsageDelta(**vars(delta)) for key, delta in self._pending.items()}

    def flush(self) -> int:
        """Add what was counted since the last batch to the catalog (blocking: run it on a
        thread). On failure the batch goes back to be added with the next one, and the error
        is raised."""
        with self._flushing:
            with self._lock:
                batch, self._pending = self._pending, {}
            try:
                return self._registry.add_usage(batch)
            except BaseException:
                with self._lock:
                    for key, delta in batch.items():
                        self._pending.setdefault(key, UsageDelta()).merge(delta)
                raise
