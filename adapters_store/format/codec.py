"""Adapter file format v1: encode, decode and validate, as pure functions over bytes.

Decoding never unpickles: the header is checked byte by byte first (``framing``), then the v1
content rules here (so every rejection names the rule it broke), and the tensors are read by
``safetensors``. Rules that need the base (known
parameter names, index ranges, fingerprint, density budget) are in :func:`check_against_base`.
Rule names are stable; ``RULES`` lists them all.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..adapter import (
    FORMAT,
    FORMAT_VERSION,
    INT32_LIMIT,
    RESIDUAL_DTYPES,
    Adapter,
    AdapterMeta,
    Residual,
    dtype_name,
)
from ..bases import BaseSignature
from ..errors import AdapterTooLarge, IncompatibleBase
from ..head import HEAD_TYPE, head_shapes
from ..names import PARAM_RE, is_valid_name
from .framing import DEFAULT_LIMITS, Limits, bad, canonical, check_header, show
from .residual_checks import check_finite, check_index_layout, check_residual

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
    return canonical(st_save(tensors, metadata=_meta_strings(adapter.meta)))


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


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def _json_meta(meta: dict[str, str], key: str, kind: type) -> Any:
    try:
        # NaN and Infinity are not JSON: PostgreSQL's json type and strict clients refuse them.
        value = json.loads(meta[key], parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        raise bad("metadata", f"{key} is not valid JSON (NaN and Infinity are not)") from None
    if not isinstance(value, kind):
        raise bad("metadata", f"{key} must be a JSON {kind.__name__}")
    return value


def _int_meta(meta: dict[str, str], key: str) -> int:
    text = meta[key]
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise bad("metadata", f"{key} must be a non-negative decimal integer, got {show(text)}")
    return int(text)


def _parse_meta(meta: dict[str, str], limits: Limits) -> AdapterMeta:
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise bad("metadata", f"missing metadata keys: {', '.join(missing)}")
    if meta["format"] != FORMAT:
        raise bad("metadata", f"format is {show(meta['format'])}, expected {FORMAT!r}")
    if meta["format_version"] != FORMAT_VERSION:
        raise bad(
            "metadata",
            f"format_version {show(meta['format_version'])} is not supported (this reader knows {FORMAT_VERSION})",
        )
    if not is_valid_name(meta["task"]):
        raise bad(
            "metadata",
            f"task name {show(meta['task'])} is not allowed (letters, digits, '.', '_', '-')",
        )
    fp = meta["base_fingerprint"]
    if len(fp) != 64 or any(c not in "0123456789abcdef" for c in fp):
        raise bad("metadata", "base_fingerprint must be 64 lowercase hex digits")
    classes = _json_meta(meta, "class_names", list)
    if not classes or not all(isinstance(c, str) and c.strip() for c in classes):
        raise bad("metadata", "class_names must be a non-empty JSON list of non-empty strings")
    if len(set(classes)) != len(classes):
        raise bad("metadata", "class_names has duplicates")
    if len(classes) > limits.max_classes:
        raise AdapterTooLarge(f"{len(classes)} classes, the limit is {limits.max_classes}")
    head = _json_meta(meta, "head", dict)
    if (
        head.get("type") != HEAD_TYPE
        or type(head.get("dim")) is not int
        or head.get("num_classes") != len(classes)
    ):
        raise bad(
            "metadata",
            f"head must be {{'type': {HEAD_TYPE!r}, 'dim': D, 'num_classes': {len(classes)}}}",
        )
    if meta["residual_dtype"] not in RESIDUAL_DTYPES:
        raise bad("metadata", f"residual_dtype must be one of {sorted(RESIDUAL_DTYPES)}")
    try:
        density = float(meta["density"])
    except ValueError:
        raise bad("metadata", "density is not a number") from None
    try:
        created = _dt.datetime.fromisoformat(meta["created_at"])
    except ValueError:
        created = None
    if created is None or created.utcoffset() != _dt.timedelta(0):
        raise bad(
            "metadata", "created_at must be an ISO 8601 UTC timestamp (e.g. 2026-01-31T12:00:00Z)"
        )
    nnz, eligible = _int_meta(meta, "nnz"), _int_meta(meta, "eligible_params")
    if nnz > eligible or not (
        math.isfinite(density) and abs(density - (nnz / eligible if eligible else 0.0)) <= 1e-9
    ):
        raise bad(
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


def decode_adapter(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Adapter:
    """Parse and validate every base-independent rule of format v1.

    Raises:
        InvalidAdapter: with ``rule`` naming the broken rule (see ``RULES``).
    """
    raw_meta, entries = check_header(data, limits)
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
                raise bad(
                    "tensor-name",
                    f"tensor name {show(name)} is not residual/<param>/indices|values",
                )
            residual_names.setdefault(parts[1], set()).add(parts[2])
        elif name.startswith("head/"):
            if name[5:] not in head_shapes(1, 1):
                raise bad(
                    "tensor-name", f"tensor name {show(name)} is not part of a {HEAD_TYPE} head"
                )
        elif name != "text/class_embeddings":
            raise bad("tensor-name", f"tensor name {show(name)} is not part of format v1")
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error type for anything it dislikes
        raise bad("not-safetensors", f"safetensors could not read the file: {exc}") from None

    value_dtype = RESIDUAL_DTYPES[meta.residual_dtype]
    residual: dict[str, Residual] = {}
    for key, kinds in sorted(residual_names.items()):
        if kinds != {"indices", "values"}:
            raise bad(
                "residual-pair", f"{key}: has {sorted(kinds)} but needs both indices and values"
            )
        idx, val = tensors[f"residual/{key}/indices"], tensors[f"residual/{key}/values"]
        check_index_layout(key, idx)
        if val.dtype != value_dtype:
            raise bad(
                "values-dtype",
                f"{key}: values are {dtype_name(val.dtype)}, metadata says {meta.residual_dtype}",
            )
        if val.dim() != 1 or val.numel() != idx.numel():
            raise bad("values-length", f"{key}: {val.numel()} values for {idx.numel()} indices")
        residual[key] = Residual(idx, val)
    check_residual(residual)
    total = sum(r.nnz for r in residual.values())
    if total != meta.nnz:
        raise bad("metadata", f"nnz says {meta.nnz} but the residual holds {total} values")

    dim, classes = meta.head["dim"], len(meta.class_names)
    expected = head_shapes(dim, classes)
    head = {k[5:]: v for k, v in tensors.items() if k.startswith("head/")}
    if set(head) != set(expected):
        raise bad(
            "head-shape",
            f"head tensors must be exactly {sorted(expected)}, missing {sorted(set(expected) - set(head))}",
        )
    for key, shape in expected.items():
        want = torch.int64 if key.endswith("num_batches_tracked") else torch.float32
        if tuple(head[key].shape) != shape or head[key].dtype != want:
            raise bad(
                "head-shape",
                f"head/{key} is {tuple(head[key].shape)} {dtype_name(head[key].dtype)}, expected {shape} {dtype_name(want)} for {classes} classes of dim {dim}",
            )
        check_finite(f"head/{key}", head[key])
    emb = tensors.get("text/class_embeddings")
    if emb is not None:
        if tuple(emb.shape) != (classes, dim) or emb.dtype != torch.float32:
            raise bad(
                "head-shape",
                f"text/class_embeddings is {tuple(emb.shape)}, expected ({classes}, {dim}) float32",
            )
        check_finite("text/class_embeddings", emb)
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
        raise bad(
            "head-shape",
            f"head dim {meta.head['dim']} differs from the base's embedding size {base.embed_dim}",
        )
    for key, res in adapter.residual.items():
        if key not in base.param_shapes:
            raise bad(
                "unknown-parameter",
                f"residual for {show(key)}, which is not a parameter of the base's image tower",
            )
        numel = base.numel(key)
        if res.indices.dtype == torch.int64 and numel < INT32_LIMIT:
            raise bad(
                "indices-dtype",
                f"{key}: int64 indices for a parameter of {numel} elements (int32 required)",
            )
        if res.nnz and int(res.indices[-1]) >= numel:
            raise bad(
                "indices-range",
                f"{key}: index {int(res.indices[-1])} is out of range for {numel} elements",
            )
    if meta.eligible_params > base.eligible_params:
        raise bad(
            "metadata",
            f"eligible_params {meta.eligible_params} exceeds the tower's {base.eligible_params} weights",
        )
    if meta.nnz > limits.max_density * base.eligible_params:
        raise AdapterTooLarge(
            f"{meta.nnz} changed weights is {meta.nnz / base.eligible_params:.2%} of the tower, "
            f"the limit is {limits.max_density:.2%}"
        )
