"""Everything one server process holds: settings, registry, base model, cache, batcher and the
image preprocessor, and their lifecycle (load in the background, close at shutdown).

What the server *does* with them lives in :mod:`server.service`; this module only builds the
parts, wires them one way (the cache gets its loader here, it never calls back), and says
whether they are ready.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Hashable
from dataclasses import dataclass

from adapters_store.bases import build_base, signature_of
from adapters_store.registry import Registry

from .batcher import Batcher
from .cache import AdapterCache, AdapterLoader
from .config import ServerSettings
from .engine import Engine
from .errors import NotReady
from .images import ImageLimits, Preprocessor
from .metrics import Metrics

log = logging.getLogger("deltaclip.server")


@dataclass(frozen=True)
class Serving:
    """The parts that exist only once the base model is loaded."""

    engine: Engine
    cache: AdapterCache
    batcher: Batcher
    images: Preprocessor


class Runtime:
    def __init__(self, settings: ServerSettings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        # Opening the registry checks the catalog schema: a catalog not at head stops start-up.
        self.registry = Registry.from_settings(settings)
        self.engine: Engine | None = None
        self.cache: AdapterCache | None = None
        self.batcher: Batcher | None = None
        self.images: Preprocessor | None = None
        self.load_error: str | None = None
        self.loaded_fingerprint: str | None = None
        self.started = time.time()

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
            engine = await asyncio.to_thread(
                Engine, net, sig, s.resolved_device, s.dtype, self.metrics
            )
        except Exception as exc:
            # Clients learn that it failed; the detail (it may name files) goes to the log only.
            self.load_error = "the base model failed to load; see the server log"
            log.error("base model failed to load: %s: %s", type(exc).__name__, exc)
            return
        self.engine, self.loaded_fingerprint = engine, sig.fingerprint
        limits = ImageLimits(s.max_images, s.max_image_pixels, s.max_request_pixels)
        self.images = Preprocessor(engine.transforms, limits)
        self.cache = AdapterCache(AdapterLoader(self.registry, engine), s.cache_bytes, self.metrics)
        fixed = s.max_batch if s.deterministic else None  # deterministic: one forward shape
        batcher = Batcher(s.max_batch, s.max_wait_ms / 1000, s.queue_size, self.metrics,
                          self._current_key, fixed)  # fmt: skip
        batcher.start()
        for task in s.pin:
            try:
                record = await asyncio.to_thread(self.registry.resolve, task)
                self.cache.pin(record.digest)
                await self.cache.get(record)
            except Exception as exc:
                log.warning("could not preload pinned task %r: %s", task, exc)
        self.batcher = batcher  # last: ready from here on
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

    def require_ready(self) -> Serving:
        """The loaded parts, or :class:`NotReady` (still loading, or the load failed)."""
        if self.engine is None or self.cache is None or self.batcher is None or self.images is None:
            detail = f": {self.load_error}" if self.load_error else " (loading the base model)"
            raise NotReady(f"the server is not ready{detail}")
        return Serving(self.engine, self.cache, self.batcher, self.images)
