"""Question "rst_layers": where a sparse adapter's changed weights sit, layer by layer.

    python -m bench rst_layers --study /work/study/results.json --setting cmkd-rst-0.005 \\
        --out docs/bench/rst_layers.json --plot docs/study_rst_layers.png

Reads the adapters a study kept (``adapter_path`` of its runs), counts each parameter's changed
weights (``Adapter.change_counts``) and groups them by stage of the tower (stem, each block
stage, head convolution, the projection) and by kind of tensor (k×k or depthwise convolution,
1×1 convolution, norm affine, bias, linear). For each group: the share of the adapter's changed
weights it holds (mean over runs), and its own density (changed / its weights). The plot shows
both per stage, so one sees at a glance whether a budget spends itself on, say, the projection.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

from adapters_store.basenames import EFFLITE0
from adapters_store.bases import build_base, tower_parameters
from adapters_store.format.codec import Limits, read_adapter
from bench.harness import Result, add_common

LIMITS = Limits(max_density=1.0)


def stage(name: str) -> str:
    """The tower stage a parameter belongs to (EfficientNet and ViT names; else the module)."""
    if m := re.search(r"\.blocks\.(\d+)\.", name):
        return f"block stage {m.group(1)}"
    if m := re.search(r"\.resblocks\.(\d+)\.", name):
        return f"layer {m.group(1)}"
    for key, label in (
        ("conv_stem", "stem"),
        ("bn1", "stem"),
        ("conv1", "stem"),
        ("conv_head", "head conv"),
        ("bn2", "head conv"),
        ("classifier", "projection"),
        ("proj", "projection"),
    ):
        if f".{key}" in name or name.endswith(key):
            return label
    return name.rsplit(".", 1)[0]


def kind(name: str, shape: tuple[int, ...]) -> str:
    """What sort of tensor: convolution (k×k, depthwise, 1×1), norm affine, bias, linear, other."""
    if name.endswith("bias"):
        return "bias"
    if len(shape) == 4:
        if shape[1] == 1 and shape[2] > 1:
            return "depthwise conv"
        return "1×1 conv" if shape[2] == shape[3] == 1 else "k×k conv"
    if len(shape) == 2:
        return "linear"
    if len(shape) == 1:
        return "norm affine"
    return "embedding/other"


def analyse(paths: list[Path]) -> dict[str, Any]:
    """Per stage and per kind: numel, and each adapter's changed weights there."""
    net = build_base(*EFFLITE0)
    shapes = {k: tuple(p.shape) for k, p in tower_parameters(net).items()}
    groups: dict[str, dict[str, Any]] = {}
    for k, shape in shapes.items():
        for g in (f"stage:{stage(k)}", f"kind:{kind(k, shape)}"):
            entry = groups.setdefault(g, {"numel": 0, "changed": [0] * len(paths)})
            entry["numel"] += math.prod(shape)
    totals = []
    for i, path in enumerate(paths):
        counts = read_adapter(path, LIMITS).change_counts()
        totals.append(sum(counts.values()))
        for k, n in counts.items():
            for g in (f"stage:{stage(k)}", f"kind:{kind(k, shapes[k])}"):
                groups[g]["changed"][i] += n
    for entry in groups.values():
        entry["share"] = sum(c / t for c, t in zip(entry["changed"], totals, strict=True)) / len(
            paths
        )
        entry["density"] = sum(entry["changed"]) / len(paths) / entry["numel"]
    ordered = sorted(groups, key=lambda g: not g.startswith("stage:"))  # stages, then kinds
    return {
        "adapters": [str(p) for p in paths],
        "changed": totals,
        "groups": {g: groups[g] for g in ordered},
    }


def plot(result: dict[str, Any], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [
        (k.split(":", 1)[1], v) for k, v in result["groups"].items() if k.startswith("stage:")
    ]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110)
    names = [s for s, _ in stages]
    a.bar(names, [100 * v["share"] for _, v in stages], color="tab:blue")
    a.set_ylabel("share of the adapter's changed weights (%)")
    b.bar(names, [100 * v["density"] for _, v in stages], color="tab:orange")
    b.set_ylabel("changed / the stage's weights (%)")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=60, labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p, reps=1)
    p.add_argument("--study", type=Path, required=True, help="the accuracy study's result file")
    p.add_argument("--setting", default="cmkd-rst-0.005", help="which rows' adapters")
    p.add_argument("--plot", type=Path, help="PNG (default: next to --out)")


def run(args: argparse.Namespace, result: Result) -> None:
    study = json.loads(args.study.read_text())
    rows = [r for r in study.get("runs", {}).values() if r["setting"] == args.setting]
    paths = [Path(r["adapter_path"]) for r in rows if r.get("adapter_path")]
    paths = [p for p in paths if p.exists()]
    if not paths:
        raise SystemExit(f"no kept adapters of {args.setting} in {args.study}")
    out = analyse(paths)
    result["setting"], result["layers"] = args.setting, out
    print(
        f"{args.setting}: {len(paths)} adapters, {sum(out['changed']) / len(paths):,.0f} changed "
        "weights on average"
    )
    print("| group | weights | share of changed (mean) | density |")
    print("|---|---|---|---|")
    for g, v in out["groups"].items():
        print(f"| {g} | {v['numel']:,} | {v['share']:.1%} | {v['density']:.3%} |")
    plot_path = args.plot or result.path.with_suffix(".png")
    plot(out, f"{args.setting}: where the changed weights sit ({len(paths)} adapters)", plot_path)
    print(f"plot: {plot_path}")
