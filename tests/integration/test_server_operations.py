"""Operating many adapters over HTTP, on SQLite and PostgreSQL: weighted aliases set by the admin
API and served per client key, usage counted and listed, warm restarts (``preload``)."""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from adapters_store.catalog import upgrade
from adapters_store.format.codec import encode_adapter
from adapters_store.synthetic import random_adapter
from adapters_store.usage import UsageDelta
from server.main import create_app
from tests.conftest import ADMIN_TOKEN, png_bytes, wait_ready
from tests.openapi_check import checked_client

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
IMG = {"content": png_bytes(0), "headers": {"content-type": "image/png"}}
Make = Callable[..., contextlib.AbstractContextManager[TestClient]]


@pytest.fixture
def make_client(db_url: str, tmp_path: Path) -> Make:
    """Opens a checked client over an app on the tiny base and the catalog at ``db_url``."""
    from server.config import ServerSettings

    upgrade(db_url)

    @contextlib.contextmanager
    def make(ready: bool = True, **overrides: Any) -> Iterator[TestClient]:
        settings = ServerSettings(
            home=tmp_path / "home",
            database_url=db_url,
            base_model="deltaclip-tiny",
            base_pretrained="random",
            admin_token=ADMIN_TOKEN,
            max_wait_ms=1.0,
            **overrides,
        )
        with checked_client(create_app(settings)) as c:
            if ready:
                wait_ready(c)
            yield c

    return make


