"""The safetensors framing of an adapter file, checked byte by byte before any tensor is read.

Kept apart from the v1 content rules (``codec``): this is where a file stops being bytes and
becomes a header whose every offset, dtype and shape is accounted for. Also the size limits that
apply before anything is allocated, and the canonical (sorted-key) header that makes equal
adapters byte-identical.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

from ..errors import AdapterTooLarge, InvalidAdapter

# Bytes per element of each safetensors dtype a v1 file may contain.
_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


@dataclass(frozen=True)
class Limits:
    """Size limits applied before anything is allocated for a file's tensors."""

    max_file_bytes: int = 1 << 30
    max_header_bytes: int = 8 << 20
    max_tensors: int = 20_000
    max_classes: int = 100_000
    max_density: float = 0.5  # beyond ~0.5 the sparse form costs more than a dense copy


DEFAULT_LIMITS = Limits()


def bad(rule: str, message: str) -> InvalidAdapter:
    return InvalidAdapter(rule, message)


# ---------------------------------------------------------------------------------------- encode


def canonical(data: bytes) -> bytes:
    """Rewrite the header with sorted keys, so equal adapters give equal bytes (and digests).

    safetensors does not fix the order of ``__metadata__`` entries; the data section and its
    offsets are unchanged, the header is padded with spaces to a multiple of 8 as the format asks.
    """
    (n,) = struct.unpack("<Q", data[:8])
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + data[8 + n :]


def check_header(data: bytes, limits: Limits) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Validate the safetensors framing; return (metadata, tensor entries)."""
    if len(data) > limits.max_file_bytes:
        raise AdapterTooLarge(f"file is {len(data)} bytes, the limit is {limits.max_file_bytes}")
    if len(data) < 8:
        raise bad(
            "not-safetensors", f"file is {len(data)} bytes, too short for a safetensors header"
        )
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise bad(
            "not-safetensors", f"header length {n} runs past the end of the {len(data)}-byte file"
        )
    if n > limits.max_header_bytes:
        raise AdapterTooLarge(f"header declares {n} bytes, the limit is {limits.max_header_bytes}")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise bad("not-safetensors", "header is not UTF-8") from None
    except _DuplicateKey as exc:
        raise bad("not-safetensors", f"header has the key {show(exc.key)} twice") from None
    except (ValueError, RecursionError):
        raise bad("not-safetensors", "header is not valid JSON (or nested too deeply)") from None
    if not isinstance(header, dict):
        raise bad("not-safetensors", "header is not a JSON object")
    raw_meta = header.pop("__metadata__", None)
    if raw_meta is None:
        raise bad("metadata", "file has no __metadata__")
    if not isinstance(raw_meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw_meta.items()
    ):
        raise bad("metadata", "__metadata__ must map strings to strings")
    if len(header) > limits.max_tensors:
        raise AdapterTooLarge(f"{len(header)} tensors, the limit is {limits.max_tensors}")
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise bad("not-safetensors", f"tensor {show(name)}: malformed entry")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _ITEMSIZE:
            raise bad("not-safetensors", f"tensor {show(name)}: unsupported dtype {dtype!r}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise bad("not-safetensors", f"tensor {show(name)}: malformed shape")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int and o >= 0 for o in offsets)
        ):
            raise bad("not-safetensors", f"tensor {show(name)}: malformed data_offsets")
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise bad(
                "not-safetensors",
                f"tensor {show(name)}: offsets span {offsets[1] - offsets[0]} bytes, shape needs {nbytes}",
            )
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for start, stop, name in sorted(spans):
        if start != end:
            what = "overlaps the previous tensor" if start < end else "leaves a gap before it"
            raise bad("not-safetensors", f"tensor {show(name)} {what}")
        end = stop
    if 8 + n + end != len(data):
        raise bad(
            "not-safetensors",
            f"data section is {len(data) - 8 - n} bytes but tensors cover {end} (trailing or missing bytes)",
        )
    return raw_meta, header


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Refuse duplicate JSON keys: readers disagree on which copy wins, so none may be trusted."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def show(name: object) -> str:
    """A name made safe for messages and logs (control characters escaped, length bounded)."""
    text = repr(name)
    return text if len(text) <= 200 else text[:200] + "…'"
