"""Named dependencies for the routes (FastAPI full-stack template style)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from ..errors import ApiError
from ..runtime import Runtime

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def require_admin(request: Request, runtime: RuntimeDep) -> None:
    """Bearer-token check for ``/admin/*``, compared in constant time; off without a token."""
    configured = runtime.settings.admin_token
    if configured is None or not configured.get_secret_value():
        raise ApiError(
            403,
            "admin_disabled",
            "the admin API is disabled: the server has no admin token configured",
        )
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(
            401,
            "unauthorized",
            "send Authorization: Bearer <admin token>",
            {"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(token.strip().encode(), configured.get_secret_value().encode()):
        raise ApiError(401, "unauthorized", "invalid admin token", {"WWW-Authenticate": "Bearer"})


AdminDep = Depends(require_admin)
