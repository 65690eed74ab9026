"""Where each tower parameter enters the forward pass, and how a correction is hooked in there.

A *site* is one module of the image tower together with the parameters it owns. It knows
(1) how a parameter's flat positions become a prepared delta (:mod:`server.corrections`) and
(2) how to add, during one forward pass, each task's delta on that task's rows: a forward hook
on the module's output for Linear, convolutions and LayerNorm; a replacement forward for the
modules whose parameters act *inside* their forward (attention's ``in_proj`` must correct
queries, keys and values before the softmax; timm's ``BatchNormAct2d`` applies its activation
after the affine step); a pre-hook on ``ln_pre`` for ViT's class and positional embeddings; a
hook on the tower for ViT's output projection. Hooks exist only during a mixed forward pass and
are removed however it ends.

Parameters of any other kind of module have no site: an adapter that changes one is not mixable
and is always served by the patched path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, Conv2dSame, pad_same  # EfficientNet's layers
from torch import nn

from . import apply
from .corrections import Delta, MatrixLayout, NotMixable, matrix_delta, vector_delta

Work = list[tuple[apply.Rows, dict[str, Delta]]]
"""For one forward pass at one site: per run of consecutive rows of one task, the run
``(start, count)`` and the task's deltas by role."""


class Handle:
    """Undoes one installed hook or forward override."""

    def __init__(self, undo: Callable[[], None]) -> None:
        self.remove = undo


def _override(module: nn.Module, forward: Callable[..., Any]) -> Handle:
    if "forward" in module.__dict__:
        raise NotMixable(f"{type(module).__name__} already has an instance forward")
    module.forward = forward
    return Handle(lambda: module.__dict__.pop("forward", None))


class Site:
    """One module and the parameters it owns: ``roles`` maps a parameter's key to its role."""

    def __init__(self, module: nn.Module, roles: dict[str, str]) -> None:
        self.module = module
        self.roles = roles

    def delta(
        self, role: str, pos: torch.Tensor, values: torch.Tensor, device: torch.device
    ) -> Delta:
        layout = self.layout(role)
        if layout is None:
            return vector_delta(pos, values, device)
        return matrix_delta(pos, values, layout, device)

    def layout(self, role: str) -> MatrixLayout | None:
        """The matrix layout of a weight role; None for an elementwise (vector) role."""
        return None

    def install(self, work: Work) -> list[Handle]:
        raise NotImplementedError


class LinearSite(Site):
    def layout(self, role: str) -> MatrixLayout | None:
        w: torch.Tensor = self.module.weight  # type: ignore[assignment]
        return MatrixLayout(w.shape[0], w.shape[1]) if role == "weight" else None

    def install(self, work: Work) -> list[Handle]:
        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            for rows, deltas in work:
                if "weight" in deltas:
                    apply.linear(out, args[0], rows, deltas["weight"])  # type: ignore[arg-type]
                if "bias" in deltas:
                    apply.vector_last(out, rows, deltas["bias"])  # type: ignore[arg-type]

        h = self.module.register_forward_hook(hook)
        return [Handle(h.remove)]


