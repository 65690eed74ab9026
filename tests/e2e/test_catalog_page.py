"""The /catalog page in a real headless Chromium (Debian's chromium + chromium-driver)."""

from __future__ import annotations

import httpx
import pytest

from adapters_store.format.codec import encode_adapter
from adapters_store.synthetic import random_adapter
from tests.conftest import ADMIN_TOKEN

pytestmark = pytest.mark.browser


def test_catalog_lists_adapters_and_renders_the_layer_chart(
    live_server: str, browser, tiny
) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    data = encode_adapter(random_adapter(*tiny, "real2sketch", density=0.02, seed=1))
    r = httpx.post(f"{live_server}/admin/adapters", files={"file": ("a", data)}, data={"alias": "production"},
                   headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})  # fmt: skip
    assert r.status_code == 201, r.text
    browser.get(f"{live_server}/catalog")
    assert browser.title == "deltaclip catalog"
    rows = browser.find_elements(By.CSS_SELECTOR, "tr.adapter")
    assert [row.get_attribute("data-task") for row in rows] == ["real2sketch"]
    row = rows[0]
    assert "production" in row.text and "v1" in row.text
    assert "%" in row.text and "×" in row.text  # density and compression ratio
    row.find_element(By.TAG_NAME, "summary").click()
    chart = row.find_element(By.CSS_SELECTOR, "svg.layer-chart")
    assert chart.size["width"] > 100 and chart.size["height"] > 20
    bars = chart.find_elements(By.TAG_NAME, "rect")
    drawn = [b for b in bars if int(b.get_attribute("data-count")) > 0]
    assert len(drawn) >= 3
    assert all(b.size["width"] > 0 for b in drawn)
    total = sum(int(b.get_attribute("data-count")) for b in bars)
    assert total == httpx.get(f"{live_server}/adapters/real2sketch/versions/1").json()["nnz"]


def test_empty_catalog_page_says_how_to_register(live_server: str, browser) -> None:  # type: ignore[no-untyped-def]
    browser.get(f"{live_server}/catalog")
    assert "no adapters registered yet" in browser.page_source
