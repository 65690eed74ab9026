"""Adapter file format v1 (docs/FORMAT.md, "format v1"): round trip, determinism, size, one
crafted bad file per rule of ``codec.RULES``, and the definition of task weights
(``merge_tensor`` / ``merge_state``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import pickle
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from adapters_store.adapter import (
    Adapter,
    AdapterInfo,
    AdapterMeta,
    Residual,
    build_adapter,
    merge_state,
    merge_tensor,
)
from adapters_store.bases import BaseSignature, tower_parameters
from adapters_store.errors import AdapterTooLarge, IncompatibleBase, InvalidAdapter
from adapters_store.format.codec import (
    RULES,
    Limits,
    check_against_base,
    decode_adapter,
    encode_adapter,
    read_adapter,
    write_adapter,
)
from adapters_store.head import TaskHead
from adapters_store.synthetic import random_adapter, random_task_state

Tiny = tuple[nn.Module, BaseSignature]
CREATED_AT = "2024-05-01T12:00:00Z"


# ---------------------------------------------------------------------------------------- helpers


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits, so that equality is bitwise (NaN payloads and -0.0 included)."""
    t = t.detach().contiguous()
    if t.is_floating_point():
        return t.view(
            {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()]
        )
    return t


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert tuple(a.shape) == tuple(b.shape), f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.equal(_bits(a), _bits(b)), f"{what}: values differ"


def assert_adapters_equal(a: Adapter, b: Adapter) -> None:
    assert a.meta == b.meta
    assert sorted(a.residual) == sorted(b.residual)
    for key in a.residual:
        assert_bitwise_equal(a.residual[key].indices, b.residual[key].indices, f"{key} indices")
        assert_bitwise_equal(a.residual[key].values, b.residual[key].values, f"{key} values")
    assert sorted(a.head) == sorted(b.head)
    for key in a.head:
        assert_bitwise_equal(a.head[key], b.head[key], f"head/{key}")
    assert (a.class_embeddings is None) == (b.class_embeddings is None)
    if a.class_embeddings is not None and b.class_embeddings is not None:
        assert_bitwise_equal(a.class_embeddings, b.class_embeddings, "class_embeddings")


def _header(data: bytes) -> dict[str, Any]:
    (n,) = struct.unpack("<Q", data[:8])
    header: dict[str, Any] = json.loads(data[8 : 8 + n])
    return header


def _raw_file(header: Any, payload: bytes = b"") -> bytes:
    """A safetensors-shaped file built by hand: u64 header length, header bytes, payload."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    return struct.pack("<Q", len(hb)) + hb + payload


def _rewrite_header(data: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """Re-frame ``data`` with its JSON header edited by ``edit`` (payload unchanged)."""
    header = _header(data)
    edit(header)
    (n,) = struct.unpack("<Q", data[:8])
    return _raw_file(header, data[8 + n :])


def _with_counts(adapter: Adapter) -> Adapter:
    """``adapter`` with ``nnz`` and ``density`` recomputed from its residual."""
    nnz = sum(r.nnz for r in adapter.residual.values())
    eligible = adapter.meta.eligible_params
    meta = dataclasses.replace(adapter.meta, nnz=nnz, density=nnz / eligible if eligible else 0.0)
    return dataclasses.replace(adapter, meta=meta)


def _edit_residual(
    adapter: Adapter,
    key: str,
    indices: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
) -> Adapter:
    old = adapter.residual[key]
    residual = dict(adapter.residual)
    residual[key] = Residual(
        old.indices if indices is None else indices, old.values if values is None else values
    )
    return _with_counts(dataclasses.replace(adapter, residual=residual))


def _tiny_head(dim: int, classes: int) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return {k: v.clone() for k, v in TaskHead(dim, classes).state_dict().items()}


@dataclasses.dataclass(frozen=True)
class Ctx:
    """A valid adapter of the tiny base, as an object, as bytes, and as (tensors, metadata)."""

    net: nn.Module
    sig: BaseSignature
    adapter: Adapter
    data: bytes
    tensors: dict[str, torch.Tensor]
    meta: dict[str, str]
    key: str  # the residual parameter with the most changed weights

    def file(self, tensors: dict[str, torch.Tensor] | None = None, **meta: str) -> bytes:
        """A framing-valid file: this adapter's tensors/metadata with ``meta`` overriding keys."""
        return st_save(self.tensors if tensors is None else tensors, metadata={**self.meta, **meta})

    def without_meta(self, key: str) -> bytes:
        return st_save(self.tensors, metadata={k: v for k, v in self.meta.items() if k != key})

    def renamed(self, old: str, new: str) -> bytes:
        tensors = dict(self.tensors)
        tensors[new] = tensors.pop(old)
        return self.file(tensors)

    def renamed_param(self, new_key: str) -> bytes:
        """Both residual tensors of ``self.key`` moved under ``residual/<new_key>/``."""
        tensors = dict(self.tensors)
        for part in ("indices", "values"):
            tensors[f"residual/{new_key}/{part}"] = tensors.pop(f"residual/{self.key}/{part}")
        return self.file(tensors)


