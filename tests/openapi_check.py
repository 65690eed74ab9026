"""Every answer checked against the app's own OpenAPI document (openapi-core).

A module of its own, not part of conftest.py: pytest may import conftest.py under another
module name than ``tests.conftest``, which would split :data:`OPENAPI_CHECKED` in two.
"""

from __future__ import annotations

import os

# How many answers CheckedClient validated against the OpenAPI document (per test module).
OPENAPI_CHECKED: dict[str, int] = {}


def check_against_openapi(app, response) -> None:  # type: ignore[no-untyped-def]
    """Validate one answer against the app's own ``/openapi.json`` (openapi-core): its status
    must be declared for the operation, and its body must match that status's schema. An answer
    for no declared operation (an unknown path, a wrong method) must be the one error body."""
    from openapi_core import OpenAPI
    from openapi_core.templating.paths.exceptions import OperationNotFound, PathNotFound
    from openapi_core.testing import MockRequest, MockResponse

    from deltaclip_api import ErrorBody

    spec = getattr(app.state, "checked_openapi", None)
    if spec is None:
        spec = app.state.checked_openapi = OpenAPI.from_dict(app.openapi())
    request = response.request
    mime = response.headers.get("content-type", "").split(";")[0].strip()
    mocked = MockRequest("http://testserver", request.method.lower(), request.url.path)
    answer = MockResponse(response.content, response.status_code, dict(response.headers), mime)
    try:
        spec.validate_response(mocked, answer)
    except (PathNotFound, OperationNotFound):
        assert response.status_code in (404, 405), (request.method, request.url, response.text)
        ErrorBody.model_validate_json(response.content)


def checked_client(app):  # type: ignore[no-untyped-def]
    """A TestClient that validates every answer against the app's OpenAPI document (HEAD
    answers, which carry no body, excepted), counting them in :data:`OPENAPI_CHECKED`."""
    from fastapi.testclient import TestClient

    class CheckedClient(TestClient):
        def request(self, method, url, *args, **kwargs):  # type: ignore[no-untyped-def, override]
            response = super().request(method, url, *args, **kwargs)
            if method.upper() != "HEAD":
                check_against_openapi(app, response)
                module = os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[0]
                OPENAPI_CHECKED[module] = OPENAPI_CHECKED.get(module, 0) + 1
            return response

    return CheckedClient(app)
