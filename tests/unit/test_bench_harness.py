"""Smoke test of the benchmark harness: ``python -m bench`` as CI can afford it (seconds).

It runs the real entry point in a subprocess from the repository root, as the docs tell people
to, on the tiny base with two repetitions, and checks the one result schema every question
writes: the harness's header fields, the question's sections, and timings that are positive.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.harness import HEADER, SCHEMA

ROOT = Path(__file__).resolve().parents[2]


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_help_lists_every_question() -> None:
    done = bench("--help")
    assert done.returncode == 0, done.stderr
    for question in ("swap", "storage", "http", "catalog", "accuracy", "rst_overhead", "plots"):
        assert question in done.stdout


def test_swap_question_writes_the_result_schema(tmp_path: Path) -> None:
    out = tmp_path / "swap.json"
    done = bench(
        "swap", "--base", "deltaclip-tiny", "--reps", "2", "--repeat", "5", "--max-wait-s", "0",
        "--sections", "swap,cold", "--methods", "deltaclip,loop,between_forwards",
        "--densities", "0.01", "--threads", "1", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert set(HEADER) <= set(result)
    assert result["schema"] == SCHEMA
    assert result["question"] == "swap"
    assert result["base"] == "deltaclip-tiny"
    assert result["sections"] == ["swap", "cold"]
    assert result["machine"]["cpu"] and result["machine"]["threads"] == 1
    assert result["wall_s"] > 0 and len(result["wall_s_by_run"]) == 1
    swap = result["swap"]
    assert swap["forward_b1"]["p50_ms"] > 0
    assert len(swap["loads"]) == 2
    (row,) = swap["rows"]
    assert row["density"] == 0.01 and row["nnz"] > 0
    for method in ("deltaclip", "loop", "between_forwards"):
        assert row[method]["p50_ms"] > 0 and row[method]["p99_ms"] >= row[method]["p50_ms"]
        assert len(row[method]["rep_p50_ms"]) == 2
        assert row[method]["vs_forward_b1"] > 0
    assert result["cold_load"]["p50_ms"] > 0 and result["cold_load"]["bytes"] > 0
