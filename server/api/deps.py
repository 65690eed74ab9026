"""Named dependencies for the routes (FastAPI full-stack template style)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from ..errors import AdminDisabled, Unauthorized
from ..runtime import Runtime
from ..service import Service

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
ServiceDep = Annotated[Service, Depends(get_service)]


def require_admin(request: Request, service: ServiceDep) -> None:
    """Bearer-token check for ``/admin/*``, compared in constant time; off without a token."""
    configured = service.settings.admin_token
    if configured is None or not configured.get_secret_value():
        raise AdminDisabled("the admin API is disabled: the server has no admin token configured")
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("send Authorization: Bearer <admin token>")
    if not hmac.compare_digest(token.strip().encode(), configured.get_secret_value().encode()):
        raise Unauthorized("invalid admin token")


AdminDep = Depends(require_admin)
