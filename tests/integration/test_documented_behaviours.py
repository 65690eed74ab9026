"""Behaviours docs/API.md promises that no other test pinned down: each test here fails when its
promise breaks (issue 24's list: the 404 before the body is read, the file's ETag, a second
Authorization header, Retry-After on /readyz, the replica header on every answer, and the codes
``already_exists``, ``too_many_images``, ``image_too_large`` and ``invalid_labels``; the 408
JSON, the 431 and the keep-alive close are in tests/security/test_client_hygiene.py)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from adapters_store.catalog import upgrade
from adapters_store.format.codec import encode_adapter
from adapters_store.registry import Registry
from adapters_store.splits import Share
from adapters_store.synthetic import random_adapter
from server.main import create_app
from tests.conftest import ADMIN_TOKEN, png_bytes, wait_ready

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PNG = png_bytes(0)
IMG = {"content": PNG, "headers": {"content-type": "image/png"}}


def upload(c: TestClient, tiny: Any, task: str = "t", seed: int = 0) -> dict[str, Any]:
    data = encode_adapter(random_adapter(*tiny, task, seed=seed))
    r = c.post("/admin/adapters", files={"file": ("a", data)}, headers=ADMIN)
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def test_an_unknown_task_is_404_before_its_body_is_read(live_server: str) -> None:
    """The head promises a 1 MB body that never comes: the answer must not wait for it."""
    host, port = live_server.removeprefix("http://").split(":")
    head = (
        "POST /predict?task=nosuchtask HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        "Content-Length: 1000000\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode())
        raw = b""
        while b"}" not in raw:  # one JSON answer, read before any body byte was sent
            data = sock.recv(65536)
            assert data, "closed without an answer"
            raw += data
    assert raw.startswith(b"HTTP/1.1 404 "), raw[:200]
    assert b'"adapter_not_found"' in raw


def test_the_file_download_carries_the_digest_as_its_etag(client: TestClient, tiny: Any) -> None:
    rec = upload(client, tiny)
    r = client.get("/adapters/t/versions/1/file")
    assert r.status_code == 200 and r.headers["etag"] == f'"{rec["digest"]}"'
    assert r.headers["content-disposition"] == 'attachment; filename="t-v1.safetensors"'


def test_a_second_authorization_header_is_refused(client: TestClient, tiny: Any) -> None:
    data = encode_adapter(random_adapter(*tiny, "t"))
    token = ADMIN["Authorization"]
    for headers in ([("Authorization", token), ("Authorization", token)],
                    [("Authorization", token), ("Authorization", "Bearer wrong")]):  # fmt: skip
        r = client.post("/admin/adapters", files={"file": ("a", data)}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
    assert client.get("/adapters").json()["total"] == 0
    assert client.post("/admin/adapters", files={"file": ("a", data)}, headers=ADMIN).status_code == 201  # fmt: skip


def test_readiness_after_a_failed_load_is_503_with_retry_after(server_settings) -> None:  # type: ignore[no-untyped-def]
    settings = server_settings.model_copy(update={"base_model": "no-such-model", "replica_name": "r9"})  # fmt: skip
    with TestClient(create_app(settings)) as c:
        deadline = time.monotonic() + 30
        while c.get("/healthz").status_code == 200:  # loading: alive, not yet failed
            assert time.monotonic() < deadline, "the load never failed"
            time.sleep(0.02)
        r = c.get("/readyz")
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert r.json() == {
            "status": "not ready",
            "reason": "the base model failed to load; see the server log",
        }
        r = c.post("/predict?task=t", **IMG)
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert r.headers["retry-after"] == "5" and r.headers["x-deltaclip-replica"] == "r9"


def test_every_answer_names_the_replica(server_settings, tiny) -> None:  # type: ignore[no-untyped-def]
    settings = server_settings.model_copy(
        update={"replica_name": "replica-7", "max_request_bytes": 1000}
    )
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        answers = [
            c.get("/healthz"),  # 200
            c.get("/adapters/nope"),  # 404
            c.get("/adapters?limit=0"),  # 422
            c.delete("/predict"),  # 405
            c.post("/admin/adapters"),  # 401
            c.post("/predict?task=t", content=b"x" * 2000, headers={"content-type": "image/png"}),
            c.head("/healthz"),
        ]
        assert [r.status_code for r in answers] == [200, 404, 422, 405, 401, 413, 200]
        assert [r.headers.get("x-deltaclip-replica") for r in answers] == ["replica-7"] * 7


def test_too_many_images_and_an_image_too_large_have_their_codes(server_settings, tiny) -> None:  # type: ignore[no-untyped-def]
    settings = server_settings.model_copy(update={"max_images": 2, "max_image_pixels": 1000})
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        upload(c, tiny)
        small = png_bytes(1, (20, 20))  # 400 pixels
        three = [("file", (f"{i}.png", small, "image/png")) for i in range(3)]
        r = c.post("/predict?task=t", files=three)
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_images", r.text
        assert c.post("/predict?task=t", files=three[:2]).status_code == 200
        r = c.post("/predict?task=t", **IMG)  # 48 x 40 = 1,920 pixels
        assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large", r.text


@pytest.mark.parametrize("labels", ["cat", "cat,cat", "cat,", "cat,dog\x07"])
def test_bad_zero_shot_labels_are_invalid_labels(client: TestClient, labels: str) -> None:
    r = client.post("/predict/zero-shot", params={"labels": labels}, **IMG)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_labels", r.text


@pytest.mark.postgres
def test_two_replicas_naming_a_new_alias_at_once_take_turns(pg_url: str, tmp_path, tiny) -> None:  # type: ignore[no-untyped-def]
    """Another replica names the same new alias between this one's check and its insert. An
    alias may name several versions (a weighted alias), so no unique key refuses the second
    write: alias writes of a task take turns on its task row instead. Both succeed, one after
    the other, and the alias names exactly one version: the last writer's, never both."""
    from server.config import ServerSettings

    upgrade(pg_url)
    settings = ServerSettings(home=tmp_path / "home", database_url=pg_url, base_model=tiny[1].model,
                              base_pretrained=tiny[1].pretrained, admin_token=ADMIN_TOKEN)  # fmt: skip
    app = create_app(settings)
    with TestClient(app) as c:
        wait_ready(c)
        upload(c, tiny, seed=0)
        upload(c, tiny, seed=1)
        other = Registry.from_settings(settings)
        engine = app.state.runtime.registry.catalog.write_engine
        racers: list[threading.Thread] = []

        def before(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
            if statement.lstrip().upper().startswith("INSERT INTO ALIASES") and not racers:
                racer = threading.Thread(target=other.set_alias, args=("t", "canary", 2))
                racers.append(racer)
                racer.start()  # it waits for this write's task-row lock

        event.listen(engine, "before_cursor_execute", before)
        try:
            r = c.put("/admin/adapters/t/aliases/canary", json={"version": 1}, headers=ADMIN)
            assert racers, "the racing write never ran"
            racers[0].join(30)
            assert not racers[0].is_alive()
        finally:
            event.remove(engine, "before_cursor_execute", before)
            other.close()
        assert r.status_code == 200, r.text
        assert c.get("/adapters/t").json()["aliases"] == {"canary": 2}  # the second writer's
        assert other.splits("t") == {"canary": [Share(2, 100)]}  # alone, not a split
