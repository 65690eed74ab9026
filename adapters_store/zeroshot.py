"""A base's class embeddings: the text side of zero-shot answers and of CMKD's teacher.

One function for every caller: the trainer's teacher, ``deltaclip eval --zero-shot`` and the
server's ``/predict/zero-shot`` all call :func:`class_embeddings`, so a label means the same to
all three.

* open_clip bases: one prompt per label (``template``), through the base's tokenizer and frozen
  text tower.
* ``deltaclip-efflite0/imagenet``: the image embedding is the ImageNet-1k classifier's logits
  (its projection is EfficientNet-Lite0's classifier), and a label's embedding is the indicator of
  the ImageNet classes WordNet puts under it (:mod:`adapters_store.wordnet`), L2-normalised. So
  ``cos(z, t_label)`` is the sum of the logits of the label's classes over ``|z|·sqrt(n)``: the
  classifier's own knowledge, reached through words. Prompt templates do not apply.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from .basenames import EFFLITE0

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .wordnet import LabelMapping

DEFAULT_TEMPLATE = "a photo of a {name}."
IMAGENET_CLASSES = 1000


def uses_wordnet(model: str, pretrained: str) -> bool:
    """True for the bases whose text side is the WordNet head rather than a text tower."""
    return (model, pretrained) == EFFLITE0


def label_mappings(labels: Sequence[str]) -> list[LabelMapping]:
    """How the WordNet head reads each label (raises ``UnmappedLabel`` naming the ones it cannot)."""
    from .wordnet import map_labels

    return map_labels(labels)


def prompts(labels: Sequence[str], template: str) -> list[str]:
    """One prompt per label, e.g. ``"a photo of a alarm clock."`` for ``"a photo of a {name}."``."""
    return [template.format(name=label) for label in labels]


@functools.lru_cache(maxsize=8)
def _tokenizer(model: str) -> Any:
    import open_clip

    return open_clip.get_tokenizer(model)


def class_embeddings(
    net: nn.Module,
    model: str,
    pretrained: str,
    labels: Sequence[str],
    template: str = DEFAULT_TEMPLATE,
) -> torch.Tensor:
    """``[len(labels), D]`` L2-normalised float32 class embeddings on ``net``'s device.

    Args:
        net: the base model (only its text tower is used, in eval mode, without gradients).
        model, pretrained: the base's names; they pick the text side.
        labels: the class names, in head order.
        template: the prompt with a ``{name}`` field (open_clip bases only).

    Raises:
        UnmappedLabel: on the WordNet head, a label that maps to no ImageNet class.
    """
    import torch
    import torch.nn.functional as F

    device = next(net.parameters()).device
    if uses_wordnet(model, pretrained):
        emb = torch.zeros(len(labels), IMAGENET_CLASSES)
        for row, mapping in enumerate(label_mappings(labels)):
            emb[row, list(mapping.classes)] = 1.0
        return F.normalize(emb, dim=1).to(device)
    tokens = _tokenizer(model)(prompts(labels, template)).to(device)
    was_training = net.training
    if was_training:  # a served model is already in eval mode: leave its flags alone
        net.eval()
    try:
        with torch.no_grad():
            out = [cast(Any, net).encode_text(chunk).float() for chunk in tokens.split(256)]
    finally:
        if was_training:
            net.train()
    return F.normalize(torch.cat(out), dim=1)
