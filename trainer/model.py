"""The two heads around the open_clip model: the task head (student) and the text head (teacher).

Image features are ``model.encode_image(x)``: the *unnormalised* projected embedding, which the
task head (``adapters_store.head.TaskHead``) normalises itself with BatchNorm and LayerNorm. The
teacher is ``g(z) = exp(logit_scale)·cos(z, t_k)`` with ``t_k`` the base's L2-normalised class
embedding (``adapters_store.zeroshot.class_embeddings``: a prompt through the frozen text tower, or
the default base's WordNet head), computed once. Only the image tower and the task
head are trained; ``logit_scale`` and the text tower stay frozen.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from adapters_store.head import TaskHead

# Every trainable BatchNorm of torch, named by its public classes (the lazy ones become the
# plain ones after their first call); quantised BatchNorms cannot be trained and are left out.
BATCHNORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
)


def tower_kind(net: nn.Module) -> str:
    """``"vit"``, ``"efficientnet"`` or ``"conv"`` (ResNet, ConvNeXt and other conv towers).

    It picks the per-base defaults of lr, head lr multiplier and τ (``TOWER_DEFAULTS``;
    docs/METHOD.md gives ViT and ResNet values). A tower with BatchNorm, or a trunk named like a
    conv net, is convolutional; anything else is treated as a vision transformer.
    """
    visual = cast(nn.Module, net.visual)
    name = type(getattr(visual, "trunk", visual)).__name__.lower()
    if "efficientnet" in name:
        return "efficientnet"
    if any(isinstance(m, BATCHNORM_TYPES) for m in visual.modules()):
        return "conv"
    if "resnet" in name or "convnext" in name:
        return "conv"
    return "vit"


class TextHead(nn.Module):
    """``g(z)_k = s·cos(z, t_k)``, ``s = exp(logit_scale)`` of the base; nothing here is trained."""

    def __init__(self, class_embeddings: torch.Tensor, logit_scale: float) -> None:
        super().__init__()
        self.register_buffer("class_embeddings", F.normalize(class_embeddings.float(), dim=1))
        self.scale = float(logit_scale)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        emb = cast(torch.Tensor, self.class_embeddings)
        return self.scale * F.normalize(features.float(), dim=1) @ emb.t()


class CMKDModel(nn.Module):
    """The open_clip model, its task head and its text head, with the training-mode rules.

    ``train()`` puts the image tower and the task head in training mode but keeps every
    BatchNorm of the tower in eval mode (its running statistics stay the base's, as docs/METHOD.md
    describes); the text tower stays in eval mode and frozen.
    """

    def __init__(self, net: nn.Module, head: TaskHead, teacher: TextHead) -> None:
        super().__init__()
        self.net = net
        self.head = head
        self.teacher = teacher
        net.requires_grad_(False)
        cast(nn.Module, net.visual).requires_grad_(True)

    @property
    def visual(self) -> nn.Module:
        """The image tower (the part that RST trains and the adapter stores)."""
        return cast(nn.Module, self.net.visual)

    def train(self, mode: bool = True) -> CMKDModel:
        """Train the tower and the task head, keeping the tower's BatchNorms in eval mode."""
        self.training = mode
        self.net.eval()
        self.visual.train(mode)
        for m in self.visual.modules():
            if isinstance(m, BATCHNORM_TYPES):
                m.eval()
        self.head.train(mode)
        self.teacher.eval()
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The tower's ``encode_image`` output in float32: the input of both heads."""
        return cast(Any, self.net).encode_image(images).float()

    def forward(self, parts: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One training forward: the tower on all parts at once, then the task head on each part
        separately (per-domain BatchNorm statistics) and the text head. A single ``forward`` per
        step is also what DistributedDataParallel needs to synchronise gradients."""
        features = self.features(torch.cat(parts)).split([p.shape[0] for p in parts])
        return [self.head(f) for f in features], [self.teacher(f) for f in features]

    def head_parameters(self) -> list[nn.Parameter]:
        """The task head's trainable parameters (its BatchNorm bias is frozen at 0)."""
        return [p for p in self.head.parameters() if p.requires_grad]


def logit_scale_of(net: nn.Module) -> float:
    """``exp(logit_scale)`` of the base (100 for OpenAI CLIP)."""
    scale = getattr(net, "logit_scale", None)
    if scale is None:
        return 100.0
    return float(torch.as_tensor(scale).detach().exp())
