"""Content-addressed blob store: ``<root>/<aa>/<sha256>``, written atomically, verified on read.

A blob becomes visible only through ``rename`` of a fully written and fsynced temporary file
in the same folder, so a crash at any point leaves either no blob or the whole blob (plus,
at worst, a ``.tmp-*`` file that :meth:`BlobStore.fsck` reports and :meth:`BlobStore.remove_temp`
cleans). Identical bytes map to the same path, so writes are idempotent.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import BlobNotFound, ChecksumMismatch, InvalidDigest

_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
_TMP_PREFIX = ".tmp-"


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def check_digest(digest: str) -> str:
    """Return ``digest`` if it is a lowercase hex SHA-256, else raise :class:`InvalidDigest`.

    Digests end up in file paths, so nothing else may pass (no ``../``, no separators).
    """
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise InvalidDigest(f"not a lowercase hex SHA-256 digest: {digest!r}")
    return digest


def _holds(path: Path, data: bytes | memoryview) -> bool:
    """Whether the file at ``path`` holds exactly ``data``: compared, not hashed again.

    ``data`` already hashes to the blob's digest, so equal bytes prove the stored copy intact
    (a damaged one is then rewritten: re-registering repairs it) at the cost of one read and a
    comparison, without a second SHA-256 over the file.
    """
    view = memoryview(data).cast("B")
    try:
        if path.stat().st_size != len(view):
            return False
        with path.open("rb") as f:
            for start in range(0, len(view), 1 << 20):
                if f.read(1 << 20) != view[start : start + (1 << 20)]:
                    return False
    except FileNotFoundError:
        return False
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def announced(data: bytes | memoryview, digest: str | None, hashed: bool) -> str:
    """The digest of ``data``: ``digest`` as given when the caller ``hashed`` these bytes itself,
    else computed (and checked against ``digest`` when one is announced)."""
    if hashed and digest is not None:
        check_digest(digest)
        return digest
    actual = sha256_hex(data)
    if digest is not None and digest != actual:
        raise ChecksumMismatch(f"data hashes to {actual}, not the announced {digest}")
    return actual


def readable(store: Any, digest: str) -> bool:
    """True when ``store.get(digest)`` returns the blob (``get`` verifies the checksum)."""
    try:
        store.get(digest)
    except (BlobNotFound, ChecksumMismatch):
        return False
    return True


class BlobStore:
    """Blobs under ``root``, one file per SHA-256 digest, sharded by the digest's first byte."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path_for(self, digest: str) -> Path:
        check_digest(digest)
        return self.root / digest[:2] / digest

    def exists(self, digest: str) -> bool:
        return self.path_for(digest).is_file()

    def put(
        self, data: bytes | memoryview, digest: str | None = None, *, hashed: bool = False
    ) -> str:
        """Store ``data`` and return its digest; a no-op (bar refreshing mtime) if already stored.

        Args:
            data: the bytes.
            digest: the caller's already computed digest, checked against the data.
            hashed: the caller computed ``digest`` from these very bytes (the registry does):
                they are not hashed again.
        """
        actual = announced(data, digest, hashed)
        final = self.path_for(actual)
        if _holds(final, data):
            # Refresh mtime so a concurrent gc with a grace period keeps a blob being re-registered.
            os.utime(final)
            return actual
        # Absent, or corrupted on disk: (re)write it, atomically replacing any damaged copy.
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=final.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_name, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
        _fsync_dir(final.parent)
        return actual

    def get(self, digest: str) -> bytes:
        """Read a blob and verify it hashes to ``digest``.

        Raises:
            BlobNotFound: no blob with that digest.
            ChecksumMismatch: the bytes on disk are corrupted.
        """
        path = self.path_for(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BlobNotFound(f"blob {digest} is not in the store") from None
        actual = sha256_hex(data)
        if actual != digest:
            raise ChecksumMismatch(
                f"blob {digest} is corrupted on disk (its bytes hash to {actual})"
            )
        return data

    def delete(self, digest: str) -> bool:
        path = self.path_for(digest)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        _fsync_dir(path.parent)
        return True

    def digests(self) -> Iterator[str]:
        """Every stored digest (temporary files excluded)."""
        if not self.root.is_dir():
            return
        for shard in sorted(self.root.iterdir()):
            if not shard.is_dir():
                continue
            for entry in sorted(shard.iterdir()):
                if _DIGEST_RE.match(entry.name) and entry.name[:2] == shard.name:
                    yield entry.name

    def temp_files(self) -> list[Path]:
        """Leftovers of interrupted writes."""
        if not self.root.is_dir():
            return []
        return sorted(self.root.glob(f"*/{_TMP_PREFIX}*"))

    def age_seconds(self, digest: str) -> float:
        return time.time() - self.path_for(digest).stat().st_mtime

    def verify(self, digest: str) -> bool:
        """True when the blob exists and its bytes hash to its name."""
        return readable(self, digest)
