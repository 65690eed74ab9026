"""The serving core survives its own faults, through real HTTP: a worker that dies, a delete
during a cold load, a pinned alias moved (here and by another replica), a client that hangs up
while its job waits, and a full queue refusing before any expensive step (issue 24).

Faults are injected at the exact step into the real runtime's objects; the test waits on events
the injected code sets, or polls a condition up to a deadline, never for a fixed time."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from adapters_store.errors import ChecksumMismatch
from adapters_store.format.codec import encode_adapter
from adapters_store.synthetic import random_adapter
from server.main import create_app
from tests.conftest import ADMIN_TOKEN, png_bytes, wait_ready

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PNG = png_bytes(0)
IMG = {"content": PNG, "headers": {"content-type": "image/png"}}


class Fatal(BaseException):
    """Escapes every ``except Exception``: what kills a worker thread."""


def eventually(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def adapter_file(tiny: Any, task: str, seed: int) -> bytes:
    return encode_adapter(random_adapter(*tiny, task, density=0.05, seed=seed))


def register(
    c: TestClient, tiny: Any, task: str, seed: int, alias: str | None = None
) -> dict[str, Any]:
    data = adapter_file(tiny, task, seed)
    r = c.post("/admin/adapters", files={"file": ("a", data)},
               data={"alias": alias} if alias else None, headers=ADMIN)  # fmt: skip
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def hold_worker(runtime: Any) -> tuple[threading.Event, threading.Event, list[str]]:
    """Make the engine's first forward signal and wait for release; count every forward."""
    started, release = threading.Event(), threading.Event()
    ran: list[str] = []
    original = runtime.engine.run

    def run(adapter: Any, images: Any) -> Any:
        ran.append(adapter.task)
        if len(ran) == 1:
            started.set()
            assert release.wait(30), "never released"
        return original(adapter, images)

    runtime.engine.run = run
    return started, release, ran


def test_a_dead_worker_turns_readiness_503_fails_fast_and_restarts_on_a_verified_base(
    server_settings, tiny
) -> None:  # type: ignore[no-untyped-def]
    app = create_app(server_settings)
    with TestClient(app) as c:
        wait_ready(c)
        register(c, tiny, "t", 1)
        before = c.post("/predict?task=t", **IMG)
        assert before.status_code == 200
        runtime = app.state.runtime
        batcher = runtime.batcher
        collect = batcher._collect
        kills = [Fatal("injected")]

        def dying_collect(first: Any) -> Any:  # the step that gathers a round, outside any job
            if kills:
                raise kills.pop()
            return collect(first)

        batcher._collect = dying_collect
        resetting, allow_reset = threading.Event(), threading.Event()
        reset = runtime.engine.reset

        def held_reset() -> None:  # hold the restart so the down state can be observed
            resetting.set()
            assert allow_reset.wait(30)
            reset()

        runtime.engine.reset = held_reset
        r = c.post("/predict?task=t", **IMG)  # its job is in the round that kills the worker
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready", r.text
        assert resetting.wait(30)
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.headers["retry-after"] == "5"
        assert "restarting" in ready.json()["reason"]
        r = c.post("/predict?task=t", **IMG)  # fail fast while down: no job is queued
        assert r.status_code == 503 and "restarting" in r.json()["error"]["message"]
        assert batcher.depth == 0
        assert c.get("/base").status_code == 503
        allow_reset.set()
        eventually(lambda: c.get("/readyz").status_code == 200, "readiness after the restart")
        after = c.post("/predict?task=t", **IMG)
        assert after.status_code == 200 and after.json() == before.json()
        check = c.post("/admin/base/check", headers=ADMIN).json()
        assert check["unchanged"] and check["consistent"]
        metrics = c.get("/metrics").text
        assert "deltaclip_worker_restarts_total 1.0" in metrics


