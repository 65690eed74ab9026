"""Concurrency: 8 processes × 50 registrations on one SQLite file and on PostgreSQL (exact
version numbers, no 'database is locked'), the same bytes registered by 8 processes at once
(one version each), and deleting, replacing and registering adapters while requests for them
are in flight (never a 5xx, never another adapter's answer).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from torch import nn

from adapters_store.bases import BaseSignature
from adapters_store.blobs import BlobStore
from adapters_store.catalog import Catalog, upgrade
from adapters_store.config import StoreSettings
from adapters_store.format.codec import encode_adapter
from adapters_store.registry import Registry
from adapters_store.serving_base import ServingBase
from adapters_store.synthetic import random_adapter
from tests.conftest import png_bytes
from tests.security.helpers import ADMIN, WorkerResult, mp_context, register_files

Tiny = tuple[nn.Module, BaseSignature]
WORKERS, EACH = 8, 50


def variants(tiny: Tiny, task: str, n: int, folder: Path, seed: int = 0) -> list[str]:
    """``n`` distinct adapter files of ``task`` (one random adapter, ``n`` train configs)."""
    folder.mkdir(parents=True, exist_ok=True)
    adapter = random_adapter(*tiny, task, density=0.01, seed=seed)
    paths = []
    for i in range(n):
        meta = dataclasses.replace(adapter.meta, train_config={"variant": i})
        path = folder / f"{task}-{i}.safetensors"
        path.write_bytes(encode_adapter(dataclasses.replace(adapter, meta=meta)))
        paths.append(str(path))
    return paths


def run_workers(url: str, home: Path, sig: BaseSignature, batches: list[list[str]]) -> list[WorkerResult]:  # fmt: skip
    ctx = mp_context()
    results = ctx.Queue()
    procs = [
        ctx.Process(target=register_files, args=(i, url, str(home), sig, batch, results))
        for i, batch in enumerate(batches)
    ]
    for p in procs:
        p.start()
    out = [results.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    return out


def registry_of(url: str, home: Path) -> Registry:
    return Registry.from_settings(StoreSettings(home=home, database_url=url))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'catalog.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    upgrade(url)
    yield url


def test_8_processes_x_50_registrations_get_exact_versions(
    catalog_url: str, tmp_path: Path, tiny: Tiny
) -> None:
    paths = variants(tiny, "shared", WORKERS * EACH, tmp_path / "files")
    batches = [paths[i * EACH : (i + 1) * EACH] for i in range(WORKERS)]
    start = time.perf_counter()
    results = run_workers(catalog_url, tmp_path / "home", ServingBase.of(*tiny), batches)
    elapsed = time.perf_counter() - start
    errors = [e for r in results for e in r.errors]
    assert errors == [], errors[:5]
    assert not any("locked" in e for e in errors)
    assert sum(r.created for r in results) == WORKERS * EACH
    versions = sorted(v for r in results for v in r.versions)
    assert versions == list(range(1, WORKERS * EACH + 1))
    for r in results:  # each process saw its own versions increase
        assert r.versions == sorted(r.versions)
    reg = registry_of(catalog_url, tmp_path / "home")
    rows = reg.versions("shared")
    assert [r.version for r in rows] == list(range(1, WORKERS * EACH + 1))
    assert len({r.digest for r in rows}) == WORKERS * EACH
    assert reg.fsck().clean
    assert len(list(reg.blobs.digests())) == WORKERS * EACH
    reg.close()
    print(f"\n{WORKERS}×{EACH} registrations in {elapsed:.1f}s")


def test_same_bytes_from_8_processes_at_once_get_one_version_each(
    catalog_url: str, tmp_path: Path, tiny: Tiny
) -> None:
    paths = variants(tiny, "same", 20, tmp_path / "files", seed=1)
    results = run_workers(catalog_url, tmp_path / "home", ServingBase.of(*tiny), [paths] * WORKERS)
    assert [e for r in results for e in r.errors] == []
    assert sum(r.created for r in results) == 20
    reg = registry_of(catalog_url, tmp_path / "home")
    assert [r.version for r in reg.versions("same")] == list(range(1, 21))
    # Every process got the same version for the same file.
    assert all(r.versions == results[0].versions for r in results)
    assert reg.fsck().clean
    reg.close()


# ------------------------------------------------------------------------------------ serving


def _slow_engine(client: TestClient, delay: float) -> None:
    engine = client.app.state.runtime.engine  # type: ignore[attr-defined]
    original = engine.run

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(delay)
        return original(*args, **kwargs)

    engine.run = slow


@dataclasses.dataclass(frozen=True)
class Answer:
    """One request of a client loop: its URL, when it was sent and answered, and the answer."""

    url: str
    start: float
    end: float
    status: int
    body: dict[str, Any]


@dataclasses.dataclass
class Window:
    """When an admin call was made (``time.monotonic()`` before it and after its answer)."""

    start: float = 0.0
    end: float = 0.0

    def before(self, answer: Answer) -> bool:
        """The call had returned when the request was sent: the request saw its effect."""
        return self.end < answer.start

    def after(self, answer: Answer) -> bool:
        """The request was answered before the call began: it cannot have seen the effect."""
        return answer.end < self.start


def timed(window: Window, call: Any) -> Any:
    window.start = time.monotonic()
    out = call()
    window.end = time.monotonic()
    return out


def test_delete_and_replace_while_requests_are_in_flight(
    api: TestClient, store: Any, tiny: Tiny
) -> None:
    """Requests for task ``t`` run while its version 1 is replaced by version 2 (other classes),
    the alias moves, version 1 is deleted and the blobs are garbage-collected. Every answer is
    a 200 from the version its request must resolve to at that moment (by when it was sent and
    answered), with that version's digest and labels, or the 404 of a version or alias that did
    not exist then; a client loop that fails fails the test."""
    classes = {1: ["cat", "dog", "bird"], 2: ["sketch", "photo", "painting", "clipart"]}
    other_classes = ["red", "green", "blue"]
    v1 = encode_adapter(random_adapter(*tiny, "t", seed=1, class_names=classes[1]))
    v2 = encode_adapter(random_adapter(*tiny, "t", seed=2, class_names=classes[2]))
    other = encode_adapter(random_adapter(*tiny, "other", seed=3, class_names=other_classes))
    digests = {}
    for data in (v1, other):
        r = api.post("/admin/adapters", files={"file": ("a", data)}, headers=ADMIN)
        digests[r.json()["task"], r.json()["version"]] = r.json()["digest"]
    _slow_engine(api, 0.01)
    png = {"content": png_bytes(0), "headers": {"content-type": "image/png"}}
    stop = threading.Event()
    answers: list[Answer] = []

    def client_loop(url: str) -> None:
        while not stop.is_set():
            start = time.monotonic()
            r = api.post(url, **png)
            answers.append(Answer(url, start, time.monotonic(), r.status_code, r.json()))

    alias1, alias2, delete = Window(), Window(), Window()
    urls = ["/predict?task=t", "/predict?task=t&version=1", "/predict?task=t&alias=production", "/predict?task=other"]  # fmt: skip
    with ThreadPoolExecutor(8) as pool:
        loops = [pool.submit(client_loop, urls[i % len(urls)]) for i in range(8)]
        try:
            time.sleep(0.5)
            r = timed(alias1, lambda: api.put("/admin/adapters/t/aliases/production", json={"version": 1}, headers=ADMIN))  # fmt: skip
            assert r.status_code == 200
            r = api.post("/admin/adapters", files={"file": ("a", v2)}, headers=ADMIN)
            digests["t", 2] = r.json()["digest"]
            time.sleep(0.3)
            r = timed(alias2, lambda: api.put("/admin/adapters/t/aliases/production", json={"version": 2}, headers=ADMIN))  # fmt: skip
            assert r.status_code == 200
            time.sleep(0.3)
            r = timed(delete, lambda: api.delete("/admin/adapters/t/versions/1", headers=ADMIN))
            assert r.status_code == 200
            assert api.post("/predict?task=t&version=1", **png).status_code == 404
            reg = Registry(Catalog(store.resolved_database_url), BlobStore(store.blob_root))
            assert reg.gc(grace_seconds=0) == [digests["t", 1]]
            reg.close()
            delete.end = time.monotonic()  # the deletion is over once the blob is gone too
            time.sleep(0.5)
        finally:
            stop.set()
        for loop in loops:
            loop.result()  # a client loop's exception (a non-JSON body, say) fails the test
    assert len(answers) > 50
    by_digest = {d: k for k, d in digests.items()}
    seen: set[tuple[str, int]] = set()  # (url, version answered), or (url, 404)
    for a in answers:
        if a.status == 404:
            if "version=1" in a.url:  # only once its deletion had begun (row, then blob, gone)
                assert not delete.after(a), a
                assert a.body["error"]["code"] in ("adapter_not_found", "blob_not_found"), a
            else:  # the alias before it was first set; nothing else ever goes missing
                assert "alias=production" in a.url and not alias1.before(a), a
                assert a.body["error"]["code"] == "adapter_not_found", a
            seen.add((a.url, 404))
            continue
        assert a.status == 200, a
        task, version = by_digest[a.body["digest"]]
        assert (a.body["task"], a.body["version"]) == (task, version), a
        labels = {p["label"] for p in a.body["predictions"][0]}
        assert labels <= set(other_classes if task == "other" else classes[version]), a
        seen.add((a.url, version))
        if "task=other" in a.url:
            assert task == "other", a
        elif "version=1" in a.url:
            assert version == 1 and not delete.before(a), a
        elif alias2.before(a):  # the alias (and the default) already pointed at version 2
            assert version == 2, a
        elif alias2.after(a):
            assert version == 1, a
    assert {(urls[0], 1), (urls[0], 2), (urls[1], 1), (urls[2], 2), (urls[3], 1)} <= seen
    assert {(urls[1], 404), (urls[2], 404)} <= seen  # after the delete; before the alias
    assert api.post("/predict?task=t", **png).json()["version"] == 2
    assert api.post("/admin/base/check", headers=ADMIN).json()["unchanged"]


def test_registering_while_serving(api: TestClient, tiny: Tiny) -> None:
    """New versions land while 6 threads keep predicting: every request answers 200 with the
    version it resolved, and the newest version is served once registered."""
    r = api.post("/admin/adapters", files={"file": ("a", encode_adapter(random_adapter(*tiny, "t", seed=0)))}, headers=ADMIN)  # fmt: skip
    assert r.status_code == 201
    png = {"content": png_bytes(1), "headers": {"content-type": "image/png"}}
    stop = threading.Event()
    statuses: list[int] = []
    seen: set[int] = set()

    def client_loop() -> None:
        while not stop.is_set():
            r = api.post("/predict?task=t", **png)
            statuses.append(r.status_code)
            if r.status_code == 200:
                seen.add(r.json()["version"])

    with ThreadPoolExecutor(6) as pool:
        for _ in range(6):
            pool.submit(client_loop)
        for seed in range(1, 11):
            data = encode_adapter(random_adapter(*tiny, "t", seed=seed))
            assert api.post("/admin/adapters", files={"file": ("a", data)}, headers=ADMIN).status_code == 201  # fmt: skip
            time.sleep(0.05)
        time.sleep(0.2)
        stop.set()
    assert statuses and set(statuses) == {200}
    assert 11 in seen and len(seen) > 2
    assert api.post("/admin/base/check", headers=ADMIN).json()["unchanged"]
