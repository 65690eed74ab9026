"""The in-memory adapter: a sparse residual over a base's image tower plus a task head.

``build_adapter`` turns (base state, task state) into an :class:`Adapter`; ``merge_state`` is
*the* definition of task weights (docs/FORMAT.md, "format v1") that training export, the CLI and the server's
patcher all reproduce bit for bit::

    W_task[i] = (W_base[i].float() + value_i).to(W_base.dtype)   at the listed positions i
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import InvalidTaskState, ParameterNotFound
from .format.schema import BLOCK_SIZES, RESIDUAL_DTYPE_NAMES, AdapterMeta, head_meta

RESIDUAL_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name) for name in RESIDUAL_DTYPE_NAMES
}
INT32_LIMIT = 2**31


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def index_dtype_for(numel: int) -> torch.dtype:
    """int32 indices, int64 only for parameters with at least 2**31 elements (format v1)."""
    return torch.int64 if numel >= INT32_LIMIT else torch.int32


@dataclass(frozen=True)
class Residual:
    """Changed positions of one parameter and their deltas, in one of the format's two forms.

    Unstructured (``block_size == 1``): ``indices`` are strictly increasing flat positions and
    ``values`` is 1-D, one delta per position. Block form (``block_size = B > 1``): ``indices``
    are strictly increasing *block ids* (block ``k`` is flat positions ``k·B … k·B + B − 1``)
    and ``values`` is ``[n_blocks, B]``; a tail block past the parameter's end carries zeros
    there. Blocks exist so that a served adapter moves whole cache lines (docs/FORMAT.md).
    """

    indices: torch.Tensor
    values: torch.Tensor
    block_size: int = 1

    @property
    def nnz(self) -> int:
        """Stored values: changed weights, or ``n_blocks × B`` for the block form."""
        return int(self.values.numel())

    def positions(self, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(flat positions int64, deltas)`` inside a parameter of ``numel`` elements.

        The block form expands to every position of every block, minus a tail block's positions
        past the end; the unstructured form is returned as stored.
        """
        idx = self.indices.to(torch.int64)
        if self.block_size == 1:
            return idx, self.values
        b = self.block_size
        pos = (idx[:, None] * b + torch.arange(b, device=idx.device)).reshape(-1)
        inside = pos < numel
        return pos[inside], self.values.reshape(-1)[inside]


@dataclass
class Adapter:
    meta: AdapterMeta
    residual: dict[str, Residual]
    head: dict[str, torch.Tensor]
    class_embeddings: torch.Tensor | None = None

    def change_counts(self) -> dict[str, int]:
        """Changed weights per base parameter, in key order."""
        return {name: r.nnz for name, r in sorted(self.residual.items())}

    @property
    def block_size(self) -> int:
        """The residual's block size (1: unstructured); a file holds one form only."""
        return next((r.block_size for r in self.residual.values()), 1)


def utc_now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class AdapterInfo:
    """What a producer says about an adapter: the metadata of format v1 (docs/FORMAT.md §3)
    that the tensors cannot tell. :func:`build_adapter` derives the rest.

    Attributes:
        base_model, base_pretrained, base_fingerprint: the base it was trained on (the names
            must be that base's: rule ``base-names``).
        created_at: ISO 8601 UTC; None for now.
    """

    task: str
    base_model: str
    base_pretrained: str
    base_fingerprint: str
    class_names: Sequence[str]
    source_domain: str = ""
    target_domain: str = ""
    method: str = ""
    train_config: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    created_at: str | None = None


