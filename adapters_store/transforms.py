"""The evaluation image transform: one definition for training-time evaluation, ``deltaclip
eval`` and serving, so a served task sees exactly the pixels its adapter was evaluated on.

As the reference: ``Resize((s, s))`` (bilinear, no crop) → ``ToTensor`` → normalise with the
base's mean/std, where ``s`` is the size the adapter was trained at (``train_config.image_size``)
or else the base's native size. Inputs are RGB PIL images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn
from torchvision import transforms as T

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalisation(net: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The base's input mean and std, as open_clip records them on the image tower."""
    cfg: Mapping[str, Any] = getattr(net.visual, "preprocess_cfg", None) or {}
    mean, std = cfg.get("mean") or CLIP_MEAN, cfg.get("std") or CLIP_STD
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def native_size(net: nn.Module) -> int:
    """The base's native square input size (224 for ViT-B/16 and EfficientNet-Lite0)."""
    visual: Any = net.visual
    size = getattr(visual, "image_size", None) or (
        getattr(visual, "preprocess_cfg", None) or {}
    ).get("size", 224)
    return int(size[0] if isinstance(size, Sequence) else size)


def adapter_image_size(train_config: Mapping[str, Any], net: nn.Module) -> int:
    """The size an adapter was trained (and therefore is evaluated and served) at."""
    size = train_config.get("image_size")
    return int(size) if isinstance(size, int) and size > 0 else native_size(net)


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    return T.Compose([T.Resize((size, size)), T.ToTensor(), T.Normalize(mean, std)])


def eval_transform_for(net: nn.Module, size: int | None = None) -> T.Compose:
    return eval_transform(size or native_size(net), *normalisation(net))
