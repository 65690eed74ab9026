"""A raw /predict body is an image when its bytes are one, whatever its Content-Type says.

``curl --data-binary @photo.jpg URL`` labels the body ``application/x-www-form-urlencoded``;
the server sniffs the bytes (server/images.image_format) instead of trusting that label, and a
body that is not an image is still refused with 415.
"""

from __future__ import annotations

import io

import pytest
from PIL import Image

from adapters_store.format.codec import encode_adapter
from adapters_store.synthetic import random_adapter
from server.images import image_format
from tests.conftest import png_bytes

CURL_DATA_BINARY = "application/x-www-form-urlencoded"  # what curl --data-binary sends


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png_bytes(3))).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def task(client, admin, tiny) -> str:  # type: ignore[no-untyped-def]
    r = client.post(
        "/admin/adapters", headers=admin,
        files={"file": ("t.safetensors", encode_adapter(random_adapter(*tiny, "t")))},
    )  # fmt: skip
    assert r.status_code == 201, r.text
    return "t"


@pytest.mark.parametrize("content_type", [CURL_DATA_BINARY, "text/plain", None])
def test_an_image_body_is_answered_whatever_its_label(client, task, content_type) -> None:  # type: ignore[no-untyped-def]
    image = jpeg_bytes()
    labelled = client.post(
        f"/predict?task={task}&top_k=2", content=image, headers={"content-type": "image/jpeg"}
    )
    headers = {"content-type": content_type} if content_type else {}
    r = client.post(f"/predict?task={task}&top_k=2", content=image, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json() == labelled.json()  # the same image, the same answer
    assert len(r.json()["predictions"]) == 1 and len(r.json()["predictions"][0]) == 2


@pytest.mark.parametrize(
    "body",
    [b"task=t&file=photo.jpg", b"BM but not a bitmap", b"GIF89a\x01\x00\x01\x00", b""],
    ids=["form-fields", "bmp-magic-only", "gif", "empty"],
)
def test_a_body_that_is_not_an_allowed_image_is_still_415(client, task, body: bytes) -> None:  # type: ignore[no-untyped-def]
    r = client.post(
        f"/predict?task={task}", content=body, headers={"content-type": CURL_DATA_BINARY}
    )
    assert r.status_code == 415, r.text
    error = r.json()["error"]
    assert error["code"] == "unsupported_media_type"
    assert CURL_DATA_BINARY in error["message"]


def test_zero_shot_sniffs_too_but_admin_uploads_do_not(client, admin, task) -> None:  # type: ignore[no-untyped-def]
    image = png_bytes(4)
    r = client.post(
        "/predict/zero-shot?labels=cat,dog",
        content=image,
        headers={"content-type": CURL_DATA_BINARY},
    )
    assert r.status_code == 200, r.text
    assert {p["label"] for p in r.json()["predictions"][0]} == {"cat", "dog"}
    r = client.post(
        "/admin/adapters", content=image, headers={**admin, "content-type": CURL_DATA_BINARY}
    )
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"


def test_image_format_reads_the_header_with_the_allowed_parser_only() -> None:
    assert image_format(png_bytes(0)) == "PNG"
    assert image_format(jpeg_bytes()) == "JPEG"
    assert image_format(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40) is None  # magic, no valid header
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "TIFF")
    assert image_format(buf.getvalue()) is None  # an image, but not an allowed one
