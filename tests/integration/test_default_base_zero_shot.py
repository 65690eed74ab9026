"""The default base answers zero-shot with real knowledge: its ImageNet classifier reached
through WordNet (adapters_store.zeroshot), over HTTP and through the CLI."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adapters_store.bases import EFFLITE0, build_base, signature_of
from adapters_store.errors import IncompatibleBase
from adapters_store.format.codec import check_against_base
from adapters_store.synthetic import random_adapter

LABELS = "cat,dog,coffee,car"
# The fingerprint of the default base before its text side became WordNet (random text tower,
# a random 256-d projection): adapters made on it must be refused, never reused.
PREVIOUS_EFFLITE0_FINGERPRINT = "d555528fe5faa0f36533ebcf61cc7ae0c68b545bee70c4f0adaf970e691517ef"


def _photos() -> dict[str, np.ndarray]:
    from skimage import data

    return {"cat": data.chelsea(), "coffee": data.coffee(), "dog": data.astronaut(),
            "car": data.rocket()}  # fmt: skip


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def efflite0_client(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from adapters_store.catalog import upgrade
    from server.config import ServerSettings
    from server.main import create_app
    from tests.conftest import wait_ready

    tmp = tmp_path_factory.mktemp("efflite0")
    url = f"sqlite:///{tmp / 'catalog.db'}"
    upgrade(url)
    settings = ServerSettings(home=tmp / "home", database_url=url, base_model=EFFLITE0[0],
                              base_pretrained=EFFLITE0[1], max_wait_ms=1.0)  # fmt: skip
    with TestClient(create_app(settings)) as client:
        wait_ready(client, timeout=120)
        yield client


def test_zero_shot_over_http_knows_cats_and_coffee(efflite0_client) -> None:  # type: ignore[no-untyped-def]
    photos = _photos()
    for label in ("cat", "coffee"):
        r = efflite0_client.post(
            f"/predict/zero-shot?labels={LABELS}",
            files={"file": (f"{label}.png", _png(photos[label]), "image/png")},
        )
        assert r.status_code == 200, r.text
        top = r.json()["predictions"][0][0]
        assert top["label"] == label and top["score"] > 0.5


def test_a_label_wordnet_cannot_place_is_a_400_naming_it(efflite0_client) -> None:  # type: ignore[no-untyped-def]
    r = efflite0_client.post(
        "/predict/zero-shot?labels=cat,xyzzy",
        files={"file": ("cat.png", _png(_photos()["cat"]), "image/png")},
    )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "unmapped_label" and "xyzzy" in r.json()["error"]["message"]


def test_zero_shot_through_the_cli(tmp_path: Path) -> None:
    for label, image in _photos().items():
        (tmp_path / "data" / label).mkdir(parents=True)
        Image.fromarray(image).save(tmp_path / "data" / label / f"{label}.png")
    out = subprocess.run(
        [sys.executable, "-m", "adapters_store.cli", "eval", "--zero-shot", "--json",
         "--data", str(tmp_path / "data"), "--home", str(tmp_path / "home")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["base_model"] == EFFLITE0[0] and report["warning"] is None
    assert report["per_class_accuracy"]["cat"] == 1.0
    assert report["per_class_accuracy"]["coffee"] == 1.0


def test_adapters_made_on_the_previous_default_base_are_refused() -> None:
    net = build_base(*EFFLITE0)
    sig = signature_of(net, *EFFLITE0)
    old = random_adapter(net, sig, "old-task")
    old.meta.base_fingerprint = PREVIOUS_EFFLITE0_FINGERPRINT
    with pytest.raises(IncompatibleBase) as err:
        check_against_base(old, sig)
    assert PREVIOUS_EFFLITE0_FINGERPRINT[:12] in str(err.value)
    assert sig.fingerprint[:12] in str(err.value)
