"""The planner's cost model (server/costs.py): forward times by batch size, and the configured
form ``DELTACLIP_MIX_COSTS`` takes, checked when the settings are read."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from server.config import ServerSettings
from server.costs import CostModel, batch_sizes


def test_forward_times_interpolate_between_measured_sizes_and_extend_past_them() -> None:
    cost = CostModel(batch_s={4: 2.0, 1: 1.0, 16: 5.0})
    assert list(cost.batch_s) == [1, 4, 16]  # kept sorted
    assert cost.forward(1) == 1.0 and cost.forward(4) == 2.0 and cost.forward(16) == 5.0
    assert cost.forward(2) == pytest.approx(1 + 1 / 3)
    assert cost.forward(10) == pytest.approx(3.5)
    assert cost.forward(20) == pytest.approx(6.0)  # the slope of the last two sizes
    assert cost.forward(0) == 0.0
    assert CostModel(batch_s={2: 1.0}).forward(1) == pytest.approx(0.5)
    assert CostModel(batch_s={2: 1.0}).forward(6) == pytest.approx(3.0)


def test_forwards_split_at_the_largest_batch() -> None:
    cost = CostModel(batch_s={1: 1.0, 16: 2.0})
    assert cost.forwards(16, 16) == pytest.approx(2.0)
    assert cost.forwards(17, 16) == pytest.approx(3.0)
    assert cost.forwards(0, 16) == 0.0


def test_the_linear_form_without_a_table() -> None:
    cost = CostModel(forward_s=1.0, image_s=0.25)
    assert cost.forward(4) == pytest.approx(2.0)
    assert cost.forwards(6, 4) == pytest.approx(2.0 + 1.5)


def test_sizes_measured_at_start_up() -> None:
    assert batch_sizes(16) == [1, 2, 4, 8, 16]
    assert batch_sizes(12) == [1, 2, 4, 8, 12]
    assert batch_sizes(1) == [1]


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ({"forward_s": 1.0, "speed": 2}, "unknown cost model fields \\['speed'\\]"),
        ({"site_s": -1}, "site_s must be a number of seconds >= 0"),
        ({"site_s": "fast"}, "must be numbers"),
        ({"batch_s": {"0": 1.0}}, "batch_s maps batch sizes >= 1"),
        ({"batch_s": {"four": 1.0}}, "must be numbers"),
        ({"batch_s": [1.0, 2.0]}, "batch_s must map batch sizes to seconds"),
    ],
)
def test_a_bad_configured_model_is_refused_naming_the_problem(
    raw: dict[str, object], words: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match=words):
        CostModel.parse(raw)
    monkeypatch.setenv("DELTACLIP_MIX_COSTS", json.dumps(raw))
    with pytest.raises(ValidationError, match="mix_costs"):
        ServerSettings()


def test_the_configured_form_round_trips_through_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cost = CostModel(swap_weight_s=1e-8, site_s=1e-4, weight_row_s=1e-9, batch_s={1: 0.1, 16: 0.9})
    monkeypatch.setenv("DELTACLIP_MIX_COSTS", json.dumps(cost.as_config()))
    settings = ServerSettings()
    assert settings.mix_costs is not None
    assert CostModel.parse(settings.mix_costs) == cost
