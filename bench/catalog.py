"""Question "catalog": list/filter latency of the API and the catalog page at scale.

    python -m bench catalog [--adapters 10000] [--repeat 200] [--databases sqlite,postgresql]

Registers N real v1 adapters (tiny base; N/10 tasks × 10 versions, 4 source and 25 target
domains) through the registry, then times GET /adapters (first page, deep page, task, domain and
base filters) and GET /catalog through the app's HTTP stack (in-process ASGI client), ``--repeat``
requests each after 10 warm-up requests, on SQLite and on PostgreSQL (a fresh database created
on ``--postgres`` and dropped afterwards).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from adapters_store.adapter import AdapterInfo, build_adapter
from adapters_store.bases import TINY, build_base, signature_of, tower_parameters
from adapters_store.catalog import upgrade
from adapters_store.format.codec import encode_adapter
from adapters_store.head import TaskHead
from adapters_store.registry import Registry
from adapters_store.serving_base import ServingBase
from bench.harness import Result, add_common, csv_list, median, p, time_once

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    add_common(ap, reps=1)
    ap.add_argument("--adapters", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=200, help="timed requests per query")
    ap.add_argument("--databases", type=csv_list(str), default=["sqlite", "postgresql"])
    ap.add_argument(
        "--postgres", default=PG_ADMIN, help="admin URL; a fresh database is created and dropped"
    )


def run(args: argparse.Namespace, result: Result) -> None:
    from sqlalchemy import create_engine, text

    with tempfile.TemporaryDirectory() as tmp:
        if "sqlite" in args.databases:
            print(f"SQLite, {args.adapters} adapters:", flush=True)
            result["sqlite"] = measure(f"sqlite:///{tmp}/catalog.db", Path(tmp) / "sqlite", args)
            result.save()
        if "postgresql" in args.databases:
            admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
            name = f"deltaclip_bench_{uuid.uuid4().hex[:8]}"
            with admin.connect() as c:
                c.execute(text(f'CREATE DATABASE "{name}"'))
            try:
                print(f"PostgreSQL, {args.adapters} adapters:", flush=True)
                url = args.postgres.rsplit("/", 1)[0] + f"/{name}"
                result["postgresql"] = measure(url, Path(tmp) / "pg", args)
            finally:
                with admin.connect() as c:
                    c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                admin.dispose()


def populate(reg: Registry, n: int, net: Any, sig: Any) -> float:
    """Register ``n`` one-weight adapters; the seconds it took."""
    base = {k: v.detach() for k, v in tower_parameters(net).items()}
    head = TaskHead(sig.embed_dim, 3).state_dict()
    key = next(iter(base))
    serving = ServingBase.of(net, sig)
    t = time.perf_counter()
    for i in range(n):
        task_state = dict(base)
        w = base[key].clone()
        w.view(-1)[i % w.numel()] += 1e-3
        task_state[key] = w
        adapter = build_adapter(
            base,
            task_state,
            AdapterInfo(
                task=f"task{i // 10:04d}",
                base_model=sig.model,
                base_pretrained=sig.pretrained,
                base_fingerprint=sig.fingerprint,
                class_names=["a", "b", "c"],
                source_domain=f"src{i % 4}",
                target_domain=f"tgt{i % 25}",
                method="bench",
                created_at="2026-01-01T00:00:00Z",
                train_config={"seed": i},
            ),
            head_state=head,
        )
        reg.register(encode_adapter(adapter), serving)
    return time.perf_counter() - t


def measure(url: str, home: Path, args: argparse.Namespace) -> dict[str, Any]:
    from fastapi.testclient import TestClient

    from server.config import ServerSettings
    from server.main import create_app

    n = args.adapters
    net = build_base(*TINY)
    sig = signature_of(net, *TINY)
    upgrade(url)
    settings = ServerSettings(
        home=home, database_url=url, base_model=TINY[0], base_pretrained=TINY[1]
    )
    reg = Registry.from_settings(settings)
    seconds = populate(reg, n, net, sig)
    reg.close()
    rng = random.Random(0)
    deep = max(1, n - 50)
    queries: dict[str, Callable[[], str]] = {
        "GET /adapters (first page)": lambda: "/adapters?limit=50",
        "GET /adapters (deep page)": lambda: f"/adapters?limit=50&offset={rng.randrange(0, deep)}",
        "GET /adapters?task=": lambda: f"/adapters?task=task{rng.randrange(max(1, n // 10)):04d}",
        "GET /adapters?domain=": lambda: f"/adapters?domain=tgt{rng.randrange(25)}&limit=50",
        "GET /adapters?base=": lambda: (
            f"/adapters?base={TINY[0]}&limit=50&offset={rng.randrange(0, deep)}"
        ),
        "GET /catalog (page)": lambda: f"/catalog?limit=50&offset={rng.randrange(0, deep)}",
    }
    out: dict[str, Any] = {"adapters": n, "register_seconds": seconds, "queries": {}}
    with TestClient(create_app(settings)) as client:

        def get(make: Callable[[], str]) -> None:
            r = client.get(make())
            assert r.status_code == 200, r.text

        for name, make in queries.items():
            for _ in range(10):
                get(make)
            times = [time_once(partial(get, make)) for _ in range(args.repeat)]
            out["queries"][name] = {"p50_ms": median(times) * 1e3, "p95_ms": p(times, 0.95) * 1e3}
            print(
                f"  {name:<30} p50 {median(times) * 1e3:6.1f} ms   p95 {p(times, 0.95) * 1e3:6.1f} ms",
                flush=True,
            )
    return out