class ConvSite(Site):
    def __init__(self, module: nn.Conv2d, roles: dict[str, str]) -> None:
        super().__init__(module, roles)
        if not isinstance(module.padding, tuple) or module.padding_mode != "zeros":
            raise NotMixable("convolution padding")
        same = isinstance(module, Conv2dSame)
        self.geometry = apply.ConvGeometry(module, pad_same if same else None)

        one = (1, 1)
        kernel, stride = tuple(module.kernel_size), tuple(module.stride)
        unpadded = self.geometry.padding == (0, 0)
        self.pointwise = kernel == one and stride == one and module.groups == 1 and unpadded

    def layout(self, role: str) -> MatrixLayout | None:
        if role != "weight":
            return None
        w: torch.Tensor = self.module.weight  # type: ignore[assignment]
        if self.pointwise:  # a Linear over channels: the full-width form
            return MatrixLayout(w.shape[0], w.shape[1])
        conv: nn.Conv2d = self.module  # type: ignore[assignment]
        return MatrixLayout(w.shape[0], w.shape[1], conv.groups, w.shape[2] * w.shape[3], conv=True)

    def install(self, work: Work) -> list[Handle]:
        geometry = self.geometry

        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            for rows, deltas in work:
                d: Any = deltas.get("weight")
                if d is not None and d.full:  # a 1×1 convolution's full-width delta
                    apply.pointwise(out, args[0], rows, d)
                elif d is not None:
                    apply.conv(out, args[0], rows, d, geometry)
                if "bias" in deltas:
                    apply.vector_channels(out, rows, deltas["bias"])  # type: ignore[arg-type]

        h = self.module.register_forward_hook(hook)
        return [Handle(h.remove)]


class LayerNormSite(Site):
    def install(self, work: Work) -> list[Handle]:
        eps = float(self.module.eps)  # type: ignore[arg-type]

        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            for rows, deltas in work:
                if "weight" in deltas:
                    apply.layer_norm_weight(out, args[0], rows, deltas["weight"], eps)  # type: ignore[arg-type]
                if "bias" in deltas:
                    apply.vector_last(out, rows, deltas["bias"])  # type: ignore[arg-type]

        h = self.module.register_forward_hook(hook)
        return [Handle(h.remove)]


class BatchNormSite(Site):
    """BatchNorm2d in eval mode; timm's ``BatchNormAct2d`` (affine, then its dropout and
    activation) gets a replacement forward so the correction lands before the activation."""

    def __init__(self, module: nn.BatchNorm2d, roles: dict[str, str]) -> None:
        super().__init__(module, roles)
        if module.running_mean is None or module.running_var is None:
            raise NotMixable("BatchNorm without running statistics")
        self.stats = apply.BatchStats(module)
        self.fused = isinstance(module, BatchNormAct2d)

    def _correct(self, out: torch.Tensor, x: torch.Tensor, work: Work) -> None:
        for rows, deltas in work:
            if "weight" in deltas:
                apply.batch_norm_weight(out, x, rows, deltas["weight"], self.stats)  # type: ignore[arg-type]
            if "bias" in deltas:
                apply.vector_channels(out, rows, deltas["bias"])  # type: ignore[arg-type]

    def install(self, work: Work) -> list[Handle]:
        bn: Any = self.module
        if bn.training:
            raise NotMixable("BatchNorm in training mode")
        if not self.fused:

            def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
                self._correct(out, args[0], work)

            h = bn.register_forward_hook(hook)
            return [Handle(h.remove)]

        def forward(x: torch.Tensor) -> torch.Tensor:
            y = F.batch_norm(
                x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
            )
            self._correct(y, x, work)
            return bn.act(bn.drop(y))

        return [_override(bn, forward)]


class AttentionSite(Site):
    """``nn.MultiheadAttention`` (self-attention, packed ``in_proj``): a replacement forward that
    corrects the packed q/k/v projection before attention and the output projection after it."""

    def __init__(self, module: nn.MultiheadAttention, roles: dict[str, str]) -> None:
        super().__init__(module, roles)
        if module.in_proj_weight is None or module.bias_k is not None or module.add_zero_attn:
            raise NotMixable("attention layout")

    def layout(self, role: str) -> MatrixLayout | None:
        mha: Any = self.module
        if role == "in_proj_weight":
            return MatrixLayout(*mha.in_proj_weight.shape)
        if role == "out_proj.weight":
            return MatrixLayout(*mha.out_proj.weight.shape)
        return None

    def install(self, work: Work) -> list[Handle]:
        mha: Any = self.module
        forward = attention_forward(mha, work)
        return [_override(mha, forward)]


