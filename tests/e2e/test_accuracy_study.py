"""The accuracy study end to end at its smallest: choose the lr on source images, stop, resume.

``python -m bench accuracy --quick`` on two rows: the lr selection runs, a stop after a few runs
(``--max-runs``), then a second invocation that finishes the grid without redoing what was done.
Every run is recorded with the commit and whole-tree state it ran from, and the report reads it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def study(out: Path, work: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "bench", "accuracy", "--quick", "--allow-dirty",
           "--rows", "source-only-ft", "--shifts", "faded", "--out", str(out),
           "--work", str(work), "--jobs", "2", *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_the_study_chooses_on_source_images_stops_and_resumes(tmp_path: Path) -> None:
    out, work = tmp_path / "study.json", tmp_path / "work"
    first = study(out, work, "--max-runs", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    data = json.loads(out.read_text())
    # Two lrs × one selection seed, then one grid run before the stop.
    assert len(data["selection_runs"]) == 2 and len(data["runs"]) == 1
    sel = data["selection"]
    assert sel["lr"] in (1e-3, 3e-3)
    chosen = max(sel["source_val_accuracy"].items(), key=lambda kv: (kv[1], -float(kv[0])))
    assert float(chosen[0]) == sel["lr"]  # the source-validation winner, nothing else
    done = dict(data["runs"])

    second = study(out, work)
    assert second.returncode == 0, second.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data["runs"]) == {"faded/source-only-ft/s0", "faded/source-only-ft/s1"}
    for key, row in done.items():  # resumed: the finished run was not redone
        assert data["runs"][key]["started_at"] == row["started_at"]
    assert len(data["sessions"]) == 2 and not data["failures"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip
    status = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout  # fmt: skip
    for row in [*data["runs"].values(), *data["selection_runs"].values()]:
        assert row["code"]["commit"] == head and row["code"]["dirty"] == bool(status)
        assert row["seed"] in (0, 1) and row["steps"] == 3 and row["wall_seconds"] > 0
        assert len(row["scores"]["test"]["predictions"]) == row["scores"]["test"]["images"] == 40
    assert all(row["lr"] == sel["lr"] for row in data["runs"].values())
    assert data["study_seconds"] == pytest.approx(
        sum(r["wall_seconds"] for k in ("runs", "selection_runs") for r in data[k].values()),
        abs=0.2,
    )
    assert "| source-only FT | 2 |" in second.stdout  # the report, from the file
    assert len(data["teacher"]["test-faded"]["predictions"]) == 40


def test_a_study_of_other_settings_or_from_another_commit_is_refused(tmp_path: Path) -> None:
    out, work = tmp_path / "study.json", tmp_path / "work"
    started = study(out, work, "--max-runs", "0")  # settings, data and teacher; no run yet
    assert started.returncode == 0, started.stderr[-3000:]
    data = json.loads(out.read_text())
    data["runs"]["faded/source-only-ft/s0"] = {"code": {"commit": "0" * 40}}
    out.write_text(json.dumps(data))
    refused = study(out, work)
    assert refused.returncode != 0 and "resume from that commit" in refused.stderr
    assert json.loads(out.read_text()) == data  # untouched
    out.write_text(json.dumps({"config": {"steps": 999}, "runs": {}}))
    other = study(out, work)
    assert other.returncode != 0 and "holds a study of other settings" in other.stderr
    assert json.loads(out.read_text()) == {"config": {"steps": 999}, "runs": {}}
