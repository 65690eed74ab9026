"""Exact, fused hot-swap of sparse residuals into a live image tower.

At start-up every parameter of the image tower is moved into one flat buffer per dtype, and each
``nn.Parameter`` becomes a view into it. An adapter is *prepared* once (off the worker): its
per-parameter indices become global indices into the flat buffer, and the task values
``(W_base.float() + value).to(dtype)`` (docs/FORMAT.md, format v1; in the serving dtype) and the original
values are gathered from a pristine host copy of the base. Patching is then one ``index_copy_``
per dtype, and restoring is the same copy with the saved originals — never a subtraction, so
the base is bit-identical after any number of swaps.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from adapters_store.adapter import Adapter


@dataclass
class PreparedResidual:
    """One adapter's residual, ready to scatter: per dtype, global indices, task and base values."""

    indices: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)
    task_values: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)
    original_values: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        tensors: Iterable[torch.Tensor] = [
            *self.indices.values(),
            *self.task_values.values(),
            *self.original_values.values(),
        ]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def nnz(self) -> int:
        return sum(int(t.numel()) for t in self.indices.values())


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
            start = sizes.get(p.dtype, 0)
            self.offsets[prefix + name] = (p.dtype, start, p.numel())
            sizes[p.dtype] = start + p.numel()
        device = params[0][1].device if params else torch.device("cpu")
        for dtype, n in sizes.items():
            self.flat[dtype] = torch.empty(n, dtype=dtype, device=device)
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

    def prepare(self, adapter: Adapter) -> PreparedResidual:
        """Global indices plus task/original values, on the serving device (thread-safe)."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        deltas: dict[torch.dtype, list[torch.Tensor]] = {}
        for key, res in sorted(adapter.residual.items()):
            if key not in self.offsets:
                raise KeyError(f"the serving tower has no parameter {key}")
            dtype, start, _ = self.offsets[key]
            by_dtype.setdefault(dtype, []).append(res.indices.to(torch.int64) + start)
            deltas.setdefault(dtype, []).append(res.values.float())
        out = PreparedResidual()
        for dtype, parts in by_dtype.items():
            idx = torch.cat(parts)
            base = self.pristine[dtype].index_select(0, idx)  # 2-3× faster than [idx]
            task = (base.float() + torch.cat(deltas[dtype])).to(dtype)
            out.indices[dtype] = idx.to(self.device)
            out.task_values[dtype] = task.to(self.device)
            out.original_values[dtype] = base.to(self.device)
        return out

    def patch(self, prepared: PreparedResidual) -> None:
        for dtype, idx in prepared.indices.items():
            self.flat[dtype].index_copy_(0, idx, prepared.task_values[dtype])

    def restore(self, prepared: PreparedResidual) -> None:
        for dtype, idx in prepared.indices.items():
            self.flat[dtype].index_copy_(0, idx, prepared.original_values[dtype])

    def is_pristine(self) -> bool:
        """True when the live weights equal the loaded base bit for bit."""
        return all(
            torch.equal(_bits(buf.cpu()), _bits(self.pristine[d])) for d, buf in self.flat.items()
        )


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits as same-width integers (so NaN == NaN and -0.0 != 0.0)."""
    return t.view(
        {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()]
    )
