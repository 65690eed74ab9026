"""Where a sparse adapter's changes sit: parameter names to stages and kinds, shares, densities."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import rst_layers
from bench.rst_layers import analyse, kind, stage


def test_parameters_are_grouped_by_stage_and_kind() -> None:
    assert stage("visual.trunk.blocks.3.1.conv_pw.weight") == "block stage 3"
    assert stage("visual.trunk.conv_stem.weight") == "stem"
    assert stage("visual.trunk.bn1.bias") == "stem"
    assert stage("visual.trunk.bn2.weight") == "head conv"
    assert stage("visual.trunk.classifier.weight") == "projection"
    assert stage("visual.transformer.resblocks.11.mlp.c_fc.weight") == "layer 11"
    assert kind("x.conv_dw.weight", (32, 1, 3, 3)) == "depthwise conv"
    assert kind("x.conv_pw.weight", (16, 32, 1, 1)) == "1×1 conv"
    assert kind("x.conv_stem.weight", (32, 3, 3, 3)) == "k×k conv"
    assert kind("x.bn1.weight", (32,)) == "norm affine"
    assert kind("x.bn1.bias", (32,)) == "bias"
    assert kind("x.classifier.weight", (1000, 1280)) == "linear"


def test_shares_and_densities_over_adapters(monkeypatch: pytest.MonkeyPatch) -> None:
    counts = {
        Path("a"): {"visual.trunk.classifier.weight": 30, "visual.trunk.conv_stem.weight": 10},
        Path("b"): {"visual.trunk.classifier.weight": 10, "visual.trunk.conv_stem.weight": 10},
    }
    fake = {p: SimpleNamespace(change_counts=lambda c=c: c) for p, c in counts.items()}
    monkeypatch.setattr(rst_layers, "read_adapter", lambda path, limits: fake[path])
    out = analyse(list(counts))
    assert out["changed"] == [40, 20]
    proj = out["groups"]["stage:projection"]
    assert proj["changed"] == [30, 10] and proj["share"] == pytest.approx((0.75 + 0.5) / 2)
    assert proj["density"] == pytest.approx(20 / (1000 * 1280 + 1000))  # weight and bias
    stem = out["groups"]["stage:stem"]
    assert stem["share"] == pytest.approx((0.25 + 0.5) / 2)
    groups = list(out["groups"])
    assert groups.index("stage:projection") < groups.index("kind:linear")  # stages come first
    shares = [v["share"] for g, v in out["groups"].items() if g.startswith("stage:")]
    assert sum(shares) == pytest.approx(1.0)
