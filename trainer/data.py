"""Domains as image folders (``DOMAIN/CLASS/*.jpg``), one shared class order, labelled datasets.

The layout is the one of Office-31, Office-Home and DomainNet. Class *names* come from folder
names normalised for prompts (``_`` → space, lower case); the class *order* is derived once, as
the sorted normalised names, and is the index order of source labels, target labels, prompts and
the adapter's ``class_names`` alike. Nothing assumes that a folder listing lines up with some
prompt list (the reference's DomainNet prompts did not, which is why its zero-shot score was 6.6 %).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from .errors import DataError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)


class UnreadableImagesWarning(UserWarning):
    """Some images of a domain could not be read; they are skipped, and counted."""


def prompt_name(folder: str) -> str:
    """A class folder's name as it appears in prompts and in ``class_names``.

    ``Alarm_Clock`` → ``alarm clock``: underscores become spaces, runs of whitespace collapse,
    and everything is lower case, so the source's and target's folders match whatever their case.
    """
    return " ".join(folder.replace("_", " ").split()).lower()


@dataclass
class DomainFolder:
    """The readable images of one domain folder, labelled by their (normalised) class name."""

    root: Path
    classes: dict[str, str]  # normalised class name -> folder name
    samples: list[tuple[Path, str]]  # (image file, normalised class name)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, why it was unreadable)

    @property
    def name(self) -> str:
        """The folder's name, used as the catalogued domain name when none is given."""
        return self.root.name


def _image_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used as an image, or ``None``; reads headers, not pixels."""
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        return f"{type(exc).__name__}: {exc}"
    return None


def scan_domain(root: str | os.PathLike[str], check_images: bool = True) -> DomainFolder:
    """List ``root/CLASS/*`` images; unreadable ones are skipped with a warning that counts them.

    Raises:
        DataError: the folder is missing, has no class folders or no readable image, or two
            folders normalise to the same class name.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"domain folder {root} does not exist or is not a folder")
    classes: dict[str, str] = {}
    files: list[tuple[Path, str]] = []
    for entry in sorted(root.iterdir()):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        name = prompt_name(entry.name)
        if not name:
            raise DataError(f"class folder {entry} has no usable name")
        if name in classes:
            raise DataError(
                f"class folders {classes[name]!r} and {entry.name!r} in {root} are both "
                f"class {name!r} once normalised (_ -> space, lower case)"
            )
        classes[name] = entry.name
        files.extend(
            (f, name)
            for f in sorted(entry.iterdir())
            if f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".") and f.is_file()
        )
    if not classes:
        raise DataError(f"domain folder {root} has no class folders (expected {root}/CLASS/*.jpg)")
    problems: list[str | None] = [None] * len(files)
    if check_images and files:
        with ThreadPoolExecutor(max_workers=8) as pool:
            problems = list(pool.map(_image_problem, (f for f, _ in files)))
    samples = [s for s, p in zip(files, problems, strict=True) if p is None]
    skipped = [(f, p) for (f, _), p in zip(files, problems, strict=True) if p is not None]
    if skipped:
        first, why = skipped[0]
        warnings.warn(
            f"skipped {len(skipped)} unreadable image(s) of {len(files)} in {root} "
            f"(first: {first}: {why})",
            UnreadableImagesWarning,
            stacklevel=2,
        )
    if not samples:
        raise DataError(f"domain folder {root} has no readable images")
    return DomainFolder(root=root, classes=classes, samples=samples, skipped=skipped)


def class_order(source: DomainFolder, target: DomainFolder) -> list[str]:
    """The one class order (sorted normalised names) shared by source, target and prompts.

    Raises:
        DataError: the two domains' class sets differ; the message names every difference.
    """
    src, tgt = set(source.classes), set(target.classes)
    if src != tgt:
        parts = []
        if src - tgt:
            parts.append(f"only in source {source.root}: {sorted(src - tgt)}")
        if tgt - src:
            parts.append(f"only in target {target.root}: {sorted(tgt - src)}")
        raise DataError("source and target class sets differ: " + "; ".join(parts))
    return sorted(src)


def labelled(domain: DomainFolder, class_names: Sequence[str]) -> list[tuple[Path, int]]:
    """``(file, class index)`` pairs in ``class_names``'s order.

    Raises:
        DataError: the folder has classes ``class_names`` does not know (named in the message).
    """
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted(set(domain.classes) - set(index))
    if unknown:
        raise DataError(
            f"{domain.root} has classes the model does not know: "
            + ", ".join(f"{domain.classes[u]!r} ({u})" for u in unknown)
        )
    return [(path, index[name]) for path, name in domain.samples]


def load_rgb(path: Path) -> Image.Image:
    """Decode an image as 3-channel RGB (grey, palette and alpha alike), then close the file."""
    with Image.open(path) as im:
        return im.convert("RGB")


class ImageDataset(Dataset[tuple[Any, int]]):
    """Labelled image files through a transform.

    Items are addressed by an ``int`` (evaluation: deterministic transforms) or by
    ``(index, seed)`` (training: the random transform runs under ``seed``, so an augmentation does
    not depend on which process or at which point of a run it is drawn).
    """

    def __init__(self, samples: Sequence[tuple[Path, int]], transform: Callable[[Any], Any]):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        for attempt in range(len(self.samples)):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                image = load_rgb(path)
            except Exception as exc:  # headers were fine at scan time but the pixels are not
                warnings.warn(
                    f"skipping unreadable image {path}: {exc}",
                    UnreadableImagesWarning,
                    stacklevel=2,
                )
                continue
            if seed is None:
                return self.transform(image), label
            with torch.random.fork_rng(devices=[]):  # the caller's CPU generator is restored
                torch.default_generator.manual_seed(seed)
                return self.transform(image), label
        raise DataError("no image of the dataset could be read")
