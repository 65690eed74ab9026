"""Several `deltaclip serve` replicas over one PostgreSQL catalog behind nginx, on loopback:
task-affinity routing, cross-replica consistency of register/alias/delete, and failover when a
replica is killed mid-load."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from adapters_store.format.codec import encode_adapter
from adapters_store.synthetic import random_adapter
from tests.conftest import ADMIN_TOKEN, png_bytes
from tests.e2e.cluster import running_cluster

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
IMG = {"content": png_bytes(0), "headers": {"content-type": "image/png"}}


@pytest.fixture
def cluster(pg_url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Three replicas (each with its own home, as on separate hosts) and nginx in front."""
    with running_cluster(pg_url, tmp_path, replicas=3) as running:
        yield running


def test_routing_consistency_and_failover(cluster, tiny) -> None:  # type: ignore[no-untyped-def]
    front, replicas = cluster
    urls = [u for u, _ in replicas.values()]
    tasks = [f"task{i}" for i in range(8)]
    for i, task in enumerate(tasks):  # registered through one replica only
        r = httpx.post(f"{urls[0]}/admin/adapters", files={"file": ("a", encode_adapter(random_adapter(*tiny, task, seed=i)))},
                       headers=AUTH)  # fmt: skip
        assert r.status_code == 201, r.text

    # Affinity: every request for a task lands on the same replica; tasks spread over replicas.
    owner: dict[str, str] = {}
    with httpx.Client(base_url=front, timeout=30) as c:
        for _ in range(3):
            for task in tasks:
                r = c.post(f"/predict?task={task}", **IMG)
                assert r.status_code == 200, r.text
                owner.setdefault(task, r.headers["x-deltaclip-replica"])
                assert r.headers["x-deltaclip-replica"] == owner[task]
    assert len(set(owner.values())) >= 2

    # Consistency: a change made through any replica holds on every replica once it returned.
    assert httpx.post(f"{urls[1]}/admin/adapters", files={"file": ("a", encode_adapter(random_adapter(*tiny, "task0", seed=99)))},
                      headers=AUTH).status_code == 201  # fmt: skip
    assert (
        httpx.put(
            f"{urls[2]}/admin/adapters/task0/aliases/production", json={"version": 1}, headers=AUTH
        ).status_code
        == 200
    )
    assert {httpx.post(f"{u}/predict?task=task0", **IMG).json()["version"] for u in urls} == {1}
    assert (
        httpx.delete(f"{urls[0]}/admin/adapters/task0/versions/1", headers=AUTH).status_code == 200
    )
    assert {httpx.post(f"{u}/predict?task=task0", **IMG).json()["version"] for u in urls} == {
        2
    }  # alias went with v1
    assert (
        httpx.delete(f"{urls[1]}/admin/adapters/task1/versions/1", headers=AUTH).status_code == 200
    )
    assert {httpx.post(f"{u}/predict?task=task1", **IMG).status_code for u in urls} == {404}
    live = [t for t in tasks if t != "task1"]

    # Failover: kill -9 the replica that owns the most tasks while clients keep sending.
    victim = Counter(owner[t] for t in live).most_common(1)[0][0]
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    stop = threading.Event()

    def client(n: int) -> None:
        with httpx.Client(base_url=front, timeout=30) as c:
            k = n
            while not stop.is_set():
                task = live[k % len(live)]
                k += 1
                try:
                    r = c.post(f"/predict?task={task}", **IMG)
                    statuses[r.status_code] += 1
                    if r.status_code != 200:
                        failures.append(f"{task}: {r.status_code}")
                except httpx.TransportError as exc:
                    failures.append(f"{task}: {exc!r}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    time.sleep(2)
    replicas[victim][1].send_signal(signal.SIGKILL)
    killed_at = sum(statuses.values())
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join(60)
    total = sum(statuses.values())
    assert total - killed_at > 20, statuses  # the cluster kept serving after the kill
    assert len(failures) <= len(threads), failures  # at most the requests in flight at the kill
    with httpx.Client(base_url=front, timeout=30) as c:  # every task is served by a survivor
        for task in live:
            r = c.post(f"/predict?task={task}", **IMG)
            assert r.status_code == 200 and r.headers["x-deltaclip-replica"] != victim
