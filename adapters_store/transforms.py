"""The evaluation image transform shared by training-time evaluation, export checks and serving.

As the reference: ``Resize((s, s))`` (no crop), RGB, ``ToTensor``, normalise with the base's
mean/std. Serving must preprocess exactly like evaluation, so both import this one definition.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torchvision import transforms as T


def preprocess_cfg(net: nn.Module) -> dict[str, Any]:
    cfg: dict[str, Any] = dict(getattr(net.visual, "preprocess_cfg", {}) or {})
    size = cfg.get("size", getattr(net.visual, "image_size", 224))
    cfg["size"] = int(size[0] if isinstance(size, list | tuple) else size)
    cfg.setdefault("mean", (0.48145466, 0.4578275, 0.40821073))
    cfg.setdefault("std", (0.26862954, 0.26130258, 0.27577711))
    return cfg


def eval_transform(net: nn.Module, image_size: int | None = None) -> T.Compose:
    cfg = preprocess_cfg(net)
    size = image_size or cfg["size"]
    return T.Compose([
        T.Lambda(lambda im: im.convert("RGB")),
        T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(cfg["mean"], cfg["std"]),
    ])  # fmt: skip
