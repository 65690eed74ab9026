"""docs/DEPLOYMENT.md's settings table is the settings the code reads, with the flags that exist."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from server.cli import register
from server.config import ServerSettings

ROOT = Path(__file__).resolve().parents[2]


def settings_rows() -> dict[str, str]:
    """``DELTACLIP_X`` → its flag cell, from the table under "## Settings"."""
    text = (ROOT / "docs" / "DEPLOYMENT.md").read_text(encoding="utf-8")
    section = text.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"`(DELTACLIP_[A-Z_]+)`", cells[0]) if len(cells) == 4 else None
        if match:
            rows[match[1]] = cells[2]
    return rows


def serve_flags() -> set[str]:
    commands = argparse.ArgumentParser().add_subparsers()
    register(commands)
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", commands.choices["serve"].format_help()))


def test_every_setting_is_in_the_table_and_nothing_else() -> None:
    rows = settings_rows()
    assert len(rows) >= 25, rows
    assert set(rows) == {f"DELTACLIP_{name.upper()}" for name in ServerSettings.model_fields}


def test_the_flags_named_exist_and_every_serve_setting_flag_is_named() -> None:
    flags = serve_flags()
    named = {flag for cell in settings_rows().values() for flag in re.findall(r"--[a-z-]+", cell)}
    assert named <= flags, f"the table names flags serve does not have: {named - flags}"
    settings_flags = {f"--{name.replace('_', '-')}" for name in ServerSettings.model_fields}
    assert flags & settings_flags <= named, (
        f"flags missing from the table: {(flags & settings_flags) - named}"
    )
