"""PEFT LoRA as the alternative deltaclip is compared with, set up once for every question.

LoRA sits on the MLP Linear layers of a ViT image tower (:data:`LORA_TARGETS`) or, in a
convolutional tower without them (EfficientNet), on its pointwise 1×1 convolutions
(:data:`CONV_TARGETS`), at the rank whose parameter count is nearest to a sparse adapter's
changed weights, so that swap cost, memory and mixed-batch throughput compare the two at an equal
number of task parameters.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

LORA_TARGETS = ["c_fc", "c_proj"]  # a ViT's MLP Linears
CONV_TARGETS = ["conv_pw", "conv_pwl"]  # an EfficientNet's pointwise convolutions (timm names)


def lora_modules(tower: nn.Module) -> dict[str, nn.Linear | nn.Conv2d]:
    """The layers LoRA adapts: the MLP Linears, or else the pointwise (1×1, ungrouped) convs."""
    found: dict[str, nn.Linear | nn.Conv2d] = {
        name: m
        for name, m in tower.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS
    }
    if found:
        return found
    return {
        name: m
        for name, m in tower.named_modules()
        if isinstance(m, nn.Conv2d)
        and m.kernel_size == (1, 1)
        and m.groups == 1
        and name.rsplit(".", 1)[-1] in CONV_TARGETS
    }


def lora_params_per_rank(tower: nn.Module) -> int:
    """LoRA parameters per unit of rank on the targeted layers: sum of (in + out)."""
    return sum(
        m.in_features + m.out_features
        if isinstance(m, nn.Linear)
        else m.in_channels + m.out_channels
        for m in lora_modules(tower).values()
    )


def lora_rank_for(nnz: int, per_rank: int) -> int:
    """The rank whose LoRA parameter count is nearest to ``nnz`` changed weights (at least 1)."""
    return max(1, round(nnz / per_rank))


def build_peft(
    base_visual: nn.Module, names_by_rank: dict[int, list[str]], device: str, dtype: torch.dtype
) -> Any:
    """A PeftModel over a copy of the tower with the named LoRA adapters at each rank.

    Weights are random (``init_lora_weights=False``) with B scaled so that B·A is a few percent
    of |W|, like the sparse residuals; the seed is fixed, so every run builds the same adapters.
    """
    from peft import LoraConfig, get_peft_model

    targets = sorted({name.rsplit(".", 1)[-1] for name in lora_modules(base_visual)})
    if not targets:
        raise ValueError("this tower has no layer LoRA is set up for (bench/lora.py)")
    tower = copy.deepcopy(base_visual).to(device, dtype)
    pm: Any = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for r in sorted(names_by_rank):
            cfg = LoraConfig(r=r, lora_alpha=r, target_modules=targets, init_lora_weights=False)
            for name in names_by_rank[r]:
                if pm is None:
                    pm = get_peft_model(tower, cfg, adapter_name=name)
                else:
                    pm.add_adapter(name, cfg)
    with torch.no_grad():
        for pname, param in pm.named_parameters():
            if ".lora_B." in pname:
                param.mul_(0.02)
    return pm.to(device, dtype).eval()


def lora_state(pm: Any, name: str, as_name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s LoRA tensors, keyed as if they belonged to adapter ``as_name``."""
    return {
        k.replace(f".{name}.", f".{as_name}."): v.detach().clone()
        for k, v in pm.state_dict().items()
        if ".lora_" in k and f".{name}." in k
    }
