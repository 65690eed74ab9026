"""Everything one server process holds: settings, registry, base model, cache, batcher and the
image preprocessor, and their lifecycle (load in the background, close at shutdown).

What the server *does* with them lives in :mod:`server.service`; this module only builds the
parts, wires them one way (the cache gets its loader here, it never calls back), says whether
they are ready, and supervises them: a model worker that dies is restarted here once the base is
reset and verified (readiness is 503 with the reason meanwhile), and pinned tasks are re-resolved
when their alias may have moved.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Coroutine, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter

from adapters_store.bases import build_base, signature_of
from adapters_store.registry import Registry

from .baseproof import BaseCheck
from .batcher import Batcher
from .cache import AdapterCache, AdapterLoader
from .config import ServerSettings
from .costs import CostModel
from .engine import Engine
from .errors import NotReady
from .images import ImageLimits, Preprocessor
from .metrics import Metrics
from .planner import Planner, measure_costs, rows_counter
from .preload import plan, preload
from .usage import UsageRecorder

log = logging.getLogger("deltaclip.server")


@dataclass(frozen=True)
class Serving:
    """The parts that exist only once the base model is loaded."""

    engine: Engine
    cache: AdapterCache
    batcher: Batcher
    images: Preprocessor
    check: BaseCheck


class Runtime:
    def __init__(self, settings: ServerSettings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics(settings.metrics_tasks)
        # Opening the registry checks the catalog schema: a catalog not at head stops start-up.
        self.registry = Registry.from_settings(settings)
        self.engine: Engine | None = None
        self.cache: AdapterCache | None = None
        self.batcher: Batcher | None = None
        self.images: Preprocessor | None = None
        self.check: BaseCheck | None = None
        self.load_error: str | None = None
        self.loaded_fingerprint: str | None = None
        self.started = time.time()
        self.worker_restarts = Counter(
            "deltaclip_worker_restarts_total",
            "Model worker threads restarted after dying",
            registry=self.metrics.registry,
        )
        self.rows_served = rows_counter(self.metrics.registry)
        self.usage = UsageRecorder(self.registry, self.metrics)
        self.preloaded: int | None = None  # adapters --preload prepared, once it has run
        self._preloading: tuple[int, int] | None = None  # (done, of) while it runs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # background tasks (strong references)

    @property
    def ready(self) -> bool:
        return self.batcher is not None and self.batcher.down is None

    @property
    def not_ready_reason(self) -> str:
        """Why the server is not ready (client-safe text)."""
        if self.load_error:
            return self.load_error
        if self.batcher is not None and self.batcher.down is not None:
            return self.batcher.down
        if self._preloading is not None:
            done, total = self._preloading
            return f"preloading adapters ({done} of {total})"
        return "loading the base model"

    async def load(self) -> None:
        """Load the base (in a thread), then start the worker and preload pinned tasks."""
        s = self.settings
        try:
            t0 = time.perf_counter()
            net = await asyncio.to_thread(build_base, s.base_model, s.base_pretrained)
            sig = await asyncio.to_thread(signature_of, net, s.base_model, s.base_pretrained)
            mixing = s.batch_mode != "patched" and not s.deterministic
            engine = await asyncio.to_thread(
                Engine, net, sig, s.resolved_device, s.dtype, self.metrics, mixing
            )
            planner = await asyncio.to_thread(self._planner, engine) if mixing else None
        except Exception as exc:
            # Clients learn that it failed; the detail (it may name files) goes to the log only.
            self.load_error = "the base model failed to load; see the server log"
            log.error("base model failed to load: %s: %s", type(exc).__name__, exc)
            return
        self.engine, self.loaded_fingerprint = engine, sig.fingerprint
        self._loop = asyncio.get_running_loop()
        self._spawn(self._flush_usage_every())
        limits = ImageLimits(s.max_images, s.max_image_pixels, s.max_request_pixels)
        self.images = Preprocessor(engine.transforms, limits)
        self.cache = AdapterCache(AdapterLoader(self.registry, engine), s.cache_bytes, self.metrics)
        # The first proof of the base, before the worker exists (so on this thread).
        self.check = BaseCheck(engine, self.metrics, s.base_check_s)
        await asyncio.to_thread(self.check.run)
        batcher = Batcher(
            s.max_batch,
            s.max_wait_ms / 1000,
            s.queue_size,
            self.metrics,
            self._current_key,
            s.max_batch if s.deterministic else None,  # deterministic: one forward shape
            between_rounds=self.check.between_rounds,
            on_death=self._worker_died,
            planner=planner,
        )
        batcher.start()
        await self.refresh_pins()
        await self._warm(sig.fingerprint)
        self.batcher = batcher  # last: ready from here on
        if s.pin:
            self._spawn(self._poll_pins())
        log.info(
            "base %s/%s loaded in %.1fs, fingerprint %s",
            s.base_model,
            s.base_pretrained,
            time.perf_counter() - t0,
            sig.fingerprint,
        )

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.batcher is not None:
            self.batcher.stop()
        if self.cache is not None:
            self.cache.close()
        try:  # the last counts of this replica
            self.usage.flush()
        except Exception as exc:
            log.error("usage not added to the catalog at shutdown: %s", exc)
        self.registry.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------------------ warm start

    async def _warm(self, fingerprint: str) -> None:
        """Before turning ready: give the latency series' task labels to the catalog's most
        requested tasks, and prepare the adapters ``--preload`` names (within the cache)."""
        s, cache = self.settings, self.cache
        try:
            if s.metrics_tasks:
                limit = min(1000, s.metrics_tasks)
                top = await asyncio.to_thread(self.registry.list, sort="requests", limit=limit)
                self.metrics.tasks.seed(r.task for r in top.items if r.requests)
            if s.preload and cache is not None:
                self._preloading = (0, 0)
                records = await asyncio.to_thread(plan, self.registry, s.preload, fingerprint)
                self.preloaded = await asyncio.to_thread(
                    preload, records, cache.preload, self._preload_progress
                )
        except Exception as exc:  # a warm start is an optimisation: serve cold rather than not
            log.error("warm start incomplete: %s: %s", type(exc).__name__, exc)
        finally:
            self._preloading = None

    def _preload_progress(self, done: int, total: int) -> None:
        self._preloading = (done, total)

    async def _flush_usage_every(self) -> None:
        while True:
            await asyncio.sleep(self.settings.usage_flush_s)
            await self.flush_usage()

    async def flush_usage(self) -> None:
        """Add this replica's usage counts to the catalog now (kept for the next try on error)."""
        try:
            await asyncio.to_thread(self.usage.flush)
        except Exception as exc:
            log.warning("usage not added to the catalog (kept for the next batch): %s", exc)

    # ------------------------------------------------------------------------------ pins

    async def refresh_pins(self, tasks: Iterable[str] | None = None) -> None:
        """Re-resolve pinned tasks (all, or those of ``tasks`` that are pinned), move each pin to
        the digest its task resolves to now and load it. Called after this replica changes a
        pinned task's versions or aliases, and every ``pin_refresh_s`` for other replicas'."""
        if self.cache is None:
            return
        wanted = set(tasks) if tasks is not None else None
        for task in self.settings.pin:
            if wanted is not None and task not in wanted:
                continue
            try:
                record = await asyncio.to_thread(self.registry.pinned, task)
                if self.cache.pin(task, record.digest) is not None:
                    log.info("pin %r moved to v%d", task, record.version)
                await self.cache.get(record)
            except Exception as exc:
                log.warning("could not load pinned task %r: %s", task, exc)

    async def _poll_pins(self) -> None:
        while True:
            await asyncio.sleep(self.settings.pin_refresh_s)
            await self.refresh_pins()

    # ------------------------------------------------------------------------------ supervision

    def _worker_died(self, reason: str) -> None:
        """The batcher's report from its dying thread: restart it from the event loop."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._spawn, self._restart_worker())

    async def _restart_worker(self) -> None:
        """Reset the base from the pristine copy, verify it, then start a fresh worker. Until
        then readiness is 503 with the batcher's reason; if the base cannot be verified it stays
        so (with that reason)."""
        batcher, engine, check = self.batcher, self.engine, self.check
        if batcher is None or engine is None or check is None:
            return
        await asyncio.to_thread(batcher.join, 30.0)  # the dead thread finishes its report
        try:
            await asyncio.to_thread(engine.reset)  # no worker runs: safe on this thread
            proof = await asyncio.to_thread(check.run)
        except Exception as exc:
            log.critical("could not reset the base after the worker died: %s", exc)
            batcher.down = "the model worker failed and the base could not be reset"
            return
        if not proof.unchanged:
            batcher.down = "the model worker failed and the base failed verification"
            log.critical("base failed verification after the worker died; staying not ready")
            return
        batcher.restart()
        self.worker_restarts.inc()
        log.warning("model worker restarted with a verified base")

    def _planner(self, engine: Engine) -> Planner | None:
        """The mixed-task planner, its cost model configured or measured now (before the worker
        exists, so on this thread); None (patched only) if the measurement fails."""
        s = self.settings
        try:
            cost = (
                CostModel.parse(s.mix_costs) if s.mix_costs else measure_costs(engine, s.max_batch)
            )
        except Exception as exc:
            log.error(
                "no mixed-task planner (serving patched only): %s: %s", type(exc).__name__, exc
            )
            engine.reset()
            return None
        log.info(
            "mixed-task planner, %s cost model (DELTACLIP_MIX_COSTS form): %s",
            "configured" if s.mix_costs else "measured",
            json.dumps(cost.as_config()),
        )
        return Planner(cost, s.max_batch, engine.run_mixed, always=s.batch_mode == "mixed")

    def _current_key(self) -> Hashable:
        current = self.engine.current if self.engine is not None else None
        return current.digest if current is not None else None

    def require_ready(self) -> Serving:
        """The loaded parts, or :class:`NotReady` (still loading, the load failed, or the model
        worker is down and restarting)."""
        engine, cache, batcher, images, check = (
            self.engine,
            self.cache,
            self.batcher,
            self.images,
            self.check,
        )
        if engine is None or cache is None or batcher is None or images is None or check is None:
            raise NotReady(f"the server is not ready: {self.not_ready_reason}")
        if batcher.down is not None:
            raise NotReady(f"the server is not ready: {batcher.down}")
        return Serving(engine, cache, batcher, images, check)
