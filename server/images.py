"""Image decoding for untrusted uploads: JPEG, PNG, WebP and BMP only, bounded pixel count.

The format is decided from the leading bytes before any decoder runs, so only the four allowed
decoders ever see request data. EXIF orientation is applied, the first frame of an animation
is used, and every mode (CMYK, 16-bit, palette, alpha) is brought to 8-bit RGB.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ApiError

ALLOWED = ("JPEG", "PNG", "WEBP", "BMP")
_KNOWN_OTHER = {
    b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"GIF87a": "GIF", b"GIF89a": "GIF", b"SIMPLE  =": "FITS",
    b"\x00\x00\x01\x00": "ICO", b"%PDF": "PDF", b"8BPS": "PSD", b"\x00\x00\x00\x0cjP": "JPEG 2000",
}  # fmt: skip


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


def _unsupported(data: bytes) -> ApiError:
    name = next((fmt for magic, fmt in _KNOWN_OTHER.items() if data.startswith(magic)), None)
    what = f"{name} images are not supported" if name else "not a recognised image"
    return ApiError(415, "unsupported_media_type", f"{what}: send JPEG, PNG, WebP or BMP")


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode ``data`` to an 8-bit RGB image.

    Raises:
        ApiError: 400 empty, 415 unsupported format, 413 too many pixels, 422 undecodable.
    """
    if not data:
        raise ApiError(400, "empty_image", "the image is empty (0 bytes)")
    fmt = sniff(data)
    if fmt is None:
        raise _unsupported(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data), formats=[fmt])
            width, height = image.size
            if width <= 0 or height <= 0:
                raise ApiError(422, "invalid_image", f"the image has no pixels ({width}×{height})")
            if width * height > max_pixels:
                raise ApiError(
                    413,
                    "image_too_large",
                    f"the image is {width}×{height} pixels; the limit is {max_pixels:,} pixels",
                )
            image.seek(0)
            image.load()
            image = ImageOps.exif_transpose(image) or image
            return _to_rgb(image)
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(413, "image_too_large", "the image declares too many pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ApiError(
            422, "invalid_image", f"the {fmt} image could not be decoded ({type(exc).__name__})"
        ) from None


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
