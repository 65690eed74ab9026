"""Adding one task's prepared delta (:mod:`server.corrections`) to its rows of an activation.

Every function here adds in place to ``out``, only at the batch rows ``rows`` (int64, on the
activation's device) and only at the features the delta touches; products are computed in
float32 and rounded once into the activation's dtype. The features sit either on the last
dimension (Linear, attention, LayerNorm, embeddings: ``[B, …, F]``) or on dimension 1
(convolutions and BatchNorm: ``[B, C, H, W]``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .corrections import MatrixDelta, VectorDelta


def _put_last(out: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor, v: torch.Tensor) -> None:
    """``out[rows, …, idx] += v`` with ``v`` shaped ``[n, T, |idx|]`` (T: the middle dims)."""
    o3 = out.view(out.shape[0], -1, out.shape[-1])
    tok = torch.arange(o3.shape[1], device=out.device)
    index = (rows.view(-1, 1, 1), tok.view(1, -1, 1), idx.view(1, 1, -1))
    o3.index_put_(index, v.to(out.dtype), accumulate=True)


def _put_channels(
    out: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor, v: torch.Tensor
) -> None:
    """``out[rows, idx, …] += v`` with ``v`` shaped ``[n, |idx|, L]`` (L: the spatial dims)."""
    o3 = out.view(out.shape[0], out.shape[1], -1)
    sp = torch.arange(o3.shape[2], device=out.device)
    index = (rows.view(-1, 1, 1), idx.view(1, -1, 1), sp.view(1, 1, -1))
    o3.index_put_(index, v.to(out.dtype), accumulate=True)


def linear(out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, d: MatrixDelta) -> None:
    """``out += x @ ΔWᵀ`` on ``rows`` (features on the last dimension of ``x`` and ``out``)."""
    n = rows.numel()
    xs = x.index_select(0, rows).reshape(-1, x.shape[-1]).index_select(1, d.in_idx)
    corr = d.csr @ xs.float().T.contiguous()  # [|V|, n·T]
    _put_last(out, rows, d.out_idx, corr.T.reshape(n, -1, corr.shape[0]))


def vector_last(out: torch.Tensor, rows: torch.Tensor, d: VectorDelta) -> None:
    """``out += Δb`` on ``rows`` along the last dimension (a bias)."""
    o3 = out.view(out.shape[0], -1, out.shape[-1])
    v = d.values.view(1, 1, -1).expand(rows.numel(), o3.shape[1], -1)
    _put_last(out, rows, d.idx, v)


def vector_flat(out: torch.Tensor, rows: torch.Tensor, d: VectorDelta) -> None:
    """``out.view(B, -1)[rows, idx] += Δ``: a delta over a row's flattened positions (ViT's
    class and positional embeddings on the token stream ``[B, T, D]``)."""
    flat = out.view(out.shape[0], -1)
    v = d.values.view(1, -1).expand(rows.numel(), -1).to(out.dtype)
    flat.index_put_((rows.view(-1, 1), d.idx.view(1, -1)), v, accumulate=True)


def vector_channels(out: torch.Tensor, rows: torch.Tensor, d: VectorDelta) -> None:
    """``out += Δb`` on ``rows`` along dimension 1 (a convolution's or BatchNorm's bias)."""
    spatial = out[0, 0].numel()
    v = d.values.view(1, -1, 1).expand(rows.numel(), -1, spatial)
    _put_channels(out, rows, d.idx, v)


def conv(
    out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, d: MatrixDelta, geometry: ConvGeometry
) -> None:
    """``out += conv(x, ΔW)`` on ``rows``, as a sparse product over the input's patches (only the
    input channels the delta reads are unfolded)."""
    n = rows.numel()
    xs = x.index_select(0, rows).index_select(1, d.in_idx).float()
    if geometry.same:
        xs = geometry.pad(xs)
    cols = F.unfold(xs, geometry.kernel, geometry.dilation, geometry.padding, geometry.stride)
    k, length = cols.shape[1], cols.shape[2]
    corr = d.csr @ cols.transpose(0, 1).reshape(k, n * length)  # [|V|, n·L]
    _put_channels(out, rows, d.out_idx, corr.view(-1, n, length).transpose(0, 1))


def layer_norm_weight(
    out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, d: VectorDelta, eps: float
) -> None:
    """``out += x̂ · Δγ`` on ``rows``, ``x̂`` the input normalised over its last dimension."""
    xs = x.index_select(0, rows).float()
    xhat = F.layer_norm(xs, (xs.shape[-1],), eps=eps)
    xhat = xhat.view(rows.numel(), -1, xs.shape[-1]).index_select(2, d.idx)
    _put_last(out, rows, d.idx, xhat * d.values)


def batch_norm_weight(
    out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, d: VectorDelta, stats: BatchStats
) -> None:
    """``out += x̂ · Δγ`` on ``rows``, ``x̂ = (x − mean) / √(var + eps)`` with the running stats
    (eval mode), only at the changed channels."""
    xs = x.index_select(0, rows).index_select(1, d.idx).float()
    mean = stats.mean.index_select(0, d.idx).float().view(1, -1, 1, 1)
    var = stats.var.index_select(0, d.idx).float().view(1, -1, 1, 1)
    xhat = (xs - mean) * torch.rsqrt(var + stats.eps)
    _put_channels(out, rows, d.idx, (xhat * d.values.view(1, -1, 1, 1)).flatten(2))


class ConvGeometry:
    """A convolution's kernel, stride, padding and dilation (``same``: TensorFlow-style dynamic
    padding, applied to the input by ``pad`` before an unpadded convolution)."""

    def __init__(self, module: torch.nn.Conv2d, same_pad: object | None) -> None:
        self.kernel: tuple[int, ...] = tuple(module.kernel_size)
        self.stride: tuple[int, ...] = tuple(module.stride)
        self.dilation: tuple[int, ...] = tuple(module.dilation)
        padding = (0, 0) if same_pad is not None else module.padding
        self.padding: tuple[int, ...] = tuple(int(p) for p in padding)
        self.same = same_pad is not None
        self._pad: Any = same_pad

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        return self._pad(x, list(self.kernel), list(self.stride), list(self.dilation))


class BatchStats:
    """A BatchNorm's running statistics and eps, read at call time (they are buffers)."""

    def __init__(self, module: torch.nn.BatchNorm2d) -> None:
        self.module = module

    @property
    def mean(self) -> torch.Tensor:
        return self.module.running_mean  # type: ignore[return-value]

    @property
    def var(self) -> torch.Tensor:
        return self.module.running_var  # type: ignore[return-value]

    @property
    def eps(self) -> float:
        return float(self.module.eps)
