"""Image transforms of the reference (docs/METHOD.md), for any image size.

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

from adapters_store.transforms import eval_transform as shared_eval_transform
from adapters_store.transforms import native_size, normalisation

Transform = Callable[[Any], Any]


def normalisation_of(net: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The base's input mean and std (the contract package's definition, shared with serving)."""
    return normalisation(net)


def image_size_of(net: nn.Module) -> int:
    """The base's native square input size (224 for ViT-B/16 and EfficientNet-Lite0)."""
    return native_size(net)


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
    """Resize(size x size): the whole image, no crop — the one definition serving uses too."""
    return shared_eval_transform(size, mean, std)


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
