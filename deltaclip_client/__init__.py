"""deltaclip_client: a small typed Python client for ``deltaclip serve``'s HTTP API.

It imports neither the server nor the trainer (tests/unit/test_layering.py checks it), so any
program (the trainer's ``--push``, the demo, ``deltaclip predict --server``) can talk to a
server over HTTP with it::

    from deltaclip_client import Client

    with Client("http://127.0.0.1:8000", token=os.environ["DELTACLIP_ADMIN_TOKEN"]) as c:
        c.register("task.safetensors", alias="production")
        print(c.predict("real2sketch", "photo.jpg", top_k=3).predictions[0])

Answers are the models of :mod:`deltaclip_api`, which the server declares in its OpenAPI
document; they are re-exported here.
"""

from deltaclip_api import (
    AdapterRef,
    AliasRemoved,
    AliasSet,
    BaseInfo,
    BaseStatus,
    ErrorBody,
    Health,
    Label,
    Prediction,
    Readiness,
    Registration,
    ZeroShot,
)

from .answers import AdapterPage
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
    "AdapterPage",
    "AdapterRef",
    "AliasRemoved",
    "AliasSet",
    "ApiError",
    "BadRequest",
    "BaseInfo",
    "BaseStatus",
    "Client",
    "ClientError",
    "Conflict",
    "ErrorBody",
    "Forbidden",
    "Health",
    "ImageInput",
    "InvalidAnswer",
    "Label",
    "NotFound",
    "PayloadTooLarge",
    "Prediction",
    "Readiness",
    "Registration",
    "ServerFailed",
    "TransportFailed",
    "Unauthorized",
    "Unavailable",
    "Unprocessable",
    "UnsupportedMediaType",
    "ZeroShot",
]