@pytest.fixture(scope="module")
def ctx(tiny: Tiny) -> Ctx:
    net, sig = tiny
    adapter = random_adapter(net, sig, "t", density=0.01)
    data = encode_adapter(adapter)
    key = max(adapter.residual, key=lambda k: adapter.residual[k].nnz)
    assert adapter.residual[key].nnz >= 4
    return Ctx(net, sig, adapter, data, dict(st_load(data)), _header(data)["__metadata__"], key)


# ------------------------------------------------------------------------------- round trip


def test_round_trip_random_adapter(ctx: Ctx) -> None:
    decoded = decode_adapter(ctx.data)
    assert_adapters_equal(ctx.adapter, decoded)
    assert decoded.meta.task == "t"
    assert decoded.meta.nnz == sum(r.nnz for r in ctx.adapter.residual.values()) > 0
    assert decoded.class_embeddings is not None
    check_against_base(decoded, ctx.sig)


def test_round_trip_merge_reproduces_task_state_bit_for_bit(tiny: Tiny) -> None:
    net, sig = tiny
    base, task = random_task_state(net, 0.01, seed=1)
    head = _tiny_head(sig.embed_dim, 3)
    adapter = build_adapter(
        base,
        task,
        AdapterInfo(
            task="merge-check",
            base_model=sig.model,
            base_pretrained=sig.pretrained,
            base_fingerprint=sig.fingerprint,
            class_names=["a", "b", "c"],
            created_at=CREATED_AT,
        ),
        head_state=head,
    )
    decoded = decode_adapter(encode_adapter(adapter))
    check_against_base(decoded, sig)
    assert decoded.meta.nnz > 0
    assert any(not torch.equal(base[k], task[k]) for k in base), (
        "the task must differ from the base"
    )
    merged = merge_state(base, decoded)
    assert sorted(merged) == sorted(task)
    for key in task:
        assert merged[key].dtype == torch.float32
        assert_bitwise_equal(merged[key], task[key], key)
    # and the base state was not touched by the merge
    for key, p in tower_parameters(net).items():
        assert_bitwise_equal(base[key], p.detach(), key)


def test_write_then_read_round_trip(ctx: Ctx, tmp_path: Path) -> None:
    path = write_adapter(ctx.adapter, tmp_path / "sub" / "a.safetensors")
    assert_adapters_equal(ctx.adapter, decode_adapter(path.read_bytes()))
    assert_adapters_equal(ctx.adapter, read_adapter(path))
    assert [p.name for p in path.parent.iterdir()] == ["a.safetensors"], "no temp files left behind"
    with pytest.raises(AdapterTooLarge) as exc:
        read_adapter(path, Limits(max_file_bytes=len(ctx.data) - 1))
    assert exc.value.rule == "size-limit"
    assert str(len(ctx.data)) in str(exc.value)


def test_encode_is_deterministic_and_canonical(ctx: Ctx, tiny: Tiny) -> None:
    net, sig = tiny
    assert encode_adapter(ctx.adapter) == ctx.data
    again = random_adapter(net, sig, "t", density=0.01)
    again.meta.created_at = ctx.adapter.meta.created_at
    assert encode_adapter(again) == ctx.data
    assert encode_adapter(decode_adapter(ctx.data)) == ctx.data
    # insertion order of the dicts does not matter
    shuffled = dataclasses.replace(
        ctx.adapter,
        residual=dict(reversed(list(ctx.adapter.residual.items()))),
        head=dict(reversed(list(ctx.adapter.head.items()))),
    )
    assert encode_adapter(shuffled) == ctx.data


