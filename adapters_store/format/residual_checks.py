"""Format v1's rules on residual tensors: index (or block id) layout and order, finite values.

Used by :func:`adapters_store.format.codec.decode_adapter`; every rejection names its rule (``bad``).
"""

from __future__ import annotations

import torch

from ..adapter import INT32_LIMIT, Residual, dtype_name
from .framing import bad


def check_index_layout(key: str, idx: torch.Tensor, form: str = "indices") -> None:
    """``indices`` (or block ids, ``form="blocks"``) are 1-D int32, int64 only for huge ones."""
    if idx.dim() != 1:
        raise bad("indices-shape", f"{key}: {form} must be 1-D, got shape {tuple(idx.shape)}")
    if idx.dtype not in (torch.int32, torch.int64):
        raise bad(
            "indices-dtype",
            f"{key}: {form} must be int32 (int64 for huge parameters), got {dtype_name(idx.dtype)}",
        )


def check_blocks_against_base(key: str, res: Residual, numel: int) -> None:
    """A block residual of a parameter of ``numel`` elements: int32 ids unless there are 2^31
    blocks or more, every id below ``ceil(numel / B)``, and zeros past the end of a tail block."""
    b = res.block_size
    n_blocks = -(-numel // b)
    if res.indices.dtype == torch.int64 and n_blocks < INT32_LIMIT:
        raise bad(
            "indices-dtype", f"{key}: int64 blocks for {n_blocks} blocks of {b} (int32 required)"
        )
    if not res.nnz:
        return
    last = int(res.indices[-1])
    if last >= n_blocks:
        raise bad(
            "indices-range",
            f"{key}: block {last} is out of range for {numel} elements in blocks of {b}",
        )
    inside = numel - (n_blocks - 1) * b  # positions of the tail block that exist
    if last == n_blocks - 1 and inside < b and bool((res.values[-1, inside:] != 0).any()):
        raise bad(
            "blocks-tail",
            f"{key}: block {last} has non-zero values past the parameter's end ({numel} elements)",
        )


def _check_indices(key: str, idx: torch.Tensor, form: str) -> None:
    """Non-negative, strictly increasing (so no duplicates); names the first broken rule."""
    if idx.numel() == 0:
        return
    one = "index" if form == "indices" else "block"
    # Comparisons, not differences: a difference of int32 indices can overflow and pass.
    later, earlier = idx[1:], idx[:-1]
    if bool((idx[0] >= 0) & (later > earlier).all()):
        return
    if int(idx.min()) < 0:
        raise bad("indices-negative", f"{key}: negative {one} {int(idx.min())}")
    same = later == earlier
    if bool(same.any()):
        raise bad("indices-duplicate", f"{key}: {one} {int(later[same][0])} appears twice")
    raise bad("indices-sorted", f"{key}: {form} are not in increasing order")


def check_residual(residual: dict[str, Residual]) -> None:
    """Index order and finite values over all parameters at once (a few ops on the concatenated
    tensors instead of a few per parameter, ~150 for ViT-B-16); when that finds a fault, the
    per-parameter checks name the parameter and the rule."""
    parts = [(k, r) for k, r in residual.items() if r.nnz]
    if not parts:
        return
    flat = torch.cat([r.indices.to(torch.int64) for _, r in parts])
    increasing = flat[1:] > flat[:-1]
    first = torch.tensor([r.indices.numel() for _, r in parts]).cumsum(0)[:-1]
    increasing[first - 1] = True  # a new parameter starts: its indices restart from 0
    if not bool((flat.min() >= 0) & increasing.all()):
        for key, r in parts:
            _check_indices(key, r.indices, "indices" if r.block_size == 1 else "blocks")
    values = torch.cat([r.values.reshape(-1) for _, r in parts])
    if not bool(torch.isfinite(values).all()):
        for key, r in parts:
            check_finite(f"{key} values", r.values)


def check_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise bad("values-finite", f"{name} contains NaN or Inf")
