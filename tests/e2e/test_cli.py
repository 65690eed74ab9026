"""The ``deltaclip`` console script, run as a user runs it (a subprocess per command)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters_store.format.codec import write_adapter
from adapters_store.synthetic import random_adapter


def run(
    home: Path, *args: str, ok: bool = True, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DELTACLIP_HOME": str(home), "DELTACLIP_BASE_MODEL": "deltaclip-tiny",
           "DELTACLIP_BASE_PRETRAINED": "random", **(extra_env or {})}  # fmt: skip
    env.pop("DELTACLIP_DATABASE_URL", None)
    proc = subprocess.run(
        [sys.executable, "-m", "adapters_store.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if ok:
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode != 0, proc.stdout
        assert "Traceback" not in proc.stderr
    return proc


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    run(h, "db", "upgrade")
    return h


def test_register_then_list_json(home: Path, tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = write_adapter(random_adapter(*tiny, "real2sketch"), tmp_path / "some.safetensors")
    out = run(home, "adapters", "register", str(path), "--alias", "production").stdout
    assert "registered: real2sketch v1" in out
    assert (
        "already registered: real2sketch v1" in run(home, "adapters", "register", str(path)).stdout
    )
    listing = json.loads(run(home, "adapters", "list", "--json").stdout)
    assert listing["total"] == 1
    item = listing["items"][0]
    assert (item["task"], item["version"], item["aliases"]) == ("real2sketch", 1, ["production"])
    shown = json.loads(run(home, "adapters", "show", "real2sketch", "--json").stdout)
    assert shown["digest"] == item["digest"] and sum(shown["param_counts"].values()) == shown["nnz"]


def test_alias_export_delete_gc_fsck(home: Path, tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file

    from adapters_store.adapter import merge_state
    from adapters_store.bases import tower_parameters

    adapter = random_adapter(*tiny, "t", seed=3)
    path = write_adapter(adapter, tmp_path / "a.safetensors")
    run(home, "adapters", "register", str(path))
    run(home, "adapters", "alias", "t", "canary", "--version", "1")
    assert (
        json.loads(run(home, "adapters", "show", "t", "--alias", "canary", "--json").stdout)[
            "version"
        ]
        == 1
    )
    run(
        home,
        "adapters",
        "export",
        "t",
        "--version",
        "1",
        "-o",
        str(tmp_path / "merged.safetensors"),
    )
    merged = load_file(tmp_path / "merged.safetensors")
    base = {k: p.detach() for k, p in tower_parameters(tiny[0]).items()}
    want = merge_state(base, adapter)
    assert all((merged[k] == want[k]).all() for k in base)
    run(home, "adapters", "delete", "t", "--version", "1")
    assert json.loads(run(home, "adapters", "list", "--json").stdout)["total"] == 0
    assert run(home, "adapters", "fsck", ok=False).stdout.count("orphan blob") == 1
    assert "removed 1" in run(home, "adapters", "gc", "--grace", "0").stdout
    assert "clean" in run(home, "adapters", "fsck").stdout


def test_errors_are_messages_not_tracebacks(home: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 4)
    err = run(home, "adapters", "register", str(bad), ok=False).stderr
    assert "invalid adapter" in err and "not-safetensors" in err
    assert (
        "no such file" in run(home, "adapters", "register", str(tmp_path / "nope"), ok=False).stderr
    )
    assert (
        "no adapter registered for task 'ghost'"
        in run(home, "adapters", "show", "ghost", ok=False).stderr
    )
    fresh = tmp_path / "fresh"
    assert "deltaclip db upgrade" in run(fresh, "adapters", "list", ok=False).stderr
    assert (
        "unknown base architecture"
        in run(home, "base", "info", "--base-model", "nope", ok=False).stderr
    )


def test_base_info_prints_json(tmp_path: Path) -> None:
    info = json.loads(run(tmp_path, "base", "info").stdout)
    assert info["model"] == "deltaclip-tiny" and info["pretrained"] == "random"
    assert len(info["fingerprint"]) == 64
    assert (
        info["parameters"]["image_tower"] + info["parameters"]["other"]
        == info["parameters"]["total"]
    )


def subcommands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every command under ``parser``, depth first: its words and its parser."""
    for action in parser._actions:  # argparse has no public way to list subparsers
        if isinstance(action.choices, dict):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from subcommands(sub, (*path, name))


def test_help_for_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    from adapters_store.cli import build_parser

    root = build_parser()
    commands = [((), root), *subcommands(root)]
    words = {path for path, _ in commands}
    assert {("db", "upgrade"), ("base", "info"), ("adapters", "register"), ("adapters", "fsck"),
            ("adapters", "import-finetune"), ("train",), ("eval",), ("serve",), ("demo",)} <= words  # fmt: skip
    for path, parser in commands:
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args([*path, "--help"])
        assert exc.value.code == 0, path
        out = capsys.readouterr().out
        assert out.startswith("usage: " + " ".join(("deltaclip", *path))), (path, out[:200])
        for action in parser._actions:  # every flag, argument and subcommand is in its help
            if action.help == argparse.SUPPRESS:
                continue
            shown = action.option_strings or [str(action.metavar or action.dest)]
            if isinstance(action.choices, dict) and action.metavar is None:
                shown = list(action.choices)
            for text in shown:
                assert str(text) in out, (path, text)
