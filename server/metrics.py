"""Prometheus metrics, one registry per app (so several apps can live in one test process).

Each metric is moved where its event happens: responses here (:class:`ResponseMetricsMiddleware`),
request latency in :mod:`server.service`, the queue and batches in :mod:`server.batcher`, swaps
in :mod:`server.engine`, the cache in :mod:`server.cache`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UNROUTED = "unrouted"
"""The ``route`` label of a response given before routing (a head or body over its limit) or
for a path no route takes."""

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_latency = Histogram(
            "deltaclip_request_seconds",
            "End-to-end /predict latency",
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
        self.cold_load = Histogram(
            "deltaclip_cold_load_seconds", "Store → prepared adapter (read, verify, validate, prepare)",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5), registry=r,
        )  # fmt: skip


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
