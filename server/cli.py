"""``deltaclip serve``: run the server under uvicorn (plugged in via the ``deltaclip.commands``
entry point)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .config import ServerSettings
    from .main import create_app
    from .protocol import protocol_class

    overrides: dict[str, Any] = {
        key: value
        for key, value in {
            "home": args.home,
            "database_url": args.database_url,
            "base_model": args.base_model,
            "base_pretrained": args.base_pretrained,
            "device": args.device,
            "dtype": args.dtype,
            "host": args.host,
            "port": args.port,
            "max_batch": args.max_batch,
            "cache_bytes": args.cache_bytes,
            "deterministic": args.deterministic,
        }.items()
        if value is not None
    }
    if args.pin:
        overrides["pin"] = args.pin
    if args.preload:
        overrides["preload"] = args.preload
    settings = ServerSettings(**overrides)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(settings)
    # h11 (not httptools, which buffers heads unbounded) bounds incomplete heads, the app
    # answers complete heads over the limit (431); the protocol adds a read timeout and JSON
    # protocol errors (server/protocol.py). docs/API.md lists what uvicorn still answers itself.
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        access_log=args.access_log,
        http=protocol_class(settings.read_timeout_s),
        h11_max_incomplete_event_size=settings.max_head_bytes,
        timeout_keep_alive=settings.keep_alive_s,
    )
    return 0


def cmd_deploy_nginx(args: argparse.Namespace) -> int:
    from .deploy import nginx_conf

    text = nginx_conf(args.upstream, args.listen, max_body=args.max_body)
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    else:
        print(text, end="")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve predictions, the catalog and the admin API over HTTP")
    p.add_argument("--host", help="bind address (DELTACLIP_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (DELTACLIP_PORT, default 8000)")
    p.add_argument("--home", type=Path, help="data folder (DELTACLIP_HOME)")
    p.add_argument("--database-url", help="catalog URL (DELTACLIP_DATABASE_URL)")
    p.add_argument("--base-model", help="open_clip architecture (DELTACLIP_BASE_MODEL)")
    p.add_argument(
        "--base-pretrained", help="weights tag, local file or 'random' (DELTACLIP_BASE_PRETRAINED)"
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (DELTACLIP_DEVICE)")
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        help="serving dtype (DELTACLIP_DTYPE)",
    )
    p.add_argument("--max-batch", type=int, help="images per forward pass (DELTACLIP_MAX_BATCH)")
    p.add_argument(
        "--deterministic",
        action="store_true",
        default=None,
        help="every forward pass at max-batch images (padded): answers independent of batch "
        "companions, at a throughput cost under light load (DELTACLIP_DETERMINISTIC)",
    )
    p.add_argument(
        "--cache-bytes", type=int, help="memory for prepared adapters (DELTACLIP_CACHE_BYTES)"
    )
    p.add_argument(
        "--pin",
        action="append",
        metavar="TASK",
        help="preload and never evict this task (repeatable)",
    )
    p.add_argument(
        "--preload",
        action="append",
        metavar="SPEC",
        help="before turning ready, prepare top:N (the N most requested adapters) or "
        "alias:NAME (every version NAME names), within the cache budget (repeatable)",
    )
    p.add_argument("--log-level", default="info")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(func=cmd_serve)

    deploy = sub.add_parser("deploy", help="deployment configuration").add_subparsers(
        dest="deploy_command", required=True
    )
    p = deploy.add_parser("nginx", help="an nginx front routing each task to one replica")
    p.add_argument(
        "--upstream", action="append", required=True, metavar="HOST:PORT", help="a replica (repeat)"
    )
    p.add_argument("--listen", default="8080", help="nginx listen address/port")
    p.add_argument("--max-body", default="256m", help="largest request body")
    p.add_argument("--output", "-o", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_deploy_nginx)