def test_a_delete_during_a_cold_load_is_honoured(server_settings, tiny) -> None:  # type: ignore[no-untyped-def]
    app = create_app(server_settings)
    with TestClient(app) as c:
        wait_ready(c)
        rec = register(c, tiny, "t", 1)
        runtime = app.state.runtime
        loading, gate = threading.Event(), threading.Event()
        load = runtime.registry.load

        def slow_load(record: Any, base: Any) -> Any:
            loading.set()
            assert gate.wait(30)
            return load(record, base)

        runtime.registry.load = slow_load
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(c.post, "/predict?task=t", **IMG)
            assert loading.wait(30)
            r = c.delete("/admin/adapters/t/versions/1", headers=ADMIN)
            assert r.status_code == 200, r.text
            gate.set()
            # Resolved before the delete: it is answered, by the version it resolved to.
            assert pending.result(30).json()["digest"] == rec["digest"]
        assert rec["digest"] not in runtime.cache  # the load finished after the delete
        assert runtime.cache.loading() == []
        r = c.post("/predict?task=t", **IMG)
        assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"


def test_cancelling_one_request_during_a_shared_cold_load_spares_the_others(
    server_settings, tiny
) -> None:  # type: ignore[no-untyped-def]
    """Both loader threads are busy, so "t"'s load waits in the pool when one of its two
    requests is cancelled: the old cache cancelled the load for both, and for good."""
    app = create_app(server_settings)
    with TestClient(app) as c:
        wait_ready(c)
        for seed, task in enumerate(("a", "b", "t")):
            register(c, tiny, task, seed)
        runtime, service = app.state.runtime, app.state.service
        gate = threading.Event()
        loads: list[str] = []
        load = runtime.registry.load

        def slow_load(record: Any, base: Any) -> Any:
            loads.append(record.task)
            assert gate.wait(30)
            return load(record, base)

        runtime.registry.load = slow_load

        async def read() -> list[bytes]:
            return [PNG]

        with ThreadPoolExecutor(3) as pool:
            busy = [pool.submit(c.post, f"/predict?task={task}", **IMG) for task in ("a", "b")]
            eventually(lambda: sorted(loads) == ["a", "b"], "both loader threads to be busy")
            other = pool.submit(c.post, "/predict?task=t", **IMG)
            cancelled = c.portal.start_task_soon(service.classify, "t", None, None, read)
            eventually(lambda: runtime.batcher.depth == 4, "both requests for t to wait")
            assert runtime.cache.loading() and "t" not in loads  # t's load has not started
            cancelled.cancel()
            eventually(lambda: runtime.batcher.depth == 3, "the cancelled request's place")
            gate.set()
            assert [f.result(30).status_code for f in [*busy, other]] == [200, 200, 200]
        assert c.post("/predict?task=t", **IMG).status_code == 200  # nor poisoned
        assert sorted(loads) == ["a", "b", "t"]  # one load each


def test_a_pin_follows_its_alias_here_and_when_another_replica_moves_it(
    server_settings, tiny
) -> None:  # type: ignore[no-untyped-def]
    with TestClient(create_app(server_settings)) as c:
        wait_ready(c)
        v1 = register(c, tiny, "t", 1, alias="production")
        v2 = register(c, tiny, "t", 2)
    settings = server_settings.model_copy(update={"pin": ["t"], "pin_refresh_s": 0.05})
    app = create_app(settings)
    with TestClient(app) as c:
        wait_ready(c)
        cache = app.state.runtime.cache
        assert cache.pins() == {"t": v1["digest"]} and v1["digest"] in cache
        r = c.put("/admin/adapters/t/aliases/production", json={"version": 2}, headers=ADMIN)
        assert r.status_code == 200
        # Moved by this replica: the pin follows before the answer (and v2 is loaded).
        assert cache.pins() == {"t": v2["digest"]} and v2["digest"] in cache
        # Moved by another replica (straight in the shared catalog): the short poll catches it.
        app.state.runtime.registry.set_alias("t", "production", 1)
        eventually(lambda: cache.pins() == {"t": v1["digest"]}, "the pin to follow the alias")
        eventually(lambda: v1["digest"] in cache, "the newly pinned version to be loaded")


