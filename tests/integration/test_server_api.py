"""The HTTP API end to end on the tiny base: answers equal the exported merged models, and
every answer matches the OpenAPI document (tests/conftest.py ``checked_client``)."""

from __future__ import annotations

import copy
import io
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from adapters_store.errors import SchemaOutOfDate
from adapters_store.format.codec import encode_adapter
from adapters_store.head import head_from_state
from adapters_store.registry import Registry
from adapters_store.synthetic import random_adapter
from adapters_store.transforms import adapter_image_size, eval_transform_for
from server.main import create_app
from tests.conftest import ADMIN_TOKEN, app_routes, png_bytes, wait_ready
from tests.openapi_check import OPENAPI_CHECKED, check_against_openapi, checked_client

NON_MUTATING_POSTS = {"/predict", "/predict/zero-shot"}
MODULE = "tests/integration/test_server_api.py"


@pytest.fixture(scope="module", autouse=True)
def every_answer_was_checked() -> Iterator[None]:
    """The OpenAPI check ran: this module's answers arrived at it (not 0 of 0)."""
    before = OPENAPI_CHECKED.get(MODULE, 0)
    yield
    assert OPENAPI_CHECKED.get(MODULE, 0) > before, "no answer was checked against the document"


def register(client: TestClient, admin: dict[str, str], data: bytes, **form: str) -> dict[str, Any]:
    r = client.post(
        "/admin/adapters", files={"file": ("a.safetensors", data)}, data=form, headers=admin
    )
    assert r.status_code in (200, 201), r.text
    return r.json()


def golden(
    settings, tiny, task: str, version: int, images: list[bytes], k: int = 5
) -> list[list[tuple[str, float]]]:  # type: ignore[no-untyped-def]
    """Top-k of the exported merged model (Registry.merged_state), one image at a time."""
    net, sig = tiny
    reg = Registry.from_settings(settings)
    record = reg.get(task, version)
    state = reg.merged_state(record, net, sig)
    reg.close()
    model = copy.deepcopy(net)
    model.load_state_dict(
        {k2: v for k2, v in state.items() if not k2.startswith(("head.", "text."))}
    )
    head = head_from_state({k2[5:]: v for k2, v in state.items() if k2.startswith("head.")})
    tf = eval_transform_for(model, adapter_image_size(record.train_config, model))
    out = []
    for data in images:
        with torch.no_grad():
            probs = head(model.encode_image(tf(Image.open(io.BytesIO(data)))[None])).softmax(-1)[0]
        values, idx = probs.topk(k)
        out.append(
            [(record.class_names[int(i)], float(v)) for v, i in zip(values, idx, strict=True)]
        )
    return out


def assert_same(answer: dict[str, Any], want: list[list[tuple[str, float]]]) -> None:
    got = [[(p["label"], p["score"]) for p in preds] for preds in answer["predictions"]]
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert [label for label, _ in g] == [label for label, _ in w]
        assert all(abs(a - b) < 2e-6 for (_, a), (_, b) in zip(g, w, strict=True))


def test_two_tasks_answer_like_their_merged_models(client, admin, server_settings, tiny) -> None:  # type: ignore[no-untyped-def]
    net, sig = tiny
    classes = [["cat", "dog", "bird"], ["sketch", "photo", "painting", "clipart"]]
    for i, task in enumerate(["real2sketch", "synth2real"]):
        reg = register(
            client,
            admin,
            encode_adapter(
                random_adapter(net, sig, task, density=0.05, seed=i, class_names=classes[i])
            ),
        )
        assert (reg["task"], reg["version"], reg["created"]) == (task, 1, True)
    images = [png_bytes(s) for s in range(3)]
    for i, task in enumerate(["real2sketch", "synth2real"]):
        files = [("file", (f"{n}.png", data, "image/png")) for n, data in enumerate(images)]
        r = client.post(f"/predict?task={task}&top_k=3", files=files)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["task"] == task and body["version"] == 1 and len(body["digest"]) == 64
        assert {p["label"] for preds in body["predictions"] for p in preds} <= set(classes[i])
        assert_same(body, golden(server_settings, tiny, task, 1, images, k=3))
    raw = client.post(
        "/predict?task=real2sketch&top_k=3",
        content=images[0],
        headers={"content-type": "image/png"},
    )
    assert_same(raw.json(), golden(server_settings, tiny, "real2sketch", 1, images[:1], k=3))


