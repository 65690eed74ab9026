"""What the server does, behind the HTTP routes: classify, zero-shot, register, delete, alias,
and the status reads. Routes parse the request, make one call here and shape the answer.

Each operation that needs the base model checks readiness once, at its start (503
``not_ready`` before anything else happens). Request bodies are passed in as readers and read
only after the cheap checks have passed, so a request for an unknown task is refused before its
(possibly large) body is buffered. docs/API.md describes the HTTP side of each operation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass
from functools import partial

import torch
from prometheus_client import generate_latest

from adapters_store.records import AdapterRecord, Page, Registration

from .batcher import Batcher, BatchFn, QueueFull
from .config import ServerSettings
from .errors import Overloaded, Timeout
from .runtime import Runtime

log = logging.getLogger("deltaclip.server")

ReadImages = Callable[[], Awaitable[list[bytes]]]
"""Reads the request's image files (called once the request is known to be answerable)."""
ReadAdapter = Callable[[], Awaitable[tuple[bytes, str | None]]]
"""Reads an uploaded adapter file and the alias to give it, if any."""

_TEXT_CACHE_SIZE = 256


@dataclass(frozen=True)
class Prediction:
    """Class probabilities ``[N, C]`` from one adapter, with the adapter that produced them."""

    record: AdapterRecord
    class_names: list[str]
    probs: torch.Tensor


@dataclass(frozen=True)
class BaseStatus:
    """The serving base, and whether its live weights still equal the weights as served."""

    model: str
    pretrained: str
    device: str
    dtype: str
    fingerprint: str | None
    serving_fingerprint: str
    live_fingerprint: str
    unchanged: bool
    swaps: int
    cached_adapters: int
    cache_bytes: int


@dataclass(frozen=True)
class CatalogView:
    """One page of the catalog, with what the page needs to know about the serving base."""

    page: Page
    base_label: str
    shapes: Mapping[str, tuple[int, ...]] | None
    base_fingerprint: str | None