def test_decode_never_unpickles(ctx: Ctx, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("decode_adapter must not unpickle")

    assert not ctx.data.startswith((b"PK", b"\x80"))
    assert _header(ctx.data)["__metadata__"]["format"] == "deltaclip.adapter"
    for target, name in (
        (pickle, "loads"),
        (pickle, "load"),
        (pickle, "Unpickler"),
        (torch, "load"),
    ):
        monkeypatch.setattr(target, name, refuse)
    assert_adapters_equal(ctx.adapter, decode_adapter(ctx.data))


@pytest.mark.parametrize("zipfile", [True, False], ids=["torch-zip", "torch-legacy-pickle"])
def test_pickle_file_is_rejected_as_not_safetensors(zipfile: bool, tmp_path: Path) -> None:
    buf = io.BytesIO()
    torch.save(
        {"residual/visual.proj/indices": torch.arange(3, dtype=torch.int32)},
        buf,
        _use_new_zipfile_serialization=zipfile,
    )
    path = tmp_path / "renamed.safetensors"
    path.write_bytes(buf.getvalue())
    for attempt in (lambda: decode_adapter(buf.getvalue()), lambda: read_adapter(path)):
        with pytest.raises(InvalidAdapter) as exc:
            attempt()
        assert exc.value.rule == "not-safetensors", str(exc.value)


# ------------------------------------------------------------------- bytes per changed weight


def _size_figures(residual_dtype: torch.dtype) -> tuple[float, int, int, int]:
    g = torch.Generator().manual_seed(7)
    base = {
        "visual.a.weight": torch.randn(512, 1024, generator=g),
        "visual.b.weight": torch.randn(1024, 512, generator=g),
    }
    task = {}
    for key, w in base.items():
        changed = torch.rand(w.shape, generator=g) < 0.1
        task[key] = torch.where(changed, w * (1 + 0.05 * torch.randn(w.shape, generator=g)), w)
    adapter = build_adapter(
        base,
        task,
        AdapterInfo(
            task="size",
            base_model="m",
            base_pretrained="p",
            base_fingerprint="ab" * 32,
            class_names=[f"c{i}" for i in range(10)],
            created_at=CREATED_AT,
        ),
        head_state=_tiny_head(32, 10),
        residual_dtype=residual_dtype,
    )
    nnz = adapter.meta.nnz
    size = len(encode_adapter(adapter))
    empty = dataclasses.replace(
        adapter, residual={}, meta=dataclasses.replace(adapter.meta, nnz=0, density=0.0)
    )
    fixed = len(encode_adapter(empty))
    return (size - fixed) / nnz, size, fixed, nnz


@pytest.mark.parametrize(
    ("residual_dtype", "bound"), [(torch.float32, 8.5), (torch.bfloat16, 6.5)], ids=["fp32", "bf16"]
)
def test_bytes_per_changed_weight(residual_dtype: torch.dtype, bound: float) -> None:
    per_weight, size, fixed, nnz = _size_figures(residual_dtype)
    assert 95_000 <= nnz <= 115_000
    print(
        f"\n{residual_dtype}: {per_weight:.4f} bytes per changed weight "
        f"(file {size} B = fixed {fixed} B + {size - fixed} B for {nnz} changed weights; "
        f"{size / nnz:.4f} B per changed weight including the fixed part)"
    )
    assert per_weight <= bound
    assert size <= fixed + bound * nnz


# ----------------------------------------------------------------- one crafted file per rule

Attempt = Callable[[], object]


def _decode(data: bytes, limits: Limits | None = None) -> Attempt:
    return lambda: decode_adapter(data, limits or Limits())


def _check(ctx: Ctx, adapter: Adapter, limits: Limits | None = None) -> Attempt:
    """Encode, decode (must be accepted), then check against the tiny base."""

    def run() -> None:
        decoded = decode_adapter(encode_adapter(adapter))
        check_against_base(decoded, ctx.sig, limits or Limits())

    return run


def _entry(dtype: str, shape: list[int], start: int, stop: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, stop]}


def _framed(ctx: Ctx, entries: dict[str, Any], payload: bytes) -> bytes:
    return _raw_file({"__metadata__": ctx.meta, **entries}, payload)


def _meta_int_value(ctx: Ctx) -> bytes:
    def edit(header: dict[str, Any]) -> None:
        header["__metadata__"]["nnz"] = 5

    return _rewrite_header(ctx.data, edit)


def _nnz_off_by_one(ctx: Ctx) -> bytes:
    nnz, eligible = ctx.adapter.meta.nnz + 1, ctx.adapter.meta.eligible_params
    return ctx.file(nnz=str(nnz), density=repr(nnz / eligible))


def _unknown_parameter(ctx: Ctx) -> Adapter:
    residual = dict(ctx.adapter.residual)
    residual["visual.nope.weight"] = Residual(
        torch.tensor([0, 5], dtype=torch.int32), torch.tensor([0.5, -0.25])
    )
    return _with_counts(dataclasses.replace(ctx.adapter, residual=residual))


def _head_dim_16(ctx: Ctx) -> Adapter:
    classes = ctx.adapter.meta.class_names
    meta = dataclasses.replace(ctx.adapter.meta, head={**ctx.adapter.meta.head, "dim": 16})
    emb = nn.functional.normalize(torch.ones(len(classes), 16), dim=1)
    return dataclasses.replace(
        ctx.adapter, meta=meta, head=_tiny_head(16, len(classes)), class_embeddings=emb
    )


def _idx(ctx: Ctx) -> torch.Tensor:
    return ctx.adapter.residual[ctx.key].indices.clone()


def _val(ctx: Ctx) -> torch.Tensor:
    return ctx.adapter.residual[ctx.key].values.clone()


def _set(t: torch.Tensor, pos: int, value: float) -> torch.Tensor:
    t = t.clone()
    t[pos] = value
    return t


def _swap01(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t[1:2], t[0:1], t[2:]])


def _head(ctx: Ctx, key: str, tensor: torch.Tensor) -> Adapter:
    return dataclasses.replace(ctx.adapter, head={**ctx.adapter.head, key: tensor})


def _meta(ctx: Ctx, **changes: Any) -> Adapter:
    return dataclasses.replace(ctx.adapter, meta=dataclasses.replace(ctx.adapter.meta, **changes))


def _block_adapter(ctx: Ctx) -> tuple[Adapter, str]:
    """A B = 4 block adapter of the tiny base and its parameter with the most blocks."""
    adapter = random_adapter(ctx.net, ctx.sig, "b", density=0.05, seed=3, block_size=4)
    return adapter, max(adapter.residual, key=lambda k: adapter.residual[k].indices.numel())


