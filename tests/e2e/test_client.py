"""deltaclip_client against real ``deltaclip serve`` processes on loopback: every call, the
typed errors with the server's codes, a real 503 retried after its Retry-After, and
``deltaclip adapters push``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from adapters_store.catalog import upgrade
from adapters_store.format.codec import encode_adapter, write_adapter
from adapters_store.synthetic import random_adapter
from deltaclip_client import (
    Client,
    NotFound,
    TransportFailed,
    Unauthorized,
    Unavailable,
    Unprocessable,
    UnsupportedMediaType,
)
from tests.conftest import png_bytes
from tests.security.helpers import ADMIN_TOKEN, ServerProcess, free_port, start_server

CLASSES = ["cat", "dog", "bird"]


def serve(tmp: Path, env: dict[str, str] | None = None) -> ServerProcess:
    url = f"sqlite:///{tmp / 'catalog.db'}"
    upgrade(url)
    return start_server(tmp / "home", url, env)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = serve(tmp_path_factory.mktemp("client"))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def admin(server: ServerProcess) -> Iterator[Client]:
    with Client(server.url, token=ADMIN_TOKEN, retries=0) as c:
        yield c


def test_every_call_against_a_live_server(admin: Client, tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = encode_adapter(random_adapter(*tiny, "cli-t", class_names=CLASSES, seed=1))
    path = write_adapter(random_adapter(*tiny, "cli-t", class_names=CLASSES, seed=2),
                         tmp_path / "second.safetensors")  # fmt: skip
    one = admin.register(first, alias="production")
    assert (one.task, one.version, one.created, one.aliases) == ("cli-t", 1, True, ["production"])
    assert admin.register(first).created is False  # the same bytes: the existing version
    two = admin.register(path)
    assert (two.version, two.created) == (2, True)

    page = admin.list_adapters(task="cli-t")
    assert page.total == 2 and [i["version"] for i in page.items] == [2, 1]
    assert admin.show("cli-t")["version"] == 1  # alias production wins over the newest
    assert admin.show("cli-t", version=2)["digest"] == two.digest
    assert admin.download("cli-t", version=2) == path.read_bytes()
    saved = tmp_path / "got.safetensors"
    assert admin.download("cli-t", alias="production", dest=saved) == first
    assert saved.read_bytes() == first

    image = tmp_path / "x.png"
    image.write_bytes(png_bytes(0))
    answer = admin.predict("cli-t", image, png_bytes(1), top_k=2)
    assert (answer.task, answer.version, answer.digest) == ("cli-t", 1, one.digest)
    assert len(answer.predictions) == 2 and all(len(row) == 2 for row in answer.predictions)
    assert all(
        label.label in CLASSES and 0 <= label.score <= 1
        for row in answer.predictions
        for label in row
    )
    assert admin.predict("cli-t", image, version=2).version == 2
    same = admin.predict("cli-t", png_bytes(0), top_k=2)
    assert same.predictions[0] == answer.predictions[0]  # a path and its bytes: the same answer

    split = admin.set_split("cli-t", "canary", {1: 50, 2: 50})
    assert (split.version, [(s.version, s.weight) for s in split.split]) == (1, [(1, 50), (2, 50)])
    keyed = {
        k: admin.predict("cli-t", image, alias="canary", client_key=k).version for k in "abcdefgh"
    }
    assert set(keyed.values()) <= {1, 2} and len(keyed) == 8
    assert all(
        admin.predict("cli-t", image, alias="canary", client_key=k).version == v
        for k, v in keyed.items()
    )  # sticky
    admin.set_alias("cli-t", "production", 2)
    assert admin.predict("cli-t", image).version == 2
    admin.remove_alias("cli-t", "production")
    assert admin.task("cli-t")["aliases"] == {"canary": 1}  # the split's heaviest (the first)
    deleted = admin.delete("cli-t", 2)
    assert (deleted.task, deleted.version, deleted.digest) == ("cli-t", 2, two.digest)
    assert admin.predict("cli-t", image).version == 1  # the newest left

    shot = admin.zero_shot(["a cat", "a dog", "a car"], image, top_k=3)
    assert {x.label for x in shot.predictions[0]} == {"a cat", "a dog", "a car"}
    assert shot.base.fingerprint == admin.wait_ready().fingerprint


def test_errors_carry_the_servers_code_and_message(
    server: ServerProcess, admin: Client, tiny
) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(NotFound) as missing:
        admin.predict("ghost", png_bytes(0))
    assert missing.value.status == 404 and missing.value.code == "adapter_not_found"
    assert "ghost" in missing.value.message
    with pytest.raises(NotFound):
        admin.show("ghost")
    with pytest.raises(UnsupportedMediaType) as refused:
        admin.register(encode_adapter(random_adapter(*tiny, "err-t", class_names=CLASSES)))
        admin.predict("err-t", b"plain text, not an image")
    assert refused.value.code == "unsupported_media_type"
    with pytest.raises(Unprocessable) as invalid:
        admin.register(b"not a safetensors file at all")
    assert invalid.value.code == "invalid_adapter"
    with Client(server.url, token="wrong") as stranger, pytest.raises(Unauthorized) as denied:
        stranger.delete("err-t", 1)
    assert denied.value.code == "unauthorized"
    with Client(f"http://127.0.0.1:{free_port()}") as nobody, pytest.raises(TransportFailed):
        nobody.list_adapters()


def queue_depth(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(r"^deltaclip_queue_depth (\S+)$", text, re.M)
    assert match, "no queue depth metric"
    return float(match.group(1))


def test_a_503_is_retried_after_its_retry_after(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A real queue-full 503: one waiting request fills a queue of one (the worker waits 3 s to
    fill its batch), so the next is refused with Retry-After: 4 until that one has run."""
    srv = serve(tmp_path, {"DELTACLIP_QUEUE_SIZE": "1", "DELTACLIP_MAX_WAIT_MS": "3000",
                           "DELTACLIP_MAX_BATCH": "64", "DELTACLIP_RETRY_AFTER_S": "4"})  # fmt: skip
    try:
        with Client(srv.url, token=ADMIN_TOKEN) as c:
            c.register(encode_adapter(random_adapter(*tiny, "busy", class_names=CLASSES)))
        first = threading.Thread(
            target=lambda: httpx.post(f"{srv.url}/predict?task=busy", content=png_bytes(0),
                                      headers={"content-type": "image/png"}, timeout=60)
        )  # fmt: skip
        first.start()
        deadline = time.monotonic() + 20
        while queue_depth(srv.url) < 1:
            assert time.monotonic() < deadline, "the first request never queued"
            time.sleep(0.02)
        with Client(srv.url, retries=0) as impatient, pytest.raises(Unavailable) as busy:
            impatient.predict("busy", png_bytes(1))
        assert (busy.value.code, busy.value.retry_after) == ("overloaded", 4.0)
        waits: list[tuple[str, float]] = []
        with Client(srv.url, retries=2, on_retry=lambda e, s: waits.append((e.code, s))) as patient:
            started = time.monotonic()
            answer = patient.predict("busy", png_bytes(1))
            took = time.monotonic() - started
        assert answer.task == "busy" and len(answer.predictions) == 1
        assert waits == [("overloaded", 4.0)] and took >= 4.0
        first.join(30)
    finally:
        srv.stop()


