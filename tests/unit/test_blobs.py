from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from adapters_store.blobs import BlobStore
from adapters_store.errors import BlobNotFound, ChecksumMismatch


def test_put_get_roundtrip_and_layout(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    data = b"adapter bytes" * 100
    digest = store.put(data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert store.path_for(digest) == tmp_path / "blobs" / digest[:2] / digest
    assert store.get(digest) == data
    assert list(store.digests()) == [digest]
    assert store.temp_files() == []


def test_put_is_idempotent(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    a = store.put(b"same")
    os.utime(store.path_for(a), (1, 1))
    assert store.put(b"same") == a
    assert list(store.digests()) == [a]
    assert store.age_seconds(a) < 60  # re-putting refreshes the age used by gc


def test_corruption_is_detected_on_read(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    digest = store.put(b"x" * 1000)
    path = store.path_for(digest)
    raw = bytearray(path.read_bytes())
    raw[500] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(ChecksumMismatch, match=digest):
        store.get(digest)
    assert not store.verify(digest)


def test_missing_blob(tmp_path: Path) -> None:
    with pytest.raises(BlobNotFound):
        BlobStore(tmp_path).get("0" * 64)


def test_announced_digest_is_checked(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    with pytest.raises(ChecksumMismatch):
        store.put(b"data", digest="f" * 64)
    assert list(store.digests()) == []


@pytest.mark.parametrize(
    "bad", ["../../etc/passwd", "ABCDEF" + "0" * 58, "0" * 63, "0" * 64 + "/x", ""]
)
def test_digest_must_be_lowercase_sha256(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError):
        BlobStore(tmp_path).path_for(bad)


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = BlobStore(tmp_path)

    def boom(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="No space"):
        store.put(b"payload")
    monkeypatch.undo()
    assert list(store.digests()) == []
    assert store.temp_files() == []


def test_delete(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    d = store.put(b"bye")
    assert store.delete(d)
    assert not store.exists(d)
    assert not store.delete(d)