def _block_of_three(ctx: Ctx) -> bytes:
    adapter, key = _block_adapter(ctx)
    tensors = dict(st_load(encode_adapter(adapter)))
    tensors[f"residual/{key}/values"] = tensors[f"residual/{key}/values"][:, :3].contiguous()
    return st_save(tensors, metadata=_header(encode_adapter(adapter))["__metadata__"])


def _tail_past_end(ctx: Ctx) -> Attempt:
    """The base's parameter ends one position into the adapter's last (full) block of it."""
    adapter, key = _block_adapter(ctx)
    shapes = {**ctx.sig.param_shapes, key: (int(adapter.residual[key].indices[-1]) * 4 + 1,)}
    sig = dataclasses.replace(ctx.sig, param_shapes=shapes)
    meta = dataclasses.replace(adapter.meta, eligible_params=sig.eligible_params)
    return lambda: check_against_base(dataclasses.replace(adapter, meta=meta), sig)


def _deep_json(depth: int) -> bytes:
    return b'{"__metadata__": ' + b"[" * depth + b"]" * depth + b"}"


@dataclasses.dataclass(frozen=True)
class Case:
    rule: str
    name: str
    says: str  # a fragment the message must contain: what is wrong
    make: Callable[[Ctx], Attempt]

    @property
    def id(self) -> str:
        return f"{self.rule}:{self.name}"


