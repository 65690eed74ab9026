"""Format v1's rules on residual tensors: index layout and order, finite values.

Used by :func:`adapters_store.format.codec.decode_adapter`; every rejection names its rule (``bad``).
"""

from __future__ import annotations

import torch

from ..adapter import Residual, dtype_name
from .framing import bad


def check_index_layout(key: str, idx: torch.Tensor) -> None:
    if idx.dim() != 1:
        raise bad("indices-shape", f"{key}: indices must be 1-D, got shape {tuple(idx.shape)}")
    if idx.dtype not in (torch.int32, torch.int64):
        raise bad(
            "indices-dtype",
            f"{key}: indices must be int32 (int64 for huge parameters), got {dtype_name(idx.dtype)}",
        )


def _check_indices(key: str, idx: torch.Tensor) -> None:
    """Non-negative, strictly increasing (so no duplicates); names the first broken rule."""
    if idx.numel() == 0:
        return
    # Comparisons, not differences: a difference of int32 indices can overflow and pass.
    later, earlier = idx[1:], idx[:-1]
    if bool((idx[0] >= 0) & (later > earlier).all()):
        return
    if int(idx.min()) < 0:
        raise bad("indices-negative", f"{key}: negative index {int(idx.min())}")
    same = later == earlier
    if bool(same.any()):
        raise bad("indices-duplicate", f"{key}: index {int(later[same][0])} appears twice")
    raise bad("indices-sorted", f"{key}: indices are not in increasing order")


def check_residual(residual: dict[str, Residual]) -> None:
    """Index order and finite values over all parameters at once (a few ops on the concatenated
    tensors instead of a few per parameter, ~150 for ViT-B-16); when that finds a fault, the
    per-parameter checks name the parameter and the rule."""
    parts = [(k, r) for k, r in residual.items() if r.nnz]
    if not parts:
        return
    flat = torch.cat([r.indices.to(torch.int64) for _, r in parts])
    increasing = flat[1:] > flat[:-1]
    first = torch.tensor([r.nnz for _, r in parts]).cumsum(0)[:-1]
    increasing[first - 1] = True  # a new parameter starts: its indices restart from 0
    if not bool((flat.min() >= 0) & increasing.all()):
        for key, r in parts:
            _check_indices(key, r.indices)
    values = torch.cat([r.values for _, r in parts])
    if not bool(torch.isfinite(values).all()):
        for key, r in parts:
            check_finite(f"{key} values", r.values)


def check_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise bad("values-finite", f"{name} contains NaN or Inf")
