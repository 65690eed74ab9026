"""Mixed-task batches over HTTP on the tiny base: concurrent requests for several tasks are
answered from one mixed forward, each like its task's exported merged model (within float
rounding); a request with ``exact=true`` is served patched, bit for bit; the answer and the
``X-Deltaclip-Path`` header say which path served it, and /metrics counts rows per path."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi.testclient import TestClient

from adapters_store.format.codec import encode_adapter
from adapters_store.synthetic import random_adapter
from server.main import create_app
from tests.conftest import png_bytes, wait_ready
from tests.integration.test_server_api import golden, register

# Batching pays (each image added to a forward costs less than the last), so every group of a
# round of several tasks is cheaper mixed, even a task's rows whose exact sibling runs patched.
COSTS = {"swap_weight_s": 1e-6, "site_s": 0, "weight_row_s": 0,
         "batch_s": {"1": 1.0, "2": 1.5, "6": 2.0}}  # fmt: skip


def scores(body: dict[str, Any]) -> list[list[tuple[str, float]]]:
    return [[(p["label"], p["score"]) for p in preds] for preds in body["predictions"]]


def close(
    got: list[list[tuple[str, float]]], want: list[list[tuple[str, float]]], tol: float
) -> bool:
    return all(
        [label for label, _ in g] == [label for label, _ in w]
        and all(abs(a - b) <= tol for (_, a), (_, b) in zip(g, w, strict=True))
        for g, w in zip(got, want, strict=True)
    )


def test_concurrent_tasks_are_answered_mixed_and_exact_requests_patched(
    server_settings, tiny, admin
) -> None:  # type: ignore[no-untyped-def]
    net, sig = tiny
    requests = [("t0", 0, False), ("t1", 1, False), ("t2", 2, False), ("t0", 3, False),
                ("t1", 4, False), ("t2", 5, True)]  # fmt: skip
    # One round holds every request: the worker waits (up to 5 s) for max_batch images.
    settings = server_settings.model_copy(
        update={
            "batch_mode": "auto",
            "max_batch": len(requests),
            "max_wait_ms": 5000,
            "mix_costs": COSTS,
        }
    )
    images = [png_bytes(200 + i) for i in range(len(requests))]
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        for i in range(3):
            register(
                c, admin, encode_adapter(random_adapter(net, sig, f"t{i}", density=0.05, seed=i))
            )

        def call(req: tuple[str, int, bool]) -> Any:
            task, img, exact = req
            return c.post(f"/predict?task={task}&exact={str(exact).lower()}", content=images[img],
                          headers={"content-type": "image/png"})  # fmt: skip

        with ThreadPoolExecutor(len(requests)) as pool:
            answers = list(pool.map(call, requests))
        for (task, img, exact), r in zip(requests, answers, strict=True):
            assert r.status_code == 200, r.text
            body = r.json()
            assert (
                body["path"] == r.headers["x-deltaclip-path"] == ("patched" if exact else "mixed")
            )
            want = golden(settings, tiny, task, 1, images[img : img + 1])
            assert close(scores(body), want, 2e-6 if exact else 1e-5), task
        metrics = c.get("/metrics").text
        assert 'deltaclip_rows_total{path="mixed"} 5.0' in metrics
        assert 'deltaclip_rows_total{path="patched"} 1.0' in metrics
        base = c.post("/admin/base/check", headers=admin).json()
        assert base["unchanged"] and base["consistent"]


def test_patched_mode_never_mixes(server_settings, tiny, admin) -> None:  # type: ignore[no-untyped-def]
    net, sig = tiny
    settings = server_settings.model_copy(
        update={"batch_mode": "patched", "max_batch": 2, "max_wait_ms": 5000}
    )
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        for i in range(2):
            register(
                c, admin, encode_adapter(random_adapter(net, sig, f"t{i}", density=0.05, seed=i))
            )

        def call(task: str) -> Any:
            return c.post(f"/predict?task={task}", content=png_bytes(1),
                          headers={"content-type": "image/png"})  # fmt: skip

        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(call, ["t0", "t1"]))
        assert [r.json()["path"] for r in answers] == ["patched", "patched"]
        assert 'deltaclip_rows_total{path="mixed"}' not in c.get("/metrics").text
