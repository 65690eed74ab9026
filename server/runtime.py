"""Everything one server process holds: settings, registry, base model, cache and batcher."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Hashable
from functools import partial
from typing import Any

import torch

from adapters_store.bases import build_base, signature_of
from adapters_store.registry import AdapterRecord, Registry

from .batcher import Batcher, QueueFull
from .cache import AdapterCache
from .config import ServerSettings
from .engine import Engine, PreparedAdapter
from .errors import ApiError
from .metrics import Metrics

log = logging.getLogger("deltaclip.server")


class Runtime:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        # Opening the registry checks the catalog schema: a catalog not at head stops start-up.
        self.registry = Registry.from_settings(settings)
        self.engine: Engine | None = None
        self.cache: AdapterCache | None = None
        self.batcher: Batcher | None = None
        self.load_error: str | None = None
        self.loaded_fingerprint: str | None = None
        self.started = time.time()
        self._text_cache: OrderedDict[tuple[str, ...], torch.Tensor] = OrderedDict()

    # ------------------------------------------------------------------------------ lifecycle

    @property
    def ready(self) -> bool:
        return self.batcher is not None

    async def load(self) -> None:
        """Load the base (in a thread), then start the worker and preload pinned tasks."""
        s = self.settings
        try:
            t0 = time.perf_counter()
            net = await asyncio.to_thread(build_base, s.base_model, s.base_pretrained)
            sig = await asyncio.to_thread(signature_of, net, s.base_model, s.base_pretrained)
            engine = await asyncio.to_thread(Engine, net, sig, s.resolved_device, s.dtype)
        except Exception as exc:
            # Clients learn that it failed; the detail (it may name files) goes to the log only.
            self.load_error = "the base model failed to load; see the server log"
            log.error("base model failed to load: %s: %s", type(exc).__name__, exc)
            return
        self.engine, self.loaded_fingerprint = engine, sig.fingerprint
        self.cache = AdapterCache(self._prepare, s.cache_bytes, self.metrics)
        batcher = Batcher(
            s.max_batch, s.max_wait_ms / 1000, s.queue_size, self.metrics, self._current_key
        )
        batcher.start()
        for task in s.pin:
            try:
                record = await asyncio.to_thread(self.registry.resolve, task)
                self.cache.pin(record.digest)
                await self.cache.get(record)
            except Exception as exc:
                log.warning("could not preload pinned task %r: %s", task, exc)
        self.batcher = batcher
        log.info("base %s/%s loaded in %.1fs, fingerprint %s", s.base_model, s.base_pretrained,
                 time.perf_counter() - t0, sig.fingerprint)  # fmt: skip

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()
        if self.cache is not None:
            self.cache.close()
        self.registry.close()

    def _current_key(self) -> Hashable:
        current = self.engine.current if self.engine is not None else None
        return current.digest if current is not None else None

    def require_ready(self) -> tuple[Engine, AdapterCache, Batcher]:
        if self.engine is None or self.cache is None or self.batcher is None:
            detail = f": {self.load_error}" if self.load_error else " (loading the base model)"
            raise ApiError(
                503, "not_ready", f"the server is not ready{detail}", {"Retry-After": "5"}
            )
        return self.engine, self.cache, self.batcher

    # ------------------------------------------------------------------------------ adapters

    def _prepare(self, record: AdapterRecord) -> PreparedAdapter:
        """Store → prepared: read and checksum-verify the blob, validate against this base."""
        assert self.engine is not None
        adapter = self.registry.load(record, self.engine.signature)
        return self.engine.prepare(record, adapter)

    async def resolve(self, task: str, version: int | None, alias: str | None) -> AdapterRecord:
        return await asyncio.to_thread(self.registry.resolve, task, version, alias)

    async def prepared(self, record: AdapterRecord) -> PreparedAdapter:
        _, cache, _ = self.require_ready()
        return await cache.get(record)

    # ------------------------------------------------------------------------------ inference

    async def infer(self, key: Hashable, fn: Any, images: torch.Tensor) -> torch.Tensor:
        _, _, batcher = self.require_ready()
        try:
            job = batcher.submit(key, fn, images)
        except QueueFull:
            raise ApiError(503, "overloaded", "too many requests are waiting; retry shortly",
                           {"Retry-After": str(self.settings.retry_after_s)}) from None  # fmt: skip
        try:
            return await asyncio.wait_for(
                asyncio.shield(job.future), self.settings.request_timeout_s
            )
        except TimeoutError:
            job.abandoned = True
            raise ApiError(
                504, "timeout", f"no answer within {self.settings.request_timeout_s:g}s"
            ) from None

    async def predict(self, prepared: PreparedAdapter, images: torch.Tensor) -> torch.Tensor:
        engine, _, _ = self.require_ready()
        return await self.infer(prepared.digest, partial(engine.run, prepared), images)

    async def zero_shot(self, labels: list[str], images: torch.Tensor) -> torch.Tensor:
        engine, _, _ = self.require_ready()
        key = tuple(labels)
        emb = self._text_cache.get(key)
        if emb is None:
            emb = await asyncio.to_thread(engine.text_embeddings, labels)
            self._text_cache[key] = emb
            while len(self._text_cache) > 256:
                self._text_cache.popitem(last=False)
        return await self.infer(("zero-shot", key), partial(engine.run_zero_shot, emb), images)

    async def live_fingerprint(self) -> str:
        engine, _, batcher = self.require_ready()
        return str(await batcher.call(engine.fingerprint))
