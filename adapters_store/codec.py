"""Adapter file format v1: encode, decode and validate, as pure functions over bytes.

Decoding never unpickles: the header is checked byte by byte here (so every rejection names the
rule it broke), then the tensors are read by ``safetensors``. Rules that need the base (known
parameter names, index ranges, fingerprint, density budget) are in :func:`check_against_base`.
Rule names are stable; ``RULES`` lists them all.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .adapter import (
    FORMAT,
    FORMAT_VERSION,
    INT32_LIMIT,
    RESIDUAL_DTYPES,
    Adapter,
    AdapterMeta,
    Residual,
    dtype_name,
)
from .bases import BaseSignature
from .errors import AdapterTooLarge, IncompatibleBase, InvalidAdapter
from .head import HEAD_TYPE, head_shapes
from .names import PARAM_RE, is_valid_name

RULES = (
    "not-safetensors",  # not a well-formed safetensors file (length, header, offsets, trailing bytes)
    "size-limit",  # file, header, tensor count, class count or density beyond the configured limits
    "metadata",  # a required __metadata__ key is missing or malformed
    "tensor-name",  # a tensor name outside the v1 layout or with forbidden characters
    "residual-pair",  # a residual without its indices or its values
    "indices-shape",  # indices not 1-D
    "indices-dtype",  # indices not int32 (int64 only for parameters with >= 2**31 elements)
    "indices-negative",
    "indices-sorted",  # indices not increasing
    "indices-duplicate",
    "indices-range",  # an index >= numel of the base parameter
    "values-dtype",  # values not the declared residual dtype
    "values-length",  # values not 1-D or not as long as the indices
    "values-finite",  # NaN or Inf in values, head or embeddings
    "head-shape",  # head tensors or class embeddings disagree with class_names / embedding size
    "unknown-parameter",  # a residual for a parameter the base's image tower lacks
    "fingerprint",  # trained against other base weights
)

_REQUIRED_META = (
    "format",
    "format_version",
    "task",
    "base_model",
    "base_pretrained",
    "base_fingerprint",
    "class_names",
    "head",
    "residual_dtype",
    "nnz",
    "eligible_params",
    "density",
    "source_domain",
    "target_domain",
    "method",
    "train_config",
    "metrics",
    "created_at",
)
_ST_DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}  # fmt: skip


@dataclass(frozen=True)
class Limits:
    """Size limits applied before anything is allocated for a file's tensors."""

    max_file_bytes: int = 1 << 30
    max_header_bytes: int = 8 << 20
    max_tensors: int = 20_000
    max_classes: int = 100_000
    max_density: float = 0.5  # beyond ~0.5 the sparse form costs more than a dense copy


DEFAULT_LIMITS = Limits()


def _bad(rule: str, message: str) -> InvalidAdapter:
    return InvalidAdapter(rule, message)


# ---------------------------------------------------------------------------------------- encode


def _meta_strings(meta: AdapterMeta) -> dict[str, str]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "task": meta.task,
        "base_model": meta.base_model,
        "base_pretrained": meta.base_pretrained,
        "base_fingerprint": meta.base_fingerprint,
        "class_names": json.dumps(meta.class_names, ensure_ascii=False),
        "head": json.dumps(meta.head, sort_keys=True),
        "residual_dtype": meta.residual_dtype,
        "nnz": str(meta.nnz),
        "eligible_params": str(meta.eligible_params),
        "density": repr(float(meta.density)),
        "source_domain": meta.source_domain,
        "target_domain": meta.target_domain,
        "method": meta.method,
        "train_config": json.dumps(meta.train_config, sort_keys=True),
        "metrics": json.dumps(meta.metrics, sort_keys=True),
        "created_at": meta.created_at,
    }


def encode_adapter(adapter: Adapter) -> bytes:
    """The v1 file bytes for ``adapter`` (deterministic for equal inputs)."""
    tensors: dict[str, torch.Tensor] = {}
    for key, res in sorted(adapter.residual.items()):
        tensors[f"residual/{key}/indices"] = res.indices.contiguous()
        tensors[f"residual/{key}/values"] = res.values.contiguous()
    for key, value in sorted(adapter.head.items()):
        tensors[f"head/{key}"] = value.contiguous()
    if adapter.class_embeddings is not None:
        tensors["text/class_embeddings"] = adapter.class_embeddings.contiguous()
    return _canonical(st_save(tensors, metadata=_meta_strings(adapter.meta)))


def _canonical(data: bytes) -> bytes:
    """Rewrite the header with sorted keys, so equal adapters give equal bytes (and digests).

    safetensors does not fix the order of ``__metadata__`` entries; the data section and its
    offsets are unchanged, the header is padded with spaces to a multiple of 8 as the format asks.
    """
    (n,) = struct.unpack("<Q", data[:8])
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + data[8 + n :]