def test_a_full_queue_refuses_before_any_lookup_load_or_decode(server_settings, tiny) -> None:  # type: ignore[no-untyped-def]
    app = create_app(server_settings.model_copy(update={"queue_size": 1}))
    with TestClient(app) as c:
        wait_ready(c)
        register(c, tiny, "t", 1)
        runtime = app.state.runtime
        started, release, _ = hold_worker(runtime)
        resolves: list[str] = []
        resolve = runtime.registry.resolve

        def counting_resolve(*args: Any) -> Any:
            resolves.append(args[0])
            return resolve(*args)

        runtime.registry.resolve = counting_resolve
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(c.post, "/predict?task=t", **IMG)
            assert started.wait(30)
            # The worker runs the first job, whose place is free again; hold one more place.
            second = pool.submit(c.post, "/predict?task=t", **IMG)
            eventually(lambda: runtime.batcher.depth == 1, "the second request to hold its place")
            n = len(resolves)
            r = c.post("/predict?task=nosuchtask", **IMG)
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
            assert r.headers["retry-after"] == "1"
            assert len(resolves) == n  # refused before the task was even looked up
            release.set()
            assert first.result(30).status_code == 200 and second.result(30).status_code == 200
        assert runtime.batcher.depth == 0


def test_a_cancelled_request_drops_its_job_and_frees_its_place(server_settings, tiny) -> None:  # type: ignore[no-untyped-def]
    app = create_app(server_settings)
    with TestClient(app) as c:
        wait_ready(c)
        register(c, tiny, "t", 1)
        runtime, service = app.state.runtime, app.state.service
        started, release, ran = hold_worker(runtime)

        async def read() -> list[bytes]:
            return [PNG]

        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(c.post, "/predict?task=t", **IMG)
            assert started.wait(30)
            # A second prediction on the app's own event loop, cancelled while its job waits.
            second = c.portal.start_task_soon(service.classify, "t", None, None, read)
            eventually(lambda: runtime.batcher.depth == 1, "the second job to be queued")
            second.cancel()
            eventually(lambda: runtime.batcher.depth == 0, "the cancelled request's place")
            release.set()
            assert first.result(30).status_code == 200
        assert c.post("/predict?task=t", **IMG).status_code == 200
        assert ran == ["t", "t"]  # the first request and the last, never the cancelled one


def test_a_request_failing_at_any_step_gives_its_queue_place_back(server_settings, tiny) -> None:  # type: ignore[no-untyped-def]
    """With one place in the queue, requests failing at each step before and after admission
    (lookup, cold load, decode, the forward) leave it free: the next request is never refused
    as overloaded, and the count is back to zero."""
    app = create_app(server_settings.model_copy(update={"queue_size": 1}))
    with TestClient(app) as c:
        wait_ready(c)
        register(c, tiny, "t", 1)
        register(c, tiny, "broken", 2)
        runtime = app.state.runtime
        load = runtime.registry.load

        def failing_load(record: Any, base: Any) -> Any:
            if record.task == "broken":
                raise ChecksumMismatch("injected: the stored bytes no longer match")
            return load(record, base)

        runtime.registry.load = failing_load
        run = runtime.engine.run
        forwards = {"fail": 1}

        def failing_run(adapter: Any, images: Any) -> Any:
            if forwards.pop("fail", 0):
                raise RuntimeError("injected: the forward failed")
            return run(adapter, images)

        runtime.engine.run = failing_run
        for _ in range(2):
            assert c.post("/predict?task=nosuchtask", **IMG).status_code == 404
            assert c.post("/predict?task=broken", **IMG).status_code == 409
            bad = c.post("/predict?task=t", content=b"\x89PNG\r\n\x1a\nnot really", headers={"content-type": "image/png"})  # fmt: skip
            assert bad.status_code == 422
        # An injected fault in the forward is the server's own: a JSON 500, nothing more.
        broken = c.post("/predict?task=t", **IMG)
        assert broken.status_code == 500 and broken.json()["error"]["code"] == "internal"
        assert runtime.batcher.depth == 0
        assert c.post("/predict?task=t", **IMG).status_code == 200


