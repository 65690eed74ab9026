"""Real images, offline: Fashion-MNIST as a source domain and visibly shifted target domains.

Source of the images, in order of preference (the caller is told which one was used):
1. Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``);
2. a download of the same four IDX files from the Fashion-MNIST project into the data folder.

With neither, the demo stops and says how to get the images.

Target domains are deterministic image transforms of *other* images of the same classes:
``sketch`` (an edge map, dark lines on white), ``negative`` (inverted) and ``faded`` (low
contrast, lifted blacks). Written as ``DOMAIN/CLASS/*.png`` folders, the layout of Office-Home.
"""

from __future__ import annotations

import gzip
import struct
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DOWNLOAD_URL = (
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"
)
FASHION_CLASSES = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
]
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _sketch(img: Image.Image) -> Image.Image:
    edges = img.resize((img.width * 2, img.height * 2), Image.Resampling.BICUBIC).filter(
        ImageFilter.FIND_EDGES
    )
    return ImageOps.invert(ImageOps.autocontrast(edges)).resize(img.size, Image.Resampling.BICUBIC)


def _faded(img: Image.Image) -> Image.Image:
    return ImageEnhance.Brightness(ImageEnhance.Contrast(img).enhance(0.3)).enhance(1.6)


SHIFTS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "sketch": _sketch,
    "negative": ImageOps.invert,
    "faded": _faded,
}


@dataclass
class ImageSet:
    """Grey images, their class indices, the class names and where the images came from."""

    images: np.ndarray  # [N, H, W] uint8
    labels: np.ndarray  # [N] int
    classes: list[str]
    origin: str


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, count = struct.unpack(">II", data[:8])
    if magic == 2051:
        rows, cols = struct.unpack(">II", data[8:16])
        return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, rows, cols)
    if magic == 2049:
        return np.frombuffer(data, dtype=np.uint8, offset=8).astype(np.int64)
    raise ValueError(f"{path} is not an IDX file (magic {magic})")


def _fashion_from(folder: Path, split: str, origin: str) -> ImageSet:
    images, labels = (folder / name for name in FILES[split])
    return ImageSet(_read_idx(images), _read_idx(labels), list(FASHION_CLASSES), origin)


def load_images(split: str, cache_dir: Path) -> ImageSet:
    """Fashion-MNIST ``split`` ("train"/"test") from the best available source (see module doc)."""
    if all((DEBIAN_DIR / name).is_file() for name in FILES[split]):
        return _fashion_from(
            DEBIAN_DIR, split, f"Fashion-MNIST from Debian's dataset-fashion-mnist ({DEBIAN_DIR})"
        )
    cached = cache_dir / "fashion-mnist"
    try:
        cached.mkdir(parents=True, exist_ok=True)
        for name in FILES[split]:
            if not (cached / name).is_file():
                urllib.request.urlretrieve(DOWNLOAD_URL + name, cached / f".{name}.part")
                (cached / f".{name}.part").rename(cached / name)
        return _fashion_from(cached, split, f"Fashion-MNIST downloaded to {cached}")
    except OSError as exc:
        raise OSError(
            f"no Fashion-MNIST images: {DEBIAN_DIR} is missing and the download into {cached} "
            f"failed ({exc}); install Debian's dataset-fashion-mnist "
            "(apt-get install dataset-fashion-mnist, which `make demo` does as root) or allow "
            "the download"
        ) from None


def _pick(labels: np.ndarray, per_class: int, rng: np.random.Generator, classes: int) -> np.ndarray:
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(classes)]
    return np.concatenate(chosen)


def _write(
    folder: Path,
    images: ImageSet,
    indices: np.ndarray,
    shift: Callable[[Image.Image], Image.Image] | None,
) -> int:
    for i in indices:
        cls = images.classes[int(images.labels[i])]
        img = Image.fromarray(images.images[i], mode="L")
        if shift is not None:
            img = shift(img)
        (folder / cls).mkdir(parents=True, exist_ok=True)
        img.convert("RGB").save(folder / cls / f"{int(i):05d}.png")
    return len(indices)


def prepare_domains(
    root: Path,
    shifts: list[str],
    *,
    source_per_class: int,
    target_per_class: int,
    test_per_class: int,
    seed: int = 0,
    source_val_per_class: int = 0,
) -> tuple[dict[str, Path], str]:
    """Write ``root/photo`` (source), ``root/<shift>`` (unlabelled-use targets) and
    ``root/test-<shift>`` (held-out target images for checking the server), disjoint image sets.

    With ``source_val_per_class``, also ``root/photo-val``: labelled source images held out from
    training (drawn from the source half of the pool, after every other draw, so the other folders
    are the same with or without it), for choices that must not look at target labels.

    Every draw is made whether or not its folder already exists, so a folder written by an earlier
    call holds the images this call would have written.

    Returns:
        the folders by name, and a sentence saying which image source was used.
    """
    train = load_images("train", root / "cache")
    test = load_images("test", root / "cache")
    rng = np.random.default_rng(seed)
    n_classes = len(train.classes)
    pool = rng.permutation(len(train.labels))
    half = len(pool) // 2
    src_labels, tgt_labels = train.labels[pool[:half]], train.labels[pool[half:]]
    folders: dict[str, Path] = {"photo": root / "photo"}
    src_picked = _pick(src_labels, source_per_class, rng, n_classes)
    if not folders["photo"].is_dir():
        _write(folders["photo"], train, pool[:half][src_picked], None)
    for name in shifts:
        folders[name] = root / name
        folders[f"test-{name}"] = root / f"test-{name}"
        tgt_picked = _pick(tgt_labels, target_per_class, rng, n_classes)
        if not folders[name].is_dir():
            _write(folders[name], train, pool[half:][tgt_picked], SHIFTS[name])
        test_picked = _pick(test.labels, test_per_class, rng, n_classes)
        if not folders[f"test-{name}"].is_dir():
            _write(folders[f"test-{name}"], test, test_picked, SHIFTS[name])
    if source_val_per_class:
        rest = np.setdiff1d(np.arange(half), src_picked)  # source-half positions not trained on
        folders["photo-val"] = root / "photo-val"
        val_picked = rest[_pick(src_labels[rest], source_val_per_class, rng, n_classes)]
        if not folders["photo-val"].is_dir():
            _write(folders["photo-val"], train, pool[:half][val_picked], None)
    return folders, train.origin
