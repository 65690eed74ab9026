"""`deltaclip demo` end to end (a small configuration of it): real Fashion-MNIST images, trained
adapters, a real server process, and server answers that agree with `deltaclip eval`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from deltaclip_demo.data import DEBIAN_DIR


@pytest.mark.slow
def test_demo_trains_serves_and_agrees_with_eval(tmp_path: Path) -> None:
    assert DEBIAN_DIR.is_dir(), "CI installs Debian's dataset-fashion-mnist (see .ci/run)"
    env = {**os.environ, "DELTACLIP_HOME": str(tmp_path / "home")}
    env.pop("DELTACLIP_DATABASE_URL", None)
    proc = subprocess.run(
        [sys.executable, "-m", "adapters_store.cli", "demo", "--no-wait", "--shifts", "negative",
         "--images-per-class", "8", "--test-per-class", "3", "--steps", "4", "--image-size", "32", "--port", "0"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = proc.stdout.replace("\r", "\n")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Fashion-MNIST from Debian's dataset-fashion-mnist" in out
    assert (
        "The server is running at http://127.0.0.1:" in out
        and "/catalog" in out
        and "curl -F file=@" in out
    )
    # The base's zero-shot answer (CMKD's teacher, no adapter) is printed before the adapter's.
    assert re.search(r"negative\s+zero-shot accuracy [\d.]+%", out), out
    assert re.search(r"photo2negative v1: .* \(teacher [\d.]+%\)", out), out
    # The adapter keeps the promise: at most 0.5 % of the tower changed (the demo's budget).
    density = re.search(
        r"photo2negative v1: [\d,]+ weights changed \(([\d.]+)% of the tower\)", out
    )
    assert density and 0 < float(density.group(1)) <= 0.5, out
    # The teacher's terms at their final weight: the ramp spans the run, λ(T) at its last step.
    assert re.search(
        r"loss terms at the last step \(weighted\): L_cls [\d.]+, .*λ = 0\.462", out
    ), out
    served = re.search(r"photo2negative v1 \(\w+…\): accuracy ([\d.]+)% on (\d+) images", out)
    assert served, out
    assert int(served.group(2)) == 30
    # The accuracy printed from the server's answers is the accuracy of the merged adapter.
    evaluated = subprocess.run(
        [sys.executable, "-m", "adapters_store.cli", "eval", "--task", "photo2negative", "--data",
         str(tmp_path / "home" / "demo-data" / "test-negative"), "--json"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    accuracy = float(re.search(r'"accuracy": ([\d.]+)', evaluated.stdout).group(1))  # type: ignore[union-attr]
    assert f"{accuracy:.1%}" == f"{served.group(1)}%"
