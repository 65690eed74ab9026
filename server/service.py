"""What the server does, behind the HTTP routes: classify, zero-shot, register, delete, alias,
and the status reads. Routes parse the request, make one call here and shape the answer.

Each operation that needs the base model checks readiness once, at its start (503
``not_ready`` before anything else happens). A prediction then takes its place in the queue
(503 ``overloaded`` when full) before any lookup, load or decode. Request bodies are passed in as
readers and read only after the cheap checks have passed, so a request for an unknown task is
refused before its (possibly large) body is buffered. A prediction whose client gives up
(timeout, cancellation, disconnect) drops its job before it runs and frees its place.
docs/API.md describes the HTTP side of each operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from prometheus_client import generate_latest
from starlette.requests import ClientDisconnect

from adapters_store.records import AdapterRecord, Page, Registration
from adapters_store.splits import Share

from .baseproof import BaseProof
from .batcher import Batcher, CallTimeout, QueueFull, WorkerDown
from .config import ServerSettings
from .errors import NotReady, Overloaded, Timeout
from .planner import MixSpec
from .runtime import Runtime, Serving
from .work import BatchFn, Job, Ticket

log = logging.getLogger("deltaclip.server")

ReadImages = Callable[[], Awaitable[list[bytes]]]
"""Reads the request's image files (called once the request is known to be answerable)."""
ReadAdapter = Callable[[], Awaitable[tuple[bytes, str | None]]]
"""Reads an uploaded adapter file and the alias to give it, if any."""
Gone = Callable[[], Awaitable[None]]
"""Returns when the client has disconnected (after its body was read)."""

_TEXT_CACHE_SIZE = 256


@dataclass(frozen=True)
class Prediction:
    """Class probabilities ``[N, C]`` from one adapter, with the adapter that produced them."""

    record: AdapterRecord
    class_names: list[str]
    probs: torch.Tensor
    path: str = "patched"  # "mixed" when any image rode in a mixed-task forward


