"""Format v1's block form: round trip, merge, and one crafted file per rule a block file can break.

A block residual is ``residual/<P>/blocks`` (int32 block ids, strictly increasing) with
``values`` ``[n_blocks, B]``; its ids are checked as strictly as the unstructured indices, and a
tail block may carry nothing past its parameter's end (docs/FORMAT.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from adapters_store.adapter import (
    Adapter,
    AdapterInfo,
    Residual,
    build_adapter,
    merge_state,
    merge_tensor,
)
from adapters_store.bases import BaseSignature
from adapters_store.errors import InvalidAdapter
from adapters_store.format.codec import check_against_base, decode_adapter, encode_adapter
from adapters_store.format.framing import Limits
from adapters_store.format.schema import encode_meta
from adapters_store.head import TaskHead
from adapters_store.synthetic import random_adapter, random_task_state

Tiny = tuple[nn.Module, BaseSignature]
B = 4


@dataclasses.dataclass(frozen=True)
class BlockCtx:
    sig: BaseSignature
    adapter: Adapter
    tensors: dict[str, torch.Tensor]
    meta: dict[str, str]
    key: str  # the residual parameter with the most blocks

    def file(self, **edits: torch.Tensor | None) -> bytes:
        """The adapter's file with tensors of ``self.key`` replaced (``None`` drops one)."""
        tensors = dict(self.tensors)
        for part, value in edits.items():
            name = f"residual/{self.key}/{part}"
            if value is None:
                tensors.pop(name)
            else:
                tensors[name] = value
        return st_save(tensors, metadata=self.meta)

    @property
    def blocks(self) -> torch.Tensor:
        return self.tensors[f"residual/{self.key}/blocks"].clone()

    @property
    def values(self) -> torch.Tensor:
        return self.tensors[f"residual/{self.key}/values"].clone()


@pytest.fixture(scope="module")
def bctx(tiny: Tiny) -> BlockCtx:
    net, sig = tiny
    adapter = random_adapter(net, sig, "blocks", density=0.05, seed=3, block_size=B)
    data = encode_adapter(adapter)
    key = max(adapter.residual, key=lambda k: adapter.residual[k].indices.numel())
    assert adapter.residual[key].indices.numel() >= 4
    return BlockCtx(sig, adapter, dict(st_load(data)), encode_meta(adapter.meta), key)


def test_block_round_trip_and_merge_are_exact(tiny: Tiny) -> None:
    net, sig = tiny
    for residual_dtype in (torch.float32, torch.bfloat16):
        for block_size in (2, 4, 8, 16):
            base, task = random_task_state(net, 0.03, seed=block_size, block_size=block_size)
            adapter = build_adapter(
                base,
                task,
                AdapterInfo(
                    task="b",
                    base_model=sig.model,
                    base_pretrained=sig.pretrained,
                    base_fingerprint=sig.fingerprint,
                    class_names=["a", "b"],
                ),
                head_state=TaskHead(sig.embed_dim, 2).state_dict(),
                residual_dtype=residual_dtype,
                block_size=block_size,
            )
            data = encode_adapter(adapter)
            decoded = decode_adapter(data)
            check_against_base(decoded, sig)
            assert encode_adapter(decoded) == data, "decode/encode is the identity on bytes"
            assert decoded.block_size == block_size
            for key, res in decoded.residual.items():
                assert f"residual/{key}/blocks" in st_load(data)
                assert res.indices.dtype == torch.int32
                assert tuple(res.values.shape) == (res.indices.numel(), block_size)
            assert decoded.meta.nnz == sum(r.values.numel() for r in decoded.residual.values())
            merged = merge_state(base, decoded)
            for key in task:
                if residual_dtype == torch.float32:  # float32 deltas reproduce the task exactly
                    assert torch.equal(merged[key].view(torch.int32), task[key].view(torch.int32))
                unchanged = base[key] == task[key]
                assert torch.equal(  # positions that did not change keep the base's very bits
                    merged[key][unchanged].view(torch.int32), base[key][unchanged].view(torch.int32)
                ), key


def test_unchanged_positions_in_a_block_are_negative_zero() -> None:
    base = {"visual.w": torch.tensor([0.0, -0.0, 1.0, 2.0, 3.0, 4.0])}
    task = {"visual.w": torch.tensor([0.0, -0.0, 1.5, 2.0, 3.0, 4.0])}
    adapter = build_adapter(
        base,
        task,
        AdapterInfo(
            task="z",
            base_model="m",
            base_pretrained="p",
            base_fingerprint="a" * 64,
            class_names=["a"],
        ),
        head_state=TaskHead(4, 1).state_dict(),
        block_size=4,
    )
    res = adapter.residual["visual.w"]
    assert res.indices.tolist() == [0] and res.values[0].tolist() == [0.0, 0.0, 0.5, 0.0]
    assert torch.signbit(res.values[0]).tolist() == [True, True, False, True]
    merged = merge_state(base, adapter)["visual.w"]
    assert torch.equal(merged.view(torch.int32), task["visual.w"].view(torch.int32))


