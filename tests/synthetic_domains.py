"""Synthetic domain folders: coloured shapes by "day" and by "night".

They have the ``DOMAIN/CLASS/*`` layout of the real benchmarks and a real domain shift (light
background, PNG → dark, speckled and blurred background, dimmer colours, JPEG), so a run on them
exercises every code path without downloading a data set. Class folder names deliberately mix
case and underscores (``Big_Square``) to exercise the class-name normalisation.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("Big_Square", "circle", "triangle", "Plus_Sign")
# The same shapes under names the default base's WordNet text side can place ("plus sign" maps to
# no ImageNet class; "Cross_Sign" reaches "street sign" through its head noun): for runs on
# deltaclip-efflite0, whose trainer refuses a class its teacher cannot read.
WORDNET_SHAPES = ("Big_Square", "circle", "triangle", "Cross_Sign")


Colour = tuple[int, int, int]


def _shape(
    draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill: Colour
) -> None:
    x0, y0, x1, y1 = box
    if kind == "Big_Square":
        draw.rectangle(box, fill=fill)
    elif kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        w = max(2, (x1 - x0) // 4)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.rectangle((cx - w // 2, y0, cx + w // 2, y1), fill=fill)
        draw.rectangle((x0, cy - w // 2, x1, cy + w // 2), fill=fill)


def _rgb(rng: random.Random, low: int, high: int) -> Colour:
    return (rng.randint(low, high), rng.randint(low, high), rng.randint(low, high))


def _image(kind: str, night: bool, size: int, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (size, size), _rgb(rng, 0, 50) if night else (235, 235, 235))
    draw = ImageDraw.Draw(image)
    extent = rng.randint(size // 2, size - 4)
    x0, y0 = rng.randint(1, size - extent - 1), rng.randint(1, size - extent - 1)
    colour = _rgb(rng, 70, 180) if night else _rgb(rng, 40, 220)
    _shape(draw, kind, (x0, y0, x0 + extent, y0 + extent), colour)
    if night:
        for _ in range(size):
            draw.point((rng.randrange(size), rng.randrange(size)), fill=(160, 160, 160))
        image = image.filter(ImageFilter.SMOOTH)
    return image


def make_domains(
    root: str | Path,
    per_class: int = 6,
    size: int = 32,
    seed: int = 0,
    classes: tuple[str, ...] = SHAPES,
) -> tuple[Path, Path]:
    """Write ``root/day/CLASS/*.png`` and ``root/night/CLASS/*.jpg``; return both folders."""
    root = Path(root)
    rng = random.Random(seed)
    folders = []
    for domain, ext in (("day", "png"), ("night", "jpg")):
        for kind in classes:
            folder = root / domain / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                _image(kind, domain == "night", size, rng).save(folder / f"{i:03d}.{ext}")
        folders.append(root / domain)
    return folders[0], folders[1]
