"""A confusion-matrix PNG drawn with Pillow alone (no plotting library to install or configure).

Rows are true classes, columns predicted ones; each cell is shaded by its share of the row (so a
rare class is as readable as a frequent one) and, when cells are large enough, shows its count.
Class names are drawn along both axes up to 60 classes; beyond that the grid stays legible only
as a pattern, and the names are left to the JSON report.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

MAX_LABELLED_CLASSES = 60


def _shade(share: float) -> tuple[int, int, int]:
    """White for 0, dark blue for 1."""
    return (int(255 - 247 * share), int(255 - 207 * share), int(255 - 148 * share))


def confusion_png(
    matrix: torch.Tensor, class_names: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    """Draw ``matrix`` (``[C, C]`` counts, rows = truth) to ``path`` as a PNG; returns the path."""
    n = int(matrix.shape[0])
    if n == 0 or matrix.shape != (n, n) or len(class_names) != n:
        raise ValueError("a confusion matrix needs C x C counts and C class names, C >= 1")
    cell = max(4, min(32, 800 // n))
    font = ImageFont.load_default(size=12)
    labelled = n <= MAX_LABELLED_CLASSES
    label_px = max(int(font.getlength(name[:24])) for name in class_names) + 8 if labelled else 0
    top = 24 + label_px
    width, height = label_px + n * cell + 16, top + n * cell + 16
    image = Image.new("RGB", (max(width, 240), height), "white")
    draw = ImageDraw.Draw(image)
    draw.text(
        (8, 6),
        title or "confusion matrix (rows: true, columns: predicted)",
        fill="black",
        font=font,
    )
    counts = matrix.to(torch.float64)
    rows = counts.sum(dim=1, keepdim=True).clamp_min(1)
    shares = counts / rows
    for i in range(n):
        for j in range(n):
            x, y = label_px + j * cell, top + i * cell
            share = float(shares[i, j])
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=_shade(share))
            if cell >= 20 and counts[i, j] > 0:
                colour = "white" if share > 0.5 else "black"
                draw.text((x + 3, y + cell // 3), str(int(counts[i, j])), fill=colour, font=font)
    if labelled:
        for i, name in enumerate(class_names):
            draw.text(
                (4, top + i * cell + max(0, cell // 2 - 6)), name[:24], fill="black", font=font
            )
            text = Image.new("RGB", (label_px, 14), "white")
            ImageDraw.Draw(text).text((2, 1), name[:24], fill="black", font=font)
            rotated = text.rotate(90, expand=True)
            image.paste(rotated, (label_px + i * cell + max(0, cell // 2 - 7), 24))
    grid = [label_px, top, label_px + n * cell - 1, top + n * cell - 1]
    draw.rectangle(grid, outline="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
