"""Every metric ``/metrics`` declares moves when its event happens."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from adapters_store.format.codec import encode_adapter
from adapters_store.synthetic import random_adapter
from server.main import create_app
from tests.conftest import png_bytes, wait_ready

IMG = {"content": png_bytes(0), "headers": {"content-type": "image/png"}}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(c: TestClient) -> dict[str, Samples]:
    """Family name → ``{(sample name, labels): value}`` as ``/metrics`` reads now."""
    r = c.get("/metrics")
    assert r.status_code == 200
    return {
        family.name: {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
        for family in text_string_to_metric_families(r.text)
        if family.name.startswith("deltaclip_") and not family.name.endswith("_created")
    }


class WorkerKilled(BaseException):
    """Escapes every ``except Exception``: what kills a worker thread."""


def until(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_every_declared_metric_moves_where_its_event_happens(server_settings, admin, tiny) -> None:  # type: ignore[no-untyped-def]
    app = create_app(server_settings)
    with TestClient(app) as c:
        wait_ready(c)
        declared = {
            family.name.removesuffix("_total")
            for family in app.state.runtime.metrics.registry.collect()
        }
        before = scrape(c)
        assert {name.removesuffix("_total") for name in before} == declared
        seen: list[dict[str, Samples]] = []

        for i, task in enumerate(("t0", "t1")):
            data = encode_adapter(random_adapter(*tiny, task, density=0.05, seed=i))
            r = c.post("/admin/adapters", files={"file": ("a", data)}, headers=admin)
            assert r.status_code == 201, r.text
        for task in ("t0", "t1", "t0", "t1"):  # 2 cold loads, 2 hits, 4 swaps
            assert c.post(f"/predict?task={task}", **IMG).status_code == 200
        assert c.post("/predict?task=ghost", **IMG).status_code == 404
        seen.append(scrape(c))

        # Hold the worker inside a forward pass so that a second request has to wait in line.
        engine = app.state.runtime.engine
        entered, release = threading.Event(), threading.Event()
        real_run = engine.run

        def held_run(adapter: Any, images: torch.Tensor) -> torch.Tensor:
            entered.set()
            assert release.wait(30)
            return real_run(adapter, images)

        engine.run = held_run
        try:
            with ThreadPoolExecutor(2) as pool:
                first = pool.submit(c.post, "/predict?task=t0", **IMG)
                assert entered.wait(30)
                second = pool.submit(c.post, "/predict?task=t1", **IMG)
                until(lambda: scrape(c)["deltaclip_queue_depth"][("deltaclip_queue_depth", ())] >= 1,
                      "the second request to wait in the queue")  # fmt: skip
                seen.append(scrape(c))
                release.set()
                assert first.result().status_code == 200 and second.result().status_code == 200
        finally:
            release.set()
            engine.run = real_run

        r = c.delete("/admin/adapters/t1/versions/1", headers=admin)  # evicts its prepared copy
        assert r.status_code == 200, r.text
        seen.append(scrape(c))
        # A stray write behind the engine's record: the admin check reports and counts it.
        engine.patcher.flat[torch.float32][7] += 1.0
        check = c.post("/admin/base/check", headers=admin)
        assert check.status_code == 200 and check.json()["consistent"] is False, check.text
        seen.append(scrape(c))

        # The worker thread dies between jobs: it is restarted on a verified base, and counted.
        batcher = app.state.runtime.batcher
        collect, kills = batcher._collect, [WorkerKilled("injected")]

        def dying_collect(first: Any) -> Any:
            if kills:
                raise kills.pop()
            return collect(first)

        batcher._collect = dying_collect
        assert c.post("/predict?task=t0", **IMG).status_code == 503
        until(lambda: c.get("/readyz").status_code == 200, "readiness after the restart")
        assert c.post("/predict?task=t0", **IMG).status_code == 200
        seen.append(scrape(c))
        swaps = c.get("/base").json()["swaps"]
        after = scrape(c)

    moved = {
        name.removesuffix("_total")
        for name, samples in before.items()
        if any(scraped[name] != samples for scraped in seen)
    }
    assert moved == declared, f"never moved: {sorted(declared - moved)}"

    def value(family: str, sample: str | None = None, **labels: str) -> float:
        key = (sample or family, tuple(sorted(labels.items())))
        return after[family].get(key, 0.0)

    assert value("deltaclip_swaps", "deltaclip_swaps_total") == swaps >= 6
    assert value("deltaclip_cache_misses", "deltaclip_cache_misses_total") == 2
    assert value("deltaclip_cache_hits", "deltaclip_cache_hits_total") == 6  # 4, then 2 after
    assert value("deltaclip_cache_evictions", "deltaclip_cache_evictions_total") == 1
    responses = "deltaclip_responses_total"
    assert value("deltaclip_responses", responses, route="/predict", status="200") == 7
    assert value("deltaclip_responses", responses, route="/predict", status="503") == 1
    assert value("deltaclip_base_mismatches", "deltaclip_base_mismatches_total") == 1
    assert value("deltaclip_worker_restarts", "deltaclip_worker_restarts_total") == 1
    assert value("deltaclip_responses", responses, route="/predict", status="404") == 1
    assert value("deltaclip_responses", responses, route="/admin/adapters", status="201") == 2
    assert value("deltaclip_responses", responses,
                 route="/admin/adapters/{task}/versions/{version}", status="200") == 1  # fmt: skip
    assert value("deltaclip_request_seconds", "deltaclip_request_seconds_count", task="t0") == 4
    assert value("deltaclip_queue_depth") == 0


def test_answers_given_before_routing_are_counted(server_settings) -> None:  # type: ignore[no-untyped-def]
    settings = server_settings.model_copy(update={"max_request_bytes": 10})
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        assert c.post("/predict?task=t", content=b"x" * 100).status_code == 413
        assert c.get("/no/such/route").status_code == 404
        assert c.head("/healthz").status_code == 200
        families = scrape(c)["deltaclip_responses"]
    counted = {dict(labels)["route"] + " " + dict(labels)["status"]: v
               for (_, labels), v in families.items()}  # fmt: skip
    assert counted["unrouted 413"] == 1
    assert counted["unrouted 404"] == 1
    assert counted["/healthz 200"] == 1  # the HEAD, answered as the GET route