def test_version_alias_and_default_resolution(client, admin, tiny) -> None:  # type: ignore[no-untyped-def]
    net, sig = tiny
    for seed in range(3):
        register(client, admin, encode_adapter(random_adapter(net, sig, "t", seed=seed)))
    img = {"content": png_bytes(0), "headers": {"content-type": "image/png"}}
    assert client.post("/predict?task=t", **img).json()["version"] == 3
    assert (
        client.put(
            "/admin/adapters/t/aliases/production", json={"version": 2}, headers=admin
        ).status_code
        == 200
    )
    assert client.post("/predict?task=t", **img).json()["version"] == 2
    assert client.post("/predict?task=t&version=1", **img).json()["version"] == 1
    client.put("/admin/adapters/t/aliases/canary", json={"version": 3}, headers=admin)
    assert client.post("/predict?task=t&alias=canary", **img).json()["version"] == 3
    assert client.post("/predict?task=t&alias=canary&version=1", **img).status_code == 400
    assert client.post("/predict?task=t&alias=nope", **img).status_code == 404
    # A deleted version is refused as soon as the delete has returned.
    assert client.delete("/admin/adapters/t/versions/3", headers=admin).status_code == 200
    assert client.post("/predict?task=t&version=3", **img).status_code == 404
    assert client.post("/predict?task=t&alias=canary", **img).status_code == 404
    assert client.post("/predict?task=t", **img).json()["version"] == 2


def test_catalog_reads(client, admin, tiny) -> None:  # type: ignore[no-untyped-def]
    data = encode_adapter(random_adapter(*tiny, "t", seed=1))
    register(client, admin, data, alias="production")
    listing = client.get("/adapters").json()
    assert listing["total"] == 1 and listing["items"][0]["aliases"] == ["production"]
    assert client.get("/adapters?domain=nowhere").json()["total"] == 0
    task = client.get("/adapters/t").json()
    assert task["aliases"] == {"production": 1} and [v["version"] for v in task["versions"]] == [1]
    detail = client.get("/adapters/t/versions/1").json()
    assert sum(detail["param_counts"].values()) == detail["nnz"] > 0
    f = client.get("/adapters/t/versions/1/file")
    assert f.content == data and "t-v1.safetensors" in f.headers["content-disposition"]
    assert client.get("/adapters/nope").status_code == 404
    assert client.get("/adapters/t/versions/9").json()["error"]["code"] == "adapter_not_found"


def test_200_concurrent_requests_over_5_tasks_with_a_one_adapter_cache(
    server_settings, tiny, admin
) -> None:  # type: ignore[no-untyped-def]
    net, sig = tiny
    datas = [
        encode_adapter(random_adapter(net, sig, f"task{i}", density=0.05, seed=i)) for i in range(5)
    ]
    one = (sig.eligible_params * 0.05) * 16 * 1.5  # room for one prepared adapter, not two
    settings = server_settings.model_copy(update={"cache_bytes": int(one), "max_batch": 8})
    images = [png_bytes(100 + i) for i in range(4)]
    with checked_client(create_app(settings)) as c:
        wait_ready(c)
        for data in datas:
            register(c, admin, data)
        want = {f"task{i}": golden(settings, tiny, f"task{i}", 1, images) for i in range(5)}
        jobs = [(f"task{n % 5}", n % 4) for n in range(200)]

        def call(job: tuple[str, int]) -> tuple[str, int, dict[str, Any]]:
            task, img = job
            r = c.post(
                f"/predict?task={task}", content=images[img], headers={"content-type": "image/png"}
            )
            assert r.status_code == 200, r.text
            return task, img, r.json()

        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(call, jobs))
        for task, img, body in results:
            assert body["task"] == task
            assert_same(body, want[task][img : img + 1])
        base = c.post("/admin/base/check", headers=admin).json()  # checked now, not cached
        assert base["unchanged"] and base["live_fingerprint"] == sig.fingerprint
        assert base["consistent"] and base["age_s"] < 5
        assert base["cached_adapters"] <= 1
        metrics = c.get("/metrics").text
        assert "deltaclip_cache_evictions_total" in metrics and "deltaclip_swaps_total" in metrics


