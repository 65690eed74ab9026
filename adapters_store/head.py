"""The task head (the CMKD student, the only head that answers requests).

``BatchNorm1d(D)`` with its bias frozen at 0 → ``LayerNorm(D, eps=1e-6)`` →
``Linear(D, C, bias=False)`` initialised from N(0, 0.001²), as in docs/METHOD.md. It lives in the
contract package because its ``state_dict`` is stored in every adapter file.
"""

from __future__ import annotations

import torch
from torch import nn

# The head's name in adapter metadata is part of the format, declared with its schema.
from .format.schema import HEAD_TYPE as HEAD_TYPE


class TaskHead(nn.Module):
    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        self.bn.bias.requires_grad_(False)
        self.ln = nn.LayerNorm(dim, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.fc.weight, std=0.001)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.ln(self.bn(features)))


def head_shapes(dim: int, num_classes: int) -> dict[str, tuple[int, ...]]:
    """The exact ``state_dict`` layout of a :class:`TaskHead`, used to validate adapter files."""
    return {
        "bn.weight": (dim,),
        "bn.bias": (dim,),
        "bn.running_mean": (dim,),
        "bn.running_var": (dim,),
        "bn.num_batches_tracked": (),
        "ln.weight": (dim,),
        "ln.bias": (dim,),
        "fc.weight": (num_classes, dim),
    }


def head_from_state(state: dict[str, torch.Tensor]) -> TaskHead:
    """A :class:`TaskHead` in eval mode carrying ``state`` (shapes already validated)."""
    num_classes, dim = state["fc.weight"].shape
    head = TaskHead(int(dim), int(num_classes))
    head.load_state_dict(state)
    return head.eval()