CASES: list[Case] = [
    # --- not-safetensors: framing, built by hand
    Case("not-safetensors", "empty-file", "too short", lambda c: _decode(b"")),
    Case("not-safetensors", "seven-bytes", "too short", lambda c: _decode(b"\x10" + b"\0" * 6)),
    Case("not-safetensors", "header-past-end", "runs past the end",
         lambda c: _decode(struct.pack("<Q", 100) + b'{"__metadata__": {}}')),
    Case("not-safetensors", "header-not-utf8", "not UTF-8",
         lambda c: _decode(_raw_file(b'{"\xff\xfe": 1}'))),
    Case("not-safetensors", "header-not-json", "not valid JSON",
         lambda c: _decode(_raw_file(b'{"__metadata__": {'))),
    Case("not-safetensors", "header-json-list", "not a JSON object",
         lambda c: _decode(_raw_file([{"__metadata__": {}}]))),
    Case("not-safetensors", "header-deeply-nested", "header",
         lambda c: _decode(_raw_file(_deep_json(100_000)))),
    Case("not-safetensors", "overlapping-offsets", "overlaps",
         lambda c: _decode(_framed(c, {"head/bn.weight": _entry("F32", [2], 0, 8),
                                       "head/bn.bias": _entry("F32", [2], 4, 12)}, b"\0" * 12))),
    Case("not-safetensors", "gap-between-tensors", "gap",
         lambda c: _decode(_framed(c, {"head/bn.weight": _entry("F32", [2], 0, 8),
                                       "head/bn.bias": _entry("F32", [2], 12, 20)}, b"\0" * 20))),
    Case("not-safetensors", "trailing-bytes", "trailing", lambda c: _decode(c.data + b"\0" * 8)),
    Case("not-safetensors", "missing-bytes", "tensors cover", lambda c: _decode(c.data[:-4])),
    Case("not-safetensors", "offsets-disagree-with-shape", "shape needs",
         lambda c: _decode(_framed(c, {"head/bn.weight": _entry("F32", [3], 0, 8)}, b"\0" * 8))),
    Case("not-safetensors", "unsupported-dtype", "unsupported dtype",
         lambda c: _decode(_framed(c, {"head/bn.weight": _entry("C64", [1], 0, 8)}, b"\0" * 8))),
    Case("not-safetensors", "malformed-entry", "malformed entry",
         lambda c: _decode(_framed(c, {"head/bn.weight": {"dtype": "F32", "shape": [2]}}, b""))),
    # --- size-limit
    Case("size-limit", "file-bytes", "limit",
         lambda c: _decode(c.data, Limits(max_file_bytes=len(c.data) - 1))),
    Case("size-limit", "header-bytes", "header declares",
         lambda c: _decode(c.data, Limits(max_header_bytes=256))),
    Case("size-limit", "absurd-header-length-within-file", "header declares",
         lambda c: _decode(struct.pack("<Q", 9 << 20) + b" " * (9 << 20))),
    Case("size-limit", "tensor-count", "tensors", lambda c: _decode(c.data, Limits(max_tensors=3))),
    Case("size-limit", "class-count", "classes", lambda c: _decode(c.data, Limits(max_classes=2))),
    Case("size-limit", "density", "the limit is",
         lambda c: _check(c, c.adapter, Limits(max_density=0.001))),
    # --- metadata
    Case("metadata", "no-metadata", "__metadata__", lambda c: _decode(st_save(c.tensors))),
    Case("metadata", "integer-value", "strings", lambda c: _decode(_meta_int_value(c))),
    Case("metadata", "missing-key", "created_at", lambda c: _decode(c.without_meta("created_at"))),
    Case("metadata", "wrong-format", "format", lambda c: _decode(c.file(format="other.thing"))),
    Case("metadata", "wrong-format-version", "format_version",
         lambda c: _decode(c.file(format_version="2"))),
    Case("metadata", "task-dotdot", "task name", lambda c: _decode(c.file(task="../evil"))),
    Case("metadata", "task-slash", "task name", lambda c: _decode(c.file(task="a/../b"))),
    Case("metadata", "task-nul", "task name", lambda c: _decode(c.file(task="t\x00x"))),
    Case("metadata", "task-escape-char", "task name", lambda c: _decode(c.file(task="t\x1b[2J"))),
    Case("metadata", "task-trailing-newline", "task name", lambda c: _decode(c.file(task="t\n"))),
    Case("metadata", "fingerprint-not-hex", "base_fingerprint",
         lambda c: _decode(c.file(base_fingerprint="AB" * 32))),
    Case("metadata", "class-names-not-json", "class_names",
         lambda c: _decode(c.file(class_names="cat, dog"))),
    Case("metadata", "class-names-not-list", "class_names",
         lambda c: _decode(c.file(class_names='{"a": 1}'))),
    Case("metadata", "class-names-duplicates", "duplicates",
         lambda c: _decode(c.file(class_names=json.dumps(["a", "b", "c", "d", "a"])))),
    Case("metadata", "head-num-classes", "head",
         lambda c: _decode(c.file(head=json.dumps({**c.adapter.meta.head, "num_classes": 4})))),
    Case("metadata", "residual-dtype", "residual_dtype", lambda c: _decode(c.file(residual_dtype="int8"))),
    Case("metadata", "created-at-not-iso", "created_at",
         lambda c: _decode(c.file(created_at="yesterday at noon"))),
    Case("metadata", "density-not-number", "density", lambda c: _decode(c.file(density="dense"))),
    Case("metadata", "density-inconsistent", "density", lambda c: _decode(c.file(density="0.25"))),
    Case("metadata", "nnz-not-decimal", "nnz", lambda c: _decode(c.file(nnz="-1"))),
    Case("metadata", "nnz-superscript-digit", "nnz", lambda c: _decode(c.file(nnz="\u00b9"))),
    Case("metadata", "nnz-disagrees-with-tensors", "nnz says", lambda c: _decode(_nnz_off_by_one(c))),
    Case("metadata", "train-config-not-object", "train_config",
         lambda c: _decode(c.file(train_config="[1, 2]"))),
    Case("metadata", "eligible-params-beyond-base", "eligible_params",
         lambda c: _check(c, _with_counts(_meta(c, eligible_params=c.sig.eligible_params + 1)))),
    # --- tensor-name
    Case("tensor-name", "dotdot", "not residual/<param>",
         lambda c: _decode(c.renamed_param(f"../{c.key}"))),
    Case("tensor-name", "nul-byte", "\\x00",
         lambda c: _decode(c.renamed_param(f"{c.key}\x00"))),
    Case("tensor-name", "trailing-newline", "not residual/<param>",
         lambda c: _decode(c.renamed_param(f"{c.key}\n"))),
    Case("tensor-name", "unknown-prefix", "not part of format v1",
         lambda c: _decode(c.file({**c.tensors, "extra/blob": torch.zeros(2)}))),
    Case("tensor-name", "unknown-head-tensor", "head",
         lambda c: _decode(c.file({**c.tensors, "head/fc.bias": torch.zeros(5)}))),
    Case("tensor-name", "residual-third-part", "indices|values",
         lambda c: _decode(c.renamed(f"residual/{c.key}/values", f"residual/{c.key}/scales"))),
    # --- residual-pair
    Case("residual-pair", "only-indices", "needs both",
         lambda c: _decode(c.file({k: v for k, v in c.tensors.items()
                                   if k != f"residual/{c.key}/values"}))),
    Case("residual-pair", "only-values", "needs both",
         lambda c: _decode(c.file({k: v for k, v in c.tensors.items()
                                   if k != f"residual/{c.key}/indices"}))),
    # --- indices
    Case("indices-shape", "2-d", "1-D",
         lambda c: _decode(encode_adapter(_edit_residual(c.adapter, c.key, _idx(c).view(1, -1))))),
    Case("indices-dtype", "int16", "int32",
         lambda c: _decode(encode_adapter(_edit_residual(c.adapter, c.key, _idx(c).to(torch.int16))))),
    Case("indices-dtype", "int64-on-small-parameter", "int64",
         lambda c: _check(c, _edit_residual(c.adapter, c.key, _idx(c).to(torch.int64)))),
    Case("indices-negative", "minus-one", "negative index -1",
         lambda c: _decode(encode_adapter(_edit_residual(c.adapter, c.key, _set(_idx(c), 0, -1))))),
    # int32 differences wrap: 2e9 followed by -2e9 "steps up" by 294,967,296 in int32.
    Case("indices-negative", "int32-wraparound", "negative index -2000000000",
         lambda c: _decode(encode_adapter(_edit_residual(
             c.adapter, c.key, _set(_set(_idx(c), 0, 2_000_000_000), 1, -2_000_000_000))))),
    Case("indices-sorted", "swapped", "increasing order",
         lambda c: _decode(encode_adapter(_edit_residual(c.adapter, c.key, _swap01(_idx(c)))))),
    Case("indices-duplicate", "repeated", "appears twice",
         lambda c: _decode(encode_adapter(_edit_residual(
             c.adapter, c.key, _set(_idx(c), 1, int(_idx(c)[0])))))),
    Case("indices-range", "numel", "out of range",
         lambda c: _check(c, _edit_residual(c.adapter, c.key,
                                            _set(_idx(c), -1, c.sig.numel(c.key))))),
    # --- values
    Case("values-dtype", "bf16-declared-fp32", "metadata says float32",
         lambda c: _decode(encode_adapter(_edit_residual(c.adapter, c.key, values=_val(c).bfloat16())))),
    Case("values-length", "one-short", "values for",
         lambda c: _decode(encode_adapter(_edit_residual(c.adapter, c.key, values=_val(c)[:-1])))),
    Case("values-length", "2-d", "values for",
         lambda c: _decode(encode_adapter(_edit_residual(c.adapter, c.key,
                                                         values=_val(c).view(1, -1))))),
    Case("values-finite", "nan-value", "NaN or Inf",
         lambda c: _decode(encode_adapter(_edit_residual(c.adapter, c.key,
                                                         values=_set(_val(c), 2, math.nan))))),
    Case("values-finite", "inf-in-head", "head/ln.weight",
         lambda c: _decode(encode_adapter(_head(c, "ln.weight", _set(c.adapter.head["ln.weight"], 0, math.inf))))),
    Case("values-finite", "nan-in-class-embeddings", "text/class_embeddings",
         lambda c: _decode(encode_adapter(dataclasses.replace(
             c.adapter, class_embeddings=torch.full((5, c.sig.embed_dim), math.nan))))),
    # --- head-shape
    Case("head-shape", "fc-weight-rows", "head/fc.weight",
         lambda c: _decode(encode_adapter(_head(c, "fc.weight", torch.zeros(4, c.sig.embed_dim))))),
    Case("head-shape", "head-dtype", "head/bn.weight",
         lambda c: _decode(encode_adapter(_head(c, "bn.weight", c.adapter.head["bn.weight"].double())))),
    Case("head-shape", "missing-head-tensor", "ln.bias",
         lambda c: _decode(encode_adapter(dataclasses.replace(
             c.adapter, head={k: v for k, v in c.adapter.head.items() if k != "ln.bias"})))),
    Case("head-shape", "class-embeddings-shape", "text/class_embeddings",
         lambda c: _decode(encode_adapter(dataclasses.replace(
             c.adapter, class_embeddings=torch.zeros(5, c.sig.embed_dim + 1))))),
    Case("head-shape", "dim-differs-from-base", "embedding size",
         lambda c: _check(c, _head_dim_16(c))),
    # --- the block form (every block rule: tests/unit/test_codec_blocks.py)
    Case("block-size", "block-of-three", "block size 3", lambda c: _decode(_block_of_three(c))),
    Case("blocks-tail", "value-past-the-end", "past the parameter's end", _tail_past_end),
    # --- base-dependent
    Case("unknown-parameter", "visual.nope.weight", "visual.nope.weight",
         lambda c: _check(c, _unknown_parameter(c))),
    Case("fingerprint", "other-base", "fingerprint",
         lambda c: _check(c, _meta(c, base_fingerprint="0" * 64))),
    Case("base-names", "other-model-name", "'no-such-model'",
         lambda c: _check(c, _meta(c, base_model="no-such-model"))),
    Case("base-names", "other-pretrained-name", "this base's, deltaclip-tiny/random",
         lambda c: _check(c, _meta(c, base_pretrained="openai"))),
]  # fmt: skip


