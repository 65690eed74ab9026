"""The in-place swap rules deltaclip's copy-restore is measured against.

* the per-tensor Python loop deltaclip replaced (``index_add_`` of the delta, ``index_copy_`` of
  the saved originals, one parameter at a time);
* subtract-to-restore on deltaclip's own flat buffers (add the residual, subtract it again), so
  that only the restore rule differs from ``FlatPatcher``.

Both are timed by the swap question and checked for drift by its exactness section.
"""

from __future__ import annotations

from typing import Any

import torch

from adapters_store.adapter import Adapter

Part = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def per_tensor(engine: Any, adapter: Adapter) -> list[Part]:
    """(flat view of the parameter, indices, delta, saved originals) per changed parameter."""
    params = dict(engine.visual.named_parameters())
    out = []
    for key, res in adapter.residual.items():
        flat = params[key.removeprefix("visual.")].detach().view(-1)
        idx = res.indices.to(device=engine.device, dtype=torch.int64)
        out.append((flat, idx, res.values.to(engine.device), flat[idx].clone()))
    return out


def loop_swap(parts: list[Part]) -> None:
    """The per-tensor Python loop deltaclip replaces: index_add the delta, index_copy back."""
    for flat, idx, delta, _ in parts:
        flat.index_add_(0, idx, delta)
    for flat, idx, _, saved in parts:
        flat.index_copy_(0, idx, saved)


def flat_residual(
    patcher: Any, adapter: Adapter
) -> dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]]:
    """Global indices and float32 deltas per flat buffer, in the order ``FlatPatcher.prepare`` uses."""
    idx: dict[torch.dtype, list[torch.Tensor]] = {}
    delta: dict[torch.dtype, list[torch.Tensor]] = {}
    for key, res in sorted(adapter.residual.items()):
        dtype, start, _ = patcher.offsets[key]
        idx.setdefault(dtype, []).append(res.indices.to(torch.int64) + start)
        delta.setdefault(dtype, []).append(res.values.float())
    return {
        d: (torch.cat(idx[d]).to(patcher.device), torch.cat(delta[d]).to(patcher.device))
        for d in idx
    }


class SubtractSwap:
    """Subtract-to-restore on deltaclip's own flat buffers (so only the restore rule differs):
    patch adds the residual, restore subtracts it. ``upcast``: each step computed in float32 and
    rounded once to the serving dtype (the patch then equals the format's task weights exactly);
    otherwise ``index_add_`` of the residual rounded to the serving dtype."""

    def __init__(
        self,
        patcher: Any,
        adapter: Adapter,
        upcast: bool,
        flat: dict[torch.dtype, torch.Tensor] | None = None,
    ) -> None:
        self.flat = patcher.flat if flat is None else flat
        self.upcast = upcast
        self.parts = []
        for dtype, (idx, delta) in flat_residual(patcher, adapter).items():
            self.parts.append((dtype, idx, delta, delta.to(dtype), (-delta).to(dtype)))

    def _step(self, sign: int) -> None:
        for dtype, idx, delta, plus, minus in self.parts:
            buf = self.flat[dtype]
            if self.upcast:
                buf.index_copy_(0, idx, (buf[idx].float() + sign * delta).to(dtype))
            else:
                buf.index_add_(0, idx, plus if sign > 0 else minus)

    def patch(self) -> None:
        self._step(+1)

    def restore(self) -> None:
        self._step(-1)

    def cycle(self) -> None:
        self.patch()
        self.restore()
