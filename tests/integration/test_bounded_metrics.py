"""``/metrics`` stays bounded however many tasks are served: 2,000 synthetic tasks, each served
once, expose as many series as the first few dozen did (METRICS_TASKS tasks keep their own
latency label, the rest are counted under ``_other``)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from adapters_store.catalog import upgrade
from adapters_store.format.codec import encode_adapter
from adapters_store.registry import Registry
from adapters_store.serving_base import ServingBase
from adapters_store.synthetic import random_adapter
from adapters_store.usage import UsageDelta
from server.config import ServerSettings
from server.main import create_app
from server.metrics import OTHER_TASKS
from tests.conftest import png_bytes, wait_ready

pytestmark = pytest.mark.slow
TASKS = [f"task{i:04d}" for i in range(2000)]
LABELLED = 20
IMG = {"content": png_bytes(0), "headers": {"content-type": "image/png"}}


def series(c: TestClient) -> list[tuple[str, dict[str, str], float]]:
    r = c.get("/metrics")
    assert r.status_code == 200
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    ]


def test_two_thousand_tasks_expose_a_bounded_number_of_series(tmp_path: Path, tiny) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    upgrade(url)
    settings = ServerSettings(
        home=tmp_path / "home",
        database_url=url,
        base_model="deltaclip-tiny",
        base_pretrained="random",
        max_wait_ms=1.0,
        metrics_tasks=LABELLED,
        cache_bytes=64 << 20,
    )
    registry = Registry.from_settings(settings)
    base = ServingBase.of(*tiny)
    for i, task in enumerate(TASKS):
        registry.register(encode_adapter(random_adapter(*tiny, task, seed=i, density=0.001)), base)
    # The catalog's most requested tasks (all replicas' traffic) get the labels first.
    hot = TASKS[-5:]
    registry.add_usage({(task, 1): UsageDelta(requests=100) for task in hot})
    registry.close()

    def serve(tasks: list[str]) -> None:
        with ThreadPoolExecutor(4) as pool:
            statuses = list(
                pool.map(lambda t: c.post(f"/predict?task={t}", **IMG).status_code, tasks)
            )
        assert statuses == [200] * len(tasks)

    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        serve(hot + TASKS[:40])  # every label taken: the named tasks have their series
        series(c)  # the scrape's own response series
        early = series(c)
        serve(TASKS[40:])
        late = series(c)
        resident = c.get("/base").json()["cached_adapters"]

    grown = {(n, tuple(sorted(lb.items()))) for n, lb, _ in late} - {
        (n, tuple(sorted(lb.items()))) for n, lb, _ in early
    }
    assert len(late) == len(early) < 600, (len(early), len(late), sorted(grown))
    latency = {s[1]["task"] for s in late if s[0] == "deltaclip_request_seconds_count"}
    assert OTHER_TASKS in latency and len(latency) == LABELLED + 1
    assert set(hot) <= latency  # served last, labelled first
    counts = [s[2] for s in late if s[0] == "deltaclip_request_seconds_count"]
    assert sum(counts) == len(TASKS) + len(hot)  # every request counted, named or _other
    value = {s[0]: s[2] for s in late if not s[1]}
    assert value["deltaclip_adapters_served"] == len(TASKS)
    assert value["deltaclip_cache_resident_adapters"] == resident > 0
    print(
        f"/metrics: {len(late)} series after {len(TASKS)} tasks ({len(early)} after {len(hot) + 40})"
    )
