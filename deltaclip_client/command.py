"""``deltaclip adapters push FILE --server URL``: register an adapter file on a remote server.

Plugged into ``deltaclip adapters`` through the ``deltaclip.adapter_commands`` entry points.
:func:`admin_token` and :func:`push` are what ``deltaclip train --push`` uses too, so both
commands find the token and report a refusal the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from deltaclip_api import Registration

from .client import Client
from .errors import ClientError, Unavailable

TOKEN_ENV = "DELTACLIP_ADMIN_TOKEN"


class NoToken(ClientError):
    """No admin token was given, or its file cannot be read or is empty."""


def admin_token(token_file: str | os.PathLike[str] | None = None) -> str:
    """The admin token: the first line of ``token_file`` if given, else ``$DELTACLIP_ADMIN_TOKEN``.

    Raises:
        NoToken: neither gives a token (the message says how to give one).
    """
    if token_file is not None:
        try:
            lines = Path(token_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise NoToken(f"cannot read the token file {token_file}: {exc}") from None
        token = lines[0].strip() if lines else ""
        if not token:
            raise NoToken(f"the token file {token_file} is empty")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise NoToken(f"no admin token: set {TOKEN_ENV} or give --token-file FILE")
    return token


def tell_retry(error: Unavailable, wait: float) -> None:
    """Say on stderr that the server is busy and when the call is tried again."""
    print(f"deltaclip: server busy ({error.code}); retrying in {wait:g}s", file=sys.stderr)


def push(
    path: str | os.PathLike[str],
    server: str,
    token: str,
    alias: str | None = None,
    retries: int = 3,
) -> Registration:
    """Register the adapter file at ``path`` on ``server``; what the server made of it.

    Raises:
        OSError: the file cannot be read.
        ClientError: the server is unreachable or refused the file (its code and message).
    """
    data = Path(path).read_bytes()
    with Client(server, token=token, retries=retries, on_retry=tell_retry) as client:
        return client.register(data, alias=alias)


def cmd_push(args: argparse.Namespace) -> int:
    """Run ``deltaclip adapters push``; prints the version (JSON with ``--json``)."""
    try:
        result = push(
            args.file, args.server, admin_token(args.token_file), args.alias, args.retries
        )
    except ClientError as exc:
        print(f"deltaclip: error: push to {args.server}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.model_dump(mode="json"), indent=2, sort_keys=True))
    else:
        what = "registered" if result.created else "already registered"
        print(f"{what} on {args.server}: {result.task} v{result.version} ({result.digest})")
    return 0


def add_push_flags(p: argparse.ArgumentParser) -> None:
    """The token and retry flags ``adapters push`` and ``train --push`` share."""
    p.add_argument(
        "--token-file",
        type=Path,
        help=f"file whose first line is the admin token (default: ${TOKEN_ENV})",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=3,
        help="retries of a 503 (server loading or busy), after its Retry-After",
    )


def register_push(adapters: Any) -> None:
    """Entry point of ``deltaclip.adapter_commands``: adds ``deltaclip adapters push``."""
    what = "register an adapter file on a remote server (its admin API)"
    how = (
        "Upload FILE to SERVER's POST /admin/adapters with the admin token; the server validates "
        "it against its base before storing it. A 503 (loading, busy) is retried."
    )
    p = adapters.add_parser("push", help=what, description=how)
    p.add_argument("file", type=Path)
    p.add_argument("--server", required=True, help="server URL, e.g. http://host:8000")
    p.add_argument("--alias", help="alias to point at the registered version")
    p.add_argument("--json", action="store_true", help="print the server's answer as JSON")
    add_push_flags(p)
    p.set_defaults(func=cmd_push)
