"""Exact, fused hot-swap of sparse residuals into a live image tower.

At start-up every parameter of the image tower is moved into one flat buffer per dtype, each at
a 64-byte-aligned offset (one cache line; the gaps are zeros that no parameter sees), and each
``nn.Parameter`` becomes a view into it. An adapter is *prepared* once (off the worker): its
per-parameter positions become global positions in the flat buffer, and the task values
``(W_base.float() + value).to(dtype)`` (docs/FORMAT.md, format v1; in the serving dtype) and the
original values are gathered from a pristine host copy of the base. Patching is then one
``index_copy_`` per dtype, and restoring is the same copy with the saved originals — never a
subtraction, so the base is bit-identical after any number of swaps.

A block adapter (format v1's block form, ``B`` consecutive weights per block) is moved in whole
blocks: because every parameter starts on a 64-byte boundary and ``B × itemsize`` divides 64,
each block is one aligned item of the buffer viewed as ``[n_items, B × itemsize / 8]`` int64, so
patch and restore copy one row of a few machine words per block instead of ``B`` scattered
elements (a tail block's positions past its parameter's end land in the zero gap and carry 0).
On the CPU the rows are written by NumPy's fancy assignment over a ``V<width>`` (raw bytes) view:
one memcpy per block on the calling thread, measured 2-3× faster than ``index_copy_`` on the
int64 rows and without the thread-pool start that makes short copies slow on a busy machine
(docs/BENCHMARKS.md, "Block adapters").
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from adapters_store.adapter import Adapter, Residual

ALIGN_BYTES = 64  # a cache line: every parameter starts here, so whole blocks are whole items
Group = tuple[torch.dtype, int]  # (serving dtype, bytes per moved item) of a block group


@dataclass
class PreparedResidual:
    """One adapter's residual, ready to copy in and out of the flat buffers.

    Unstructured changes, per dtype: global element positions, task and base values. Block
    changes, per (dtype, item width in bytes): global item rows and the task and base items.
    """

    indices: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)
    task_values: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)
    original_values: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)
    block_rows: dict[Group, torch.Tensor] = field(default_factory=dict)
    block_task: dict[Group, torch.Tensor] = field(default_factory=dict)
    block_original: dict[Group, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        tensors: Iterable[torch.Tensor] = [
            *self.indices.values(),
            *self.task_values.values(),
            *self.original_values.values(),
            *self.block_rows.values(),
            *self.block_task.values(),
            *self.block_original.values(),
        ]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def nnz(self) -> int:
        """Weights written per patch (every position of every block for the block form)."""
        blocks = sum(
            t.numel() * t.element_size() // g[0].itemsize for g, t in self.block_task.items()
        )
        return sum(int(t.numel()) for t in self.indices.values()) + blocks


def item_view(flat: torch.Tensor, width: int) -> torch.Tensor:
    """``flat`` (64-byte aligned, a multiple of 64 bytes long) as rows of ``width`` bytes, each
    row one item of the widest integer type that divides it (int64 words for 16 bytes and up)."""
    wide = next(t for t in (torch.int64, torch.int32, torch.int16) if width % t.itemsize == 0)
    return flat.view(wide).view(-1, width // wide.itemsize)


def _aligned_zeros(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``n`` zeros whose first element sits on a 64-byte boundary."""
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.zeros(n + ALIGN_BYTES // size, dtype=dtype, device=device)
    shift = (-raw.data_ptr() % ALIGN_BYTES) // size
    return raw[shift : shift + n]


class FlatPatcher:
    """Owns the flat layout of a tower's parameters; only the serving worker may call
    :meth:`patch` and :meth:`restore`."""

    def __init__(self, tower: nn.Module, prefix: str = "visual.") -> None:
        self.prefix = prefix
        params = list(tower.named_parameters())
        self.flat: dict[torch.dtype, torch.Tensor] = {}
        self.offsets: dict[str, tuple[torch.dtype, int, int]] = {}  # key -> (dtype, start, numel)
        sizes: dict[torch.dtype, int] = {}
        for name, p in params:
            line = ALIGN_BYTES // p.element_size()
            start = -(-sizes.get(p.dtype, 0) // line) * line
            self.offsets[prefix + name] = (p.dtype, start, p.numel())
            sizes[p.dtype] = start + p.numel()
        device = params[0][1].device if params else torch.device("cpu")
        for dtype, n in sizes.items():
            line = ALIGN_BYTES // torch.empty((), dtype=dtype).element_size()
            self.flat[dtype] = _aligned_zeros(-(-n // line) * line, dtype, device)
        with torch.no_grad():
            for name, p in params:
                dtype, start, numel = self.offsets[prefix + name]
                view = self.flat[dtype][start : start + numel].view(p.shape)
                view.copy_(p.data)
                p.data = view
        # Host copy of the untouched base: originals and task values are computed from it, so
        # preparing an adapter never reads the live (possibly patched) weights.
        self.pristine = {
            dtype: buf.detach().to("cpu", copy=True) for dtype, buf in self.flat.items()
        }
        self.device = device
        self._rows: dict[Group, np.ndarray] = {}  # CPU: each block group's buffer as raw items
        # Blocks through NumPy on the CPU; elsewhere (CUDA) one index_copy_ of int64 rows.
        self.numpy_blocks = device.type == "cpu"

    def _items_np(self, group: Group) -> np.ndarray:
        if group not in self._rows:
            dtype, width = group
            raw = self.flat[dtype].view(torch.uint8).numpy()
            self._rows[group] = raw.view(np.dtype(f"V{width}"))
        return self._rows[group]

    def prepare(self, adapter: Adapter) -> PreparedResidual:
        """Global positions plus task/original values, on the serving device (thread-safe)."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        deltas: dict[torch.dtype, list[torch.Tensor]] = {}
        rows: dict[Group, list[torch.Tensor]] = {}
        block_deltas: dict[Group, list[torch.Tensor]] = {}
        for key, res in sorted(adapter.residual.items()):
            if key not in self.offsets:
                raise KeyError(f"the serving tower has no parameter {key}")
            dtype, start, numel = self.offsets[key]
            width = res.block_size * dtype.itemsize
            if res.block_size > 1 and ALIGN_BYTES % width == 0:
                group = (dtype, width)
                first = start * dtype.itemsize // width  # exact: start is 64-byte aligned
                rows.setdefault(group, []).append(res.indices.to(torch.int64) + first)
                block_deltas.setdefault(group, []).append(res.values.float())
                continue
            pos, values = res.positions(numel) if res.block_size > 1 else _unstructured(res)
            by_dtype.setdefault(dtype, []).append(pos + start)
            deltas.setdefault(dtype, []).append(values.float())
        out = PreparedResidual()
        for dtype, parts in by_dtype.items():
            idx = torch.cat(parts)
            base = self.pristine[dtype].index_select(0, idx)  # 2-3× faster than [idx]
            task = (base.float() + torch.cat(deltas[dtype])).to(dtype)
            out.indices[dtype] = idx.to(self.device)
            out.task_values[dtype] = task.to(self.device)
            out.original_values[dtype] = base.to(self.device)
        for (dtype, width), parts in rows.items():
            row = torch.cat(parts)
            base = item_view(self.pristine[dtype], width).index_select(0, row)
            values = base.view(dtype).view(row.numel(), -1)
            task = (values.float() + torch.cat(block_deltas[dtype, width])).to(dtype)
            out.block_rows[dtype, width] = row.to(self.device)
            out.block_task[dtype, width] = item_view(task.reshape(-1), width).to(self.device)
            out.block_original[dtype, width] = base.to(self.device)
        return out

    def _write(
        self,
        prepared: PreparedResidual,
        values: dict[torch.dtype, torch.Tensor],
        items: dict[Group, torch.Tensor],
    ) -> None:
        for dtype, idx in prepared.indices.items():
            self.flat[dtype].index_copy_(0, idx, values[dtype])
        for (dtype, width), row in prepared.block_rows.items():
            if self.numpy_blocks:
                src = items[dtype, width].numpy().view(np.dtype(f"V{width}")).reshape(-1)
                self._items_np((dtype, width))[row.numpy()] = src
            else:
                item_view(self.flat[dtype], width).index_copy_(0, row, items[dtype, width])

    def patch(self, prepared: PreparedResidual) -> None:
        self._write(prepared, prepared.task_values, prepared.block_task)

    def restore(self, prepared: PreparedResidual) -> None:
        self._write(prepared, prepared.original_values, prepared.block_original)

    def reset(self) -> None:
        """Copy the whole pristine base back into the live buffers: the exact base, whatever a
        failed patch or restore left behind (it does not trust any adapter's saved values)."""
        with torch.no_grad():
            for dtype, buf in self.flat.items():
                buf.copy_(self.pristine[dtype])

    def matches(self, prepared: PreparedResidual | None) -> bool:
        """True when the live weights are bit for bit the base with ``prepared`` patched in (the
        base itself for None): the check that the engine's record of what is patched is true.
        Reads only; builds the expected buffers on the host."""
        for dtype, buf in self.flat.items():
            expected = self.pristine[dtype].clone()
            if prepared is not None:
                idx = prepared.indices.get(dtype)
                if idx is not None:
                    expected.index_copy_(0, idx.cpu(), prepared.task_values[dtype].cpu())
                for (group_dtype, width), row in prepared.block_rows.items():
                    if group_dtype == dtype:
                        items = prepared.block_task[dtype, width].cpu()
                        item_view(expected, width).index_copy_(0, row.cpu(), items)
            if not torch.equal(_bits(buf.cpu()), _bits(expected)):
                return False
        return True

    def is_pristine(self) -> bool:
        """True when the live weights equal the loaded base bit for bit."""
        return all(
            torch.equal(_bits(buf.cpu()), _bits(self.pristine[d])) for d, buf in self.flat.items()
        )


def _unstructured(res: Residual) -> tuple[torch.Tensor, torch.Tensor]:
    return res.indices.to(torch.int64), res.values


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits as same-width integers (so NaN == NaN and -0.0 != 0.0)."""
    return t.view(
        {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()]
    )
