"""The task head of an imported fine-tune: the base's zero-shot head, or one from a head file.

A dense fine-tune rarely comes with a head in the adapter's ``bn-ln-linear`` layout, so
``deltaclip adapters import-finetune`` either builds one that answers like the base's text head
(CMKD's teacher, :class:`trainer.model.TextHead`) from the class embeddings of
``adapters_store.zeroshot.class_embeddings`` (the one definition of a label's embedding), or
reads a head file, never running code to load it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from adapters_store.bases import BaseSignature
from adapters_store.head import TaskHead, head_shapes
from adapters_store.zeroshot import DEFAULT_TEMPLATE, class_embeddings

from .errors import CheckpointRefused, listed
from .model import logit_scale_of
from .weights_file import read_tensors


def zero_shot_head(embeddings: torch.Tensor, logit_scale: float) -> TaskHead:
    """A task head that answers like the base's text head ``s·cos(z, t_k)``, from class embeddings.

    The head normalises before its linear layer (BatchNorm at its initial identity statistics,
    then LayerNorm, whose output has norm ``√D``), so ``fc = s·t_k/√D`` gives
    ``s·cos(z − mean(z), t_k)``: the text head's logits for any feature ``z`` with zero mean, and
    close to them otherwise (LayerNorm removes the mean).
    """
    emb = torch.nn.functional.normalize(embeddings.detach().float().cpu(), dim=1)
    num_classes, dim = emb.shape
    head = TaskHead(int(dim), int(num_classes))
    with torch.no_grad():
        head.fc.weight.copy_(emb * (logit_scale / math.sqrt(dim)))
    return head.eval()


def base_zero_shot_head(
    net: nn.Module, signature: BaseSignature, class_names: Sequence[str], template: str
) -> tuple[TaskHead, torch.Tensor]:
    """The zero-shot head of ``class_names`` on this base, and the class embeddings it came from."""
    emb = class_embeddings(
        net, signature.model, signature.pretrained, list(class_names), template or DEFAULT_TEMPLATE
    ).cpu()
    return zero_shot_head(emb, logit_scale_of(net)), emb


def head_from_file(path: str | Path, num_classes: int, dim: int) -> dict[str, torch.Tensor]:
    """A task head's ``state_dict`` from a head file (read without running code, as checkpoints).

    The file holds either the whole head (``bn.*``, ``ln.*``, ``fc.weight``, optionally under a
    ``head/`` prefix, as in an adapter) or one ``[C, D]`` linear weight (``weight`` or
    ``fc.weight``), which then acts on the head's normalised features like any adapter's.

    Raises:
        CheckpointRefused: the wrong shape for these classes and this base, a bias (the format's
            head has none), NaN/Inf, or tensors that are not a head.
    """
    raw = {k.removeprefix("head/"): v for k, v in read_tensors(path, "head file").items()}
    shapes = head_shapes(dim, num_classes)
    if set(raw) == set(shapes):
        state = raw
    elif set(raw) in ({"weight"}, {"fc.weight"}):
        state = {k: v.clone() for k, v in TaskHead(dim, num_classes).state_dict().items()}
        state["fc.weight"] = next(iter(raw.values()))
    elif "bias" in raw or "fc.bias" in raw:
        raise CheckpointRefused(
            f"head file {path} has a bias; the adapter's head is bn-ln-linear without one "
            "(docs/FORMAT.md)"
        )
    else:
        raise CheckpointRefused(
            f"head file {path} is not a task head: expected {sorted(shapes)} or one [C, D] "
            f"'weight', got {listed(list(raw))}"
        )
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {shape})"
        for k, shape in shapes.items()
        if tuple(state[k].shape) != shape
    ]
    if wrong:
        raise CheckpointRefused(
            f"head file {path} does not fit {num_classes} classes on a {dim}-d base: "
            + listed(wrong)
        )
    state = {k: v.float() if v.is_floating_point() else v.long() for k, v in state.items()}
    if not all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point()):
        raise CheckpointRefused(f"head file {path} holds NaN or Inf")
    return state
