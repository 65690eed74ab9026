"""Server settings read from ``DELTACLIP_*`` as the docs write them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.config import ServerSettings


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ("real2sketch", ["real2sketch"]),
        ("real2sketch,photo2art", ["real2sketch", "photo2art"]),
        (" real2sketch , photo2art ,", ["real2sketch", "photo2art"]),
        ('["real2sketch", "photo2art"]', ["real2sketch", "photo2art"]),
        ("", []),
    ],
)
def test_pin_takes_the_comma_separated_form_and_json(
    monkeypatch: pytest.MonkeyPatch, env: str, expected: list[str]
) -> None:
    monkeypatch.setenv("DELTACLIP_PIN", env)
    assert ServerSettings().pin == expected


def test_pin_from_flags_stays_a_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DELTACLIP_PIN", raising=False)
    assert ServerSettings(pin=["a", "b"]).pin == ["a", "b"]
    assert ServerSettings().pin == []


def test_a_broken_json_pin_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DELTACLIP_PIN", '["a",')
    with pytest.raises(ValidationError, match="pin"):
        ServerSettings()
