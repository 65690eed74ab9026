"""Load and soak on loopback: ~10,000 mixed requests over five tasks (raw and multipart bodies,
versions, aliases, zero-shot and a share of bad requests) from 16 concurrent clients against
the real ``deltaclip serve`` process, while new versions are registered and aliases moved.

Zero 5xx, every good request answered 200 by the adapter it asked for, resident memory drift
under 5 % after warm-up, and the base's fingerprint unchanged at the end. The figures are
printed and written to ``$DELTACLIP_SOAK_REPORT`` when set (docs/RELIABILITY.md quotes them).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from torch import nn

from adapters_store.bases import BaseSignature
from adapters_store.catalog import upgrade
from adapters_store.format.codec import encode_adapter
from adapters_store.synthetic import random_adapter
from tests.conftest import png_bytes
from tests.security.helpers import ADMIN, ServerProcess, start_server

Tiny = tuple[nn.Module, BaseSignature]
TASKS = [f"task{i}" for i in range(5)]
WARMUP, REQUESTS, CONCURRENCY = 600, 10_000, 16


def classes_of(task: str) -> list[str]:
    return [f"{task}-class{j}" for j in range(4)]


def task_file(tiny: Tiny, task: str, seed: int) -> bytes:
    return encode_adapter(random_adapter(*tiny, task, seed=seed, class_names=classes_of(task)))


def make_request(rng: random.Random, images: list[bytes]) -> tuple[str, dict[str, Any], bool]:
    """``(url, httpx kwargs, expected to succeed)`` for one random request of the mix."""
    task = rng.choice(TASKS)
    roll = rng.random()
    img = rng.choice(images)
    if roll < 0.02:  # a client mistake: must be a 4xx, never a 5xx
        return f"/predict?task={task}", {"content": b"not an image", "headers": {"content-type": "image/png"}}, False  # fmt: skip
    if roll < 0.05:
        return "/predict/zero-shot?labels=cat,dog,car", {"content": img, "headers": {"content-type": "image/png"}}, True  # fmt: skip
    which = rng.choice(["", "&version=1", "&alias=production"])
    if roll < 0.25:
        files = [("file", (f"{i}.png", rng.choice(images), "image/png")) for i in range(2)]
        return f"/predict?task={task}{which}&top_k=2", {"files": files}, True
    return f"/predict?task={task}{which}", {"content": img, "headers": {"content-type": "image/png"}}, True  # fmt: skip


async def drive(
    server: ServerProcess, n: int, images: list[bytes], seed: int, stats: dict[str, Any]
) -> None:
    rng = random.Random(seed)
    jobs = [make_request(rng, images) for _ in range(n)]
    queue = iter(jobs)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            for url, kwargs, good in queue:
                t0 = time.perf_counter()
                r = await client.post(url, **kwargs)
                stats["latency"].append(time.perf_counter() - t0)
                stats["status"][r.status_code] = stats["status"].get(r.status_code, 0) + 1
                expected = r.status_code == 200 if good else 400 <= r.status_code < 500
                if not expected:
                    stats["bad"].append((url, r.status_code, r.text[:200]))
                elif good and "task=" in url:
                    body = r.json()
                    task = url.split("task=")[1].split("&")[0]
                    labels = {p["label"] for preds in body["predictions"] for p in preds}
                    if body["task"] != task or not labels <= set(classes_of(task)):
                        stats["bad"].append((url, "wrong adapter", body["task"], sorted(labels)))

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def register_meanwhile(server: ServerProcess, tiny: Tiny, stop: asyncio.Event, stats: dict[str, Any]) -> None:  # fmt: skip
    """New versions of every task and alias moves, every ~0.3 s, until the load is done."""
    seed = 100
    async with httpx.AsyncClient(base_url=server.url, timeout=60, headers=ADMIN) as client:
        while not stop.is_set():
            task = TASKS[seed % len(TASKS)]
            data = await asyncio.to_thread(task_file, tiny, task, seed)
            r = await client.post("/admin/adapters", files={"file": ("a", data)})
            stats["registrations"][r.status_code] = stats["registrations"].get(r.status_code, 0) + 1  # fmt: skip
            if r.status_code == 201:
                await client.put(f"/admin/adapters/{task}/aliases/production", json={"version": r.json()["version"]})  # fmt: skip
            seed += 1
            await asyncio.sleep(0.3)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_soak_10k_mixed_requests_with_concurrent_registrations(tmp_path: Path, tiny: Tiny) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    upgrade(url)
    server = start_server(tmp_path / "home", url, args=["--log-level", "warning"])
    try:
        for task in TASKS:
            data = task_file(tiny, task, TASKS.index(task))
            r = httpx.post(f"{server.url}/admin/adapters", files={"file": ("a", data)}, data={"alias": "production"}, headers=ADMIN)  # fmt: skip
            assert r.status_code == 201, r.text
        images = [png_bytes(i, size=(48 + 8 * i, 40)) for i in range(8)]
        warm: dict[str, Any] = {"latency": [], "status": {}, "bad": []}
        asyncio.run(drive(server, WARMUP, images, 1, warm))
        assert warm["bad"] == [], warm["bad"][:5]
        time.sleep(0.5)
        rss_warm = server.rss_kib()

        stats: dict[str, Any] = {"latency": [], "status": {}, "bad": [], "registrations": {}}
        rss_samples: list[int] = []

        async def main() -> float:
            stop = asyncio.Event()

            async def sample() -> None:
                while not stop.is_set():
                    rss_samples.append(server.rss_kib())
                    await asyncio.sleep(0.5)

            side = [asyncio.create_task(register_meanwhile(server, tiny, stop, stats)),
                    asyncio.create_task(sample())]  # fmt: skip
            t0 = time.perf_counter()
            await drive(server, REQUESTS, images, 2, stats)
            elapsed = time.perf_counter() - t0
            stop.set()
            await asyncio.gather(*side)
            return elapsed

        elapsed = asyncio.run(main())
        time.sleep(0.5)
        rss_end = server.rss_kib()
        base = httpx.post(f"{server.url}/admin/base/check", headers=ADMIN).json()
        assert server.alive()
    finally:
        server.stop()
    lat = stats["latency"]
    drift = (rss_end - rss_warm) / rss_warm
    report = {
        "requests": len(lat), "concurrency": CONCURRENCY, "seconds": round(elapsed, 1),
        "throughput_rps": round(len(lat) / elapsed, 1),
        "p50_ms": round(statistics.median(lat) * 1000, 1), "p95_ms": round(percentile(lat, 0.95) * 1000, 1),
        "p99_ms": round(percentile(lat, 0.99) * 1000, 1), "max_ms": round(max(lat) * 1000, 1),
        "statuses": dict(sorted(stats["status"].items())), "registrations": stats["registrations"],
        "rss_after_warmup_mib": round(rss_warm / 1024, 1), "rss_end_mib": round(rss_end / 1024, 1),
        "rss_peak_mib": round(max([*rss_samples, rss_end]) / 1024, 1), "rss_drift_pct": round(drift * 100, 2),
        "fingerprint_unchanged": base["unchanged"] and base["live_fingerprint"] == tiny[1].fingerprint,
        "swaps": base["swaps"],
    }  # fmt: skip
    print("\nsoak:", json.dumps(report))
    if os.environ.get("DELTACLIP_SOAK_REPORT"):
        Path(os.environ["DELTACLIP_SOAK_REPORT"]).write_text(json.dumps(report, indent=2))
    assert stats["bad"] == [], stats["bad"][:10]
    assert len(lat) == REQUESTS
    assert not any(code >= 500 for code in stats["status"]), stats["status"]
    assert sum(stats["registrations"].values()) >= 10 and set(stats["registrations"]) == {201}
    assert abs(drift) < 0.05, report
    assert report["fingerprint_unchanged"], base
