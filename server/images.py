"""Image preprocessing for untrusted uploads, in one place: decoding, pixel budgets, the
evaluation transform an adapter was trained with, and stacking into a batch.

Decoding accepts JPEG, PNG, WebP and BMP only, with a bounded pixel count. The format is decided
from the leading bytes before any decoder runs, so only the four allowed decoders ever see
request data. EXIF orientation is applied, the first frame of an animation is used, and every
mode (CMYK, 16-bit, palette, alpha) is brought to 8-bit RGB. A request's images share one pixel
budget on top of the per-image limit, so many large images cannot add up to a memory spike.
"""

from __future__ import annotations

import io
import struct
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn

from adapters_store.transforms import adapter_image_size, eval_transform_for

from .errors import (
    EmptyImage,
    ImageTooLarge,
    InvalidImage,
    ServerError,
    TooManyImages,
    UnsupportedMediaType,
)

Transform = Callable[[Image.Image], torch.Tensor]

ALLOWED = ("JPEG", "PNG", "WEBP", "BMP")
_KNOWN_OTHER = {
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"SIMPLE  =": "FITS",
    b"\x00\x00\x01\x00": "ICO",
    b"%PDF": "PDF",
    b"8BPS": "PSD",
    b"\x00\x00\x00\x0cjP": "JPEG 2000",
}


def sniff(data: bytes) -> str | None:
    """The allowed format named by the leading bytes, else None."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM":
        return "BMP"
    return None


def image_format(data: bytes) -> str | None:
    """The allowed format of ``data`` when its leading bytes name one and Pillow's parser for
    that format reads the header, else None.

    This lets the bytes, not the label, decide whether a raw body is an image: ``curl
    --data-binary @photo.jpg`` labels it ``application/x-www-form-urlencoded``. Only the four
    allowed parsers see the bytes, and only their headers: decoding stays :func:`decode_image`'s.
    """
    fmt = sniff(data)
    if fmt is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[fmt]):
                return fmt
    except Image.DecompressionBombError:
        return fmt  # an image all the same: decoding answers 413 for its size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error):
        return None


def _unsupported(data: bytes) -> UnsupportedMediaType:
    name = next((fmt for magic, fmt in _KNOWN_OTHER.items() if data.startswith(magic)), None)
    what = f"{name} images are not supported" if name else "not a recognised image"
    return UnsupportedMediaType(f"{what}: send JPEG, PNG, WebP or BMP")


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode ``data`` to an 8-bit RGB image.

    Raises:
        EmptyImage: no bytes.
        UnsupportedMediaType: a format other than the four allowed.
        ImageTooLarge: more than ``max_pixels`` pixels (declared in the header).
        InvalidImage: undecodable, or no pixels.
    """
    if not data:
        raise EmptyImage("the image is empty (0 bytes)")
    fmt = sniff(data)
    if fmt is None:
        raise _unsupported(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data), formats=[fmt])
            width, height = image.size
            if width <= 0 or height <= 0:
                raise InvalidImage(f"the image has no pixels ({width}×{height})")
            if width * height > max_pixels:
                raise ImageTooLarge(
                    f"the image is {width}×{height} pixels; the limit is {max_pixels:,} pixels"
                )
            image.seek(0)
            image.load()
            image = ImageOps.exif_transpose(image) or image
            return _to_rgb(image)
    except ServerError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge("the image declares too many pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidImage(f"the {fmt} image could not be decoded ({type(exc).__name__})") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if image.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        image = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, image)
    return image.convert("RGB")


@dataclass(frozen=True)
class ImageLimits:
    """What one request may carry: images, pixels per image, pixels for all images together."""

    max_images: int
    max_image_pixels: int
    max_request_pixels: int


def decode_within_budget(files: Sequence[bytes], limits: ImageLimits) -> Iterator[Image.Image]:
    """Decode ``files`` one at a time (so only one full-size image is held at once), each within
    the per-image limit and what is left of the request's pixel budget.

    Raises:
        TooManyImages: more files than ``max_images``.
        ImageTooLarge: one image over its limit, or the images together over the budget.
    """
    if len(files) > limits.max_images:
        raise TooManyImages(f"at most {limits.max_images} images per request")
    budget = limits.max_request_pixels
    for data in files:
        limit = min(limits.max_image_pixels, budget)
        try:
            image = decode_image(data, limit)
        except ImageTooLarge:
            if limit < limits.max_image_pixels:
                raise ImageTooLarge(
                    f"the request's images together exceed {limits.max_request_pixels:,} pixels"
                ) from None
            raise
        budget -= image.width * image.height
        yield image


class EvalTransforms:
    """The evaluation transform per image size, for one base: an adapter is served at the size
    it was trained (and evaluated) at, the base's native size for zero-shot."""

    def __init__(self, net: nn.Module) -> None:
        self._net = net
        self._by_size: dict[int, Transform] = {}
        self._lock = threading.Lock()

    def for_config(self, train_config: Mapping[str, Any] | None = None) -> Transform:
        """The transform for an adapter's ``train_config`` (None: the base's native size)."""
        size = adapter_image_size(train_config or {}, self._net)
        with self._lock:
            if size not in self._by_size:
                self._by_size[size] = eval_transform_for(self._net, size)
            return self._by_size[size]


class Preprocessor:
    """Uploaded bytes to the ``[N, 3, H, W]`` batch an adapter expects (CPU-bound: call it off
    the event loop)."""

    def __init__(self, transforms: EvalTransforms, limits: ImageLimits) -> None:
        self.transforms = transforms
        self.limits = limits

    def batch(
        self, files: Sequence[bytes], train_config: Mapping[str, Any] | None = None
    ) -> torch.Tensor:
        """Decode, check and transform every file, then stack them."""
        transform = self.transforms.for_config(train_config)
        return torch.stack([transform(image) for image in decode_within_budget(files, self.limits)])
