"""Decoding untrusted images: allowed formats only, bounded pixels, every mode to RGB."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from server.errors import ServerError
from server.images import decode_image

LIMIT = 40_000_000
NOISE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def encode(image: Image.Image, fmt: str, **kw) -> bytes:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width×height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP"])
def test_allowed_formats_decode_to_rgb(fmt: str) -> None:
    img = Image.new("RGB", (30, 20), (200, 30, 10))
    out = decode_image(encode(img, fmt), LIMIT)
    assert out.mode == "RGB" and out.size == (30, 20)


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"", 400),
        (b"plain text, not an image", 415),
        (encode(Image.new("RGB", (4, 4)), "TIFF"), 415),
        (encode(Image.new("RGB", (4, 4)), "GIF"), 415),
        (b"SIMPLE  =                    T" + b" " * 100, 415),
        (encode(NOISE, "PNG")[:400], 422),
        (encode(NOISE, "JPEG")[:400], 422),
        (bomb_png(20_000, 20_000), 413),
    ],
    ids=["empty", "text", "tiff", "gif", "fits", "truncated-png", "truncated-jpeg", "bomb"],
)
def test_bad_images_are_client_errors(data: bytes, status: int) -> None:
    with pytest.raises(ServerError) as exc:
        decode_image(data, LIMIT)
    assert exc.value.status == status


def test_zero_pixel_png_is_rejected() -> None:
    with pytest.raises(ServerError) as exc:
        decode_image(bomb_png(0, 0), LIMIT)
    assert exc.value.status == 422


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    out = decode_image(encode(img, "JPEG", exif=exif), LIMIT)
    assert out.size == (20, 40)


def test_cmyk_16bit_palette_alpha_and_animation() -> None:
    cmyk = decode_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"), LIMIT)
    assert cmyk.mode == "RGB" and cmyk.getpixel((4, 4))[0] > 200  # red
    deep = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    assert decode_image(encode(deep, "PNG"), LIMIT).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (8, 8), 3)
    assert decode_image(encode(pal, "PNG"), LIMIT).mode == "RGB"
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert decode_image(encode(rgba, "PNG"), LIMIT).getpixel((0, 0)) == (
        255,
        255,
        255,
    )  # transparent → white
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    anim = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert decode_image(anim, LIMIT).getpixel((0, 0))[0] > 200  # first frame


def test_pixel_limit_is_ours_not_pillows() -> None:
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(ServerError) as exc:
        decode_image(data, 9_999)
    assert (
        exc.value.status == 413
        and "10,000" not in exc.value.message
        and "9,999" in exc.value.message
    )