def upload(c: TestClient, tiny, task: str, seed: int) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    data = encode_adapter(random_adapter(*tiny, task, seed=seed, density=0.01))
    r = c.post("/admin/adapters", files={"file": ("a", data)}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def test_a_weighted_alias_over_http(make_client: Make, tiny) -> None:  # type: ignore[no-untyped-def]
    with make_client() as c:
        for seed in range(3):
            upload(c, tiny, "t", seed)
        split = {"split": [{"version": 2, "weight": 70}, {"version": 3, "weight": 30}]}
        r = c.put("/admin/adapters/t/aliases/production", json=split, headers=ADMIN)
        assert r.status_code == 200, r.text
        assert r.json() == {"task": "t", "alias": "production", "version": 2, **split}
        task = c.get("/adapters/t").json()
        assert task["aliases"] == {"production": 2} and task["splits"] == {
            "production": split["split"]
        }

        served: dict[str, int] = {}
        for i in range(300):
            r = c.post(
                "/predict?task=t",
                headers={**IMG["headers"], "X-Deltaclip-Client": f"u{i}"},
                content=IMG["content"],
            )
            assert r.status_code == 200, r.text
            served[f"u{i}"] = r.json()["version"]
        assert len(served) == 300 and set(served.values()) == {2, 3}
        assert 0.2 < Counter(served.values())[3] / 300 < 0.4
        for i in range(0, 300, 10):  # sticky: the same key, the same version, by header or ?client=
            again = c.post(f"/predict?task=t&alias=production&client=u{i}", **IMG)
            assert again.json()["version"] == served[f"u{i}"]
        # The parameter wins over the header.
        pinned = next(k for k, v in served.items() if v == 3)
        r = c.post(
            f"/predict?task=t&client={pinned}",
            headers={**IMG["headers"], "X-Deltaclip-Client": "someone-else"},
            content=IMG["content"],
        )
        assert r.json()["version"] == 3
        page = c.get("/catalog").text
        assert "production 70%" in page and "production 30%" in page

        # Refusals change nothing.
        for body in (
            {"version": 1, **split},
            {},
            {"split": [{"version": 1, "weight": 1}] * 2},
            {"split": [{"version": 1, "weight": 0}]},
            {"split": []},
        ):
            r = c.put("/admin/adapters/t/aliases/production", json=body, headers=ADMIN)
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", r.text
        bad = {"split": [{"version": 1, "weight": 50}, {"version": 9, "weight": 50}]}
        r = c.put("/admin/adapters/t/aliases/production", json=bad, headers=ADMIN)
        assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"
        assert c.get("/adapters/t").json()["splits"] == {"production": split["split"]}
        r = c.post("/predict?task=t&client=a%20b", **IMG)
        assert r.status_code == 422, r.text

        # Deleting a weighted version: its clients move to the version left.
        assert c.delete("/admin/adapters/t/versions/3", headers=ADMIN).status_code == 200
        assert c.get("/adapters/t").json()["splits"] == {
            "production": [{"version": 2, "weight": 70}]
        }
        r = c.post(f"/predict?task=t&client={pinned}", **IMG)
        assert r.json()["version"] == 2


def test_usage_is_counted_flushed_and_listed(make_client: Make, tiny) -> None:  # type: ignore[no-untyped-def]
    with make_client() as c:
        upload(c, tiny, "a", 0)
        upload(c, tiny, "b", 1)
        upload(c, tiny, "idle", 2)
        for _ in range(3):
            assert (
                c.post(
                    "/predict?task=b", files=[("file", ("x.png", IMG["content"]))] * 2
                ).status_code
                == 200
            )
        assert c.post("/predict?task=a", **IMG).status_code == 200
        bad = c.post("/predict?task=a", content=b"\x89PNG\r\n\x1a\n broken", headers=IMG["headers"])
        assert bad.status_code == 422, bad.text
        assert c.post("/predict?task=ghost", **IMG).status_code == 404  # resolved nothing
        runtime = c.app.state.runtime  # type: ignore[attr-defined]
        pending = runtime.usage.pending()
        assert set(pending) == {("a", 1), ("b", 1)}
        assert runtime.usage.flush() == 2
        listing = c.get("/adapters?sort=requests").json()["items"]
        assert [(i["task"], i["requests"], i["images"], i["errors"]) for i in listing] == [
            ("b", 3, 6, 0),
            ("a", 1, 1, 1),
            ("idle", 0, 0, 0),
        ]
        assert listing[0]["last_served_at"] and listing[2]["last_served_at"] is None
        unused = c.get("/adapters?unused_since=30d").json()
        assert unused["total"] == 1 and unused["items"][0]["task"] == "idle"
        detail = c.get("/adapters/b/versions/1").json()
        assert (detail["requests"], detail["images"]) == (3, 6)
        r = c.get("/adapters?unused_since=30days")
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
        assert c.get("/adapters?sort=popularity").status_code == 422
        page = c.get("/catalog?sort=requests").text
        assert (
            page.index('data-task="b"')
            < page.index('data-task="a"')
            < page.index('data-task="idle"')
        )
        assert '<td class="num images">6</td>' in page
        served = c.get("/metrics").text
        assert "deltaclip_adapters_served 2.0" in served
        assert "deltaclip_cache_resident_adapters 2.0" in served
    # Counted after the last batch: added at shutdown.
    with make_client() as c:
        assert c.post("/predict?task=idle", **IMG).status_code == 200
    with make_client() as c:
        assert c.get("/adapters/idle/versions/1").json()["requests"] == 1


def _seed_usage(c: TestClient, counts: dict[str, int]) -> None:
    registry = c.app.state.runtime.registry  # type: ignore[attr-defined]
    registry.add_usage({(t, 1): UsageDelta(requests=n, images=n) for t, n in counts.items()})


def test_preload_prepares_the_most_used_before_ready(make_client: Make, tiny) -> None:  # type: ignore[no-untyped-def]
    with make_client() as c:
        digests = {t: upload(c, tiny, t, s)["digest"] for s, t in enumerate(("a", "b", "c", "d"))}
        _seed_usage(c, {"a": 5, "b": 50, "c": 20})
        r = c.put("/admin/adapters/d/aliases/production", json={"version": 1}, headers=ADMIN)
        assert r.status_code == 200
        assert c.get("/readyz").json().get("preloaded") is None  # no --preload
        assert c.post("/predict?task=a", **IMG).status_code == 200  # a 6th request for a
        one = c.app.state.runtime.cache.bytes  # type: ignore[attr-defined]  # one adapter's

    with make_client(preload=["top:2"]) as c:
        ready = c.get("/readyz").json()
        assert (ready["preloaded"], ready["adapters_loaded"]) == (2, 2), ready
        cache = c.app.state.runtime.cache  # type: ignore[attr-defined]
        assert set(cache.digests()) == {digests["b"], digests["c"]}
    with make_client(preload=["alias:production", "top:1"]) as c:
        assert set(c.app.state.runtime.cache.digests()) == {digests["d"], digests["b"]}  # type: ignore[attr-defined]
    with make_client(preload=["top:4"], cache_bytes=one * 2 + one // 2) as c:  # room for two
        ready = c.get("/readyz").json()
        assert (ready["preloaded"], ready["adapters_loaded"]) == (2, 2), ready
        assert set(c.app.state.runtime.cache.digests()) == {digests["b"], digests["c"]}  # type: ignore[attr-defined]


def test_readiness_waits_for_the_preload(make_client: Make, tiny, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import server.runtime

    with make_client() as c:
        upload(c, tiny, "a", 0)
        _seed_usage(c, {"a": 1})
    entered, release = threading.Event(), threading.Event()
    real = server.runtime.preload

    def held(records, keep, progress):  # type: ignore[no-untyped-def]
        progress(0, len(records))
        entered.set()
        assert release.wait(60)
        return real(records, keep, progress)

    monkeypatch.setattr(server.runtime, "preload", held)
    with make_client(ready=False, preload=["top:5"]) as c:
        try:
            assert entered.wait(60)
            r = c.get("/readyz")
            assert r.status_code == 503 and r.json()["reason"] == "preloading adapters (0 of 1)"
        finally:
            release.set()
        wait_ready(c)
        assert c.get("/readyz").json()["preloaded"] == 1


def test_a_pin_holds_the_heaviest_version_of_a_weighted_alias(make_client: Make, tiny) -> None:  # type: ignore[no-untyped-def]
    with make_client(pin=["t"]) as c:
        digests = [upload(c, tiny, "t", seed)["digest"] for seed in range(2)]
        split = {"split": [{"version": 1, "weight": 30}, {"version": 2, "weight": 70}]}
        r = c.put("/admin/adapters/t/aliases/production", json=split, headers=ADMIN)
        assert r.status_code == 200, r.text
        cache = c.app.state.runtime.cache  # type: ignore[attr-defined]
        assert cache.pins() == {"t": digests[1]} and digests[1] in cache
        for _ in range(20):  # re-resolved: never a random version of the split
            c.portal.call(c.app.state.runtime.refresh_pins)  # type: ignore[attr-defined]
            assert cache.pins() == {"t": digests[1]}


def test_a_bad_preload_spec_is_refused() -> None:
    from pydantic import ValidationError

    from server.config import ServerSettings

    assert ServerSettings(preload="top:3,alias:production").preload == ["top:3", "alias:production"]
    for bad in ("top:0", "top:x", "hot:3", "alias:", "alias:-x"):
        with pytest.raises(ValidationError, match="give top:N or alias:NAME"):
            ServerSettings(preload=bad)


def test_a_usage_batch_that_fails_is_kept_for_the_next(registry, tiny) -> None:  # type: ignore[no-untyped-def]
    from adapters_store.serving_base import ServingBase
    from server.metrics import Metrics
    from server.usage import UsageRecorder

    data = encode_adapter(random_adapter(*tiny, "a", seed=0, density=0.01))
    registry.register(data, ServingBase.of(*tiny))
    recorder = UsageRecorder(registry, Metrics())
    recorder.served("a", 1, 3)
    recorder.failed("a", 1)
    real = registry.add_usage

    def down(batch):  # type: ignore[no-untyped-def]
        raise ConnectionError("the catalog is down")

    registry.add_usage = down  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        recorder.flush()
    recorder.served("a", 1, 2)  # counted meanwhile: merged with the batch put back
    pending = recorder.pending()[("a", 1)]
    assert (pending.requests, pending.images, pending.errors) == (2, 5, 1)
    registry.add_usage = real  # type: ignore[method-assign]
    assert recorder.flush() == 1
    assert recorder.pending() == {}
    a = registry.get("a", 1)
    assert (a.requests, a.images, a.errors) == (2, 5, 1)