def test_every_mutating_route_requires_the_admin_token(client, server_settings, tiny) -> None:  # type: ignore[no-untyped-def]
    data = encode_adapter(random_adapter(*tiny, "t"))
    # The routes the app answers, from app.routes: a route left out of the OpenAPI schema
    # (include_in_schema=False) is walked too.
    mutating = [
        (method, path)
        for method, path in app_routes(create_app(server_settings))
        if method not in {"GET", "HEAD", "OPTIONS"} and path not in NON_MUTATING_POSTS
    ]
    assert {("POST", "/admin/adapters"), ("DELETE", "/admin/adapters/{task}/versions/{version}"),
            ("PUT", "/admin/adapters/{task}/aliases/{alias}")} <= set(mutating)  # fmt: skip
    for method, path in mutating:
        url = path.format(task="t", version=1, alias="x")
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Basic {ADMIN_TOKEN}"},
        ):
            r = client.request(method, url, headers=headers, files={"file": ("a", data)} if method == "POST" else None,
                               json={"version": 1} if method == "PUT" else None)  # fmt: skip
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.json()["error"]["code"] == "unauthorized"
    assert client.get("/adapters").json()["total"] == 0


def test_admin_api_is_off_without_a_token(server_settings, tiny) -> None:  # type: ignore[no-untyped-def]
    settings = server_settings.model_copy(update={"admin_token": None})
    with checked_client(create_app(settings)) as c:
        wait_ready(c)
        r = c.post("/admin/adapters", files={"file": ("a", encode_adapter(random_adapter(*tiny, "t")))},
                   headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})  # fmt: skip
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"


