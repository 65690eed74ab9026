"""Prometheus metrics, one registry per app (so several apps can live in one test process).

Each metric is moved where its event happens: responses here (:class:`ResponseMetricsMiddleware`),
request latency in :mod:`server.service`, the queue and batches in :mod:`server.batcher`, swaps
in :mod:`server.engine`, the cache in :mod:`server.cache`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UNROUTED = "unrouted"
"""The ``route`` label of a response given before routing (a head or body over its limit) or
for a path no route takes."""

OTHER_TASKS = "_other"
"""The ``task`` label of every task without a label of its own (no task name starts with ``_``,
so it never collides with one)."""

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class TaskLabels:
    """The ``task`` label values of the per-task series: at most ``limit`` tasks keep their name,
    every other task is counted under :data:`OTHER_TASKS`, so the series stay bounded however
    many tasks are served. A task keeps its label for the life of the process (a series never
    moves between its own label and ``_other``, so counters stay monotonic). The slots go first
    to the catalog's most requested tasks at start-up (:meth:`seed`, all replicas' traffic),
    the rest to tasks in the order they are first served."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._named: set[str] = set()
        self._lock = threading.Lock()

    def seed(self, tasks: Iterable[str]) -> None:
        for task in tasks:
            self.label(task)

    def label(self, task: str) -> str:
        with self._lock:
            if task in self._named:
                return task
            if len(self._named) < self.limit:
                self._named.add(task)
                return task
        return OTHER_TASKS


class Metrics:
    def __init__(self, task_labels: int = 50) -> None:
        self.registry = CollectorRegistry()
        self.tasks = TaskLabels(task_labels)
        r = self.registry
        self.request_latency = Histogram(
            "deltaclip_request_seconds",
            f"End-to-end /predict latency; task is {OTHER_TASKS} beyond METRICS_TASKS tasks",
            ["task"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.responses = Counter(
            "deltaclip_responses_total",
            "HTTP responses by route template (e.g. /adapters/{task}) and status",
            ["route", "status"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "deltaclip_queue_depth", "Requests waiting for the worker", registry=r
        )
        self.batch_size = Histogram(
            "deltaclip_batch_images",
            "Images per forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.swaps = Counter(
            "deltaclip_swaps_total", "Adapter patch operations on the live weights", registry=r
        )
        self.cache_hits = Counter(
            "deltaclip_cache_hits_total", "Prepared adapter found in memory", registry=r
        )
        self.cache_misses = Counter(
            "deltaclip_cache_misses_total", "Prepared adapter loaded from the store", registry=r
        )
        self.cache_evictions = Counter(
            "deltaclip_cache_evictions_total", "Prepared adapters evicted", registry=r
        )
        self.cache_bytes = Gauge(
            "deltaclip_cache_bytes", "Bytes held by prepared adapters", registry=r
        )
        self.cache_resident = Gauge(
            "deltaclip_cache_resident_adapters", "Prepared adapters held in memory", registry=r
        )
        self.adapters_served = Gauge(
            "deltaclip_adapters_served",
            "Distinct adapter versions this replica has served since it started",
            registry=r,
        )
        self.cold_load = Histogram(
            "deltaclip_cold_load_seconds",
            "Store → prepared adapter (read, verify, validate, prepare)",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
            registry=r,
        )

    def observe_request(self, task: str, seconds: float) -> None:
        """One /predict answered for ``task`` (under its bounded label)."""
        self.request_latency.labels(task=self.tasks.label(task)).observe(seconds)


class ResponseMetricsMiddleware:
    """Count every HTTP response in ``deltaclip_responses_total`` by route template and status.

    The template (not the path) keeps the label set bounded whatever paths clients send. Added
    outermost, so answers given by the other middlewares (413, 431) are counted too.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", None) or UNROUTED
                self.metrics.responses.labels(route=route, status=str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