def test_every_rule_has_a_crafted_file() -> None:
    assert {case.rule for case in CASES} == set(RULES)
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_rule(ctx: Ctx, case: Case) -> None:
    attempt = case.make(ctx)
    with pytest.raises(InvalidAdapter) as exc:
        attempt()
    err = exc.value
    assert err.rule == case.rule, f"expected rule {case.rule!r}, got {err.rule!r}: {err}"
    assert str(err).startswith(f"[{case.rule}] ")
    assert case.says in str(err), f"message {str(err)!r} does not say {case.says!r}"
    if case.rule == "fingerprint":
        assert isinstance(err, IncompatibleBase)
        assert ctx.sig.fingerprint[:12] in str(err), "the message names this base's fingerprint"
    if case.rule == "size-limit":
        assert isinstance(err, AdapterTooLarge)


def test_base_dependent_cases_pass_decode_alone(ctx: Ctx) -> None:
    """The rules that need the base are not confused with the file being malformed."""
    decode_adapter(encode_adapter(_unknown_parameter(ctx)))
    decode_adapter(encode_adapter(_meta(ctx, base_fingerprint="0" * 64)))
    decode_adapter(encode_adapter(_edit_residual(ctx.adapter, ctx.key, _idx(ctx).to(torch.int64))))


# ------------------------------------------------------------------- merge definition