def test_upload_errors_are_4xx_and_store_nothing(client, admin, tiny) -> None:  # type: ignore[no-untyped-def]
    r = client.post("/admin/adapters", files={"file": ("a", b"junk")}, headers=admin)
    assert r.status_code == 422 and "not-safetensors" in r.json()["error"]["message"]
    other = tiny[1].__class__(**{**tiny[1].__dict__, "fingerprint": "1" * 64})
    r = client.post(
        "/admin/adapters",
        files={"file": ("a", encode_adapter(random_adapter(tiny[0], other, "t")))},
        headers=admin,
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "incompatible_base"
    r = client.post("/admin/adapters", files={"other": ("a", b"x")}, headers=admin)
    assert r.status_code == 400
    assert client.get("/adapters").json()["total"] == 0


def test_predict_errors(client, admin, tiny) -> None:  # type: ignore[no-untyped-def]
    register(client, admin, encode_adapter(random_adapter(*tiny, "t")))
    png = {"content": png_bytes(0), "headers": {"content-type": "image/png"}}
    cases = [
        ("/predict?task=..%2Fetc", png, 422),
        ("/predict?task=t&top_k=0", png, 422),
        ("/predict?task=t&version=abc", png, 422),
        ("/predict?task=ghost", png, 404),
        ("/predict?task=t", {"content": b"", "headers": {"content-type": "image/png"}}, 400),
        ("/predict?task=t", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415),
        (
            "/predict?task=t",
            {"content": b"GIF89a......", "headers": {"content-type": "image/gif"}},
            415,
        ),
        (
            "/predict?task=t",
            {"content": png_bytes(0)[:60], "headers": {"content-type": "image/png"}},
            422,
        ),
    ]
    for url, kwargs, status in cases:
        r = client.post(url, **kwargs)
        assert r.status_code == status, (url, r.status_code, r.text)
        assert set(r.json()["error"]) == {"code", "message"}
    assert client.post("/predict?task=t", **png).status_code == 200


def test_zero_shot_uses_the_text_head(client) -> None:  # type: ignore[no-untyped-def]
    r = client.post(
        "/predict/zero-shot?labels=cat,dog,car",
        content=png_bytes(0),
        headers={"content-type": "image/png"},
    )
    assert r.status_code == 200
    preds = r.json()["predictions"][0]
    assert {p["label"] for p in preds} == {"cat", "dog", "car"}
    assert abs(sum(p["score"] for p in preds) - 1) < 1e-5
    assert (
        client.post(
            "/predict/zero-shot?labels=cat",
            content=png_bytes(0),
            headers={"content-type": "image/png"},
        ).status_code
        == 400
    )


def test_not_ready_until_the_base_loads(server_settings) -> None:  # type: ignore[no-untyped-def]
    settings = server_settings.model_copy(update={"base_pretrained": "/nonexistent/weights.pt"})
    with checked_client(create_app(settings)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503  # 503 while loading, and it stays 503 once loading failed
        deadline = time.monotonic() + 30
        while "loading" in r.json()["reason"] and time.monotonic() < deadline:
            time.sleep(0.05)
            r = c.get("/readyz")
        assert r.status_code == 503 and "failed to load" in r.json()["reason"]
        assert "nonexistent" not in r.text  # the detail (a path) is for the log, not for clients
        assert c.get("/healthz").status_code == 503
        r = c.post("/predict?task=t", content=png_bytes(0), headers={"content-type": "image/png"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"


def test_refuses_to_start_on_a_catalog_not_at_head(server_settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = server_settings.model_copy(
        update={"database_url": f"sqlite:///{tmp_path / 'fresh.db'}"}
    )
    with (
        pytest.raises(SchemaOutOfDate, match="deltaclip db upgrade"),
        checked_client(create_app(settings)),
    ):
        pass


def test_body_limit_is_413(server_settings, tiny) -> None:  # type: ignore[no-untyped-def]
    settings = server_settings.model_copy(update={"max_request_bytes": 1000})
    with checked_client(create_app(settings)) as c:
        wait_ready(c)
        register(
            c,
            {"Authorization": f"Bearer {ADMIN_TOKEN}"},
            encode_adapter(random_adapter(*tiny, "t")),
        )
        r = c.post(
            "/predict?task=t",
            content=b"\x89PNG" + b"0" * 5000,
            headers={"content-type": "image/png"},
        )
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

        def chunks():  # type: ignore[no-untyped-def]
            for _ in range(10):
                yield b"0" * 500

        r = c.post("/predict?task=t", content=chunks(), headers={"content-type": "image/png"})
        assert r.status_code == 413


def test_backpressure_503_and_timeout_504(server_settings, tiny, admin) -> None:  # type: ignore[no-untyped-def]
    import threading

    settings = server_settings.model_copy(
        update={"queue_size": 1, "max_batch": 1, "request_timeout_s": 1.0}
    )
    started, release = threading.Event(), threading.Event()
    app = create_app(settings)
    with checked_client(app) as c:
        wait_ready(c)
        register(c, admin, encode_adapter(random_adapter(*tiny, "t")))
        runtime = app.state.runtime
        engine = runtime.engine
        original = engine.run

        def blocked(*args, **kwargs):  # type: ignore[no-untyped-def]
            started.set()
            assert release.wait(30), "never released"
            return original(*args, **kwargs)

        engine.run = blocked
        img = {"content": png_bytes(0), "headers": {"content-type": "image/png"}}
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(c.post, "/predict?task=t", **img)
            assert started.wait(30)  # the worker holds it; its queue place is free again
            waiting = pool.submit(c.post, "/predict?task=t", **img)
            deadline = time.monotonic() + 30
            while runtime.batcher.depth != 1:  # the second request holds the only place
                assert time.monotonic() < deadline, "the second request never queued"
                time.sleep(0.01)
            full = c.post("/predict?task=t", **img)
            assert full.status_code == 503 and full.json()["error"]["code"] == "overloaded"
            assert full.headers["retry-after"] == "1"
            timed_out = waiting.result(30)
            assert timed_out.status_code == 504 and timed_out.json()["error"]["code"] == "timeout"
            assert runtime.batcher.depth == 0  # its job was dropped, its place freed at once
            assert running.result(30).status_code == 504  # its caller gave up too
        release.set()
        engine.run = original
        assert c.post("/predict?task=t", **img).status_code == 200


def test_a_request_has_a_pixel_budget(server_settings, tiny, admin) -> None:  # type: ignore[no-untyped-def]
    settings = server_settings.model_copy(
        update={"max_request_pixels": 3000}
    )  # one 48x40 image fits
    with checked_client(create_app(settings)) as c:
        wait_ready(c)
        register(c, admin, encode_adapter(random_adapter(*tiny, "t")))
        one = [("file", ("a.png", png_bytes(0), "image/png"))]
        assert c.post("/predict?task=t", files=one).status_code == 200
        r = c.post("/predict?task=t", files=one * 2)
        assert (
            r.status_code == 413 and "together exceed 3,000 pixels" in r.json()["error"]["message"]
        )


def test_more_files_than_max_images_is_413_too_many_images(server_settings, admin, tiny) -> None:  # type: ignore[no-untyped-def]
    settings = server_settings.model_copy(update={"max_images": 3})
    with checked_client(create_app(settings)) as c:
        wait_ready(c)
        register(c, admin, encode_adapter(random_adapter(*tiny, "t")))
        files = [("file", (f"{i}.png", png_bytes(i), "image/png")) for i in range(20)]
        r = c.post("/predict?task=t", files=files[:3])
        assert r.status_code == 200 and len(r.json()["predictions"]) == 3, r.text
        for n in (4, 20):
            r = c.post("/predict?task=t", files=files[:n])
            assert r.status_code == 413, (n, r.text)
            assert r.json()["error"] == {
                "code": "too_many_images",
                "message": "at most 3 images per request",
            }
        r = c.post("/predict/zero-shot?labels=cat,dog", files=files[:4])
        assert (r.status_code, r.json()["error"]["code"]) == (413, "too_many_images")
        adapter = ("a.safetensors", encode_adapter(random_adapter(*tiny, "u")))
        r = c.post("/admin/adapters", files=[("file", adapter)] * 2, headers=admin)
        assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_request"), r.text
        assert "exactly one adapter file" in r.json()["error"]["message"]
        fields = [("note", (None, "x")) for _ in range(40)]
        r = c.post("/predict?task=t", files=[files[0], *fields])
        assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_request"), r.text
        assert "Too many fields" in r.json()["error"]["message"]


def test_the_openapi_check_refuses_answers_the_document_does_not_declare(client) -> None:  # type: ignore[no-untyped-def]
    """The check above can fail: a body missing a field, an undeclared status, a foreign shape."""
    import httpx

    request = httpx.Request("POST", "http://testserver/predict?task=t")
    good = {
        "task": "t",
        "version": 1,
        "digest": "d",
        "path": "patched",
        "predictions": [[{"label": "a", "score": 0.5}]],
    }
    check_against_openapi(client.app, httpx.Response(200, json=good, request=request))
    for status, body in [
        (200, {k: v for k, v in good.items() if k != "digest"}),
        (418, {"error": {"code": "teapot", "message": "no"}}),
        (404, {"detail": "Not Found"}),
    ]:
        with pytest.raises(Exception, match=r"(?i)invalid|unknown|not found|missing|required"):
            check_against_openapi(client.app, httpx.Response(status, json=body, request=request))
