"""Named dependencies for the routes (FastAPI full-stack template style)."""

from __future__ import annotations

import hmac
import re
from typing import Annotated

from fastapi import Depends, Request

from ..errors import AdminDisabled, Unauthorized
from ..runtime import Runtime
from ..service import Service

BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] ([A-Za-z0-9._~+/-]+=*)")


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
    # Strict: exactly one Authorization header, "Bearer", one space, a token68 (RFC 7235 §2.1)
    # and nothing else, so "Bearer  token", "Bearer token " or two headers are refused.
    headers = request.headers.getlist("authorization")
    match = BEARER.fullmatch(headers[0]) if len(headers) == 1 else None
    if match is None:
        raise Unauthorized("send exactly one header: Authorization: Bearer <admin token>")
    if not hmac.compare_digest(match[1].encode(), configured.get_secret_value().encode()):
        raise Unauthorized("invalid admin token")


AdminDep = Depends(require_admin)
