"""The demo's image sources: Debian's Fashion-MNIST, else a download; with neither, a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from deltaclip_demo import data


def test_without_fashion_mnist_the_demo_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "no-debian-package")
    monkeypatch.setattr(data, "DOWNLOAD_URL", (tmp_path / "no-mirror").as_uri() + "/")
    with pytest.raises(OSError, match="install Debian's dataset-fashion-mnist") as err:
        data.load_images("train", tmp_path / "cache")
    assert "no-debian-package is missing" in str(err.value)
    assert not list((tmp_path / "cache" / "fashion-mnist").glob("*.gz"))


def test_the_download_is_read_like_the_debian_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not all((data.DEBIAN_DIR / name).is_file() for name in data.FILES["test"]):
        pytest.fail(f"Debian's dataset-fashion-mnist is not installed ({data.DEBIAN_DIR})")
    mirror = data.DEBIAN_DIR.as_uri() + "/"  # a local mirror: the same files, fetched by URL
    debian = data.load_images("test", tmp_path / "unused")
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "no-debian-package")
    monkeypatch.setattr(data, "DOWNLOAD_URL", mirror)
    fetched = data.load_images("test", tmp_path / "cache")
    assert fetched.origin.startswith("Fashion-MNIST downloaded to")
    assert (fetched.images == debian.images).all() and (fetched.labels == debian.labels).all()
    assert len(fetched.labels) == 10_000


def test_the_source_validation_folder_is_labelled_and_disjoint_from_training(
    tmp_path: Path,
) -> None:
    if not all((data.DEBIAN_DIR / name).is_file() for name in data.FILES["train"]):
        pytest.fail(f"Debian's dataset-fashion-mnist is not installed ({data.DEBIAN_DIR})")
    kw = dict(source_per_class=3, target_per_class=2, test_per_class=2, seed=5)
    with_val, _ = data.prepare_domains(tmp_path / "a", ["faded"], **kw, source_val_per_class=4)
    without, _ = data.prepare_domains(tmp_path / "b", ["faded"], **kw)

    def names(folder: Path) -> set[str]:
        return {f"{p.parent.name}/{p.name}" for p in folder.rglob("*.png")}

    val = names(with_val["photo-val"])
    assert len(val) == 4 * len(data.FASHION_CLASSES)  # labelled: 4 per class folder
    assert {p.split("/")[0] for p in val} == set(data.FASHION_CLASSES)
    assert not val & names(with_val["photo"])  # never trained on
    assert "photo-val" not in without
    for name in ("photo", "faded", "test-faded"):  # the other draws do not move
        assert names(with_val[name]) == names(without[name])
