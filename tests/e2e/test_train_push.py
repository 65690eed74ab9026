"""``deltaclip train --push URL``: the trained adapter is registered on a real ``deltaclip serve``
(through its admin API), not in the local catalog; a missing token or an unreachable server
stops the command before any training."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from adapters_store.catalog import upgrade
from deltaclip_client import Client
from tests.security.helpers import ADMIN_TOKEN, free_port, start_server
from tests.synthetic_domains import make_domains


def train(home: Path, *args: str, token: str | None = ADMIN_TOKEN,
          status: int = 0) -> subprocess.CompletedProcess[str]:  # fmt: skip
    env = {k: v for k, v in os.environ.items()
           if k not in ("DELTACLIP_ADMIN_TOKEN", "DELTACLIP_DATABASE_URL")}  # fmt: skip
    env.update({"DELTACLIP_HOME": str(home), "DELTACLIP_BASE_MODEL": "deltaclip-tiny",
                "DELTACLIP_BASE_PRETRAINED": "random", "DELTACLIP_DEVICE": "cpu"})  # fmt: skip
    if token is not None:
        env["DELTACLIP_ADMIN_TOKEN"] = token
    proc = subprocess.run([sys.executable, "-m", "adapters_store.cli", "train", *args],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == status, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    return proc


def test_train_push_registers_on_the_server(tmp_path: Path) -> None:
    day, night = make_domains(tmp_path / "data", per_class=3, size=32)
    db = f"sqlite:///{tmp_path / 'server.db'}"
    upgrade(db)
    srv = start_server(tmp_path / "server-home", db)
    try:
        flags = ["--source", str(day), "--target", str(night), "--task", "day2night",
                 "--epochs", "1", "--iters", "2", "--batch-size", "4", "--lr", "1e-4",
                 "--max-density", "0.02", "--workers", "0", "--no-progress"]  # fmt: skip
        home = tmp_path / "trainer-home"
        started = time.monotonic()
        no_token = train(home, *flags, "--push", srv.url, token=None, status=1).stderr
        assert "no admin token: set DELTACLIP_ADMIN_TOKEN or give --token-file" in no_token
        nowhere = f"http://127.0.0.1:{free_port()}"
        assert f"--push {nowhere}:" in train(home, *flags, "--push", nowhere, status=1).stderr
        assert time.monotonic() - started < 120 and not (home / "adapters").exists()  # no run

        out = train(home, *flags, "--push", srv.url, "--alias", "production", "--json").stdout
        result = json.loads(out)
        data = Path(result["adapter_path"]).read_bytes()
        assert result["server"] == srv.url and result["version"] == 1
        assert result["digest"] == hashlib.sha256(data).hexdigest()
        with Client(srv.url) as client:
            shown = client.show("day2night")  # through the alias production
            assert (shown["version"], shown["digest"]) == (1, result["digest"])
            assert client.download("day2night", version=1) == data
            assert client.predict("day2night", next(night.rglob("*.jpg"))).version == 1
        assert not (home / "catalog.db").exists()  # nothing registered locally

        text = train(home, *flags, "--push", srv.url, "--restart").stdout
        assert f"registered on {srv.url}: day2night v2" in text
    finally:
        srv.stop()
