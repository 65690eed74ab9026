"""The benchmark's PEFT LoRA comparator (bench/lora.py): which layers it adapts on a ViT-like
and on a convolutional tower, and that its mixed ``adapter_names`` batches answer each row as
that adapter alone would."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.lora import build_peft, lora_modules, lora_params_per_rank


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_pw = nn.Conv2d(4, 8, 1)
        self.conv_dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.conv_pwl = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_pwl(torch.relu(self.conv_dw(self.conv_pw(x))))


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_fc, self.c_proj, self.other = nn.Linear(6, 12), nn.Linear(12, 6), nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.other(self.c_proj(torch.relu(self.c_fc(x))))


def test_a_vit_tower_is_adapted_on_its_mlp_linears_a_conv_tower_on_its_pointwise_convs() -> None:
    assert sorted(lora_modules(Mlp())) == ["c_fc", "c_proj"]
    assert lora_params_per_rank(Mlp()) == (6 + 12) + (12 + 6)
    conv = nn.Sequential(Block(), Block())
    assert sorted(lora_modules(conv)) == ["0.conv_pw", "0.conv_pwl", "1.conv_pw", "1.conv_pwl"]
    assert lora_params_per_rank(conv) == 2 * ((4 + 8) + (8 + 4))
    with pytest.raises(ValueError, match="no layer LoRA"):
        build_peft(nn.Sequential(nn.Conv2d(3, 3, 3)), {1: ["t0"]}, "cpu", torch.float32)


def test_mixed_adapter_batches_of_a_conv_tower_match_each_adapter_alone() -> None:
    torch.manual_seed(0)
    pm = build_peft(nn.Sequential(Block(), Block()).eval(), {2: ["t0", "t1"]}, "cpu", torch.float32)
    x = torch.randn(3, 4, 5, 5)
    with torch.inference_mode():
        mixed = pm(x, adapter_names=["t0", "t1", "t0"])
        alone = {}
        for name in ("t0", "t1"):
            pm.set_adapter(name)
            alone[name] = pm(x)
    assert torch.allclose(mixed[0], alone["t0"][0], atol=1e-6)
    assert torch.allclose(mixed[1], alone["t1"][1], atol=1e-6)
    assert not torch.allclose(alone["t0"][1], alone["t1"][1], atol=1e-4)  # the adapters differ
