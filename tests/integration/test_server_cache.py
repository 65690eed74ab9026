"""The adapter cache inside a running app: cold loads off the request path, pinning, eviction."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from adapters_store.format.codec import encode_adapter
from adapters_store.synthetic import random_adapter
from server.main import create_app
from tests.conftest import ADMIN_TOKEN, png_bytes, wait_ready

IMG = {"content": png_bytes(0), "headers": {"content-type": "image/png"}}


def _register(c: TestClient, data: bytes) -> None:
    r = c.post(
        "/admin/adapters",
        files={"file": ("a", data)},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    assert r.status_code == 201, r.text


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz").status_code == 200
    except httpx.TransportError:
        return False


def test_a_slow_cold_load_does_not_stall_other_tasks(server_settings, tiny) -> None:  # type: ignore[no-untyped-def]
    app = create_app(server_settings)
    with TestClient(app) as c:
        wait_ready(c)
        for task in ("slow", "fast"):
            _register(c, encode_adapter(random_adapter(*tiny, task, seed=len(task))))
        assert c.post("/predict?task=fast", **IMG).status_code == 200  # warm
        runtime = app.state.runtime
        original = runtime.registry.load
        loading, gate = threading.Event(), threading.Event()

        def slow_load(record, base):  # type: ignore[no-untyped-def]
            if record.task == "slow":
                loading.set()
                assert gate.wait(30), "never released"
            return original(record, base)

        runtime.registry.load = slow_load
        with ThreadPoolExecutor(2) as pool:
            slow = pool.submit(c.post, "/predict?task=slow", **IMG)
            assert loading.wait(30)  # the slow task's cold load has started and is held
            fast = [c.post("/predict?task=fast", **IMG).status_code for _ in range(5)]
            # All five were answered while the slow load was still held at the gate.
            assert not slow.done()
            gate.set()
            assert slow.result(30).status_code == 200
        assert fast == [200] * 5


def test_pinned_tasks_are_preloaded_and_never_evicted(server_settings, tiny) -> None:  # type: ignore[no-untyped-def]
    with TestClient(create_app(server_settings)) as c:
        wait_ready(c)
        for i in range(3):
            _register(c, encode_adapter(random_adapter(*tiny, f"t{i}", density=0.05, seed=i)))
    settings = server_settings.model_copy(update={"pin": ["t0"], "cache_bytes": 1})
    app = create_app(settings)
    with TestClient(app) as c:
        wait_ready(c)
        cache = app.state.runtime.cache
        pinned = app.state.runtime.registry.resolve("t0").digest
        assert cache.digests() == [pinned]  # preloaded before ready
        for task in ("t1", "t2", "t0", "t1"):
            assert c.post(f"/predict?task={task}", **IMG).status_code == 200
        assert cache.digests() == [pinned]  # the 1-byte budget evicts everything else
        metrics = c.get("/metrics").text
        assert "deltaclip_cache_evictions_total 3.0" in metrics
        assert "deltaclip_cache_hits_total 1.0" in metrics


def test_deltaclip_serve_runs_the_app_under_uvicorn(server_settings, tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DELTACLIP_HOME": str(server_settings.home), "DELTACLIP_DATABASE_URL": server_settings.database_url,
           "DELTACLIP_BASE_MODEL": "deltaclip-tiny", "DELTACLIP_BASE_PRETRAINED": "random",
           "DELTACLIP_ADMIN_TOKEN": ADMIN_TOKEN}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "adapters_store.cli", "serve", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while not _ready(url):
            assert time.monotonic() < deadline, "deltaclip serve did not become ready in 60 s"
            assert proc.poll() is None, "deltaclip serve exited before it was ready"
            time.sleep(0.1)
        r = httpx.post(f"{url}/admin/adapters", files={"file": ("a", encode_adapter(random_adapter(*tiny, "t")))},
                       headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})  # fmt: skip
        assert r.status_code == 201
        r = httpx.post(f"{url}/predict?task=t", **IMG)
        assert r.status_code == 200 and r.json()["version"] == 1
        assert httpx.get(f"{url}/docs").status_code == 200
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal as its exit status.
    assert proc.returncode in (0, -15), out
    assert "Application shutdown complete" in out and "Traceback" not in out
    assert "registered t v1" in out
