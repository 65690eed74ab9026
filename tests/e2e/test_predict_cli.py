"""``deltaclip predict`` over a folder, as a user runs it: in process from the local catalog and
against a real ``deltaclip serve`` on the same catalog; one row per image, the same answers
both ways (and the server's own), and an error row for an image that cannot be read."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from adapters_store.catalog import upgrade
from adapters_store.config import StoreSettings
from adapters_store.format.codec import encode_adapter
from adapters_store.registry import Registry
from adapters_store.serving_base import ServingBase
from adapters_store.synthetic import random_adapter
from deltaclip_client import Client
from tests.conftest import png_bytes
from tests.security.helpers import ServerProcess, start_server

CLASSES = ["cat", "dog", "bird", "fish"]


def run(home: Path, db: str, *args: str, status: int = 0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DELTACLIP_HOME": str(home), "DELTACLIP_DATABASE_URL": db,
           "DELTACLIP_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "adapters_store.cli", "predict", *args],
                          env=env, capture_output=True, text=True, timeout=180)  # fmt: skip
    assert proc.returncode == status, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    return proc


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, tiny
) -> Iterator[tuple[Path, str, ServerProcess]]:  # type: ignore[no-untyped-def]
    """A catalog with task ``shapes`` (v1, v2; alias production -> v1) and a server on it."""
    tmp = tmp_path_factory.mktemp("predict")
    home, db = tmp / "home", f"sqlite:///{tmp / 'catalog.db'}"
    upgrade(db)
    reg = Registry.from_settings(StoreSettings(home=home, database_url=db))
    try:
        for seed in (1, 2):
            adapter = random_adapter(*tiny, "shapes", class_names=CLASSES, seed=seed)
            reg.register(
                encode_adapter(adapter),
                ServingBase.of(*tiny),
                alias="production" if seed == 1 else None,
            )
    finally:
        reg.close()
    srv = start_server(home, db)
    try:
        yield home, db, srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two PNGs and a JPEG in nested folders, a non-image file, and a broken '.png'."""
    root = tmp_path_factory.mktemp("images")
    (root / "a" / "deep").mkdir(parents=True)
    (root / "a" / "one.png").write_bytes(png_bytes(0))
    (root / "a" / "deep" / "two.png").write_bytes(png_bytes(1, (30, 60)))
    buf = io.BytesIO()
    Image.open(io.BytesIO(png_bytes(2))).save(buf, "JPEG")
    (root / "b.jpg").write_bytes(buf.getvalue())
    (root / "notes.txt").write_text("not an image, and not an image extension")
    (root / "broken.png").write_bytes(b"these bytes are not a PNG")
    return root


GOOD = ["a/deep/two.png", "a/one.png", "b.jpg"]


def by_name(rows: list[dict[str, str]], root: Path) -> dict[str, dict[str, str]]:
    return {str(Path(r["path"]).relative_to(root)): r for r in rows}


def test_predict_in_process_and_through_the_server(served, folder: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    home, db, srv = served
    out = tmp_path / "local.csv"
    text = run(home, db, "--task", "shapes", str(folder), "--top-k", "2", "--out", str(out),
               "--no-progress", status=1).stderr  # fmt: skip
    assert "3 of 4 images classified" in text and "1 with an error row" in text
    with out.open(newline="") as f:
        local = by_name(list(csv.DictReader(f)), folder)
    assert sorted(local) == sorted([*GOOD, "broken.png"])  # notes.txt is not an image
    assert list(local["b.jpg"]) == ["path", "task", "version", "label_1", "score_1", "label_2",
                                    "score_2", "error"]  # fmt: skip
    assert local["broken.png"]["error"].startswith("unreadable image: ")
    assert local["broken.png"]["label_1"] == "" and local["broken.png"]["version"] == "1"

    remote_out = tmp_path / "remote.jsonl"
    run(home, db, "--task", "shapes", str(folder), "--top-k", "2", "--server", srv.url,
        "--out", str(remote_out), status=1)  # fmt: skip
    remote = by_name([json.loads(line) for line in remote_out.read_text().splitlines()], folder)
    assert sorted(remote) == sorted(local)
    assert remote["broken.png"]["error"] == (
        "refused by the server: unsupported_media_type: not a recognised image: send JPEG, PNG, "
        "WebP or BMP"
    )
    with Client(srv.url) as client:
        for name in GOOD:
            asked = client.predict("shapes", folder / name, top_k=2)  # the server's own answer
            expected = [(x.label, x.score) for x in asked.predictions[0]]
            row, served_row = local[name], remote[name]
            assert (row["task"], row["version"], row["error"]) == ("shapes", "1", "")
            assert (served_row["task"], served_row["version"], served_row["error"]) == (
                "shapes",
                1,
                None,
            )
            assert [(p["label"], p["score"]) for p in served_row["predictions"]] == expected
            assert [row["label_1"], row["label_2"]] == [label for label, _ in expected]
            for rank, (_, score) in enumerate(expected, start=1):
                assert float(row[f"score_{rank}"]) == pytest.approx(score, abs=1e-5)


def test_predict_a_pinned_version_to_stdout_and_its_refusals(served, folder: Path) -> None:  # type: ignore[no-untyped-def]
    home, db, _ = served
    out = run(home, db, "--task", "shapes", "--version", "2", str(folder / "a"), "--top-k", "1",
              "--no-progress").stdout.splitlines()  # fmt: skip
    assert len(out) == 2 and all(line.split("\t")[1].split()[0] in CLASSES for line in out)
    missing = run(home, db, "--task", "ghost", str(folder), status=1).stderr
    assert "deltaclip: error:" in missing and "ghost" in missing
    empty = folder / "a" / "deep" / "empty"
    empty.mkdir(exist_ok=True)
    assert "no images" in run(home, db, "--task", "shapes", str(empty), status=1).stderr
    assert "give a .csv or a .jsonl" in run(home, db, "--task", "shapes", str(folder),
                                            "--out", "rows.txt", status=1).stderr  # fmt: skip
