"""The admin API's bearer token on every mutating route (missing, wrong, malformed, rotated), the
admin API off without a token, and what errors and logs reveal: no filesystem path, no
traceback, and client-controlled text with its control characters escaped.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi import APIRouter
from fastapi.testclient import TestClient
from pydantic import SecretStr
from torch import nn

from adapters_store import blobs
from adapters_store.bases import BaseSignature
from adapters_store.format.codec import encode_adapter
from adapters_store.synthetic import random_adapter
from server.main import create_app
from tests.conftest import app_routes, png_bytes
from tests.security.conftest import serving
from tests.security.helpers import ADMIN, ADMIN_TOKEN, rewrite_header

Tiny = tuple[nn.Module, BaseSignature]
NON_MUTATING_POSTS = {"/predict", "/predict/zero-shot"}
READ_METHODS = {"GET", "HEAD", "OPTIONS"}
OLD_TOKEN = "the-token-before-rotation"


def mutating_routes(settings: Any) -> list[tuple[str, str]]:
    """Every route of the app but reads and predictions, from ``app.routes`` (so a route left out
    of the OpenAPI schema is walked too), with its path parameters filled in."""
    routes = [
        (method, path.format(task="t", version=1, alias="production"))
        for method, path in app_routes(create_app(settings))
        if method not in READ_METHODS and path not in NON_MUTATING_POSTS
    ]
    assert len(routes) >= 4, routes
    return routes


def test_the_route_walk_sees_routes_left_out_of_the_schema(store: Any) -> None:
    app = create_app(store)
    hidden = APIRouter(prefix="/admin")
    hidden.add_api_route("/hidden", lambda: {}, methods=["POST"], include_in_schema=False)
    app.include_router(hidden)
    app.add_api_route("/also-hidden", lambda: {}, methods=["DELETE"], include_in_schema=False)
    walked = app_routes(app)
    assert {("POST", "/admin/hidden"), ("DELETE", "/also-hidden")} <= set(walked)
    in_schema = {
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method in operations
    }
    assert in_schema < set(walked)


def call(client: TestClient, method: str, url: str, headers: dict[str, str], data: bytes) -> Any:
    return client.request(
        method,
        url,
        headers=headers,
        files={"file": ("a.safetensors", data)} if method == "POST" else None,
        json={"version": 1} if method == "PUT" else None,
    )


BAD_CREDENTIALS = {
    "missing": {},
    "empty-bearer": {"Authorization": "Bearer "},
    "bearer-only": {"Authorization": "Bearer"},
    "wrong-token": {"Authorization": "Bearer wrong"},
    "rotated-old-token": {"Authorization": f"Bearer {OLD_TOKEN}"},
    "token-prefix": {"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"},
    "token-plus-one": {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
    "basic-scheme": {"Authorization": f"Basic {ADMIN_TOKEN}"},
    "no-scheme": {"Authorization": ADMIN_TOKEN},
    "token-in-other-header": {"X-Admin-Token": ADMIN_TOKEN},
    "token-in-cookie": {"Cookie": f"token={ADMIN_TOKEN}"},
    "non-ascii-token": {"Authorization": "Bearer tök".encode()},
    # Strict parsing: one space, a token68, nothing around it.
    "two-spaces": {"Authorization": f"Bearer  {ADMIN_TOKEN}"},
    "tab": {"Authorization": f"Bearer\t{ADMIN_TOKEN}"},
    "trailing-space": {"Authorization": f"Bearer {ADMIN_TOKEN} "},
    "leading-space": {"Authorization": f" Bearer {ADMIN_TOKEN}"},
    "two-tokens": {"Authorization": f"Bearer {ADMIN_TOKEN} {ADMIN_TOKEN}"},
}


@pytest.fixture
def rotated(store: Any, tiny: Tiny) -> Iterator[tuple[TestClient, Any, bytes]]:
    """A store first served with OLD_TOKEN (one adapter registered and aliased), then restarted
    with the new token, as an operator rotating the token would."""
    data = encode_adapter(random_adapter(*tiny, "t", seed=1))
    old = store.model_copy(update={"admin_token": SecretStr(OLD_TOKEN)})
    with serving(old) as client:
        auth = {"Authorization": f"Bearer {OLD_TOKEN}"}
        r = client.post("/admin/adapters", files={"file": ("a", data)}, data={"alias": "production"}, headers=auth)  # fmt: skip
        assert r.status_code == 201, r.text
    with serving(store) as client:
        yield client, store, encode_adapter(random_adapter(*tiny, "t", seed=2))


@pytest.mark.parametrize("credentials", list(BAD_CREDENTIALS), ids=list(BAD_CREDENTIALS))
def test_every_mutating_route_refuses_bad_credentials(
    rotated: tuple[TestClient, Any, bytes], credentials: str
) -> None:
    client, settings, data = rotated
    for method, url in mutating_routes(settings):
        r = call(client, method, url, BAD_CREDENTIALS[credentials], data)
        assert r.status_code == 401, (credentials, method, url, r.status_code, r.text)
        assert r.json()["error"]["code"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
        assert ADMIN_TOKEN not in r.text and OLD_TOKEN not in r.text
    # Nothing changed: one version, still aliased.
    task = client.get("/adapters/t").json()
    assert [v["version"] for v in task["versions"]] == [1] and task["aliases"] == {"production": 1}


def test_the_new_token_works_after_rotation(rotated: tuple[TestClient, Any, bytes]) -> None:
    client, _, data = rotated
    assert client.post("/admin/adapters", files={"file": ("a", data)}, headers=ADMIN).status_code == 201  # fmt: skip
    assert client.put("/admin/adapters/t/aliases/production", json={"version": 2}, headers=ADMIN).status_code == 200  # fmt: skip
    assert client.delete("/admin/adapters/t/versions/1", headers=ADMIN).status_code == 200


@pytest.mark.parametrize("token", [None, ""], ids=["unset", "empty"])
def test_admin_api_is_off_without_a_configured_token(
    store: Any, tiny: Tiny, token: str | None
) -> None:
    settings = store.model_copy(update={"admin_token": None if token is None else SecretStr(token)})
    data = encode_adapter(random_adapter(*tiny, "t"))
    with serving(settings) as client:
        for method, url in mutating_routes(settings):
            for headers in ({}, ADMIN, {"Authorization": "Bearer "}):
                r = call(client, method, url, headers, data)
                assert r.status_code == 403, (method, url, headers, r.status_code)
                assert r.json()["error"]["code"] == "admin_disabled"
        assert client.get("/adapters").json()["total"] == 0
        assert client.get("/healthz").status_code == 200


# ------------------------------------------------------------------------------------ leaks


CONTROL = [chr(c) for c in range(32) if chr(c) != "\t"] + ["\x7f"]


def assert_clean_logs(records: list[logging.LogRecord], home: Path) -> None:
    for record in records:
        text = record.getMessage()
        assert not record.exc_info, f"traceback logged: {text}"
        assert str(home) not in text, f"path in log: {text}"
        assert not any(ch in text for ch in CONTROL), f"raw control character in log: {text!r}"


def test_errors_leak_no_paths_or_tracebacks_and_logs_escape_control_characters(
    api: TestClient,
    store: Any,
    tiny: Tiny,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    home = Path(store.home)
    good = encode_adapter(random_adapter(*tiny, "t", seed=3))
    evil_task = rewrite_header(
        encode_adapter(random_adapter(*tiny, "t", seed=4)),
        lambda h: h["__metadata__"].update(task="t\nFAKE \x1b[2J"),
    )
    assert api.post("/admin/adapters", files={"file": ("a", good)}, headers=ADMIN).status_code == 201  # fmt: skip
    # Never asked for before its blob is damaged (a request for "t" loads "t" into the cache).
    cold = encode_adapter(random_adapter(*tiny, "cold", seed=6))
    assert api.post("/admin/adapters", files={"file": ("a", cold)}, headers=ADMIN).status_code == 201  # fmt: skip
    png = {"content": png_bytes(0), "headers": {"content-type": "image/png"}}
    responses = [
        api.post("/admin/adapters", files={"file": ("x\nFAKE.safetensors", b"junk")}, headers=ADMIN),
        api.post("/admin/adapters", files={"file": ("a", evil_task)}, headers=ADMIN),
        api.post("/admin/adapters", files={"file": ("a", good)}, data={"alias": "x\nFAKE\x1b[2J"}, headers=ADMIN),
        api.put("/admin/adapters/t%0aFAKE/aliases/x", json={"version": 1}, headers=ADMIN),
        api.put("/admin/adapters/t/aliases/x%1b%5b2J", json={"version": 1}, headers=ADMIN),
        api.put("/admin/adapters/t/aliases/x", content=b"{not json", headers={**ADMIN, "content-type": "application/json"}),
        api.delete("/admin/adapters/t/versions/9", headers=ADMIN),
        api.post("/predict?task=t%0aFAKE", **png),
        api.post("/predict?task=ghost", **png),
        api.post("/predict?task=t&alias=a%00b", **png),
        api.post("/predict?task=t", content=b"\x1b[2J not an image", headers={"content-type": "image/png"}),
        api.get("/adapters/t%0d%0aFAKE"),
        api.get("/adapters?domain=%1b%5b2J"),
        api.get("/adapters/t/versions/1/file%0aFAKE"),
        api.post("/admin/adapters", files={"file": ("a", b"")}, headers={"Authorization": "Bearer x\x1b"}),
    ]  # fmt: skip
    # Damaged storage: a corrupted blob, then a full disk.
    digest = api.get("/adapters/cold/versions/1").json()["digest"]
    blob = next(p for p in Path(store.blob_root).rglob(digest) if p.is_file())
    blob.write_bytes(b"\0" + blob.read_bytes()[1:])
    responses.append(api.get("/adapters/cold/versions/1/file"))
    responses.append(api.post("/predict?task=cold", **png))

    def no_space(*_: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(home / "blobs" / ".tmp-x"))

    monkeypatch.setattr(blobs, "os", SimpleNamespace(**{**vars(os), "fsync": no_space}))
    other = encode_adapter(random_adapter(*tiny, "u", seed=5))
    responses.append(api.post("/admin/adapters", files={"file": ("a", other)}, headers=ADMIN))
    for r in responses:
        assert 400 <= r.status_code < 500 or r.status_code == 507, (r.request.url, r.status_code)
        assert set(r.json()["error"]) == {"code", "message"}, r.text
        for leak in (str(home), str(home.parent), "Traceback", 'File "', "site-packages"):
            assert leak not in r.text, (r.request.url, r.text)
        assert not any(ch in r.text for ch in CONTROL), (r.request.url, r.text)
    assert responses[-1].status_code == 507
    assert_clean_logs(caplog.records, home)


def test_client_hanging_up_mid_body_is_not_a_server_error(
    api: TestClient, store: Any, tiny: Tiny, caplog: pytest.LogCaptureFixture
) -> None:
    """A body cut short by a disconnect: quiet 4xx (nobody is left to read it), no traceback."""
    data = encode_adapter(random_adapter(*tiny, "t"))
    assert api.post("/admin/adapters", files={"file": ("a", data)}, headers=ADMIN).status_code == 201  # fmt: skip
    caplog.set_level(logging.DEBUG)
    sent: list[dict[str, Any]] = []
    messages = iter([{"type": "http.request", "body": b"\x89PNG", "more_body": True}])

    async def receive() -> dict[str, Any]:
        return next(messages, {"type": "http.disconnect"})

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/predict", "raw_path": b"/predict", "query_string": b"task=t",
        "root_path": "", "headers": [(b"content-type", b"image/png"), (b"host", b"x")],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "app": api.app,
        "state": {},
    }  # fmt: skip
    api.portal.call(api.app, scope, receive, send)  # type: ignore[union-attr]
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert 400 <= start["status"] < 500, start
    assert_clean_logs(caplog.records, Path(store.home))
