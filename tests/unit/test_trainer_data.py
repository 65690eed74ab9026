"""Domain folders, the shared class order, unreadable images, samplers and transforms."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from adapters_store.transforms import CLIP_MEAN, CLIP_STD
from adapters_store.zeroshot import prompts
from trainer.data import (
    ImageDataset,
    UnreadableImagesWarning,
    class_order,
    labelled,
    prompt_name,
    scan_domain,
)
from trainer.errors import DataError
from trainer.loaders import InfiniteBatchSampler, paired_loader
from trainer.transforms import (
    eval_transform,
    strong_transform,
    train_transform,
)


def make_domain(root: Path, classes: dict[str, int], size: int = 12) -> Path:
    for i, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(count):
            Image.new("RGB", (size, size), (40 * i, 10 * j, 90)).save(root / name / f"{j}.png")
    return root


def test_prompt_names_are_normalised() -> None:
    assert prompt_name("Alarm_Clock") == "alarm clock"
    assert prompt_name("  The__Eiffel_Tower ") == "the eiffel tower"
    assert prompts(["alarm clock", "cat"], "a photo of a {name}.") == [
        "a photo of a alarm clock.",
        "a photo of a cat.",
    ]


def test_one_class_order_for_source_target_and_prompts(tmp_path: Path) -> None:
    # Folder order differs from the sorted normalised order ("Zebra" < "apple" as bytes) and the
    # two domains spell the names differently; labels must agree on the normalised name.
    src = scan_domain(make_domain(tmp_path / "s", {"Zebra": 2, "apple": 1, "Big_Cat": 1}))
    tgt = scan_domain(make_domain(tmp_path / "t", {"big_cat": 1, "zebra": 1, "Apple": 3}))
    names = class_order(src, tgt)
    assert names == ["apple", "big cat", "zebra"]
    src_labels = {p.parent.name: y for p, y in labelled(src, names)}
    tgt_labels = {p.parent.name: y for p, y in labelled(tgt, names)}
    assert src_labels == {"apple": 0, "Big_Cat": 1, "Zebra": 2}
    assert tgt_labels == {"Apple": 0, "big_cat": 1, "zebra": 2}


def test_mismatched_class_sets_name_every_difference(tmp_path: Path) -> None:
    src = scan_domain(make_domain(tmp_path / "s", {"cat": 1, "dog": 1, "Fish_Bowl": 1}))
    tgt = scan_domain(make_domain(tmp_path / "t", {"cat": 1, "dog": 1, "horse": 1}))
    with pytest.raises(DataError) as err:
        class_order(src, tgt)
    message = str(err.value)
    assert "only in source" in message and "'fish bowl'" in message
    assert "only in target" in message and "'horse'" in message


def test_unreadable_images_are_skipped_counted_and_warned(tmp_path: Path) -> None:
    root = make_domain(tmp_path / "d", {"cat": 3, "dog": 2})
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (root / "dog" / "empty.png").write_bytes(b"")
    (root / "dog" / "notes.txt").write_text("not an image, ignored without a warning")
    with pytest.warns(UnreadableImagesWarning, match="skipped 2 unreadable image"):
        domain = scan_domain(root)
    assert len(domain.samples) == 5
    assert sorted(p.name for p, _ in domain.skipped) == ["broken.jpg", "empty.png"]


def test_empty_or_missing_domain_is_an_error_naming_the_folder(tmp_path: Path) -> None:
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="empty has no readable images"):
        scan_domain(tmp_path / "empty")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "x.png")
    with pytest.raises(DataError, match="flat has no class folders"):
        scan_domain(tmp_path / "flat")
    with pytest.raises(DataError, match="missing does not exist"):
        scan_domain(tmp_path / "missing")


def test_folders_that_normalise_to_one_class_are_refused(tmp_path: Path) -> None:
    root = make_domain(tmp_path / "d", {"Alarm_Clock": 1, "alarm clock": 1})
    with pytest.raises(DataError, match="both class 'alarm clock'"):
        scan_domain(root)


def test_labelled_refuses_classes_the_model_does_not_know(tmp_path: Path) -> None:
    domain = scan_domain(make_domain(tmp_path / "d", {"cat": 1, "Unicorn_Horse": 1}))
    with pytest.raises(DataError, match="'Unicorn_Horse' \\(unicorn horse\\)"):
        labelled(domain, ["cat", "dog"])


def test_sampler_resumes_at_any_step_and_fills_every_batch() -> None:
    full = iter(InfiniteBatchSampler(n=5, batch_size=4, seed=7))
    first = [next(full) for _ in range(6)]
    resumed = iter(InfiniteBatchSampler(n=5, batch_size=4, seed=7, start_step=3))
    assert [next(resumed) for _ in range(3)] == first[3:]
    assert all(len(b) == 4 for b in first)
    stream = [i for b in first for i, _ in b]
    assert sorted(stream[:5]) == list(range(5)) and sorted(stream[5:10]) == list(range(5))
    seeds = [s for b in first for _, s in b]
    assert len(set(seeds)) == len(seeds)  # every draw gets its own augmentation seed


def test_augmentation_depends_on_the_seed_only(tmp_path: Path) -> None:
    (tmp_path / "d" / "cat").mkdir(parents=True)
    Image.effect_noise((40, 40), 60).convert("RGB").save(tmp_path / "d" / "cat" / "0.png")
    domain = scan_domain(tmp_path / "d")
    ds = ImageDataset(labelled(domain, ["cat"]), train_transform(32, 37, CLIP_MEAN, CLIP_STD))
    a = ds[(0, 123)][0]
    torch.manual_seed(999)
    state = torch.get_rng_state()
    b = ds[(0, 123)][0]
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is untouched
    assert any(not torch.equal(a, ds[(0, s)][0]) for s in range(1, 8))


def test_transforms_produce_the_crop_size(tmp_path: Path) -> None:
    image = Image.new("RGB", (50, 30), (10, 200, 30))
    for tf in (
        train_transform(24, 27, CLIP_MEAN, CLIP_STD),
        eval_transform(24, CLIP_MEAN, CLIP_STD),
        strong_transform(24, 27, CLIP_MEAN, CLIP_STD),
    ):
        assert tuple(tf(image).shape) == (3, 24, 24)


def test_paired_loader_yields_source_and_target_batches(tmp_path: Path) -> None:
    s = scan_domain(make_domain(tmp_path / "s", {"a": 3, "b": 2}))
    t = scan_domain(make_domain(tmp_path / "t", {"a": 1, "b": 1}))
    names = class_order(s, t)
    tf = eval_transform(8, CLIP_MEAN, CLIP_STD)
    loader = paired_loader(
        ImageDataset(labelled(s, names), tf), ImageDataset(labelled(t, names), tf), 4, 0, 0, 0
    )
    (xs, ys), (xt, yt) = next(iter(loader))
    assert xs.shape == xt.shape == (4, 3, 8, 8)
    assert ys.shape == yt.shape == (4,)
