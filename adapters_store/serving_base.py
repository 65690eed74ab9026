"""The base adapters are registered and loaded against: its signature and its weights.

Every door that registers an adapter (``POST /admin/adapters``, ``deltaclip adapters
register``, ``deltaclip train``, ``deltaclip adapters import-finetune``) and every load holds one
of these, built once per process with the base itself, so each applies the same rules,
``merged-finite`` included (docs/FORMAT.md §5): :meth:`Registry.register
<adapters_store.registry.Registry.register>` and ``load`` take nothing less.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .bases import BaseSignature, build_base, signature_of
from .format.servable import BaseWeights, StateWeights


@dataclass(frozen=True)
class ServingBase:
    """A base as the store checks adapters against it.

    Attributes:
        signature: its names, fingerprint and parameter shapes.
        weights: reads its weights at given positions (the server's serving copy; a built
            base's ``state_dict`` elsewhere).
    """

    signature: BaseSignature
    weights: BaseWeights

    @classmethod
    def of(cls, net: nn.Module, signature: BaseSignature) -> ServingBase:
        """The base ``net`` (as built, before any training changes it), with its signature."""
        state = {key: value.detach() for key, value in net.state_dict().items()}
        return cls(signature, StateWeights(state))

    @classmethod
    def build(cls, model: str, pretrained: str) -> tuple[nn.Module, ServingBase]:
        """Build the base ``model`` / ``pretrained`` once: the network and its serving base."""
        net = build_base(model, pretrained)
        return net, cls.of(net, signature_of(net, model, pretrained))
