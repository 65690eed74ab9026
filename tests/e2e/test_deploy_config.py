"""Deployment files: docker-compose.yml validates, and deploy/nginx.conf is the generated one."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from server.deploy import nginx_conf

ROOT = Path(__file__).resolve().parents[2]


def compose(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ("POSTGRES_PASSWORD", "DELTACLIP_ADMIN_TOKEN")
    }
    return subprocess.run(["docker-compose", *args], cwd=ROOT, env={**clean, **env}, capture_output=True,
                           text=True, timeout=60)  # fmt: skip


def test_compose_file_validates_and_requires_its_secrets() -> None:
    assert shutil.which("docker-compose"), "CI installs Debian's docker-compose"
    ok = compose("config", POSTGRES_PASSWORD="pw", DELTACLIP_ADMIN_TOKEN="token")
    assert ok.returncode == 0, ok.stderr
    for name in (
        "postgres:",
        "migrate:",
        "server-1:",
        "server-2:",
        "server-3:",
        "nginx:",
        "pg_isready",
    ):
        assert name in ok.stdout
    missing = compose("config", DELTACLIP_ADMIN_TOKEN="token")
    assert missing.returncode != 0 and "POSTGRES_PASSWORD" in missing.stderr
    missing = compose("config", POSTGRES_PASSWORD="pw")
    assert missing.returncode != 0 and "DELTACLIP_ADMIN_TOKEN" in missing.stderr


def test_checked_in_nginx_conf_is_the_generated_one() -> None:
    want = nginx_conf(["server-1:8000", "server-2:8000", "server-3:8000"], "80")
    assert (ROOT / "deploy" / "nginx.conf").read_text() == want


def test_generated_nginx_conf_is_valid_nginx(tmp_path: Path) -> None:
    assert shutil.which("nginx"), "CI installs Debian's nginx"
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_conf(["127.0.0.1:9001", "127.0.0.1:9002"], "127.0.0.1:9000",
                               pid=str(tmp_path / "nginx.pid"), error_log=str(tmp_path / "error.log")))  # fmt: skip
    r = subprocess.run(
        ["nginx", "-t", "-p", str(tmp_path), "-c", str(conf)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