# A float32 delta that the base dtype cannot hold, chosen so that adding it at full precision to
# a base weight of 1.0 rounds *up* by one ulp, while casting it to the base dtype first gives an
# exact tie that rounds back to 1.0: only the format's definition yields 1 + ulp.
#   bf16 (8 significant bits): ulp(1) = 2**-7, delta = 2**-8 * (1 + 2**-10)
#   fp16 (11 significant bits): ulp(1) = 2**-10, delta = 2**-11 * (1 + 2**-12)
# (the extra bit is below the base dtype's precision but within float32's for the sum).
TIE_BREAKERS = {
    torch.bfloat16: (2.0**-8 * (1 + 2.0**-10), 1 + 2.0**-7),
    torch.float16: (2.0**-11 * (1 + 2.0**-12), 1 + 2.0**-10),
}


@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "value_dtype",
    [torch.float32, torch.bfloat16, torch.float16],
    ids=["v-fp32", "v-bf16", "v-fp16"],
)
def test_merge_tensor_definition(base_dtype: torch.dtype, value_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 11, generator=g).to(base_dtype)
    base.view(-1)[0] = 1.0
    indices = torch.tensor([0, 3, 4, 17, 40, 65], dtype=torch.int32)
    delta, rounded_up = TIE_BREAKERS[base_dtype]
    # deltas from tiny (lost when rounding to the base dtype) to large
    values = torch.tensor([delta, -3e-3, 0.02, -0.7, 1.5, 2e-6]).to(value_dtype)
    base_before, indices_before, values_before = base.clone(), indices.clone(), values.clone()

    merged = merge_tensor(base, Residual(indices, values))

    assert merged.dtype == base_dtype and merged.shape == base.shape
    assert merged.data_ptr() != base.data_ptr()
    expected = base.clone().view(-1)
    for i, v in zip(indices.tolist(), values, strict=True):
        expected[i] = (base.view(-1)[i].float() + v.float()).to(base_dtype)
    assert_bitwise_equal(merged.view(-1), expected, "merged")
    if value_dtype == torch.float32:
        assert merged.view(-1)[0].item() == rounded_up, "the sum must be taken in float32"
    listed = torch.zeros(base.numel(), dtype=torch.bool)
    listed[indices.long()] = True
    assert_bitwise_equal(merged.view(-1)[~listed], base.view(-1)[~listed], "untouched positions")
    assert not torch.equal(_bits(merged.view(-1)[listed]), _bits(base.view(-1)[listed]))
    for before, after in ((base_before, base), (indices_before, indices), (values_before, values)):
        assert_bitwise_equal(after, before, "input")


def test_merge_state_definition_and_inputs_untouched() -> None:
    g = torch.Generator().manual_seed(4)
    base_state = {
        "visual.a.weight": torch.randn(4, 5, generator=g).bfloat16(),
        "visual.b.weight": torch.randn(7, generator=g).half(),
        "visual.c.weight": torch.randn(3, generator=g),
    }
    base_state["visual.a.weight"].view(-1)[1] = 1.0
    base_state["visual.b.weight"][0] = 1.0
    snapshot = {k: v.clone() for k, v in base_state.items()}
    residual = {
        "visual.a.weight": Residual(
            torch.tensor([1, 19], dtype=torch.int32),
            torch.tensor([TIE_BREAKERS[torch.bfloat16][0], -0.123456789]),
        ),
        "visual.b.weight": Residual(
            torch.tensor([0, 6], dtype=torch.int32),
            torch.tensor([TIE_BREAKERS[torch.float16][0], 3.14159265]),
        ),
    }
    meta = AdapterMeta(
        task="m", base_model="m", base_pretrained="p", base_fingerprint="ab" * 32,
        class_names=["x"], head={}, residual_dtype="float32", nnz=4, eligible_params=30, density=4 / 30,
    )  # fmt: skip
    adapter = Adapter(meta=meta, residual=residual, head={})

    merged = merge_state(base_state, adapter)

    assert sorted(merged) == sorted(base_state)
    for key, res in residual.items():
        expected = snapshot[key].clone().view(-1)
        for i, v in zip(res.indices.tolist(), res.values.tolist(), strict=True):
            expected[i] = (snapshot[key].view(-1)[i].float() + v).to(snapshot[key].dtype)
        assert_bitwise_equal(merged[key].view(-1), expected, key)
    assert merged["visual.a.weight"].view(-1)[1].item() == TIE_BREAKERS[torch.bfloat16][1]
    assert merged["visual.b.weight"][0].item() == TIE_BREAKERS[torch.float16][1]
    assert_bitwise_equal(merged["visual.c.weight"], snapshot["visual.c.weight"], "unchanged key")
    for key in base_state:
        assert_bitwise_equal(base_state[key], snapshot[key], f"input {key}")

    bad = Adapter(meta=meta, residual={"visual.zzz": residual["visual.a.weight"]}, head={})
    with pytest.raises(KeyError, match=r"visual\.zzz"):
        merge_state(base_state, bad)


# ------------------------------------------------------------------------- build_adapter


def _build(base: dict[str, torch.Tensor], task: dict[str, torch.Tensor], **kw: Any) -> Adapter:
    return build_adapter(
        base,
        task,
        AdapterInfo(
            task="b",
            base_model="m",
            base_pretrained="p",
            base_fingerprint="ab" * 32,
            class_names=["x", "y"],
            created_at=CREATED_AT,
        ),
        head_state=_tiny_head(8, 2),
        **kw,
    )