@dataclass(frozen=True)
class Answered:
    """A finished job of one adapter: its future (holding the probabilities), its path, and
    the adapter's class names."""

    future: asyncio.Future[Any]
    path: str
    class_names: list[str]


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
    consistent: bool
    checked_at: float
    age_s: float
    mismatches: int
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
        self,
        task: str,
        version: int | None,
        alias: str | None,
        read: ReadImages,
        gone: Gone | None = None,
        exact: bool = False,
        key: str | None = None,
    ) -> Prediction:
        """Resolve the task's adapter, decode the images at its training size and run them.
        ``exact``: only the patched path may serve it (bit-identical to the merged model).
        ``key``: the client's key, which a weighted alias hashes to one of its versions.

        The store refuses a version and an alias together (400 ``invalid_request``). The
        answer, or the failure, of a resolved request is counted in the version's usage."""
        start = time.perf_counter()
        serving = self.runtime.require_ready()
        usage = self.runtime.usage
        with self._admitted(serving) as ticket:
            resolve = self.runtime.registry.resolve
            record = await asyncio.to_thread(resolve, task, version, alias, key)
            try:
                job, images = await self._run(serving, ticket, record, read, gone, exact)
            except BaseException:
                usage.failed(record.task, record.version)
                raise
        usage.served(record.task, record.version, images.shape[0])
        self.runtime.metrics.observe_request(record.task, time.perf_counter() - start)
        return Prediction(record, job.class_names, job.future.result(), job.path)

    async def _run(
        self,
        serving: Serving,
        ticket: Ticket,
        record: AdapterRecord,
        read: ReadImages,
        gone: Gone | None,
        exact: bool,
    ) -> tuple[Answered, torch.Tensor]:
        # The adapter first: its cold load re-checks what serving reads (image size among
        # it), so a stored adapter from before those checks is refused before any decode.
        prepared = await serving.cache.get(record)
        files = await read()
        images = await asyncio.to_thread(serving.images.batch, files, record.train_config)
        run = partial(serving.engine.run, prepared)
        mix = None
        if not exact and prepared.correction is not None:
            mix = MixSpec(prepared.correction, partial(serving.engine.head_probs, prepared))
        job = await self._infer(serving.batcher, ticket, prepared.digest, run, images, gone, mix)
        return Answered(job.future, job.path, prepared.class_names), images

    async def zero_shot(
        self, labels: list[str], read: ReadImages, gone: Gone | None = None
    ) -> torch.Tensor:
        """Probabilities ``[N, len(labels)]`` from the base's text head (no adapter)."""
        serving = self.runtime.require_ready()
        with self._admitted(serving) as ticket:
            # The labels first: one the base's text side cannot place is refused (400) before
            # the body is read and any image decoded.
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
            mix = MixSpec(None, partial(serving.engine.zero_shot_probs, emb))  # base rows
            job = await self._infer(
                serving.batcher, ticket, ("zero-shot", key), run, images, gone, mix
            )
            return job.future.result()

    @contextlib.contextmanager
    def _admitted(self, serving: Serving) -> Iterator[Ticket]:
        """A place in the queue for the whole request (503 at once when there is none), released
        however the request ends (its job releases it earlier, when it starts running)."""
        try:
            ticket = serving.batcher.admit()
        except QueueFull:
            raise Overloaded(
                "too many requests are waiting; retry shortly",
                {"Retry-After": str(self.settings.retry_after_s)},
            ) from None
        except WorkerDown as exc:
            raise NotReady(f"the server is not ready: {exc}") from None
        try:
            yield ticket
        finally:
            ticket.release()

    async def _infer(
        self,
        batcher: Batcher,
        ticket: Ticket,
        key: Hashable,
        fn: BatchFn,
        images: torch.Tensor,
        gone: Gone | None,
        mix: MixSpec | None = None,
    ) -> Job:
        """Queue the images for the model worker; the job comes back answered (its future holds
        the probabilities, ``path`` the path that served it); 504 on timeout. A job whose caller
        is cancelled, times out or disconnects is dropped before it runs."""
        try:
            job = batcher.submit(key, fn, images, ticket, mix)
        except WorkerDown as exc:
            raise NotReady(f"the server is not ready: {exc}") from None
        timeout = self.settings.request_timeout_s
        watcher = asyncio.ensure_future(gone()) if gone is not None else None
        try:
            waiting: set[asyncio.Future[Any]] = {job.future}
            if watcher is not None:
                waiting.add(watcher)
            await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not job.future.done():
                if not batcher.drop(job):  # already running: its answer will go unread
                    job.future.add_done_callback(_consume)
                if watcher is not None and watcher.done():
                    raise ClientDisconnect
                raise Timeout(f"no answer within {timeout:g}s")
            try:
                job.future.result()
            except WorkerDown as exc:
                raise NotReady(f"the server is not ready: {exc}") from None
            self.runtime.rows_served.labels(path=job.path).inc(images.shape[0])
            return job
        except asyncio.CancelledError:
            if not batcher.drop(job):
                job.future.add_done_callback(_consume)
            raise
        finally:
            if watcher is not None:
                watcher.cancel()

    # ------------------------------------------------------------------------------ admin

    async def register(self, read: ReadAdapter) -> Registration:
        """Validate an uploaded adapter against the serving base and register it (idempotent)."""
        serving = self.runtime.require_ready()
        data, alias = await read()
        register = self.runtime.registry.register
        result = await asyncio.to_thread(register, data, serving.cache.base, alias)
        rec = result.record
        log.info(
            "registered %s v%d (%s) created=%s",
            rec.task,
            rec.version,
            rec.digest[:12],
            result.created,
        )
        await self.runtime.refresh_pins([rec.task])  # a new version or alias may move a pin
        return result

    async def delete(self, task: str, version: int) -> AdapterRecord:
        """Delete one version and drop its prepared copy (requests already holding it finish)."""
        rec = await asyncio.to_thread(self.runtime.registry.delete, task, version)
        if self.runtime.cache is not None:
            self.runtime.cache.evict(rec.digest)
        log.info("deleted %s v%d (%s)", rec.task, rec.version, rec.digest[:12])
        await self.runtime.refresh_pins([rec.task])
        return rec

    async def set_alias(self, task: str, alias: str, weights: Mapping[int, int]) -> list[Share]:
        """Point ``alias`` at one version (``{version: 100}``) or split it over several."""
        shares = await asyncio.to_thread(self.runtime.registry.set_split, task, alias, weights)
        split = ", ".join(f"v{sh.version}:{sh.weight}" for sh in shares)
        log.info("alias %s@%s -> %s", task, alias, split)
        await self.runtime.refresh_pins([task])
        return shares

    async def remove_alias(self, task: str, alias: str) -> None:
        await asyncio.to_thread(self.runtime.registry.remove_alias, task, alias)
        await self.runtime.refresh_pins([task])

    # ------------------------------------------------------------------------------ status

    @property
    def load_error(self) -> str | None:
        """Why the base failed to load (client-safe text), or None."""
        return self.runtime.load_error

    @property
    def ready(self) -> bool:
        return self.runtime.ready

    @property
    def not_ready_reason(self) -> str:
        return self.runtime.not_ready_reason

    @property
    def loaded_fingerprint(self) -> str | None:
        return self.runtime.loaded_fingerprint

    @property
    def adapters_loaded(self) -> int:
        return len(self.runtime.cache) if self.runtime.cache is not None else 0

    @property
    def preloaded(self) -> int | None:
        return self.runtime.preloaded

    def metrics_text(self) -> bytes:
        """The Prometheus exposition, with the queue depth read now."""
        if self.runtime.batcher is not None:
            self.runtime.metrics.queue_depth.set(self.runtime.batcher.depth)
        return generate_latest(self.runtime.metrics.registry)

    def base_status(self) -> BaseStatus:
        """The base as loaded, and the last proof of its live weights with its age: cheap (no
        hashing here, no call onto the worker), so it is safe to leave unauthenticated."""
        serving = self.runtime.require_ready()
        proof = serving.check.proof
        if proof is None:  # the first proof is made before the server turns ready
            raise NotReady("the server is not ready: the base has not been checked yet")
        return self._status(serving, proof)

    async def check_base(self) -> BaseStatus:
        """Check the live weights now, on the worker between rounds (admin; with a timeout)."""
        serving = self.runtime.require_ready()
        try:
            proof = await serving.batcher.call(serving.check.run, self.settings.request_timeout_s)
        except CallTimeout as exc:
            raise Timeout(str(exc)) from None
        except WorkerDown as exc:
            raise NotReady(f"the server is not ready: {exc}") from None
        return self._status(serving, proof)

    def _status(self, serving: Serving, proof: BaseProof) -> BaseStatus:
        engine, cache, s = serving.engine, serving.cache, self.settings
        return BaseStatus(
            model=s.base_model,
            pretrained=s.base_pretrained,
            device=str(engine.device),
            dtype=s.dtype,
            fingerprint=self.runtime.loaded_fingerprint,
            serving_fingerprint=engine.serving_fingerprint,
            live_fingerprint=proof.live_fingerprint,
            unchanged=proof.exact,
            consistent=proof.consistent,
            checked_at=proof.checked_at,
            age_s=round(max(0.0, time.time() - proof.checked_at), 3),
            mismatches=serving.check.mismatches,
            swaps=engine.swaps,
            cached_adapters=len(cache),
            cache_bytes=cache.bytes,
        )

    async def catalog(
        self, task: str | None, limit: int, offset: int, sort: str = "task"
    ) -> CatalogView:
        """A page of the catalog; the layer sizes are known once the base is loaded."""
        listing = partial(self.runtime.registry.list, task=task, sort=sort)
        page = await asyncio.to_thread(listing, limit=limit, offset=offset)
        engine = self.runtime.engine
        sig = engine.signature if engine is not None else None
        s = self.settings
        return CatalogView(
            page=page,
            base_label=f"{s.base_model}/{s.base_pretrained}",
            shapes=sig.param_shapes if sig else None,
            base_fingerprint=sig.fingerprint if sig else None,
        )


def _consume(future: asyncio.Future[Any]) -> None:
    """Read a dropped-too-late job's outcome, so nobody logs it as never retrieved."""
    if not future.cancelled():
        future.exception()