@pytest.fixture
def served(server_settings) -> Iterator[tuple[str, Any]]:  # type: ignore[no-untyped-def]
    """A real uvicorn server in a thread; yields its URL and its runtime."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(server_settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/readyz").status_code == 200
        except httpx.TransportError:
            return False

    eventually(ready, "the server to be ready", 60)
    yield url, app.state.runtime
    server.should_exit = True
    thread.join(10)


def test_a_client_that_hangs_up_while_queued_frees_its_place_and_its_job_never_runs(
    served, tiny
) -> None:  # type: ignore[no-untyped-def]
    url, runtime = served
    data = adapter_file(tiny, "t", 1)
    assert httpx.post(f"{url}/admin/adapters", files={"file": ("a", data)}, headers=ADMIN).status_code == 201  # fmt: skip
    started, release, ran = hold_worker(runtime)
    port = int(url.rsplit(":", 1)[1])
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(httpx.post, f"{url}/predict?task=t", timeout=60, **IMG)
        assert started.wait(30)
        sock = socket.create_connection(("127.0.0.1", port))
        head = (f"POST /predict?task=t HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                f"Content-Length: {len(PNG)}\r\n\r\n").encode()  # fmt: skip
        sock.sendall(head + PNG)
        eventually(lambda: runtime.batcher.depth == 1, "the second job to wait in the queue")
        sock.close()  # the client gives up
        # Its place is released while the worker is still busy: the job was dropped, not run.
        eventually(lambda: runtime.batcher.depth == 0, "the hung-up request's place")
        release.set()
        assert first.result(30).status_code == 200
    assert httpx.post(f"{url}/predict?task=t", **IMG).status_code == 200
    assert ran == ["t", "t"]  # the first request and the last: never the one that hung up


def test_base_serves_the_cached_proof_without_touching_the_worker(server_settings, tiny) -> None:  # type: ignore[no-untyped-def]
    app = create_app(server_settings.model_copy(update={"base_check_s": 3600.0}))
    with TestClient(app) as c:
        wait_ready(c)
        register(c, tiny, "t", 1)
        assert c.post("/predict?task=t", **IMG).status_code == 200  # "t" is patched now
        runtime = app.state.runtime
        hashes: list[int] = []
        fingerprint = runtime.engine.base_fingerprint

        def counted() -> str:
            hashes.append(1)
            return fingerprint()

        runtime.engine.base_fingerprint = counted
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: c.get("/base"), range(40)))
        assert len(answers) == 40 and {r.status_code for r in answers} == {200}
        body = answers[-1].json()
        assert body["unchanged"] and body["consistent"] and body["mismatches"] == 0
        assert body["live_fingerprint"] == body["serving_fingerprint"]
        assert body["age_s"] >= 0 and body["checked_at"] <= time.time()
        assert hashes == []  # the proof from start-up, served from memory
        assert runtime.engine.current is not None  # and nothing restored the base for it
        assert c.post("/admin/base/check").status_code == 401
        fresh = c.post("/admin/base/check", headers=ADMIN).json()
        assert hashes == [1] and fresh["checked_at"] > body["checked_at"]
        assert c.get("/base").json()["checked_at"] == fresh["checked_at"]


def test_the_base_is_checked_between_rounds_when_a_check_is_due(server_settings, tiny) -> None:  # type: ignore[no-untyped-def]
    app = create_app(server_settings.model_copy(update={"base_check_s": 0.05}))
    with TestClient(app) as c:
        wait_ready(c)
        register(c, tiny, "t", 1)
        first = c.get("/base").json()["checked_at"]
        assert c.post("/predict?task=t", **IMG).status_code == 200
        # No admin call: the worker checks on its own, between rounds and when idle.
        eventually(lambda: c.get("/base").json()["checked_at"] > first, "a periodic check")
        assert c.get("/base").json()["unchanged"]