def test_build_adapter_mask_stores_only_masked_positions() -> None:
    g = torch.Generator().manual_seed(5)
    base = {"visual.w": torch.randn(10, 10, generator=g), "visual.v": torch.randn(8, generator=g)}
    task = {k: v * 1.5 for k, v in base.items()}  # every position changes
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[2, 3] = mask[7, 0] = mask[9, 9] = True

    adapter = _build(base, task, mask={"visual.w": mask})

    assert adapter.residual["visual.w"].indices.tolist() == [23, 70, 99]
    assert adapter.residual["visual.w"].indices.dtype == torch.int32
    assert adapter.residual["visual.v"].indices.tolist() == list(range(8)), "unmasked keys keep all"
    assert adapter.meta.nnz == 11
    assert adapter.meta.eligible_params == 108
    assert adapter.meta.density == 11 / 108
    merged = merge_state(base, adapter)
    assert_bitwise_equal(merged["visual.w"][mask], task["visual.w"][mask], "masked")
    assert_bitwise_equal(merged["visual.w"][~mask], base["visual.w"][~mask], "outside the mask")


@pytest.mark.parametrize(
    ("residual_dtype", "tiny_base"),
    [(torch.bfloat16, 1e-38), (torch.float16, 0.125)],
    ids=["bf16", "fp16"],
)
def test_build_adapter_drops_deltas_that_round_to_zero(
    residual_dtype: torch.dtype, tiny_base: float
) -> None:
    base_w = torch.tensor([tiny_base, 1.0, 2.0, -3.0])
    task_w = base_w.clone()
    task_w[0] = torch.nextafter(base_w[0], torch.tensor(math.inf))  # a 1-ulp fp32 change
    task_w[1] = 1.5
    task_w[3] = -2.0
    assert float(task_w[0] - base_w[0]) != 0.0
    assert float((task_w[0].double() - base_w[0].double()).to(residual_dtype)) == 0.0

    low = _build({"visual.w": base_w}, {"visual.w": task_w}, residual_dtype=residual_dtype)
    assert low.residual["visual.w"].indices.tolist() == [1, 3]
    assert low.residual["visual.w"].values.dtype == residual_dtype
    assert low.residual["visual.w"].values.float().tolist() == [0.5, 1.0]
    assert low.meta.nnz == 2 and low.meta.residual_dtype == str(residual_dtype).removeprefix(
        "torch."
    )

    exact = _build({"visual.w": base_w}, {"visual.w": task_w})
    assert exact.residual["visual.w"].indices.tolist() == [0, 1, 3]
    assert_bitwise_equal(merge_state({"visual.w": base_w}, exact)["visual.w"], task_w, "fp32 merge")


def test_build_adapter_skips_unchanged_parameters() -> None:
    base = {"visual.w": torch.ones(4), "visual.v": torch.ones(3)}
    task = {"visual.w": torch.ones(4), "visual.v": torch.tensor([1.0, 2.0, 1.0])}
    adapter = _build(base, task)
    assert sorted(adapter.residual) == ["visual.v"]
    assert adapter.meta.nnz == 1 and adapter.meta.eligible_params == 7


@pytest.mark.parametrize(
    "task_w",
    [torch.ones(3, 4), torch.ones(12), torch.ones(4, 3, dtype=torch.float64)],
    ids=["transposed-shape", "flattened-shape", "other-dtype"],
)
def test_build_adapter_rejects_mismatched_tensors(task_w: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="does not match base"):
        _build({"visual.w": torch.zeros(4, 3)}, {"visual.w": task_w})


def test_build_adapter_rejects_other_problems() -> None:
    base = {"visual.w": torch.zeros(4), "visual.v": torch.zeros(2)}
    with pytest.raises(ValueError, match="not an eligible parameter"):
        _build(
            base,
            {"visual.w": torch.ones(4), "visual.v": torch.ones(2)},
            eligible={"visual.w": base["visual.w"]},
        )
    with pytest.raises(ValueError, match="residual dtype"):
        _build(base, dict(base), residual_dtype=torch.float64)
    with pytest.raises(ValueError, match="not finite"):
        _build(
            base, {"visual.w": torch.tensor([0.0, math.inf, 0.0, 0.0]), "visual.v": torch.zeros(2)}
        )


def test_the_format_package_exports_its_public_surface() -> None:
    import adapters_store.format as fmt
    from adapters_store.format import codec, servable

    assert len(fmt.__all__) == len(set(fmt.__all__)) >= 20
    for name in fmt.__all__:
        assert getattr(fmt, name) is not None, name
    assert fmt.encode_adapter is codec.encode_adapter and fmt.RULES is codec.RULES
    assert fmt.check_servable is servable.check_servable
    with pytest.raises(AttributeError):
        _ = fmt.no_such_name


def test_the_metadata_schema_imports_without_torch() -> None:
    import subprocess
    import sys

    code = "import sys, adapters_store.format.schema; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
