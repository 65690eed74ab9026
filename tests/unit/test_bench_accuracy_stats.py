"""The study's statistics and verdicts, on hand-made runs whose answers are known."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from bench.accuracy_report import (
    difference_table,
    report,
    retention_candidates,
    retention_table,
    verdicts,
)
from bench.accuracy_stats import interval, mcnemar, mean_over_shifts, paired, ratio

SHIFTS = ["a", "b"]


def run(shift: str, setting: str, seed: int, preds: str, labels: str = "0000011111") -> dict:
    correct = sum(p == y for p, y in zip(preds, labels, strict=True))
    test = {"accuracy": correct / len(labels), "images": len(labels), "predictions": preds,
            "labels": labels}  # fmt: skip
    return {"shift": shift, "setting": setting, "seed": seed, "density": 1.0, "stored_bytes": 10,
            "scores": {"test": test, "source_val": test}}  # fmt: skip


def study(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = sorted({r["setting"] for r in rows})
    return {
        "config": {"shifts": SHIFTS, "steps": 3, "image_size": 32},
        "settings": [{"key": k, "label": k} for k in keys],
        "runs": {f"{r['shift']}/{r['setting']}/s{r['seed']}": r for r in rows},
    }


def test_interval_is_the_student_t_interval() -> None:
    iv = interval([0.70, 0.72, 0.74])
    # mean 0.72, sd 0.02, t(0.975, 2) = 4.302652729911275
    assert iv.mean == pytest.approx(0.72)
    assert iv.half == pytest.approx(4.302652729911275 * 0.02 / math.sqrt(3))
    assert iv.excludes_zero is True and iv.n == 3
    single = interval([0.5])
    assert single.half is None and single.excludes_zero is None and single.pct() == "50.0"
    with pytest.raises(ValueError):
        interval([])


def test_paired_differences_use_only_shared_seeds() -> None:
    a = {0: 0.8, 1: 0.7, 2: 0.9, 5: 0.1}
    b = {0: 0.7, 1: 0.7, 2: 0.7}
    iv = paired(a, b)
    assert iv is not None and iv.n == 3
    assert iv.mean == pytest.approx((0.1 + 0.0 + 0.2) / 3)
    assert iv.excludes_zero is False  # 0.1 ± 0.25: the CI includes zero
    assert paired({0: 1.0}, {1: 1.0}) is None
    r = ratio({0: 0.9, 1: 0.8}, {0: 1.0, 1: 1.0})
    assert r is not None and r.mean == pytest.approx(0.85)


def test_mean_over_shifts_needs_every_shift_of_a_seed() -> None:
    runs = study([run("a", "x", 0, "0000011111"), run("b", "x", 0, "1111111111"),
                  run("a", "x", 1, "0000011111")])["runs"]  # fmt: skip
    assert mean_over_shifts(runs, SHIFTS, "x") == {0: pytest.approx(0.75)}  # seed 1 lacks b


def test_mcnemar_counts_discordant_images_pooled_over_seeds_and_shifts() -> None:
    rows = [run("a", "new", 0, "0000011111"), run("a", "old", 0, "1000011110"),
            run("b", "new", 0, "0000011110"), run("b", "old", 0, "0000011111")]  # fmt: skip
    test = mcnemar(study(rows)["runs"], SHIFTS, "new", "old")
    assert test is not None
    assert (test.a_only, test.b_only, test.pairs) == (2, 1, 20)
    assert test.p == pytest.approx(1.0)  # 2 against 1 of 3 discordant: exact two-sided p = 1
    lopsided = [run("a", "new", s, "0000011111") for s in range(3)] + [
        run("a", "old", s, "1111100000") for s in range(3)
    ]
    strong = mcnemar(study(lopsided)["runs"], ["a"], "new", "old")
    assert strong is not None and strong.a_only == 30 and strong.p == pytest.approx(2 * 0.5**30)
    other_images = [run("a", "new", 0, "0000011111"), run("a", "old", 0, "00000", "00000")]
    with pytest.raises(ValueError, match="other images"):
        mcnemar(study(other_images)["runs"], ["a"], "new", "old")


def test_verdicts_say_whether_each_claim_is_resolved(tmp_path: Path) -> None:
    labels = "0000011111"
    rows = []
    for seed, (so, cmkd) in enumerate([("0000000000", "0000011100"), ("0000000001", "0000011110"),
                                       ("0000000000", "0000011101")]):  # fmt: skip
        for shift in SHIFTS:
            rows += [run(shift, "source-only-ft", seed, so, labels),
                     run(shift, "cmkd-ft", seed, cmkd, labels),
                     run(shift, "cmkd-rst-0.005", seed, cmkd, labels)]  # fmt: skip
    data = study(rows)
    v = verdicts(data)
    beat = v["CMKD beats source-only"]
    assert beat["seeds"] == 3 and beat["difference"] == pytest.approx((0.3 + 0.3 + 0.4) / 3)
    assert beat["resolved"] is True and beat["holds"] is True
    assert v["CMKD's target terms help (CMKD vs CMKD without them)"] is None  # no such runs
    keep = v["RST ≤ 0.5 % keeps ≥ 97 % of CMKD full fine-tuning"]
    assert keep["retention"] == pytest.approx(1.0) and keep["met"] is True
    table = difference_table(data)
    assert "| cmkd-ft | 3 |" in table and "| yes |" in table
    report(data, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_rst_variant_is_chosen_on_source_validation_never_on_target_labels() -> None:
    def with_val(row: dict[str, Any], val: float) -> dict[str, Any]:
        row["scores"]["source_val"] = {"accuracy": val}
        return row

    rows = []
    for seed in range(3):
        for shift in SHIFTS:
            rows += [
                with_val(run(shift, "cmkd-ft", seed, "0000011111"), 0.9),
                # the base RST row: worse on the target, better on the source validation images
                with_val(run(shift, "cmkd-rst-0.005", seed, "0000011100"), 0.8),
                with_val(run(shift, "cmkd-rst-0.005-lr3x", seed, "0000011111"), 0.7),
            ]
    data = study(rows)
    data["settings"] = [
        {"key": "cmkd-ft", "label": "CMKD FT"},
        {"key": "cmkd-rst-0.005", "label": "RST"},
        {"key": "cmkd-rst-0.005-lr3x", "label": "RST lr×3", "variant_of": "cmkd-rst-0.005"},
    ]
    keep = verdicts(data)["RST ≤ 0.5 % keeps ≥ 97 % of CMKD full fine-tuning"]
    assert keep["row"] == "cmkd-rst-0.005" and keep["chosen_on_source_val"] is True
    assert keep["retention"] == pytest.approx(0.8) and keep["met"] is False
    assert "| RST **(chosen)** | 80.0 (3 seeds) |" in retention_table(data)


def test_a_source_validation_tie_goes_to_the_first_row_in_the_protocols_order() -> None:
    """The same count of correct images read back from float32 differs in the last digits:
    that is a tie, and the plainer row (earlier in the protocol) is chosen, not the float order."""
    rows = []
    for seed in range(2):
        for shift in SHIFTS:
            for key, val in [("cmkd-rst-0.005", 0.7), ("cmkd-rst-0.005-lr3x", 0.7962222231),
                             ("cmkd-rst-0.005-lr10x", 0.7962222297)]:  # fmt: skip
                row = run(shift, key, seed, "0000011111")
                row["scores"]["source_val"] = {"accuracy": val}
                rows.append(row)
    data = study(rows)
    for s in data["settings"]:
        if s["key"] != "cmkd-rst-0.005":
            s["variant_of"] = "cmkd-rst-0.005"
    data["settings"].sort(key=lambda s: ["cmkd-rst-0.005", "cmkd-rst-0.005-lr3x",
                                         "cmkd-rst-0.005-lr10x"].index(s["key"]))  # fmt: skip
    assert retention_candidates(data)[1] == "cmkd-rst-0.005-lr3x"
