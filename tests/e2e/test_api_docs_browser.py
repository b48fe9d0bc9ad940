"""``/api/docs/`` in a real browser, with nothing fetched from another host.

Swagger UI's scripts and styles are served by the project (drf-spectacular-sidecar through
whitenoise), so the page works without internet. Headless Chromium opens it on pytest-django's
``live_server``; same requirements as ``test_run_graph_browser.py``.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest
from django.test import Client

from tests.e2e.test_run_graph_browser import browser  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

ASSET = re.compile(r"<(?:script|link|img)\b[^>]*\b(?:src|href)=[\"']([^\"']+)[\"']", re.I)


def test_api_docs_html_loads_nothing_from_another_host():
    html = Client().get("/api/docs/").content.decode()

    assets = ASSET.findall(html)

    assert any(url.endswith("swagger-ui-bundle.js") for url in assets), assets
    assert [url for url in assets if urlsplit(url).netloc or url.startswith("//")] == []


def test_api_docs_page_lists_the_operations_offline(browser, live_server):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    # when the browser opens the docs
    browser.get(f"{live_server.url}/api/docs/")

    # then Swagger UI runs and lists the operations of the schema
    WebDriverWait(browser, 60).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, '[data-path="/api/tasks/"]'))
    )
    assert "/api/tasks/" in browser.find_element(By.TAG_NAME, "body").text
    # and every resource the page loaded came from this server
    loaded = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name);"
    )
    origin = urlsplit(live_server.url).netloc
    assert any(url.endswith("swagger-ui-bundle.js") for url in loaded), loaded
    assert [url for url in loaded if urlsplit(url).netloc != origin] == []
