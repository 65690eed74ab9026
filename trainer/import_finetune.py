"""``deltaclip adapters import-finetune``: a dense fine-tune of the base turned into a sparse adapter.

A user who fine-tuned the whole image tower elsewhere (any trainer, any method) brings its
checkpoint; this keeps the ``⌊density × eligible⌋`` largest ``|W − W0|`` over the whole tower (the
same global top-k as RST's density budget, :func:`trainer.rst.enforce_budget`) and writes a v1
adapter through the trainer's own path (``export.snap`` → ``export.verified_adapter`` →
``store_written``), so the file obeys every rule a trained adapter obeys.

Loading never runs code: ``.safetensors`` through safetensors, anything else through
``torch.load(..., weights_only=True)``, which refuses a pickle that names a class. The checkpoint
may hold the whole model's keys, only the ``visual.`` keys, the tower's own keys without the
prefix (``model.visual.state_dict()``), a ``{"state_dict": ...}`` wrapper, or DDP's ``module.``
prefix.

The report says how much of the fine-tune survives: per tensor and overall, the kept relative
Frobenius norm ``‖kept ΔW‖ / ‖ΔW‖`` (1.0 when nothing was dropped).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters_store.adapter import Adapter, AdapterInfo, utc_now_iso
from adapters_store.bases import BaseSignature, tower_parameters
from adapters_store.format.schema import BLOCK_SIZES
from adapters_store.head import TaskHead
from adapters_store.zeroshot import DEFAULT_TEMPLATE

from .errors import CheckpointRefused, listed
from .export import snap, verified_adapter
from .import_head import base_zero_shot_head, head_from_file
from .rst import enforce_block_budget, enforce_budget
from .transforms import image_size_of
from .weights_file import read_tensors

TOWER_PREFIX = "visual."


@dataclass
class Aligned:
    """A checkpoint matched against the base: the tuned tower and what could not be carried."""

    tower: dict[str, torch.Tensor]
    ignored: list[str] = field(default_factory=list)


def align(state: Mapping[str, torch.Tensor], net: nn.Module) -> Aligned:
    """Match a checkpoint's keys and shapes to the base's; the tuned tower in the base's dtypes.

    Keys outside the image tower (the text tower, ``logit_scale``, the tower's buffers) are
    allowed, but an adapter can carry only tower parameters: those that differ from the base are
    listed in ``ignored``.

    Raises:
        CheckpointRefused: another architecture (missing, unexpected or misshapen keys, named),
            or NaN/Inf in a tower parameter.
    """
    base = net.state_dict()
    tower = tower_parameters(net)
    bare = {f"{TOWER_PREFIX}{k}": v for k, v in state.items()}
    if not any(k.startswith(TOWER_PREFIX) for k in state) and set(bare) <= set(base):
        state = bare  # the tower's own state dict, ``model.visual.state_dict()``
    missing = [k for k in tower if k not in state]
    unexpected = [k for k in state if k not in base]
    misshapen = [
        f"{k} {tuple(v.shape)} (base {tuple(base[k].shape)})"
        for k, v in state.items()
        if k in base and v.shape != base[k].shape
    ]
    if missing or unexpected or misshapen:
        parts = [
            f"{label}: {listed(keys)}"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape mismatch", misshapen),
            )
            if keys
        ]
        raise CheckpointRefused(
            "the checkpoint is not a fine-tune of this base's architecture "
            f"({net.__class__.__name__}, {len(tower)} image-tower parameters): " + "; ".join(parts)
        )
    bad = [k for k in tower if not bool(torch.isfinite(state[k].float()).all())]
    if bad:
        raise CheckpointRefused(f"the checkpoint holds NaN or Inf in {listed(bad)}")
    ignored = [
        k
        for k, v in state.items()
        if k not in tower and not torch.equal(v.to(base[k].dtype), base[k])
    ]
    tuned = {k: state[k].detach().to(dtype=p.dtype, device="cpu") for k, p in tower.items()}
    return Aligned(tuned, sorted(ignored))


@torch.no_grad()
def keep_largest(
    base: Mapping[str, torch.Tensor],
    tuned: Mapping[str, torch.Tensor],
    density: float,
    *,
    block_size: int = 1,
) -> dict[str, torch.Tensor]:
    """The tuned tower with only the ``⌊density × eligible⌋`` largest ``|W − W0|`` kept.

    Args:
        base, tuned: ``W0`` and the fine-tuned ``W``, on CPU, keyed like the tower.
        density: the fraction of the tower's weights that may differ from the base.
        block_size: weights kept together (1: unstructured; 2, 4, 8, 16: the format's block
            form, keeping the ``⌊density × eligible / B⌋`` blocks of largest L2 norm, as RST's
            block budget does, so that the stored weights stay within the density).

    Raises:
        CheckpointRefused: a density that keeps no weight, or an unsupported block size.
    """
    if block_size != 1 and block_size not in BLOCK_SIZES:
        raise CheckpointRefused(
            f"block size {block_size}: use 1 (unstructured) or one of {BLOCK_SIZES}"
        )
    eligible = sum(int(t.numel()) for t in base.values())
    budget = int(density * eligible) // block_size
    if budget < 1:
        raise CheckpointRefused(
            f"density {density} keeps no weight of a {eligible}-weight tower "
            f"(at least {1 / eligible:.2g} is needed)"
        )
    params = {k: nn.Parameter(v.clone(), requires_grad=False) for k, v in tuned.items()}
    if block_size == 1:
        enforce_budget(params, base, budget)
    else:
        enforce_block_budget(params, base, budget, block_size)
    return {k: p.detach() for k, p in params.items()}


def kept_norms(
    base: Mapping[str, torch.Tensor],
    tuned: Mapping[str, torch.Tensor],
    kept: Mapping[str, torch.Tensor],
) -> dict[str, Any]:
    """Per changed tensor and overall: changed and kept weights, and ``‖kept ΔW‖ / ‖ΔW‖``.

    Norms are taken in float64 over ``tuned − base`` and ``kept − base``.

    Raises:
        CheckpointRefused: the checkpoint is equal to the base (no tower weight differs).
    """
    tensors: dict[str, dict[str, Any]] = {}
    full_sq = kept_sq = 0.0
    for key, w0 in base.items():
        delta = tuned[key].double() - w0.double()
        changed = int((delta != 0).sum())
        if not changed:
            continue
        kept_delta = kept[key].double() - w0.double()
        f, k = float(delta.square().sum()), float(kept_delta.square().sum())
        full_sq, kept_sq = full_sq + f, kept_sq + k
        tensors[key] = {
            "changed": changed,
            "kept": int((kept_delta != 0).sum()),
            "kept_norm": math.sqrt(k / f),
        }
    if not tensors:
        raise CheckpointRefused(
            "the checkpoint equals the base: no image-tower weight differs, nothing to import"
        )
    return {
        "changed": sum(t["changed"] for t in tensors.values()),
        "kept": sum(t["kept"] for t in tensors.values()),
        "kept_norm": math.sqrt(kept_sq / full_sq),
        "tensors": tensors,
    }


@dataclass
class ImportRequest:
    """What to import and how: the checkpoint, the task, its classes and head, the budget.

    ``block_size`` is the place for block-structured residuals (kept weights in runs of that
    size); only 1 is accepted until the format has blocks.
    """

    checkpoint: Path
    task: str
    class_names: list[str]
    density: float
    head_file: Path | None = None
    template: str = DEFAULT_TEMPLATE
    residual_dtype: str = "float32"
    block_size: int = 1
    source_domain: str = ""
    target_domain: str = ""
    created_at: str | None = None


@dataclass
class Imported:
    """The adapter built from a fine-tune, its report, and the towers to compare them on data."""

    adapter: Adapter
    report: dict[str, Any]
    net: nn.Module
    signature: BaseSignature
    head: TaskHead
    dense: dict[str, torch.Tensor]
    served: dict[str, torch.Tensor]


def check_class_names(names: Sequence[str]) -> list[str]:
    """The class names, stripped; refused when empty, blank or repeated (the format's rule)."""
    cleaned = [n.strip() for n in names]
    if not cleaned or any(not n for n in cleaned):
        raise CheckpointRefused("give the class names (non-blank), in the head's logit order")
    repeated = sorted({n for n in cleaned if cleaned.count(n) > 1})
    if repeated:
        raise CheckpointRefused(f"class names repeated: {', '.join(repeated)}")
    return cleaned


def build_import(request: ImportRequest, net: nn.Module, signature: BaseSignature) -> Imported:
    """The sparse adapter of ``request``'s checkpoint over ``net`` (the base, left unchanged).

    Raises:
        CheckpointRefused: see :func:`read_tensors`, :func:`align`, :func:`keep_largest`,
            :func:`kept_norms`, :func:`head_from_file`.
        ExactnessError: the adapter would not reproduce the kept weights (never expected).
    """
    names = check_class_names(request.class_names)
    aligned = align(read_tensors(request.checkpoint), net)
    base = {k: p.detach().cpu().clone() for k, p in tower_parameters(net).items()}
    kept = keep_largest(base, aligned.tower, request.density, block_size=request.block_size)
    served, _ = snap(base, kept, request.residual_dtype)
    report = kept_norms(base, aligned.tower, served)
    report["ignored_outside_tower"] = aligned.ignored
    emb: torch.Tensor | None = None
    if request.head_file is not None:
        head_state = head_from_file(request.head_file, len(names), signature.embed_dim)
        head = TaskHead(signature.embed_dim, len(names))
        head.load_state_dict(head_state)
        head.eval()
    else:
        head, emb = base_zero_shot_head(net, signature, names, request.template)
    source = "file" if request.head_file is not None else "zero-shot"
    info = AdapterInfo(
        task=request.task,
        base_model=signature.model,
        base_pretrained=signature.pretrained,
        base_fingerprint=signature.fingerprint,
        class_names=names,
        source_domain=request.source_domain,
        target_domain=request.target_domain,
        method="import-finetune",
        train_config={
            "image_size": image_size_of(net),
            "imported_from": request.checkpoint.name,
            "density": request.density,
            "residual_dtype": request.residual_dtype,
            "block_size": request.block_size,
            "head": source,
            **({"prompt_template": request.template} if emb is not None else {}),
        },
        metrics={
            "kept_norm": report["kept_norm"],
            "changed_weights": report["changed"],
            "kept_weights": report["kept"],
        },
        created_at=request.created_at or utc_now_iso(),
    )
    adapter = verified_adapter(
        base,
        served,
        info,
        head_state=head.state_dict(),
        class_embeddings=emb,
        residual_dtype=request.residual_dtype,
        block_size=request.block_size,
    )
    report.update(nnz=adapter.meta.nnz, density=adapter.meta.density, head=source)
    return Imported(adapter, report, net, signature, head, aligned.tower, served)