def build_adapter(
    base_state: Mapping[str, torch.Tensor],
    task_state: Mapping[str, torch.Tensor],
    info: AdapterInfo,
    *,
    head_state: Mapping[str, torch.Tensor],
    class_embeddings: torch.Tensor | None = None,
    eligible: Mapping[str, torch.Tensor] | None = None,
    mask: Mapping[str, torch.Tensor] | None = None,
    residual_dtype: torch.dtype = torch.float32,
    block_size: int = 1,
) -> Adapter:
    """Residual = task - base at every position that differs (and, if given, where ``mask`` is set).

    Args:
        base_state: the base's parameters (only keys also in ``task_state`` are compared).
        task_state: the task's parameters, same keys, shapes and dtypes as in ``base_state``.
        info: what the producer says about the adapter; the rest of its metadata (head shape,
            residual dtype, ``nnz``, ``eligible_params``, density) is derived here.
        head_state: the task head's ``state_dict`` (its width and class count must agree with
            ``info.class_names``).
        eligible: the parameters allowed to change (defaults to ``task_state``'s keys); their
            total size is recorded as ``eligible_params``.
        mask: optional boolean tensors per key restricting which positions may be stored.
        residual_dtype: float32 (exact for typical fine-tunes), bfloat16 or float16.
        block_size: 1 for the unstructured residual, else ``B`` in ``BLOCK_SIZES``: every block
            of ``B`` consecutive flat positions holding a change is stored whole, its unchanged
            positions as ``-0.0`` (adding ``-0.0`` is the identity, even for a ``-0.0`` weight).

    The delta is computed in float64 then rounded to ``residual_dtype``; positions whose delta
    rounds to zero are dropped, so ``nnz`` counts weights that really change. In float32 the
    merge reproduces a task weight exactly whenever it lies within a factor of two of its base
    weight (Sterbenz); a weight that shrinks by more than 2x towards zero can come back one
    rounding step off. The merge is the definition of the task weights, so producers (the
    trainer) snap their final weights onto ``merge_state(base, adapter)`` before evaluating.
    """
    if residual_dtype not in RESIDUAL_DTYPES.values():
        raise InvalidTaskState(
            f"residual dtype must be one of {sorted(RESIDUAL_DTYPES)}, got {residual_dtype}"
        )
    if block_size != 1 and block_size not in BLOCK_SIZES:
        raise InvalidTaskState(f"block size must be 1 or one of {BLOCK_SIZES}, got {block_size}")
    eligible_keys = list(eligible) if eligible is not None else list(task_state)
    eligible_count = sum(int(base_state[k].numel()) for k in eligible_keys)
    residual: dict[str, Residual] = {}
    for key in sorted(task_state):
        base_t = base_state[key]
        task_t = task_state[key]
        if base_t.shape != task_t.shape or base_t.dtype != task_t.dtype:
            raise InvalidTaskState(
                f"{key}: task tensor {tuple(task_t.shape)}/{task_t.dtype} does not match base "
                f"{tuple(base_t.shape)}/{base_t.dtype}"
            )
        if not base_t.is_floating_point():
            if not torch.equal(base_t, task_t):
                raise InvalidTaskState(f"{key}: non-floating tensors cannot carry a residual")
            continue
        flat_base = base_t.detach().reshape(-1).cpu()
        flat_task = task_t.detach().reshape(-1).cpu()
        changed = flat_task != flat_base
        if mask is not None and key in mask:
            changed &= mask[key].reshape(-1).cpu().bool()
        if not bool(changed.any()):
            continue
        if key not in eligible_keys:
            raise InvalidTaskState(f"{key} changed but is not an eligible parameter")
        res = _residual_of(flat_base, flat_task, changed, residual_dtype, block_size)
        if not torch.isfinite(res.values).all():
            raise InvalidTaskState(f"{key}: the residual is not finite")
        if res.nnz:
            residual[key] = res
    nnz = sum(r.nnz for r in residual.values())
    dim = int(head_state["fc.weight"].shape[1])
    meta = AdapterMeta(
        task=info.task,
        base_model=info.base_model,
        base_pretrained=info.base_pretrained,
        base_fingerprint=info.base_fingerprint,
        class_names=list(info.class_names),
        head=head_meta(dim, len(info.class_names)),
        residual_dtype=dtype_name(residual_dtype),
        nnz=nnz,
        eligible_params=eligible_count,
        density=nnz / eligible_count if eligible_count else 0.0,
        source_domain=info.source_domain,
        target_domain=info.target_domain,
        method=info.method,
        train_config=dict(info.train_config),
        metrics=dict(info.metrics),
        created_at=info.created_at or utc_now_iso(),
    )
    head = {k: v.detach().cpu().contiguous() for k, v in head_state.items()}
    emb = (
        class_embeddings.detach().float().cpu().contiguous()
        if class_embeddings is not None
        else None
    )
    return Adapter(meta=meta, residual=residual, head=head, class_embeddings=emb)


def _residual_of(
    flat_base: torch.Tensor,
    flat_task: torch.Tensor,
    changed: torch.Tensor,
    dtype: torch.dtype,
    block_size: int,
) -> Residual:
    """The residual of one flat parameter at ``changed``; deltas that round to 0 are not changes."""
    numel = flat_base.numel()
    if block_size == 1:
        idx = changed.nonzero().squeeze(1)
        delta = (flat_task[idx].double() - flat_base[idx].double()).to(dtype)
        keep = delta != 0
        return Residual(idx[keep].to(index_dtype_for(numel)), delta[keep].contiguous())
    b = block_size
    pad = -numel % b
    delta = (flat_task.double() - flat_base.double()).to(dtype)
    delta = torch.where(changed, delta, torch.zeros_like(delta))
    delta = torch.cat([delta, torch.zeros(pad, dtype=dtype)]).view(-1, b)
    blocks = (delta != 0).any(1).nonzero().squeeze(1)
    values = delta[blocks]
    values = torch.where(values == 0, torch.full_like(values, -0.0), values)
    n_blocks = numel // b + (pad > 0)
    return Residual(blocks.to(index_dtype_for(n_blocks)), values.contiguous(), block_size=b)


def merge_tensor(base: torch.Tensor, residual: Residual) -> torch.Tensor:
    """A copy of ``base`` with the residual applied by the format's definition."""
    out = base.detach().clone()
    flat = out.view(-1)
    pos, values = residual.positions(flat.numel())
    idx = pos.to(device=flat.device)
    flat[idx] = (flat[idx].float() + values.to(flat.device).float()).to(flat.dtype)
    return out


def merge_state(
    base_state: Mapping[str, torch.Tensor], adapter: Adapter
) -> dict[str, torch.Tensor]:
    """The dense task weights: ``base_state`` with every residual merged in (inputs untouched)."""
    merged = dict(base_state)
    for key, res in adapter.residual.items():
        if key not in base_state:
            raise ParameterNotFound(f"the base has no parameter {key}")
        merged[key] = merge_tensor(base_state[key], res)
    return merged
