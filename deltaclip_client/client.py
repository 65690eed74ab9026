"""A synchronous client for ``deltaclip serve``'s HTTP API (docs/API.md), over httpx.

It sends what the routes take (multipart images, an adapter file, JSON for an alias), reads
each answer into the model the server declares for it (:mod:`deltaclip_api`, the same models
its OpenAPI document carries) and each error into a typed exception carrying the server's code
and message (:mod:`deltaclip_client.errors`). A 503 (the
base still loading, the queue full) is retried after the ``Retry-After`` the server sent, a
bounded number of times; nothing else is retried, since the other errors would answer the same.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx

from deltaclip_api import (
    AdapterRef,
    AliasRemoved,
    AliasSet,
    Deleted,
    ErrorBody,
    Health,
    Prediction,
    Readiness,
    Registration,
    ZeroShot,
)

from .answers import AdapterPage
from .errors import ApiError, InvalidAnswer, NotFound, TransportFailed, Unavailable, error_for

ImageInput = bytes | str | os.PathLike[str]
# Called before each retry with the 503 and the seconds about to be slept.
RetryHook = Callable[[Unavailable, float], None]
DEFAULT_RETRY_AFTER = 1.0
T = TypeVar("T")


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: not sent by deltaclip; wait the default
        return None


def _error(response: httpx.Response) -> ApiError:
    code, message = f"http_{response.status_code}", response.text[:300].strip()
    try:
        detail = ErrorBody.model_validate_json(response.content).error
        code, message = detail.code, detail.message
    except ValueError:  # not the API's error body (e.g. a proxy's page)
        pass
    retry = _retry_after(response.headers.get("retry-after"))
    return error_for(response.status_code, code, message or response.reason_phrase, retry)


def _read(parse: Callable[[Any], T], body: Any, what: str) -> T:
    """A typed answer, or :class:`InvalidAnswer` when the JSON lacks what the API promises
    (pydantic's ``ValidationError`` is a ``ValueError``)."""
    try:
        return parse(body)
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidAnswer(f"{what}: an answer without the API's fields ({exc})") from None


def _part(image: ImageInput, index: int) -> tuple[str, tuple[str, bytes, str]]:
    if isinstance(image, bytes):
        return "file", (f"image-{index}", image, "application/octet-stream")
    path = Path(image)
    return "file", (path.name, path.read_bytes(), "application/octet-stream")


class Client:
    """The deltaclip HTTP API.

    Args:
        url: the server, e.g. ``http://127.0.0.1:8000``.
        token: the admin token, needed by :meth:`register`, :meth:`delete` and the alias calls.
        timeout: seconds per HTTP exchange.
        retries: how many times a 503 is retried (0: never), each after its ``Retry-After``.
        max_retry_wait: the longest single wait, whatever ``Retry-After`` says.
        on_retry: called before each wait (e.g. to tell a person that the server is busy).
        transport: an httpx transport (tests; default: the network).
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        max_retry_wait: float = 30.0,
        on_retry: RetryHook | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if retries < 0:
            raise ValueError("retries must be 0 or more")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.retries = retries
        self.max_retry_wait = max_retry_wait
        self.on_retry = on_retry
        self._http = httpx.Client(
            base_url=self.url, timeout=timeout, headers=headers, transport=transport
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One call, 503s retried; the 2xx response, else the typed error."""
        for attempt in range(self.retries + 1):
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                raise TransportFailed(
                    f"{method} {self.url}{path}: {str(exc) or type(exc).__name__}"
                ) from exc
            if response.is_success:
                return response
            error = _error(response)
            if not isinstance(error, Unavailable) or attempt == self.retries:
                raise error
            wait = min(
                self.max_retry_wait,
                error.retry_after if error.retry_after is not None else DEFAULT_RETRY_AFTER,
            )
            if self.on_retry is not None:
                self.on_retry(error, wait)
            time.sleep(wait)
        raise AssertionError("unreachable")  # the loop returns or raises

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self._send(method, path, **kwargs)
        try:
            body = response.json()
        except ValueError:
            raise InvalidAnswer(f"{method} {path}: the answer is not JSON") from None
        if not isinstance(body, dict):
            raise InvalidAnswer(f"{method} {path}: the answer is not a JSON object")
        return body

    # ------------------------------------------------------------------------------ predictions

    def predict(
        self,
        task: str,
        *images: ImageInput,
        version: int | None = None,
        alias: str | None = None,
        top_k: int = 5,
        client_key: str | None = None,
    ) -> Prediction:
        """Classify images (bytes or file paths) with ``task``'s adapter, one request.
        ``client_key``: the key a weighted alias hashes to one of its versions (sticky)."""
        params: dict[str, Any] = {"task": task, "top_k": top_k}
        if version is not None:
            params["version"] = version
        if alias is not None:
            params["alias"] = alias
        if client_key is not None:
            params["client"] = client_key
        files = [_part(image, i) for i, image in enumerate(images)]
        body = self._json("POST", "/predict", params=params, files=files)
        return _read(Prediction.model_validate, body, "POST /predict")

    def zero_shot(self, labels: list[str], *images: ImageInput, top_k: int = 5) -> ZeroShot:
        """Classify images over free-form ``labels`` with the base's text tower (no adapter)."""
        params = {"labels": ",".join(labels), "top_k": top_k}
        files = [_part(image, i) for i, image in enumerate(images)]
        body = self._json("POST", "/predict/zero-shot", params=params, files=files)
        return _read(ZeroShot.model_validate, body, "POST /predict/zero-shot")

    # ---------------------------------------------------------------------------------- catalog

    def list_adapters(
        self,
        task: str | None = None,
        *,
        limit: int = 50,
        offset: int = 0,
        base: str | None = None,
        domain: str | None = None,
    ) -> AdapterPage:
        """One page of the catalog: ``limit`` summaries from ``offset``, newest version first
        within a task; ``base`` (model name or fingerprint) and ``domain`` filters combine."""
        params = {k: v for k, v in {"task": task, "base": base, "domain": domain}.items() if v}
        body = self._json("GET", "/adapters", params={**params, "limit": limit, "offset": offset})
        return _read(AdapterPage.from_json, body, "GET /adapters")

    def task(self, task: str) -> dict[str, Any]:
        """``{"task", "aliases": {alias: version}, "splits": {alias: [{"version", "weight"},
        ...]}, "versions": [summary, ...]}``."""
        return self._json("GET", f"/adapters/{task}")

    def resolve(self, task: str, version: int | None = None, alias: str | None = None) -> int:
        """The version the server would use: ``version``, else ``alias``, else ``production``,
        else the newest (docs/API.md, Resolution); of a weighted alias, its heaviest version
        (the server picks one per client key)."""
        if version is not None:
            return version
        info = self.task(task)
        aliases: Mapping[str, int] = info["aliases"]
        if alias is not None:
            if alias not in aliases:
                raise NotFound(404, "adapter_not_found", f"task {task!r} has no alias {alias!r}")
            return int(aliases[alias])
        if "production" in aliases:
            return int(aliases["production"])
        return max(int(v["version"]) for v in info["versions"])

    def show(
        self, task: str, version: int | None = None, alias: str | None = None
    ) -> dict[str, Any]:
        """Every metadata field of one version (resolved as :meth:`resolve` does)."""
        return self._json("GET", f"/adapters/{task}/versions/{self.resolve(task, version, alias)}")

    def download(
        self,
        task: str,
        version: int | None = None,
        alias: str | None = None,
        dest: str | os.PathLike[str] | None = None,
    ) -> bytes:
        """The adapter file's bytes, checked against the digest the server sent (``ETag``);
        also written to ``dest`` when given."""
        number = self.resolve(task, version, alias)
        response = self._send("GET", f"/adapters/{task}/versions/{number}/file")
        data = response.content
        digest = response.headers.get("etag", "").strip('"')
        if digest and hashlib.sha256(data).hexdigest() != digest:
            raise InvalidAnswer(f"{task} v{number}: the downloaded bytes do not match {digest}")
        if dest is not None:
            Path(dest).write_bytes(data)
        return data

    # ------------------------------------------------------------------------------------ admin

    def register(
        self, adapter: bytes | str | os.PathLike[str], alias: str | None = None
    ) -> Registration:
        """Upload an adapter file (bytes or a path); the server validates it against its base."""
        if isinstance(adapter, bytes):
            name, data = "adapter.safetensors", adapter
        else:
            name, data = Path(adapter).name, Path(adapter).read_bytes()
        form = {"alias": alias} if alias else {}
        files = {"file": (name, data, "application/octet-stream")}
        body = self._json("POST", "/admin/adapters", files=files, data=form)
        return _read(Registration.model_validate, body, "POST /admin/adapters")

    def delete(self, task: str, version: int) -> AdapterRef:
        """Delete one version for good; the task, version and digest of what went."""
        path = f"/admin/adapters/{task}/versions/{version}"
        return _read(Deleted.model_validate, self._json("DELETE", path), f"DELETE {path}").deleted

    def set_alias(self, task: str, alias: str, version: int) -> AliasSet:
        """Point ``alias`` of ``task`` at ``version``."""
        path = f"/admin/adapters/{task}/aliases/{alias}"
        body = self._json("PUT", path, json={"version": version})
        return _read(AliasSet.model_validate, body, f"PUT {path}")

    def set_split(self, task: str, alias: str, weights: Mapping[int, int]) -> AliasSet:
        """Make ``alias`` of ``task`` a weighted alias: ``{version: weight}``."""
        path = f"/admin/adapters/{task}/aliases/{alias}"
        split = [{"version": v, "weight": w} for v, w in sorted(weights.items())]
        body = self._json("PUT", path, json={"split": split})
        return _read(AliasSet.model_validate, body, f"PUT {path}")

    def remove_alias(self, task: str, alias: str) -> AliasRemoved:
        """Remove ``alias`` of ``task``."""
        path = f"/admin/adapters/{task}/aliases/{alias}"
        return _read(AliasRemoved.model_validate, self._json("DELETE", path), f"DELETE {path}")

    # ----------------------------------------------------------------------------------- health

    def health(self) -> Health:
        """``/healthz``: status ``ok`` while the process runs; a quick reachability probe."""
        return _read(Health.model_validate, self._json("GET", "/healthz"), "GET /healthz")

    def wait_ready(self, timeout: float = 120.0, poll: float = 0.25) -> Readiness:
        """Wait until ``/readyz`` answers 200 (the base loaded); its answer.

        Raises:
            TransportFailed, Unavailable: still unreachable, or not ready, after ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                response = self._http.get("/readyz")
                if response.is_success:
                    return _read(Readiness.model_validate_json, response.content, "GET /readyz")
                last: Exception = _error(response)
            except httpx.TransportError as exc:
                last = TransportFailed(f"{self.url}: {str(exc) or type(exc).__name__}")
            if time.monotonic() >= deadline:
                raise last
            time.sleep(poll)