Attempt = Callable[[], object]


def _decode(data: bytes) -> Attempt:
    return lambda: decode_adapter(data, Limits())


def _against(
    c: BlockCtx, sig: BaseSignature, residual: dict[str, Residual] | None = None
) -> Attempt:
    def run() -> None:
        adapter = decode_adapter(encode_adapter(c.adapter))
        if residual is not None:
            adapter = dataclasses.replace(adapter, residual=residual)
        eligible = min(adapter.meta.eligible_params, sig.eligible_params)  # a shortened base
        adapter.meta = dataclasses.replace(adapter.meta, eligible_params=eligible)
        check_against_base(adapter, sig)

    return run


def _shortened(c: BlockCtx, keep: int) -> BaseSignature:
    """The tiny base's signature with ``c.key`` cut to end ``keep`` positions into its last block."""
    last = int(c.blocks[-1])
    shapes = dict(c.sig.param_shapes)
    shapes[c.key] = (last * B + keep,)
    return dataclasses.replace(c.sig, param_shapes=shapes)


def _set(t: torch.Tensor, pos: int, value: int) -> torch.Tensor:
    t[pos] = value
    return t


CASES: list[tuple[str, str, Callable[[BlockCtx], Attempt]]] = [
    ("residual-pair", "blocks-without-values", lambda c: _decode(c.file(values=None))),
    ("residual-pair", "blocks-and-indices", lambda c: _decode(c.file(indices=c.blocks))),
    ("indices-shape", "blocks-2d", lambda c: _decode(c.file(blocks=c.blocks[:4].reshape(2, 2)))),
    ("indices-dtype", "blocks-float", lambda c: _decode(c.file(blocks=c.blocks.float()))),
    ("indices-dtype", "blocks-int64-small-param",
     lambda c: _against(c, c.sig, {**c.adapter.residual, c.key: Residual(c.blocks.long(), c.values, B)})),
    ("indices-negative", "negative-block", lambda c: _decode(c.file(blocks=_set(c.blocks, 0, -1)))),
    ("indices-sorted", "blocks-unsorted", lambda c: _decode(c.file(blocks=c.blocks.flip(0)))),
    ("indices-duplicate", "block-twice",
     lambda c: _decode(c.file(blocks=_set(c.blocks, 1, int(c.blocks[0]))))),
    ("indices-range", "block-past-the-end",
     lambda c: _against(c, dataclasses.replace(c.sig, param_shapes={
         **c.sig.param_shapes, c.key: (int(c.blocks[-1]) * B,)}))),
    ("values-dtype", "block-values-float16", lambda c: _decode(c.file(values=c.values.half()))),
    ("values-length", "block-values-1d", lambda c: _decode(c.file(values=c.values.reshape(-1)))),
    ("values-length", "fewer-value-rows", lambda c: _decode(c.file(values=c.values[1:]))),
    ("values-finite", "nan-in-a-block",
     lambda c: _decode(c.file(values=_set(c.values, 0, float("nan"))))),  # type: ignore[arg-type]
    ("block-size", "block-of-three", lambda c: _decode(c.file(values=c.values[:, :3].contiguous()))),
    ("block-size", "block-of-32",
     lambda c: _decode(c.file(values=c.values.repeat(1, 8).contiguous()))),
    ("block-size", "mixed-forms",
     lambda c: _decode(encode_adapter(dataclasses.replace(c.adapter, residual={
         **c.adapter.residual,
         c.key: Residual(c.blocks[:2] * B, c.values[:2, 0].contiguous())})))),
    ("blocks-tail", "value-past-the-end", lambda c: _against(c, _shortened(c, 1))),
]  # fmt: skip


@pytest.mark.parametrize(("rule", "name", "make"), CASES, ids=[f"{r}:{n}" for r, n, _ in CASES])
def test_block_rule(
    bctx: BlockCtx, rule: str, name: str, make: Callable[[BlockCtx], Attempt]
) -> None:
    with pytest.raises(InvalidAdapter) as exc:
        make(bctx)()
    assert exc.value.rule == rule, f"expected {rule!r}, got {exc.value.rule!r}: {exc.value}"
    assert str(exc.value).startswith(f"[{rule}] ")


def test_a_zero_padded_tail_block_is_accepted(bctx: BlockCtx) -> None:
    """The tail rule refuses values past the end, not tail blocks: zeros there are the format."""
    tail = bctx.values
    tail[-1, 1:] = -0.0
    residual = {**bctx.adapter.residual, bctx.key: Residual(bctx.blocks, tail, B)}
    _against(bctx, _shortened(bctx, 1), residual)()
    end = int(bctx.blocks[-1]) * B + 1
    merged = merge_tensor(torch.zeros(end), residual[bctx.key])
    assert merged.numel() == end and float(merged[-1]) == float(tail[-1, 0])
