"""deltaclip_client: a small typed Python client for ``deltaclip serve``'s HTTP API.

It imports neither the server nor the trainer (tests/unit/test_layering.py checks it), so any
program (the trainer's ``--push``, the demo, ``deltaclip predict --server``) can talk to a
server over HTTP with it::

    from deltaclip_client import Client

    with Client("http://127.0.0.1:8000", token=os.environ["DELTACLIP_ADMIN_TOKEN"]) as c:
        c.register("task.safetensors", alias="production")
        print(c.predict("real2sketch", "photo.jpg", top_k=3).labels[0])
"""

from .answers import AdapterPage, Label, Prediction, Registration, ZeroShot
from .client import Client, ImageInput
from .errors import (
    ApiError,
    BadRequest,
    ClientError,
    Conflict,
    Forbidden,
    InvalidAnswer,
    NotFound,
    PayloadTooLarge,
    ServerFailed,
    TransportFailed,
    Unauthorized,
    Unavailable,
    Unprocessable,
    UnsupportedMediaType,
)

__all__ = [
    "AdapterPage", "ApiError", "BadRequest", "Client", "ClientError", "Conflict", "Forbidden",
    "ImageInput", "InvalidAnswer", "Label", "NotFound", "PayloadTooLarge", "Prediction",
    "Registration", "ServerFailed", "TransportFailed", "Unauthorized", "Unavailable",
    "Unprocessable", "UnsupportedMediaType", "ZeroShot",
]  # fmt: skip
