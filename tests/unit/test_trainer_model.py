"""Configuration defaults per tower, the text head's formula and the training-mode rules."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from adapters_store.head import TaskHead
from adapters_store.zeroshot import class_embeddings
from trainer.config import TrainConfig
from trainer.errors import TrainError
from trainer.model import CMKDModel, TextHead, logit_scale_of, tower_kind


def test_defaults_follow_the_tower_kind(tiny) -> None:  # type: ignore[no-untyped-def]
    assert tower_kind(tiny[0]) == "vit"
    base = TrainConfig(source="s", target="t", task="x")
    vit = base.resolve("vit", 32)
    assert (vit.lr, vit.head_lr_mult, vit.tau, vit.image_size) == (3e-6, 1000.0, 1e-6, 32)
    conv = base.resolve("conv", 224)
    assert (conv.lr, conv.head_lr_mult, conv.tau, conv.train_resize) == (3e-7, 1e4, 1e-5, 256)
    mine = TrainConfig(source="s", target="t", task="x", lr=1e-4, tau=0.0).resolve("conv", 224)
    assert (mine.lr, mine.tau) == (1e-4, 0.0)
    assert base.method_name == "cmkd+rst"
    assert TrainConfig("s", "t", "x", method="source-only", fixmatch=True).method_name == (
        "source-only+rst+fixmatch"
    )
    assert TrainConfig.from_dict(vit.to_dict()) == vit


def test_conv_towers_are_recognised() -> None:
    class Tower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

    net = nn.Module()
    net.visual = Tower()
    assert tower_kind(net) == "conv"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "dann"}, "method must be one of"),
        ({"tau": -1.0}, "tau must be >= 0"),
        ({"max_density": 0.0}, "max density must be in"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"prompt_template": "a photo of a {}."}, "must contain {name}"),
        ({"prompt_template": "a {name} of {kind}"}, "must contain {name}"),
        ({"lr": 0.0}, "lr must be > 0"),
    ],
)
def test_bad_settings_are_refused(change: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(TrainError, match=message):
        TrainConfig(source="s", target="t", task="x", **change).resolve("vit", 32)


def test_text_head_is_scaled_cosine_to_normalised_prompts(tiny) -> None:  # type: ignore[no-untyped-def]
    net = tiny[0]
    emb = class_embeddings(
        net, "deltaclip-tiny", "random", ["cat", "big dog"], "a photo of a {name}."
    )
    assert emb.shape == (2, 32)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2))
    scale = logit_scale_of(net)
    assert scale == pytest.approx(math.exp(float(net.logit_scale.detach())))
    head = TextHead(emb, scale)
    z = torch.randn(3, 32) * 5
    expected = scale * torch.stack(
        [torch.stack([torch.dot(zi, tk) / zi.norm() for tk in emb]) for zi in z]
    )
    assert torch.allclose(head(z), expected, atol=1e-5)


def test_training_mode_keeps_tower_batchnorm_in_eval_and_text_frozen(tiny) -> None:  # type: ignore[no-untyped-def]
    net = copy.deepcopy(tiny[0])
    net.visual.extra_bn = nn.BatchNorm1d(4)  # a tower BatchNorm, as in conv towers
    model = CMKDModel(net, TaskHead(32, 3), TextHead(torch.randn(3, 32), 10.0)).train()
    assert model.visual.training and model.head.training
    assert not net.visual.extra_bn.training
    assert not net.transformer.training  # the text tower
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {f"visual.{n}" for n, _ in net.visual.named_parameters()}
    assert not net.logit_scale.requires_grad
    assert not model.head.bn.bias.requires_grad
    assert all(p is not model.head.bn.bias for p in model.head_parameters())
