"""Deterministic mode (``DELTACLIP_DETERMINISTIC``): an image's probabilities do not depend on
what it is batched with. The same image, sent alone and inside concurrent requests that the
worker batches with other images in every position, gets bit-identical probabilities.
"""

from __future__ import annotations

import random
import threading
from typing import Any

import torch
from fastapi.testclient import TestClient

from adapters_store.format.codec import decode_adapter, encode_adapter
from tests.conftest import png_bytes
from tests.security.conftest import serving
from tests.security.helpers import ADMIN

THREADS, CALLS = 6, 6


def classify(client: TestClient, files: list[bytes]) -> torch.Tensor:
    """The raw ``[N, C]`` probabilities the service computes (before JSON rounding)."""
    service = client.app.state.service  # type: ignore[attr-defined]

    async def read() -> list[bytes]:
        return files

    assert client.portal is not None
    return client.portal.call(service.classify, "shapes", None, None, read).probs


def sharpened(trained: bytes) -> bytes:
    """The trained adapter with its logits scaled to a spread of about 4 (legal, well within the
    head bound): the tiny base's near-uniform probabilities would hide rounding differences."""
    adapter = decode_adapter(trained)
    fc = adapter.head["fc.weight"]
    adapter.head["fc.weight"] = fc * (4.0 / float(fc.norm(dim=1).mean()))
    return encode_adapter(adapter)


def test_an_image_gets_bit_identical_answers_alone_and_in_mixed_batches(
    store: Any, trained: bytes
) -> None:
    settings = store.model_copy(update={"deterministic": True, "max_batch": 8, "max_wait_ms": 20.0})
    image, others = png_bytes(1000), [png_bytes(i) for i in range(12)]
    with serving(settings) as client:
        r = client.post("/admin/adapters", files={"file": ("a", sharpened(trained))}, headers=ADMIN)
        assert r.status_code == 201, r.text
        alone = classify(client, [image])[0]
        assert torch.equal(classify(client, [image])[0], alone)
        seen: list[torch.Tensor] = []
        errors: list[BaseException] = []

        def client_loop(seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(CALLS):
                    files = rng.sample(others, rng.randint(0, 4))
                    at = rng.randint(0, len(files))
                    files.insert(at, image)
                    seen.append(classify(client, files)[at])
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == []
        assert len(seen) == THREADS * CALLS
        mismatched = [i for i, probs in enumerate(seen) if not torch.equal(probs, alone)]
        assert mismatched == [], f"{len(mismatched)} of {len(seen)} answers differ"
        # Forward passes held several images (padded to 8): the batch shape was never the issue.
        registry = client.app.state.runtime.metrics.registry  # type: ignore[attr-defined]
        images = registry.get_sample_value("deltaclip_batch_images_sum")
        passes = registry.get_sample_value("deltaclip_batch_images_count")
        assert images > passes, (images, passes)
        # The JSON answers agree too.
        answers = {
            str(client.post("/predict?task=shapes&top_k=4", files=[("file", ("x.png", image))]).json()["predictions"])
            for _ in range(2)
        }  # fmt: skip
        assert len(answers) == 1