def write_adapter(adapter: Adapter, path: str | os.PathLike[str]) -> Path:
    """Write atomically: a reader never sees a half-written adapter file."""
    path = Path(path)
    data = encode_adapter(adapter)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------------------------------- decode


def _check_header(data: bytes, limits: Limits) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Validate the safetensors framing; return (metadata, tensor entries)."""
    if len(data) > limits.max_file_bytes:
        raise AdapterTooLarge(f"file is {len(data)} bytes, the limit is {limits.max_file_bytes}")
    if len(data) < 8:
        raise _bad(
            "not-safetensors", f"file is {len(data)} bytes, too short for a safetensors header"
        )
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise _bad(
            "not-safetensors", f"header length {n} runs past the end of the {len(data)}-byte file"
        )
    if n > limits.max_header_bytes:
        raise AdapterTooLarge(f"header declares {n} bytes, the limit is {limits.max_header_bytes}")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise _bad("not-safetensors", "header is not UTF-8") from None
    except _DuplicateKey as exc:
        raise _bad("not-safetensors", f"header has the key {_show(exc.key)} twice") from None
    except (ValueError, RecursionError):
        raise _bad("not-safetensors", "header is not valid JSON (or nested too deeply)") from None
    if not isinstance(header, dict):
        raise _bad("not-safetensors", "header is not a JSON object")
    raw_meta = header.pop("__metadata__", None)
    if raw_meta is None:
        raise _bad("metadata", "file has no __metadata__")
    if not isinstance(raw_meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw_meta.items()
    ):
        raise _bad("metadata", "__metadata__ must map strings to strings")
    if len(header) > limits.max_tensors:
        raise AdapterTooLarge(f"{len(header)} tensors, the limit is {limits.max_tensors}")
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _bad("not-safetensors", f"tensor {_show(name)}: malformed entry")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _ST_DTYPES:
            raise _bad("not-safetensors", f"tensor {_show(name)}: unsupported dtype {dtype!r}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise _bad("not-safetensors", f"tensor {_show(name)}: malformed shape")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int and o >= 0 for o in offsets)
        ):
            raise _bad("not-safetensors", f"tensor {_show(name)}: malformed data_offsets")
        nbytes = math.prod(shape) * _ST_DTYPES[dtype][1]
        if offsets[1] - offsets[0] != nbytes:
            raise _bad(
                "not-safetensors",
                f"tensor {_show(name)}: offsets span {offsets[1] - offsets[0]} bytes, shape needs {nbytes}",
            )
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for start, stop, name in sorted(spans):
        if start != end:
            what = "overlaps the previous tensor" if start < end else "leaves a gap before it"
            raise _bad("not-safetensors", f"tensor {_show(name)} {what}")
        end = stop
    if 8 + n + end != len(data):
        raise _bad(
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


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def _show(name: object) -> str:
    """A name made safe for messages and logs (control characters escaped, length bounded)."""
    text = repr(name)
    return text if len(text) <= 200 else text[:200] + "…'"


def _json_meta(meta: dict[str, str], key: str, kind: type) -> Any:
    try:
        # NaN and Infinity are not JSON: PostgreSQL's json type and strict clients refuse them.
        value = json.loads(meta[key], parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        raise _bad("metadata", f"{key} is not valid JSON (NaN and Infinity are not)") from None
    if not isinstance(value, kind):
        raise _bad("metadata", f"{key} must be a JSON {kind.__name__}")
    return value


def _int_meta(meta: dict[str, str], key: str) -> int:
    text = meta[key]
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise _bad("metadata", f"{key} must be a non-negative decimal integer, got {_show(text)}")
    return int(text)


def _parse_meta(meta: dict[str, str], limits: Limits) -> AdapterMeta:
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise _bad("metadata", f"missing metadata keys: {', '.join(missing)}")
    if meta["format"] != FORMAT:
        raise _bad("metadata", f"format is {_show(meta['format'])}, expected {FORMAT!r}")
    if meta["format_version"] != FORMAT_VERSION:
        raise _bad(
            "metadata",
            f"format_version {_show(meta['format_version'])} is not supported (this reader knows {FORMAT_VERSION})",
        )
    if not is_valid_name(meta["task"]):
        raise _bad(
            "metadata",
            f"task name {_show(meta['task'])} is not allowed (letters, digits, '.', '_', '-')",
        )
    fp = meta["base_fingerprint"]
    if len(fp) != 64 or any(c not in "0123456789abcdef" for c in fp):
        raise _bad("metadata", "base_fingerprint must be 64 lowercase hex digits")
    classes = _json_meta(meta, "class_names", list)
    if not classes or not all(isinstance(c, str) and c.strip() for c in classes):
        raise _bad("metadata", "class_names must be a non-empty JSON list of non-empty strings")
    if len(set(classes)) != len(classes):
        raise _bad("metadata", "class_names has duplicates")
    if len(classes) > limits.max_classes:
        raise AdapterTooLarge(f"{len(classes)} classes, the limit is {limits.max_classes}")
    head = _json_meta(meta, "head", dict)
    if (
        head.get("type") != HEAD_TYPE
        or type(head.get("dim")) is not int
        or head.get("num_classes") != len(classes)
    ):
        raise _bad(
            "metadata",
            f"head must be {{'type': {HEAD_TYPE!r}, 'dim': D, 'num_classes': {len(classes)}}}",
        )
    if meta["residual_dtype"] not in RESIDUAL_DTYPES:
        raise _bad("metadata", f"residual_dtype must be one of {sorted(RESIDUAL_DTYPES)}")
    try:
        density = float(meta["density"])
    except ValueError:
        raise _bad("metadata", "density is not a number") from None
    try:
        created = _dt.datetime.fromisoformat(meta["created_at"])
    except ValueError:
        created = None
    if created is None or created.utcoffset() != _dt.timedelta(0):
        raise _bad(
            "metadata", "created_at must be an ISO 8601 UTC timestamp (e.g. 2026-01-31T12:00:00Z)"
        )
    nnz, eligible = _int_meta(meta, "nnz"), _int_meta(meta, "eligible_params")
    if nnz > eligible or not (
        math.isfinite(density) and abs(density - (nnz / eligible if eligible else 0.0)) <= 1e-9
    ):
        raise _bad(
            "metadata", "density must equal nnz / eligible_params, with nnz <= eligible_params"
        )
    return AdapterMeta(
        task=meta["task"], base_model=meta["base_model"], base_pretrained=meta["base_pretrained"],
        base_fingerprint=fp, class_names=classes, head=head, residual_dtype=meta["residual_dtype"],
        nnz=nnz, eligible_params=eligible, density=density, source_domain=meta["source_domain"],
        target_domain=meta["target_domain"], method=meta["method"],
        train_config=_json_meta(meta, "train_config", dict), metrics=_json_meta(meta, "metrics", dict),
        created_at=meta["created_at"],
    )  # fmt: skip


def _check_indices(key: str, idx: torch.Tensor) -> None:
    if idx.dim() != 1:
        raise _bad("indices-shape", f"{key}: indices must be 1-D, got shape {tuple(idx.shape)}")
    if idx.dtype not in (torch.int32, torch.int64):
        raise _bad(
            "indices-dtype",
            f"{key}: indices must be int32 (int64 for huge parameters), got {dtype_name(idx.dtype)}",
        )
    if idx.numel() == 0:
        return
    if int(idx.min()) < 0:
        raise _bad("indices-negative", f"{key}: negative index {int(idx.min())}")
    step = idx[1:] - idx[:-1]
    if bool((step == 0).any()):
        raise _bad("indices-duplicate", f"{key}: index {int(idx[1:][step == 0][0])} appears twice")
    if bool((step < 0).any()):
        raise _bad("indices-sorted", f"{key}: indices are not in increasing order")


def _finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise _bad("values-finite", f"{name} contains NaN or Inf")


def decode_adapter(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Adapter:
    """Parse and validate every base-independent rule of format v1.

    Raises:
        InvalidAdapter: with ``rule`` naming the broken rule (see ``RULES``).
    """
    raw_meta, entries = _check_header(data, limits)
    meta = _parse_meta(raw_meta, limits)
    residual_names: dict[str, set[str]] = {}
    for name in entries:
        if name.startswith("residual/"):
            parts = name.split("/")
            if (
                len(parts) != 3
                or parts[2] not in ("indices", "values")
                or not PARAM_RE.fullmatch(parts[1])
            ):
                raise _bad(
                    "tensor-name",
                    f"tensor name {_show(name)} is not residual/<param>/indices|values",
                )
            residual_names.setdefault(parts[1], set()).add(parts[2])
        elif name.startswith("head/"):
            if name[5:] not in head_shapes(1, 1):
                raise _bad(
                    "tensor-name", f"tensor name {_show(name)} is not part of a {HEAD_TYPE} head"
                )
        elif name != "text/class_embeddings":
            raise _bad("tensor-name", f"tensor name {_show(name)} is not part of format v1")
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error type for anything it dislikes
        raise _bad("not-safetensors", f"safetensors could not read the file: {exc}") from None

    value_dtype = RESIDUAL_DTYPES[meta.residual_dtype]
    residual: dict[str, Residual] = {}
    for key, kinds in sorted(residual_names.items()):
        if kinds != {"indices", "values"}:
            raise _bad(
                "residual-pair", f"{key}: has {sorted(kinds)} but needs both indices and values"
            )
        idx, val = tensors[f"residual/{key}/indices"], tensors[f"residual/{key}/values"]
        _check_indices(key, idx)
        if val.dtype != value_dtype:
            raise _bad(
                "values-dtype",
                f"{key}: values are {dtype_name(val.dtype)}, metadata says {meta.residual_dtype}",
            )
        if val.dim() != 1 or val.numel() != idx.numel():
            raise _bad("values-length", f"{key}: {val.numel()} values for {idx.numel()} indices")
        _finite(f"{key} values", val)
        residual[key] = Residual(idx, val)
    total = sum(r.nnz for r in residual.values())
    if total != meta.nnz:
        raise _bad("metadata", f"nnz says {meta.nnz} but the residual holds {total} values")

    dim, classes = meta.head["dim"], len(meta.class_names)
    expected = head_shapes(dim, classes)
    head = {k[5:]: v for k, v in tensors.items() if k.startswith("head/")}
    if set(head) != set(expected):
        raise _bad(
            "head-shape",
            f"head tensors must be exactly {sorted(expected)}, missing {sorted(set(expected) - set(head))}",
        )
    for key, shape in expected.items():
        want = torch.int64 if key.endswith("num_batches_tracked") else torch.float32
        if tuple(head[key].shape) != shape or head[key].dtype != want:
            raise _bad(
                "head-shape",
                f"head/{key} is {tuple(head[key].shape)} {dtype_name(head[key].dtype)}, expected {shape} {dtype_name(want)} for {classes} classes of dim {dim}",
            )
        _finite(f"head/{key}", head[key])
    emb = tensors.get("text/class_embeddings")
    if emb is not None:
        if tuple(emb.shape) != (classes, dim) or emb.dtype != torch.float32:
            raise _bad(
                "head-shape",
                f"text/class_embeddings is {tuple(emb.shape)}, expected ({classes}, {dim}) float32",
            )
        _finite("text/class_embeddings", emb)
    return Adapter(meta=meta, residual=residual, head=head, class_embeddings=emb)


def read_adapter(path: str | os.PathLike[str], limits: Limits = DEFAULT_LIMITS) -> Adapter:
    path = Path(path)
    size = path.stat().st_size
    if size > limits.max_file_bytes:
        raise AdapterTooLarge(f"{path.name} is {size} bytes, the limit is {limits.max_file_bytes}")
    return decode_adapter(path.read_bytes(), limits)


def check_against_base(
    adapter: Adapter, base: BaseSignature, limits: Limits = DEFAULT_LIMITS
) -> None:
    """The rules that need the base: fingerprint, parameter names, index ranges, sizes.

    Raises:
        IncompatibleBase: the adapter was trained against other weights.
        InvalidAdapter: any other rule, named in ``rule``.
    """
    meta = adapter.meta
    if meta.base_fingerprint != base.fingerprint:
        raise IncompatibleBase(
            f"adapter was trained against base {meta.base_model}/{meta.base_pretrained} with fingerprint "
            f"{meta.base_fingerprint[:12]}…, this base ({base.model}/{base.pretrained}) is {base.fingerprint[:12]}…"
        )
    if meta.head["dim"] != base.embed_dim:
        raise _bad(
            "head-shape",
            f"head dim {meta.head['dim']} differs from the base's embedding size {base.embed_dim}",
        )
    for key, res in adapter.residual.items():
        if key not in base.param_shapes:
            raise _bad(
                "unknown-parameter",
                f"residual for {_show(key)}, which is not a parameter of the base's image tower",
            )
        numel = base.numel(key)
        if res.indices.dtype == torch.int64 and numel < INT32_LIMIT:
            raise _bad(
                "indices-dtype",
                f"{key}: int64 indices for a parameter of {numel} elements (int32 required)",
            )
        if res.nnz and int(res.indices[-1]) >= numel:
            raise _bad(
                "indices-range",
                f"{key}: index {int(res.indices[-1])} is out of range for {numel} elements",
            )
    if meta.eligible_params > base.eligible_params:
        raise _bad(
            "metadata",
            f"eligible_params {meta.eligible_params} exceeds the tower's {base.eligible_params} weights",
        )
    if meta.nnz > limits.max_density * base.eligible_params:
        raise AdapterTooLarge(
            f"{meta.nnz} changed weights is {meta.nnz / base.eligible_params:.2%} of the tower, "
            f"the limit is {limits.max_density:.2%}"
        )
