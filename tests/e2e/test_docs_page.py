"""The OpenAPI pages work offline: their scripts and styles come from the server itself."""

from __future__ import annotations

import re
from urllib.parse import urljoin, urlsplit

import httpx
import pytest


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_api_pages_load_nothing_from_another_host(live_server: str, page: str) -> None:
    html = httpx.get(f"{live_server}{page}").text
    assets = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
    assets += re.findall(r"""url:\s*['"]([^'"]+)['"]""", html)  # the schema Swagger UI fetches
    assert any(a.endswith(".js") for a in assets), html[:500]
    for asset in assets:
        url = urljoin(f"{live_server}{page}", asset)
        assert urlsplit(url).netloc == urlsplit(live_server).netloc, f"{page} loads {asset}"
        r = httpx.get(url)
        assert r.status_code == 200 and r.content, (asset, r.status_code)


@pytest.mark.browser
def test_swagger_ui_renders_every_operation_without_the_internet(live_server: str, browser) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    schema = httpx.get(f"{live_server}/openapi.json").json()
    operations = sum(len(methods) for methods in schema["paths"].values())
    assert operations >= 12
    browser.get(f"{live_server}/docs")
    WebDriverWait(browser, 30).until(
        expected_conditions.presence_of_all_elements_located((By.CSS_SELECTOR, ".opblock"))
    )
    blocks = browser.find_elements(By.CSS_SELECTOR, ".opblock")
    assert len(blocks) == operations
    assert "deltaclip" in browser.find_element(By.CSS_SELECTOR, ".info .title").text
