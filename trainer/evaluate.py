"""Accuracy, per-class accuracy and confusion matrices; ``deltaclip eval`` of an adapter or zero-shot.

An adapter is evaluated the way it is served: the base is built, the adapter's residual merged
into the tower with ``adapters_store.adapter.merge_state`` (the one definition of task weights),
and the task head answers on ``encode_image``. Folder classes are mapped onto the adapter's
``class_names`` through the same normalisation as in training.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader

from adapters_store.adapter import Adapter, merge_state
from adapters_store.bases import build_base
from adapters_store.config import StoreSettings
from adapters_store.head import head_from_state
from adapters_store.records import AdapterRecord
from adapters_store.registry import Registry
from adapters_store.serving_base import ServingBase
from adapters_store.zeroshot import class_embeddings

from .data import ImageDataset, labelled, scan_domain
from .loaders import default_workers, eval_loader
from .model import TextHead, logit_scale_of
from .transforms import eval_transform, image_size_of, normalisation_of

Heads = Callable[[torch.Tensor], dict[str, torch.Tensor]]


@torch.no_grad()
def predictions(
    loader: DataLoader[Any], heads: Heads, device: torch.device
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Arg-max predictions of each head over ``loader``, and the labels, on CPU."""
    preds: dict[str, list[torch.Tensor]] = {}
    labels = []
    for images, y in loader:
        for name, logits in heads(images.to(device, non_blocking=True)).items():
            preds.setdefault(name, []).append(logits.argmax(dim=1).cpu())
        labels.append(y)
    return {k: torch.cat(v) for k, v in preds.items()}, torch.cat(labels)


def confusion(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[C, C]`` counts: row = true class, column = predicted class."""
    flat = labels.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes**2).view(num_classes, num_classes)


def report(preds: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, mean per-class accuracy (VisDA's metric) and per-class accuracy and support.

    A class without images has accuracy ``None`` and is left out of the per-class mean.
    """
    matrix = confusion(preds, labels, len(class_names))
    support = matrix.sum(dim=1)
    correct = matrix.diag()
    per_class = {
        name: (float(correct[i] / support[i]) if support[i] else None)
        for i, name in enumerate(class_names)
    }
    present = [v for v in per_class.values() if v is not None]
    return {
        "accuracy": float(correct.sum() / max(1, int(support.sum()))),
        "mean_class_accuracy": sum(present) / len(present) if present else 0.0,
        "images": int(support.sum()),
        "per_class_accuracy": per_class,
        "support": {name: int(support[i]) for i, name in enumerate(class_names)},
        "confusion": matrix.tolist(),
    }


@dataclass
class EvalData:
    """A folder prepared for one model: its loader and the class names its labels index."""

    loader: DataLoader[Any]
    class_names: list[str]
    skipped: int


def folder_data(
    data_dir: str | Path,
    class_names: Sequence[str] | None,
    net: nn.Module,
    image_size: int | None,
    batch_size: int,
    num_workers: int | None,
) -> EvalData:
    """Label the folder by ``class_names`` (or by its own classes) with the test transform."""
    domain = scan_domain(data_dir)
    names = list(class_names) if class_names is not None else sorted(domain.classes)
    size = image_size or image_size_of(net)
    dataset = ImageDataset(labelled(domain, names), eval_transform(size, *normalisation_of(net)))
    workers = default_workers() if num_workers is None else num_workers
    return EvalData(eval_loader(dataset, batch_size, workers), names, len(domain.skipped))


@dataclass
class TaskModel:
    """A registered adapter as it is served: the base with its residual merged, and its head."""

    record: AdapterRecord
    adapter: Adapter
    net: nn.Module
    head: nn.Module

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The task head's logits ``[N, C]`` for a batch already on the model's device."""
        return self.head(cast(Any, self.net).encode_image(images).float())


def load_task_model(
    settings: StoreSettings,
    task: str,
    version: int | None = None,
    alias: str | None = None,
    device: torch.device | None = None,
) -> TaskModel:
    """Resolve ``task`` in the catalog, build its base and merge the adapter into it
    (``adapters_store.adapter.merge_state``, the one definition of task weights), in eval mode."""
    registry = Registry.from_settings(settings)
    try:
        record = registry.resolve(task, version, alias)
        net, base = ServingBase.build(record.base_model, record.base_pretrained)
        adapter = registry.load(record, base)
    finally:
        registry.close()
    net.load_state_dict(merge_state(dict(net.state_dict()), adapter))
    head = head_from_state(dict(adapter.head))
    device = device or torch.device("cpu")
    return TaskModel(record, adapter, net.to(device).eval(), head.to(device).eval())


def evaluate_adapter(
    settings: StoreSettings,
    task: str,
    data_dir: str | Path,
    *,
    version: int | None = None,
    alias: str | None = None,
    device: torch.device | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    image_size: int | None = None,
) -> dict[str, Any]:
    """Accuracy of a registered adapter's task head on a labelled folder, as it would be served.

    Images are resized to ``image_size``, by default the size the adapter was trained at.
    """
    device = device or torch.device("cpu")
    model = load_task_model(settings, task, version, alias, device)
    record, meta = model.record, model.adapter.meta
    size = image_size or meta.train_config.get("image_size")
    data = folder_data(data_dir, meta.class_names, model.net, size, batch_size, num_workers)
    preds, labels = predictions(data.loader, lambda x: {"task": model.logits(x)}, device)
    return {
        "task": record.task,
        "version": record.version,
        "digest": record.digest,
        "data": str(data_dir),
        "skipped_images": data.skipped,
        **report(preds["task"], labels, data.class_names),
    }


def zero_shot_warning(model: str, pretrained: str) -> str | None:
    """Why zero-shot accuracy is meaningless for this base, if it is."""
    if pretrained == "random":
        return (
            f"{model}/{pretrained} is randomly initialised: its zero-shot accuracy is chance level"
        )
    return None


def evaluate_zero_shot(
    model: str,
    pretrained: str,
    data_dir: str | Path,
    *,
    template: str,
    device: torch.device | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    image_size: int | None = None,
    keep_predictions: bool = False,
) -> dict[str, Any]:
    """Accuracy of the base's text head (prompts from the folder's classes): zero-shot CLIP.

    ``keep_predictions`` adds ``predictions`` and ``labels``: per image, in the folder's order
    (class indices into ``class_names``), for paired comparisons image by image.
    """
    device = device or torch.device("cpu")
    warning = zero_shot_warning(model, pretrained)
    if warning:
        print(f"deltaclip: warning: {warning}", file=sys.stderr)
    net = build_base(model, pretrained, device)
    data = folder_data(data_dir, None, net, image_size, batch_size, num_workers)
    emb = class_embeddings(net, model, pretrained, data.class_names, template)
    teacher = TextHead(emb, logit_scale_of(net)).to(device)
    encode = cast(Any, net).encode_image
    preds, labels = predictions(data.loader, lambda x: {"text": teacher(encode(x))}, device)
    return {
        "base_model": model,
        "base_pretrained": pretrained,
        "prompt_template": template,
        "data": str(data_dir),
        "skipped_images": data.skipped,
        "warning": warning,
        "chance_accuracy": 1.0 / len(data.class_names),
        **report(preds["text"], labels, data.class_names),
        **(
            {"predictions": preds["text"].tolist(), "labels": labels.tolist()}
            if keep_predictions
            else {}
        ),
    }
