"""Two `deltaclip serve` replicas over one PostgreSQL catalog behind nginx: a weighted alias set
through one replica splits clients the same way on both and through nginx, each client sticks
to its version, the usage both replicas count adds up in the shared catalog, and a replica
started with ``--preload`` prepares the most used and aliased versions before it is ready."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from adapters_store.format.codec import encode_adapter
from adapters_store.synthetic import random_adapter
from tests.conftest import ADMIN_TOKEN, png_bytes
from tests.e2e.cluster import running_cluster, start_replica, wait_ready

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
IMAGE = png_bytes(0)
KEYS = [f"client-{i}" for i in range(200)]


def predict(c: httpx.Client, url: str, key: str) -> httpx.Response:
    headers = {"content-type": "image/png", "X-Deltaclip-Client": key}
    r = c.post(f"{url}/predict?task=t", content=IMAGE, headers=headers)
    assert r.status_code == 200, r.text
    return r


def test_the_split_holds_over_nginx_and_usage_adds_up(pg_url: str, tmp_path: Path, tiny) -> None:  # type: ignore[no-untyped-def]
    env = {"DELTACLIP_USAGE_FLUSH_S": "0.2"}
    with running_cluster(pg_url, tmp_path, replicas=2, env=env) as (front, replicas):
        urls = [u for u, _ in replicas.values()]
        for seed in range(2):  # v1 and v2, registered through the first replica
            data = encode_adapter(random_adapter(*tiny, "t", seed=seed, density=0.01))
            r = httpx.post(f"{urls[0]}/admin/adapters", files={"file": ("a", data)}, headers=AUTH)
            assert r.status_code == 201, r.text
        split = {"split": [{"version": 1, "weight": 75}, {"version": 2, "weight": 25}]}
        r = httpx.put(f"{urls[1]}/admin/adapters/t/aliases/production", json=split, headers=AUTH)
        assert r.status_code == 200, r.text

        served: Counter[tuple[str, int]] = Counter()  # (replica, version) -> requests
        with httpx.Client(timeout=30) as c:
            through_nginx = {}
            for key in KEYS:
                r = predict(c, front, key)
                through_nginx[key] = r.json()["version"]
                served[(r.headers["x-deltaclip-replica"], r.json()["version"])] += 1
            assert len(through_nginx) == len(KEYS)
            share_v2 = Counter(through_nginx.values())[2] / len(KEYS)
            assert 0.15 < share_v2 < 0.35, share_v2  # 25 %: 3 sigma is 9 points at 200 keys
            # Sticky whichever replica answers: every replica hashes a key to the same version.
            for url in urls:
                for key in KEYS[:50]:
                    r = predict(c, url, key)
                    assert r.json()["version"] == through_nginx[key], key
                    served[(r.headers["x-deltaclip-replica"], r.json()["version"])] += 1
        assert {replica for replica, _ in served} == set(replicas)  # both replicas served

        # Usage: each replica adds its own counts; the catalog holds their sum.
        expected = {v: sum(n for (_, ver), n in served.items() if ver == v) for v in (1, 2)}
        assert sum(expected.values()) == len(KEYS) + 50 * len(urls)
        deadline = time.monotonic() + 60
        while True:
            versions = httpx.get(f"{front}/adapters/t").json()["versions"]
            counted = {v["version"]: v["requests"] for v in versions}
            if counted == expected or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert counted == expected
        assert all(v["images"] == v["requests"] and v["last_served_at"] for v in versions)
        listing = httpx.get(f"{urls[0]}/adapters?sort=requests").json()["items"]
        assert [i["version"] for i in listing] == [1, 2]

        # A replica started with --preload prepares them before it says it is ready.
        args = ["--preload", "top:1", "--preload", "alias:production"]
        url, proc = start_replica(pg_url, tmp_path / "host-new", "replica-new", args=args)
        try:
            wait_ready(url, proc)
            ready = httpx.get(f"{url}/readyz").json()
            assert (ready["preloaded"], ready["adapters_loaded"]) == (2, 2), ready
        finally:
            proc.terminate()
            proc.wait(30)
