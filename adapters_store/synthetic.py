"""Synthetic adapters: a seeded random sparse fine-tune of a base, for demos, tests and benchmarks.

These are real v1 adapters (valid, registrable, servable); only the weights they carry are random
rather than learned. Perturbations stay within a few percent of each base weight, like real
fine-tuning steps, so the float32 residual merges back bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapter import Adapter, AdapterInfo, build_adapter
from .bases import BaseSignature, tower_parameters
from .head import TaskHead


def random_task_state(
    net: nn.Module, density: float, seed: int, scale: float = 0.02, block_size: int = 1
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(base_state, task_state)`` of the image tower with about ``density`` of weights changed
    (in whole blocks of ``block_size`` consecutive flat positions when it is above 1)."""
    g = torch.Generator().manual_seed(seed)
    base = {k: p.detach().cpu().clone() for k, p in tower_parameters(net).items()}
    task = {}
    for key, w in base.items():
        if block_size == 1:
            changed = torch.rand(w.shape, generator=g) < density
        else:
            n_blocks = -(-w.numel() // block_size)
            hit = torch.rand(n_blocks, generator=g) < density
            changed = hit.repeat_interleave(block_size)[: w.numel()].view(w.shape)
        noise = torch.randn(w.shape, generator=g) * scale
        bump = torch.where(w != 0, w.abs() * noise, noise * 1e-3)
        task[key] = torch.where(changed, w + bump.to(w.dtype), w)
    return base, task


def random_adapter(
    net: nn.Module,
    sig: BaseSignature,
    task: str,
    *,
    density: float = 0.005,
    seed: int = 0,
    class_names: list[str] | None = None,
    residual_dtype: torch.dtype = torch.float32,
    block_size: int = 1,
) -> Adapter:
    base, task_state = random_task_state(net, density, seed, block_size=block_size)
    classes = class_names or [f"class {i}" for i in range(5)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = TaskHead(sig.embed_dim, len(classes))
        emb = nn.functional.normalize(torch.randn(len(classes), sig.embed_dim), dim=1)
    return build_adapter(
        base,
        task_state,
        AdapterInfo(
            task=task,
            base_model=sig.model,
            base_pretrained=sig.pretrained,
            base_fingerprint=sig.fingerprint,
            class_names=classes,
            source_domain="synthetic-source",
            target_domain="synthetic-target",
            method="synthetic",
            train_config={"generator": "adapters_store.synthetic", "density": density, "seed": seed}
            | ({"block_size": block_size} if block_size > 1 else {}),
        ),
        head_state=head.state_dict(),
        class_embeddings=emb,
        residual_dtype=residual_dtype,
        block_size=block_size,
    )
