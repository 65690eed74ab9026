"""``deltaclip train --push``: register the written adapter on a running server, not the local store."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import TrainError

if TYPE_CHECKING:
    from deltaclip_client import Registration


def push_token(url: str, token_file: Path | None) -> str:
    """The admin token for ``--push``, and a reachable server, checked before training starts.

    Raises:
        TrainError: no token, or ``url`` does not answer (so no run is wasted on a typo).
    """
    from deltaclip_client import Client, ClientError
    from deltaclip_client.command import admin_token

    try:
        token = admin_token(token_file)
        with Client(url, retries=0, timeout=10) as client:
            client.health()
    except ClientError as exc:
        raise TrainError(f"--push {url}: {exc}") from None
    return token


def push_adapter(path: Path, url: str, token: str, alias: str | None) -> Registration:
    """Register the written adapter on the server at ``url`` (the trainer's remote registration).

    Raises:
        TrainError: the server refused it or could not be reached; the message says how to push
            the file (which is kept) later.
    """
    from deltaclip_client import ClientError
    from deltaclip_client.command import push

    try:
        return push(path, url, token, alias)
    except ClientError as exc:
        raise TrainError(
            f"wrote {path} but could not push it to {url} ({exc}); "
            f"push it later with `deltaclip adapters push {path} --server {url}`"
        ) from exc
