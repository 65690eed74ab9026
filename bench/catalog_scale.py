"""Catalog at scale: list/filter latency of the API and the page with 10,000 registered adapters.

    .venv/bin/python bench/catalog_scale.py [--adapters 10000] [--postgres URL] [--out results.json]

Registers N real v1 adapters (tiny base, 1,000 tasks x 10 versions, 4 source and 25 target
domains) through the registry, then times GET /adapters (first page, deep page, task, domain and
base filters) and GET /catalog through the app's HTTP stack (in-process ASGI client), 200 requests
each, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, p

from adapters_store.adapter import build_adapter
from adapters_store.bases import TINY, build_base, signature_of, tower_parameters
from adapters_store.catalog import upgrade
from adapters_store.format.codec import encode_adapter
from adapters_store.head import TaskHead
from adapters_store.registry import Registry


def populate(reg: Registry, n: int, net: Any, sig: Any) -> float:
    base = {k: v.detach() for k, v in tower_parameters(net).items()}
    head = TaskHead(sig.embed_dim, 3).state_dict()
    key = next(iter(base))
    t = time.perf_counter()
    for i in range(n):
        task_state = dict(base)
        w = base[key].clone()
        w.view(-1)[i % w.numel()] += 1e-3
        task_state[key] = w
        adapter = build_adapter(
            base, task_state, task=f"task{i // 10:04d}", base_model=sig.model, base_pretrained=sig.pretrained,
            base_fingerprint=sig.fingerprint, class_names=["a", "b", "c"], head_state=head,
            source_domain=f"src{i % 4}", target_domain=f"tgt{i % 25}", method="bench",
            created_at="2026-01-01T00:00:00Z", train_config={"seed": i},
        )  # fmt: skip
        reg.register(encode_adapter(adapter), sig)
    return time.perf_counter() - t


def measure(url: str, home: Path, n: int, repeat: int) -> dict[str, Any]:
    from fastapi.testclient import TestClient

    from server.config import ServerSettings
    from server.main import create_app

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
    queries = {
        "GET /adapters (first page)": lambda: "/adapters?limit=50",
        "GET /adapters (deep page)": lambda: (
            f"/adapters?limit=50&offset={rng.randrange(0, n - 50)}"
        ),
        "GET /adapters?task=": lambda: f"/adapters?task=task{rng.randrange(n // 10):04d}",
        "GET /adapters?domain=": lambda: f"/adapters?domain=tgt{rng.randrange(25)}&limit=50",
        "GET /adapters?base=": lambda: (
            f"/adapters?base={TINY[0]}&limit=50&offset={rng.randrange(0, n - 50)}"
        ),
        "GET /catalog (page)": lambda: f"/catalog?limit=50&offset={rng.randrange(0, n - 50)}",
    }
    out: dict[str, Any] = {"adapters": n, "register_seconds": seconds, "queries": {}}
    with TestClient(create_app(settings)) as client:
        for name, make in queries.items():
            for _ in range(10):
                client.get(make())
            times = []
            for _ in range(repeat):
                t = time.perf_counter()
                r = client.get(make())
                times.append(time.perf_counter() - t)
                assert r.status_code == 200, r.text
            out["queries"][name] = {"p50_ms": median(times) * 1e3, "p95_ms": p(times, 0.95) * 1e3}
            print(
                f"  {name:<30} p50 {median(times) * 1e3:6.1f} ms   p95 {p(times, 0.95) * 1e3:6.1f} ms",
                flush=True,
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--adapters", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
                    help="admin URL; a fresh database is created and dropped")  # fmt: skip
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from sqlalchemy import create_engine, text

    results: dict[str, Any] = {"machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        print(f"SQLite, {args.adapters} adapters:", flush=True)
        results["sqlite"] = measure(
            f"sqlite:///{tmp}/catalog.db", Path(tmp) / "sqlite", args.adapters, args.repeat
        )
        admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
        name = f"deltaclip_bench_{uuid.uuid4().hex[:8]}"
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            print(f"PostgreSQL, {args.adapters} adapters:", flush=True)
            url = args.postgres.rsplit("/", 1)[0] + f"/{name}"
            results["postgresql"] = measure(url, Path(tmp) / "pg", args.adapters, args.repeat)
        finally:
            with admin.connect() as c:
                c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