def push(file: Path, url: str, *extra: str, token: str | None = ADMIN_TOKEN,
         ok: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "DELTACLIP_ADMIN_TOKEN"}
    if token is not None:
        env["DELTACLIP_ADMIN_TOKEN"] = token
    proc = subprocess.run(
        [sys.executable, "-m", "adapters_store.cli", "adapters", "push", str(file), "--server", url, *extra],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    return proc


def test_push_registers_on_a_real_server(
    server: ServerProcess, admin: Client, tiny, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    path = write_adapter(random_adapter(*tiny, "pushed", class_names=CLASSES, seed=5),
                         tmp_path / "pushed.safetensors")  # fmt: skip
    out = push(path, server.url, "--alias", "production").stdout
    shown = admin.show("pushed", alias="production")
    assert f"registered on {server.url}: pushed v1 ({shown['digest']})" in out
    assert admin.download("pushed", version=1) == path.read_bytes()
    assert "already registered" in push(path, server.url).stdout

    token_file = tmp_path / "token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    other = write_adapter(random_adapter(*tiny, "pushed", class_names=CLASSES, seed=6),
                          tmp_path / "other.safetensors")  # fmt: skip
    assert (
        "pushed v2" in push(other, server.url, "--token-file", str(token_file), token=None).stdout
    )

    err = push(path, server.url, token=None, ok=False).stderr
    assert "no admin token: set DELTACLIP_ADMIN_TOKEN or give --token-file" in err
    err = push(path, server.url, token="wrong", ok=False).stderr
    assert "deltaclip: error: push to" in err and "unauthorized" in err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    assert "invalid_adapter" in push(bad, server.url, ok=False).stderr