class Service:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.settings: ServerSettings = runtime.settings
        self._text_cache: OrderedDict[tuple[str, ...], torch.Tensor] = OrderedDict()

    # ------------------------------------------------------------------------------ inference

    async def classify(
        self, task: str, version: int | None, alias: str | None, read: ReadImages
    ) -> Prediction:
        """Resolve the task's adapter, decode the images at its training size and run them.

        The store refuses a version and an alias together (400 ``invalid_request``)."""
        start = time.perf_counter()
        serving = self.runtime.require_ready()
        registry = self.runtime.registry
        record = await asyncio.to_thread(registry.resolve, task, version, alias)
        # The adapter first: its cold load re-checks what serving reads (image size among it),
        # so a stored adapter from before those checks is refused before any image is decoded.
        prepared = await serving.cache.get(record)
        files = await read()
        images = await asyncio.to_thread(serving.images.batch, files, record.train_config)
        run = partial(serving.engine.run, prepared)
        probs = await self._infer(serving.batcher, prepared.digest, run, images)
        self.runtime.metrics.request_latency.labels(task=record.task).observe(
            time.perf_counter() - start
        )
        return Prediction(record, prepared.class_names, probs)

    async def zero_shot(self, labels: list[str], read: ReadImages) -> torch.Tensor:
        """Probabilities ``[N, len(labels)]`` from the base's text head (no adapter)."""
        serving = self.runtime.require_ready()
        # The labels first: one the base's text side cannot place is refused (400) before the
        # body is read and any image decoded.
        key = tuple(labels)
        emb = self._text_cache.get(key)
        if emb is None:
            emb = await asyncio.to_thread(serving.engine.text_embeddings, labels)
            self._text_cache[key] = emb
            while len(self._text_cache) > _TEXT_CACHE_SIZE:
                self._text_cache.popitem(last=False)
        files = await read()
        images = await asyncio.to_thread(serving.images.batch, files)
        run = partial(serving.engine.run_zero_shot, emb)
        return await self._infer(serving.batcher, ("zero-shot", key), run, images)

    async def _infer(
        self, batcher: Batcher, key: Hashable, fn: BatchFn, images: torch.Tensor
    ) -> torch.Tensor:
        """Queue the images for the model worker; 503 when the queue is full, 504 on timeout."""
        try:
            job = batcher.submit(key, fn, images)
        except QueueFull:
            raise Overloaded("too many requests are waiting; retry shortly",
                             {"Retry-After": str(self.settings.retry_after_s)}) from None  # fmt: skip
        timeout = self.settings.request_timeout_s
        try:
            result: torch.Tensor = await asyncio.wait_for(asyncio.shield(job.future), timeout)
        except TimeoutError:
            job.abandoned = True  # the worker skips it if it has not run yet
            raise Timeout(f"no answer within {timeout:g}s") from None
        return result

    # ------------------------------------------------------------------------------ admin

    async def register(self, read: ReadAdapter) -> Registration:
        """Validate an uploaded adapter against the serving base and register it (idempotent)."""
        serving = self.runtime.require_ready()
        data, alias = await read()
        register = self.runtime.registry.register
        result = await asyncio.to_thread(register, data, serving.cache.base, alias)
        rec = result.record
        log.info("registered %s v%d (%s) created=%s",
                 rec.task, rec.version, rec.digest[:12], result.created)  # fmt: skip
        return result

    async def delete(self, task: str, version: int) -> AdapterRecord:
        """Delete one version and drop its prepared copy (requests already holding it finish)."""
        rec = await asyncio.to_thread(self.runtime.registry.delete, task, version)
        if self.runtime.cache is not None:
            self.runtime.cache.evict(rec.digest)
        log.info("deleted %s v%d (%s)", rec.task, rec.version, rec.digest[:12])
        return rec

    async def set_alias(self, task: str, alias: str, version: int) -> None:
        await asyncio.to_thread(self.runtime.registry.set_alias, task, alias, version)
        log.info("alias %s@%s -> v%d", task, alias, version)

    async def remove_alias(self, task: str, alias: str) -> None:
        await asyncio.to_thread(self.runtime.registry.remove_alias, task, alias)

    # ------------------------------------------------------------------------------ status

    @property
    def load_error(self) -> str | None:
        """Why the base failed to load (client-safe text), or None."""
        return self.runtime.load_error

    @property
    def ready(self) -> bool:
        return self.runtime.ready

    @property
    def loaded_fingerprint(self) -> str | None:
        return self.runtime.loaded_fingerprint

    def metrics_text(self) -> bytes:
        """The Prometheus exposition, with the queue depth read now."""
        if self.runtime.batcher is not None:
            self.runtime.metrics.queue_depth.set(self.runtime.batcher.depth)
        return generate_latest(self.runtime.metrics.registry)

    async def base_status(self) -> BaseStatus:
        """The base as loaded and as its weights are now (read on the worker, between batches)."""
        serving = self.runtime.require_ready()
        engine, cache, s = serving.engine, serving.cache, self.settings
        now = str(await serving.batcher.call(engine.fingerprint))
        return BaseStatus(
            model=s.base_model, pretrained=s.base_pretrained, device=str(engine.device),
            dtype=s.dtype, fingerprint=self.runtime.loaded_fingerprint,
            serving_fingerprint=engine.serving_fingerprint, live_fingerprint=now,
            unchanged=now == engine.serving_fingerprint, swaps=engine.swaps,
            cached_adapters=len(cache), cache_bytes=cache.bytes,
        )  # fmt: skip

    async def catalog(self, task: str | None, limit: int, offset: int) -> CatalogView:
        """A page of the catalog; the layer sizes are known once the base is loaded."""
        registry = self.runtime.registry
        page = await asyncio.to_thread(registry.list, task=task, limit=limit, offset=offset)
        engine = self.runtime.engine
        sig = engine.signature if engine is not None else None
        s = self.settings
        return CatalogView(
            page=page,
            base_label=f"{s.base_model}/{s.base_pretrained}",
            shapes=sig.param_shapes if sig else None,
            base_fingerprint=sig.fingerprint if sig else None,
        )
