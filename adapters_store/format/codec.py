"""Adapter file format v1: encode, decode and validate, as pure functions over bytes.

Decoding never unpickles: the header is checked byte by byte first (``framing``), then the
metadata against its schema (``schema``), then the tensor rules here (so every rejection names
the rule it broke), and the tensors are read by ``safetensors``. Rules that need the base (known
parameter names, index ranges, fingerprint, density budget) are in :func:`check_against_base`.
Rule names are stable; ``RULES`` lists them all (docs/FORMAT.md, "format v1").
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..adapter import INT32_LIMIT, RESIDUAL_DTYPES, Adapter, Residual, dtype_name
from ..bases import BaseSignature
from ..errors import AdapterTooLarge, IncompatibleBase
from ..files import atomic_write
from ..head import head_shapes
from ..names import PARAM_RE
from .framing import DEFAULT_LIMITS, Limits, bad, canonical, check_header, show
from .residual_checks import (
    check_blocks_against_base,
    check_finite,
    check_index_layout,
    check_residual,
)
from .schema import BLOCK_SIZES, HEAD_TYPE, decode_meta, encode_meta

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
    "values-length",  # values not 1-D or not as long as the indices ([n_blocks, B] for blocks)
    "block-size",  # a block size outside BLOCK_SIZES, or two forms/sizes of residual in one file
    "blocks-tail",  # a non-zero value in a tail block past the end of its parameter
    "values-finite",  # NaN or Inf in values, head or embeddings
    "head-shape",  # head tensors or class embeddings disagree with class_names / embedding size
    "unknown-parameter",  # a residual for a parameter the base's image tower lacks
    "fingerprint",  # trained against other base weights
    "base-names",  # base_model / base_pretrained differ from those of the base its fingerprint is
)


def encode_adapter(adapter: Adapter) -> bytes:
    """The v1 file bytes for ``adapter`` (deterministic for equal inputs)."""
    tensors: dict[str, torch.Tensor] = {}
    for key, res in sorted(adapter.residual.items()):
        form = "indices" if res.block_size == 1 else "blocks"
        tensors[f"residual/{key}/{form}"] = res.indices.contiguous()
        tensors[f"residual/{key}/values"] = res.values.contiguous()
    for key, value in sorted(adapter.head.items()):
        tensors[f"head/{key}"] = value.contiguous()
    if adapter.class_embeddings is not None:
        tensors["text/class_embeddings"] = adapter.class_embeddings.contiguous()
    return canonical(st_save(tensors, metadata=encode_meta(adapter.meta)))


def write_adapter(adapter: Adapter, path: str | os.PathLike[str]) -> Path:
    """Write atomically: a reader never sees a half-written adapter file."""
    data = encode_adapter(adapter)
    with atomic_write(path, suffix=".safetensors") as f:
        f.write(data)
    return Path(path)


# ---------------------------------------------------------------------------------------- decode


def decode_adapter(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Adapter:
    """Parse and validate every base-independent rule of format v1.

    Raises:
        InvalidAdapter: with ``rule`` naming the broken rule (see ``RULES``).
    """
    raw_meta, entries = check_header(data, limits)
    meta = decode_meta(raw_meta, limits)
    residual_names: dict[str, set[str]] = {}
    for name in entries:
        if name.startswith("residual/"):
            parts = name.split("/")
            if (
                len(parts) != 3
                or parts[2] not in ("indices", "blocks", "values")
                or not PARAM_RE.fullmatch(parts[1])
            ):
                raise bad(
                    "tensor-name",
                    f"tensor name {show(name)} is not residual/<param>/indices|values (or blocks)",
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
        if kinds not in ({"indices", "values"}, {"blocks", "values"}):
            raise bad(
                "residual-pair",
                f"{key}: has {sorted(kinds)} but needs both values and its indices (or blocks)",
            )
        form = "indices" if "indices" in kinds else "blocks"
        idx, val = tensors[f"residual/{key}/{form}"], tensors[f"residual/{key}/values"]
        check_index_layout(key, idx, form)
        if val.dtype != value_dtype:
            raise bad(
                "values-dtype",
                f"{key}: values are {dtype_name(val.dtype)}, metadata says {meta.residual_dtype}",
            )
        residual[key] = _residual(key, form, idx, val)
    sizes = {r.block_size for r in residual.values()}
    if len(sizes) > 1:
        raise bad(
            "block-size", f"one file holds one form of residual, got block sizes {sorted(sizes)}"
        )
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


def _residual(key: str, form: str, idx: torch.Tensor, val: torch.Tensor) -> Residual:
    """One parameter's residual in its form, once its values' shape fits its indices or blocks."""
    if form == "indices":
        if val.dim() != 1 or val.numel() != idx.numel():
            raise bad("values-length", f"{key}: {val.numel()} values for {idx.numel()} indices")
        return Residual(idx, val)
    if val.dim() != 2 or val.shape[0] != idx.numel():
        raise bad(
            "values-length",
            f"{key}: values {tuple(val.shape)} for {idx.numel()} blocks, expected [n_blocks, B]",
        )
    if val.shape[1] not in BLOCK_SIZES:
        raise bad("block-size", f"{key}: block size {val.shape[1]} is not one of {BLOCK_SIZES}")
    return Residual(idx, val, block_size=int(val.shape[1]))


def read_adapter(path: str | os.PathLike[str], limits: Limits = DEFAULT_LIMITS) -> Adapter:
    path = Path(path)
    size = path.stat().st_size
    if size > limits.max_file_bytes:
        raise AdapterTooLarge(f"{path.name} is {size} bytes, the limit is {limits.max_file_bytes}")
    return decode_adapter(path.read_bytes(), limits)


def check_against_base(
    adapter: Adapter, base: BaseSignature, limits: Limits = DEFAULT_LIMITS
) -> None:
    """The rules that need the base: fingerprint, the base's names, parameter names, index
    ranges, sizes.

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
    if (meta.base_model, meta.base_pretrained) != (base.model, base.pretrained):
        raise bad(
            "base-names",
            f"the file names base {show(meta.base_model)} / {show(meta.base_pretrained)}, but its "
            f"fingerprint is this base's, {base.model}/{base.pretrained}: write the adapter with "
            "the names of the base it was trained on",
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
        if res.block_size > 1:
            check_blocks_against_base(key, res, numel)
            continue
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
