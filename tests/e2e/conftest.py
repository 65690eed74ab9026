"""Fixtures of the end-to-end tests: a real headless Chromium (Debian's chromium + chromium-driver)."""

from __future__ import annotations

import pytest


@pytest.fixture
def browser():  # type: ignore[no-untyped-def]
    """Headless Chromium that resolves no host but the loopback one: a page that needs anything
    from the internet (a CDN) fails here as it would on an offline machine."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
