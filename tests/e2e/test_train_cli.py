"""``deltaclip train`` and ``deltaclip eval`` as a user runs them (through the entry point)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.synthetic_domains import WORDNET_SHAPES, make_domains


def run(home: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DELTACLIP_HOME": str(home), "DELTACLIP_BASE_MODEL": "deltaclip-tiny",
           "DELTACLIP_BASE_PRETRAINED": "random", "DELTACLIP_DEVICE": "cpu"}  # fmt: skip
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


def test_train_help_lists_the_options(tmp_path: Path) -> None:
    out = run(tmp_path, "train", "--help").stdout
    for flag in ("--source", "--target", "--task", "--method", "--tau", "--max-density",
                 "--epochs", "--iters", "--batch-size", "--lr", "--image-size", "--fixmatch",
                 "--device", "--output", "--no-register", "--resume"):  # fmt: skip
        assert flag in out


def test_train_then_eval_through_the_console_script(tmp_path: Path) -> None:
    day, night = make_domains(tmp_path / "data", per_class=3, size=32, classes=WORDNET_SHAPES)
    home = tmp_path / "home"
    run(home, "db", "upgrade")
    out = run(
        home, "train", "--source", str(day), "--target", str(night), "--task", "day2night",
        "--epochs", "1", "--iters", "2", "--batch-size", "4", "--lr", "1e-4",
        "--max-density", "0.02", "--workers", "1", "--json",
    ).stdout  # fmt: skip
    result = json.loads(out)
    assert result["version"] == 1 and 0 < result["density"] <= 0.02
    assert Path(result["adapter_path"]).parent == home / "adapters"
    listing = json.loads(run(home, "adapters", "list", "--json").stdout)
    assert listing["items"][0]["digest"] == result["digest"]

    png = tmp_path / "cm.png"
    text = run(home, "eval", "--task", "day2night", "--data", str(night), "--confusion", str(png))
    assert "day2night v1" in text.stdout and "accuracy:" in text.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    bad = tmp_path / "bad"
    (bad / "circle").mkdir(parents=True)
    (bad / "circle" / "x.png").write_bytes((night / "circle" / "000.jpg").read_bytes())
    err = run(
        home, "train", "--source", str(day), "--target", str(bad), "--task", "t", ok=False
    ).stderr
    assert "deltaclip: error: source and target class sets differ" in err and "'triangle'" in err
