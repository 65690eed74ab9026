"""What the client raises: one hierarchy, each HTTP error carrying the server's JSON error.

The server answers every error as ``{"error": {"code", "message"}}`` (docs/API.md, Errors);
:class:`ApiError` keeps the status, the stable ``code`` (for programs) and the ``message`` (for
people), and its subclass says the status family, so a caller can ``except NotFound`` without
comparing numbers.
"""

from __future__ import annotations


class ClientError(Exception):
    """Anything the client cannot do: the server unreachable, or an error answer."""


class TransportFailed(ClientError):
    """The server could not be reached or hung up (no HTTP answer at all)."""


class InvalidAnswer(ClientError):
    """The server answered 2xx with a body this client cannot read (not the deltaclip API?)."""


class ApiError(ClientError):
    """An HTTP error answer, with the server's error code and message.

    Attributes:
        status: the HTTP status.
        code: the server's stable error code (``http_<status>`` when the body was not the API's
            JSON error, e.g. from a proxy in front of it).
        message: the server's message for people.
        retry_after: seconds the server asked to wait (``Retry-After``), if it said.
    """

    def __init__(
        self, status: int, code: str, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{message} (HTTP {status} {code})")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class BadRequest(ApiError):
    """400: a malformed request (bad labels, names, an empty image...)."""


class Unauthorized(ApiError):
    """401: the admin token is missing or wrong."""


class Forbidden(ApiError):
    """403: the server's admin API is off (no admin token configured there)."""


class NotFound(ApiError):
    """404: no such task, version or alias (``adapter_not_found``), or route."""


class Conflict(ApiError):
    """409: a catalog uniqueness rule, or stored bytes that no longer match their digest."""


class PayloadTooLarge(ApiError):
    """413: a body, an image or an adapter over a limit."""


class UnsupportedMediaType(ApiError):
    """415: not an image, or an image format the server does not take."""


class Unprocessable(ApiError):
    """422: a parameter fails its rule, an image cannot be decoded, or an adapter is refused."""


class Unavailable(ApiError):
    """503: the server is loading (``not_ready``) or its queue is full (``overloaded``)."""


class ServerFailed(ApiError):
    """Any other 5xx: a timeout (504), a full disk (507), or a server bug (500)."""


BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: Unprocessable,
    503: Unavailable,
}


def error_for(status: int, code: str, message: str, retry_after: float | None) -> ApiError:
    """The typed error for an answer's status (:class:`ServerFailed` for other 5xx)."""
    cls = BY_STATUS.get(status) or (ServerFailed if status >= 500 else ApiError)
    return cls(status, code, message, retry_after)
