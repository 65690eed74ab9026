"""Storage cost of format v1: bytes per changed weight for float32 and bfloat16 residuals.

Run: ``.venv/bin/python bench/storage.py`` — prints a Markdown table (copied into
docs/BENCHMARKS.md). Uses the ViT-B-16 architecture with a seeded random init (timing- and
size-faithful; no weights are downloaded) and synthetic residuals at the densities RST produces.
"""

from __future__ import annotations

import torch

from adapters_store.adapter import build_adapter
from adapters_store.bases import signature_of, tower_parameters
from adapters_store.format.codec import encode_adapter
from adapters_store.head import TaskHead
from adapters_store.synthetic import random_task_state


def main() -> None:
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = open_clip.create_model("ViT-B-16", pretrained=None)
    sig = signature_of(net, "ViT-B-16", "random")
    tower = sum(p.numel() for p in tower_parameters(net).values())
    head = TaskHead(sig.embed_dim, 65).state_dict()
    common = dict(task="bench", base_model=sig.model, base_pretrained=sig.pretrained,
                  base_fingerprint=sig.fingerprint, class_names=[f"c{i}" for i in range(65)], head_state=head)  # fmt: skip
    base = {k: p.detach() for k, p in tower_parameters(net).items()}
    print(f"ViT-B-16 image tower: {tower:,} weights, 65-class head\n")
    print(
        "| density | changed weights | residual dtype | file bytes | JSON header bytes | head bytes "
        "| bytes per changed weight, residual data | bytes per changed weight, incl. header |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for density in (0.0005, 0.001, 0.005, 0.01):
        _, task = random_task_state(net, density, seed=1)
        for dtype in (torch.float32, torch.bfloat16):
            adapter = build_adapter(base, task, residual_dtype=dtype, **common)
            data = encode_adapter(adapter)
            header = 8 + int.from_bytes(data[:8], "little")
            head_bytes = sum(t.numel() * t.element_size() for t in adapter.head.values())
            nnz = adapter.meta.nnz
            residual = len(data) - header - head_bytes
            print(
                f"| {density:.2%} | {nnz:,} | {str(dtype)[6:]} | {len(data):,} | {header:,} | {head_bytes:,} "
                f"| {residual / nnz:.3f} | {(residual + header) / nnz:.3f} |"
            )


if __name__ == "__main__":
    main()
