"""Weighted aliases' choice of a version per client key: proportions, stickiness, and what a
change of weights moves."""

from __future__ import annotations

import pytest

from adapters_store.errors import InvalidRequest
from adapters_store.splits import Share, check_split, heaviest, parse_split, pick
from adapters_store.usage import parse_age

KEYS = [f"client-{i}" for i in range(20_000)]


def test_keys_split_in_proportion_to_the_weights() -> None:
    shares = [Share(3, 90), Share(4, 10)]
    chosen = [pick("t", "production", shares, key) for key in KEYS]
    assert len(chosen) == len(KEYS)
    share_v4 = chosen.count(4) / len(chosen)
    assert abs(share_v4 - 0.10) < 0.01, share_v4  # 20,000 keys: 3 sigma is 0.6 points
    assert set(chosen) == {3, 4}


def test_three_versions_and_weights_that_do_not_sum_to_100() -> None:
    shares = [Share(1, 1), Share(2, 2), Share(5, 5)]
    chosen = [pick("t", "a", shares, key) for key in KEYS]
    for version, weight in ((1, 1), (2, 2), (5, 5)):
        assert abs(chosen.count(version) / len(chosen) - weight / 8) < 0.015


def test_a_key_always_gets_the_same_version_whatever_the_order_of_the_shares() -> None:
    shares = [Share(3, 50), Share(4, 50)]
    first = {key: pick("t", "production", shares, key) for key in KEYS[:500]}
    again = {key: pick("t", "production", shares[::-1], key) for key in KEYS[:500]}
    assert first == again and len(first) == 500
    # The task and the alias are part of the hash: another alias splits keys independently.
    other = {key: pick("t", "canary", shares, key) for key in KEYS[:500]}
    assert other != first


def test_moving_weight_moves_only_the_keys_in_the_slice_that_changed_hands() -> None:
    before = {key: pick("t", "p", [Share(3, 90), Share(4, 10)], key) for key in KEYS}
    after = {key: pick("t", "p", [Share(3, 80), Share(4, 20)], key) for key in KEYS}
    moved = [key for key in KEYS if before[key] != after[key]]
    assert all(before[k] == 3 and after[k] == 4 for k in moved)  # nobody goes back to v3
    assert abs(len(moved) / len(KEYS) - 0.10) < 0.01


def test_without_a_key_the_choice_is_random_by_weight() -> None:
    chosen = [pick("t", "p", [Share(1, 75), Share(2, 25)], None) for _ in range(8000)]
    assert abs(chosen.count(2) / len(chosen) - 0.25) < 0.025


def test_a_one_version_split_is_a_plain_alias() -> None:
    assert {pick("t", "p", [Share(7, 1)], key) for key in KEYS[:100]} == {7}
    assert heaviest([Share(3, 50), Share(4, 50), Share(5, 10)]) == Share(3, 50)


@pytest.mark.parametrize(
    "weights",
    [{}, {1: 0}, {1: 10_001}, {0: 5}, {v: 1 for v in range(1, 18)}],
)
def test_bad_splits_are_refused(weights: dict[int, int]) -> None:
    with pytest.raises(InvalidRequest):
        check_split(weights)


def test_the_cli_form_of_a_split() -> None:
    assert parse_split("3=90, 4=10") == {3: 90, 4: 10}
    for bad in ("3", "3=x", "3=90,3=10", "=5", "a=1"):
        with pytest.raises(InvalidRequest):
            parse_split(bad)


def test_ages() -> None:
    assert parse_age("30d") == 30 * 86400
    assert parse_age("90s") == 90 and parse_age("2w") == 14 * 86400
    for bad in ("30", "d", "1y", "-1d", "1.5h", "1234567d"):
        with pytest.raises(InvalidRequest):
            parse_age(bad)
