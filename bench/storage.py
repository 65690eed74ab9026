"""Question "storage": bytes per changed weight, on disk and in memory.

    python -m bench storage [--sections file,reference,memory] [--base ViT-B-16]

Sections, on the ``--base`` image tower (seeded random ViT-B-16 by default: sizes do not depend
on the weights' values) with synthetic residuals at RST-like densities:

* ``file`` — format v1 file size for float32 and bfloat16 residuals with a 65-class head, for each
  of ``--block-sizes`` (1: unstructured, else the block form with whole blocks of ``B`` changed
  weights): file, JSON header and head bytes, and bytes per changed weight (also printed as a
  Markdown table);
* ``reference`` — v1 residual bytes against the reference implementation's format (a pickle of
  ``torch.sparse_coo_tensor`` residuals), for all changed tensors and for 2-D weights only;
* ``memory`` — resident bytes per prepared adapter (``PreparedAdapter.nbytes`` and measured
  growth over ``--copies`` prepared copies), adapters per GiB, against a dense copy per task and
  a PEFT LoRA adapter of matched parameter count.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import io
import json
from typing import Any

import torch

from adapters_store.adapter import Adapter, AdapterInfo, build_adapter
from adapters_store.bases import tower_parameters
from adapters_store.format.codec import encode_adapter
from adapters_store.head import TaskHead
from adapters_store.synthetic import random_adapter, random_task_state
from bench.harness import (
    DENSITIES,
    Result,
    add_common,
    csv_list,
    fake_record,
    load_base,
    print_table,
)
from bench.lora import lora_params_per_rank, lora_rank_for

GIB = 1 << 30


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p, sections=["file", "reference", "memory"], base="ViT-B-16", reps=1)
    p.add_argument("--densities", type=csv_list(float), default=list(DENSITIES))
    p.add_argument("--copies", type=int, default=50, help="prepared copies measured per density")
    p.add_argument(
        "--block-sizes",
        type=csv_list(int),
        default=[1, 4, 16],
        help="file section: B (1 = unstructured)",
    )


def run(args: argparse.Namespace, result: Result) -> None:
    net, sig = load_base(args.base)
    if "file" in args.sections:
        result["file_sizes"] = file_sizes(net, sig, args.densities, args.block_sizes)
    if {"reference", "memory"} & set(args.sections):
        # the adapters the swap question alternates first (same seeds): one per density
        adapters = {
            d: random_adapter(net, sig, "t1", density=d, seed=10 + j)
            for j, d in enumerate(args.densities)
        }
        if "memory" in args.sections:
            result["memory"] = memory(
                net, sig, adapters, 10 if args.quick else args.copies, args.device
            )
            result.save()
        if "reference" in args.sections:
            result["storage"] = reference(net, adapters)


def file_sizes(
    net: Any, sig: Any, densities: list[float], block_sizes: list[int]
) -> dict[str, Any]:
    """Format v1 bytes of one adapter per density, block size and residual dtype, and the table."""
    head = TaskHead(sig.embed_dim, 65).state_dict()
    info = AdapterInfo(
        task="bench",
        base_model=sig.model,
        base_pretrained=sig.pretrained,
        base_fingerprint=sig.fingerprint,
        class_names=[f"c{i}" for i in range(65)],
    )
    base = {k: p.detach() for k, p in tower_parameters(net).items()}
    rows = []
    for density, b in [(d, b) for b in block_sizes for d in densities]:
        _, task = random_task_state(net, density, seed=1, block_size=b)
        for dtype in (torch.float32, torch.bfloat16):
            adapter = build_adapter(
                base, task, info, head_state=head, residual_dtype=dtype, block_size=b
            )
            data = encode_adapter(adapter)
            header = 8 + int.from_bytes(data[:8], "little")
            head_bytes = sum(t.numel() * t.element_size() for t in adapter.head.values())
            nnz = adapter.meta.nnz
            residual = len(data) - header - head_bytes
            rows.append(
                {
                    "block_size": b,
                    "density": density,
                    "nnz": nnz,
                    "residual_dtype": str(dtype)[6:],
                    "file_bytes": len(data),
                    "header_bytes": header,
                    "head_bytes": head_bytes,
                    "residual_per_weight": residual / nnz,
                    "with_header_per_weight": (residual + header) / nnz,
                }
            )
    tower = sum(v.numel() for v in base.values())
    print(f"{sig.model} image tower: {tower:,} weights, 65-class head\n")
    print_table(
        [
            "B",
            "density",
            "changed weights",
            "residual dtype",
            "file bytes",
            "JSON header bytes",
            "head bytes",
            "bytes per changed weight, residual data",
            "bytes per changed weight, incl. header",
        ],
        [
            [
                str(r["block_size"]),
                f"{r['density']:.2%}",
                f"{r['nnz']:,}",
                str(r["residual_dtype"]),
                f"{r['file_bytes']:,}",
                f"{r['header_bytes']:,}",
                f"{r['head_bytes']:,}",
                f"{r['residual_per_weight']:.3f}",
                f"{r['with_header_per_weight']:.3f}",
            ]
            for r in rows
        ],
    )
    return {"tower_weights": tower, "head_classes": 65, "rows": rows}


def _reference_bytes(
    base: dict[str, torch.Tensor], adapter: Adapter, two_d_only: bool
) -> tuple[int, int]:
    """Bytes of the reference format (``torch.save`` of a dict of ``torch.sparse_coo_tensor``
    residuals, float32 values, int64 COO indices) and the changed weights it holds."""
    state, nnz = {}, 0
    for key, res in sorted(adapter.residual.items()):
        shape = base[key].shape
        if two_d_only and len(shape) != 2:
            continue
        coords = torch.stack(torch.unravel_index(res.indices.to(torch.int64), shape))
        state[key] = torch.sparse_coo_tensor(coords, res.values.float(), shape).coalesce()
        nnz += res.nnz
    buf = io.BytesIO()
    torch.save(state, buf)
    return len(buf.getvalue()), nnz


def _v1_residual_bytes(adapter: Adapter, two_d: set[str] | None) -> int:
    """Format v1 file bytes of the adapter without its head and text embeddings (residual only)."""
    keep = {k: r for k, r in adapter.residual.items() if two_d is None or k in two_d}
    bare = Adapter(meta=adapter.meta, residual=keep, head=adapter.head, class_embeddings=None)
    head = sum(t.numel() * t.element_size() for t in adapter.head.values())
    return len(encode_adapter(bare)) - head


def reference(net: Any, adapters: dict[float, Adapter]) -> dict[str, Any]:
    base = {k: v.detach().cpu() for k, v in tower_parameters(net).items()}
    two_d = {k for k, v in base.items() if v.dim() == 2}
    rows = []
    for d, a in adapters.items():
        ref_all, nnz_all = _reference_bytes(base, a, two_d_only=False)
        ref_2d, nnz_2d = _reference_bytes(base, a, two_d_only=True)
        v1_all = _v1_residual_bytes(a, None)
        v1_2d = _v1_residual_bytes(a, two_d)
        rows.append(
            {
                "density": d,
                "nnz": nnz_all,
                "nnz_2d": nnz_2d,
                "v1_file_bytes": len(encode_adapter(a)),
                "v1_residual_bytes": v1_all,
                "v1_per_weight": v1_all / nnz_all,
                "v1_2d_bytes": v1_2d,
                "v1_2d_per_weight": v1_2d / max(1, nnz_2d),
                "reference_bytes": ref_all,
                "reference_per_weight": ref_all / nnz_all,
                "reference_2d_bytes": ref_2d,
                "reference_2d_per_weight": ref_2d / max(1, nnz_2d),
                "dense_bytes": sum(v.numel() * 4 for v in base.values()),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows}


def _trim() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc), so that RSS growth
    measures new allocations rather than reuse of memory freed earlier."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _resident(cuda: bool) -> int:
    if cuda:
        return int(torch.cuda.memory_allocated())
    import psutil

    return int(psutil.Process().memory_info().rss)


def memory(
    net: Any, sig: Any, adapters: dict[float, Adapter], copies: int, device: str
) -> dict[str, Any]:
    from server.engine import Engine

    per_rank = lora_params_per_rank(net.visual)
    engine = Engine(net, sig, device, "float32")
    cuda = device.startswith("cuda")
    tower_numel = sum(p.numel() for p in engine.visual.parameters())
    dense_bytes = tower_numel * 4
    held: list[Any] = []
    rows = []
    for d, adapter in adapters.items():
        one = engine.prepare(fake_record("mem"), adapter)
        _trim()
        before = _resident(cuda)
        batch = [engine.prepare(fake_record(f"mem{i}"), adapter) for i in range(copies)]
        _trim()
        after = _resident(cuda)
        held.extend(batch)
        rank = lora_rank_for(adapter.meta.nnz, per_rank)
        lora = rank * per_rank * 4
        rows.append(
            {
                "density": d,
                "nnz": one.residual.nnz,
                "prepared_bytes": one.nbytes,
                "residual_bytes": one.residual.nbytes,
                "head_bytes": one.nbytes - one.residual.nbytes,
                "bytes_per_changed_weight": one.residual.nbytes / one.residual.nnz,
                "measured_bytes_per_adapter": (after - before) / copies,
                "measured_over": copies,
                "measured_with": "torch.cuda.memory_allocated" if cuda else "RSS (psutil)",
                "adapters_per_gib": GIB / one.nbytes,
                "dense_bytes": dense_bytes,
                "dense_per_gib": GIB / dense_bytes,
                "lora_rank": rank,
                "lora_bytes": lora,
                "lora_per_gib": GIB / lora,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    del held
    gc.collect()
    return {"tower_weights": tower_numel, "dtype": "float32", "rows": rows}
