"""Image transforms of the reference (CMKD-RST.md), for any image size.

For a crop size ``S`` (224 in the paper) the train transform resizes to ``round(S * 256/224)``
square, takes a random ``S`` crop and a horizontal flip; the test transform resizes straight to
``S x S``; FixMatch's strong view adds an always-on ColorJitter(0.4, 0.4, 0.4, 0) and RandAugment
(n=2, m=10) to a centre crop. Normalisation uses the base's own mean and std (CLIP's for the
shipped bases), read from the open_clip model so that a base with other statistics stays right.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn
from torchvision import transforms as T

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Transform = Callable[[Any], Any]


def normalisation_of(net: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The base's input mean and std (open_clip records them on the image tower)."""
    visual: Any = getattr(net, "visual", None)
    mean = getattr(visual, "image_mean", None) or CLIP_MEAN
    std = getattr(visual, "image_std", None) or CLIP_STD
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def image_size_of(net: nn.Module) -> int:
    """The base's native square input size (224 for ViT-B/16 and EfficientNet-Lite0)."""
    visual: Any = getattr(net, "visual", None)
    size = getattr(visual, "image_size", None)
    if size is None:
        size = (getattr(visual, "preprocess_cfg", None) or {}).get("size", 224)
    return int(size[0] if isinstance(size, Sequence) else size)


def _tail(mean: Sequence[float], std: Sequence[float]) -> list[Transform]:
    return [T.ToTensor(), T.Normalize(mean, std)]


def train_transform(
    size: int, resize: int, mean: Sequence[float], std: Sequence[float]
) -> Transform:
    """Resize(resize x resize) → RandomCrop(size) → HFlip (the weak view of FixMatch too)."""
    return T.Compose(
        [
            T.Resize((resize, resize)),
            T.RandomCrop(size),
            T.RandomHorizontalFlip(),
            *_tail(mean, std),
        ]
    )


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> Transform:
    """Resize(size x size): the whole image, no crop, as the reference evaluates."""
    return T.Compose([T.Resize((size, size)), *_tail(mean, std)])


def strong_transform(
    size: int, resize: int, mean: Sequence[float], std: Sequence[float]
) -> Transform:
    """FixMatch's strong view: resize, centre crop, flip, ColorJitter always, RandAugment(2, 10)."""
    return T.Compose(
        [
            T.Resize((resize, resize)),
            T.CenterCrop(size),
            T.RandomHorizontalFlip(),
            T.ColorJitter(0.4, 0.4, 0.4, 0.0),
            T.RandAugment(num_ops=2, magnitude=10),
            *_tail(mean, std),
        ]
    )


class TwoViews:
    """A weak and a strong view of the same image (FixMatch's target input)."""

    def __init__(self, weak: Transform, strong: Transform) -> None:
        self.weak, self.strong = weak, strong

    def __call__(self, image: Any) -> tuple[Any, Any]:
        return self.weak(image), self.strong(image)
