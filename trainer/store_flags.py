"""The store, base and execution flags shared by ``deltaclip train`` and ``deltaclip eval``."""

from __future__ import annotations

import argparse
from pathlib import Path

from adapters_store.config import StoreSettings


def store_settings(args: argparse.Namespace) -> StoreSettings:
    """The store and base settings: the environment, overridden by the flags given."""
    overrides = {
        key: getattr(args, key, None)
        for key in ("home", "database_url", "base_model", "base_pretrained")
    }
    return StoreSettings(**{k: v for k, v in overrides.items() if v is not None})


def add_store_flags(p: argparse.ArgumentParser) -> None:
    """The store, base and execution flags that ``train`` and ``eval`` share."""
    g = p.add_argument_group("store and base (default: DELTACLIP_* environment)")
    g.add_argument("--home", type=Path, help="data folder (DELTACLIP_HOME, default ~/.deltaclip)")
    g.add_argument("--database-url", help="catalog URL (DELTACLIP_DATABASE_URL)")
    g.add_argument("--base-model", help="open_clip architecture (DELTACLIP_BASE_MODEL)")
    g.add_argument(
        "--base-pretrained", help="weights tag, file or 'random' (DELTACLIP_BASE_PRETRAINED)"
    )
    g.add_argument(
        "--device", help="cpu, cuda, cuda:1 ... (DELTACLIP_DEVICE; default: CUDA if present)"
    )
    g.add_argument(
        "--workers", type=int, help="data-loading processes (default min(2, cpus); 0: none)"
    )
    g.add_argument("--threads", type=int, help="CPU compute threads (default: cpus - workers)")
