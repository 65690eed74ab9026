"""Accuracy, per-class accuracy, the confusion matrix and its PNG."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from trainer.evaluate import confusion, report, zero_shot_warning
from trainer.plot import confusion_png


def test_report_counts_by_hand() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    preds = torch.tensor([0, 1, 0, 1, 0, 2])
    assert confusion(preds, labels, 4).tolist() == [
        [2, 1, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 1, 0],
        [0, 0, 0, 0],
    ]
    r = report(preds, labels, ["a", "b", "c", "d"])
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["per_class_accuracy"] == {"a": pytest.approx(2 / 3), "b": 0.5, "c": 1.0, "d": None}
    assert r["mean_class_accuracy"] == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)
    assert r["support"] == {"a": 3, "b": 2, "c": 1, "d": 0}
    assert r["images"] == 6


@pytest.mark.parametrize("classes", [3, 80])
def test_confusion_png_is_a_valid_png(tmp_path: Path, classes: int) -> None:
    names = [f"class {i}" for i in range(classes)]
    matrix = torch.randint(0, 9, (classes, classes))
    path = confusion_png(matrix, names, tmp_path / "sub" / "cm.png", "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= classes * 4 and im.height >= classes * 4


def test_confusion_png_refuses_mismatched_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="C x C"):
        confusion_png(torch.zeros(2, 2), ["a"], tmp_path / "x.png")


def test_zero_shot_warning_for_bases_without_a_text_tower() -> None:
    # The default base reads labels through WordNet into its ImageNet classifier: no warning.
    assert zero_shot_warning("deltaclip-efflite0", "imagenet") is None
    message = zero_shot_warning("deltaclip-tiny", "random")
    assert message is not None and "chance" in message
    assert zero_shot_warning("ViT-B-16", "openai") is None