def attention_forward(mha: Any, work: Work) -> Callable[..., Any]:
    def forward(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        if key is not query or value is not query or key_padding_mask is not None:
            raise NotMixable("only plain self-attention is corrected")
        x = query if mha.batch_first else query.transpose(0, 1)
        b, t, e = x.shape
        heads = mha.num_heads
        qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
        for rows, deltas in work:
            if "in_proj_weight" in deltas:
                apply.linear(qkv, x, rows, deltas["in_proj_weight"])  # type: ignore[arg-type]
            if "in_proj_bias" in deltas:
                apply.vector_last(qkv, rows, deltas["in_proj_bias"])  # type: ignore[arg-type]
        q, k, v = qkv.view(b, t, 3, heads, e // heads).permute(2, 0, 3, 1, 4)
        mask = attn_mask
        if mask is not None:
            mask = mask.logical_not() if mask.dtype == torch.bool else mask.to(q.dtype)
            if mask.dim() == 3:
                mask = mask.view(b, heads, t, t)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        o = o.transpose(1, 2).reshape(b, t, e)
        out = F.linear(o, mha.out_proj.weight, mha.out_proj.bias)
        for rows, deltas in work:
            if "out_proj.weight" in deltas:
                apply.linear(out, o, rows, deltas["out_proj.weight"])  # type: ignore[arg-type]
            if "out_proj.bias" in deltas:
                apply.vector_last(out, rows, deltas["out_proj.bias"])  # type: ignore[arg-type]
        return (out if mha.batch_first else out.transpose(0, 1)), None

    return forward


class EmbeddingSite(Site):
    """open_clip ViT's ``class_embedding`` ``[D]`` and ``positional_embedding`` ``[T, D]``: added
    to the token stream ``[B, T, D]`` as it enters ``ln_pre`` (token 0 is the class token, so
    its positions are the stream's flat positions 0 … D−1)."""

    def install(self, work: Work) -> list[Handle]:
        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0].contiguous()
            for rows, deltas in work:
                for role in ("class_embedding", "positional_embedding"):
                    if role in deltas:
                        apply.vector_flat(x, rows, deltas[role])  # type: ignore[arg-type]
            return (x, *args[1:])

        h = self.module.ln_pre.register_forward_pre_hook(pre_hook)  # type: ignore[union-attr]
        return [Handle(h.remove)]


class ProjectionSite(Site):
    """open_clip ViT's output projection ``proj`` ``[width, embed]`` (``pooled @ proj``): the
    pooled features are taken from ``ln_post``'s output and the correction is added to the
    tower's output."""

    def __init__(self, module: nn.Module, roles: dict[str, str]) -> None:
        super().__init__(module, roles)
        vit: Any = module
        if vit.attn_pool is not None or vit.pool_type not in ("tok", "avg"):
            raise NotMixable("ViT pooling")

    def layout(self, role: str) -> MatrixLayout | None:
        proj: torch.Tensor = self.module.proj  # type: ignore[assignment]
        return MatrixLayout(proj.shape[1], proj.shape[0], transposed=True)

    def install(self, work: Work) -> list[Handle]:
        vit: Any = self.module
        pooled: list[torch.Tensor] = []

        def capture(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            if vit.final_ln_after_pool:
                pooled.append(out)
            else:
                pooled.append(out[:, 0] if vit.pool_type == "tok" else out[:, 1:].mean(dim=1))

        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            if len(pooled) != 1 or not isinstance(out, torch.Tensor):
                raise NotMixable("unexpected ViT output")
            for rows, deltas in work:
                apply.linear(out, pooled[0], rows, deltas["proj"])  # type: ignore[arg-type]

        # ln_post's own correction hook is registered before this capture (sites install in
        # tower order), so the captured pooled features are the corrected ones.
        h1 = vit.ln_post.register_forward_hook(capture)
        h2 = vit.register_forward_hook(hook)
        return [Handle(h1.remove), Handle(h2.remove)]
