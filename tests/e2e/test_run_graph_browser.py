"""The run's picture in a real browser: headless Chromium opens the run's admin page.

The run is built in-process (publishing is replaced, steps go through ``worker.run``), so no
Celery worker is needed; pytest-django's ``live_server`` serves the admin. Needs Debian's
``chromium`` and ``chromium-driver``: skipped without them, a failure under ``CI=true``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from django.conf import settings
from django.test import Client
from django.utils import timezone

from tasks_app import dispatch, worker
from tasks_app.models import TaskStatus
from tests import session_env
from tests.factories import UserFactory
from workflows_app import services
from workflows_app.models import RunStatus, WorkflowRun

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROME_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,1100",
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Fan-out to charge and notify, fan-in at ship, which fails: charge then reserve are undone,
# notify took two attempts, invoice never starts.
DEFINITION = {
    "start": "reserve",
    "steps": {
        "reserve": {"type": "NOOP", "next": ["charge", "notify"], "compensation": {"type": "NOOP"}},
        "charge": {"type": "NOOP", "next": "ship", "compensation": {"type": "NOOP"}},
        "notify": {"type": "NOOP", "payload": {"fail_times": 1}, "max_retries": 2, "next": "ship"},
        "ship": {"type": "NOOP", "payload": {"fail": True}, "next": "invoice"},
        "invoice": {"type": "NOOP"},
    },
}


def _browser_missing() -> str | None:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (make install: the test dependency group)")
    if not missing:
        return None
    return f"needs {', '.join(missing)} (apt-get install chromium chromium-driver)"


@pytest.fixture
def browser():
    reason = _browser_missing()
    if reason:
        if session_env.IN_CI:
            pytest.fail(f"CI=true: the browser test {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in CHROME_ARGS:
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def saga_run(monkeypatch) -> WorkflowRun:
    monkeypatch.setattr(dispatch, "publish", lambda wakeups: len(wakeups))
    owner = UserFactory(username="shop")
    workflow = services.workflow_create(owner=owner, name="order", definition=DEFINITION)
    run = services.run_start(workflow=workflow, owner=owner, input={})
    for _ in range(50):
        waiting = run.tasks.filter(status__in=[TaskStatus.PENDING, TaskStatus.RETRYING])
        task = waiting.order_by("created_at").first()
        if task is None:
            break
        waiting.filter(pk=task.pk).update(next_attempt_at=timezone.now())  # skip backoff waits
        worker.run(str(task.pk), timeout_s=30)
    run.refresh_from_db()
    assert run.status == RunStatus.COMPENSATED, run.error
    return run


def _log_in(driver, base_url: str) -> None:
    """Give the browser a staff session: the cookie of a test client's forced login."""
    staff = UserFactory(username="ops", is_staff=True, is_superuser=True)
    client = Client()
    client.force_login(staff)
    driver.get(f"{base_url}/admin/login/")  # a page of the origin before setting its cookie
    driver.add_cookie(
        {
            "name": settings.SESSION_COOKIE_NAME,
            "value": client.cookies[settings.SESSION_COOKIE_NAME].value,
            "path": "/",
        }
    )


def test_run_admin_page_shows_every_step_in_the_graph(browser, saga_run, live_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    # given a staff session in the browser
    _log_in(browser, live_server.url)

    # when it opens the run's admin page
    browser.get(f"{live_server.url}/admin/workflows_app/workflowrun/{saga_run.pk}/change/")
    svg = WebDriverWait(browser, 20).until(
        ec.visibility_of_element_located((By.CSS_SELECTOR, "svg.qwg"))
    )

    # then every step of the definition is drawn, visible, inside its box
    labels = svg.find_elements(By.CSS_SELECTOR, "text.qwg-step-name")
    assert sorted(label.text for label in labels) == sorted(DEFINITION["steps"])
    assert all(label.is_displayed() for label in labels)
    boxes = browser.execute_script(
        """return Array.from(arguments[0].querySelectorAll('g.qwg-step')).map(g => {
             const box = g.querySelector('rect').getBBox();
             const label = g.querySelector('text.qwg-step-name').getBBox();
             return [g.getAttribute('data-step'), g.getAttribute('data-status'),
                     box.width, label.width];
           });""",
        svg,
    )
    statuses = {name: status for name, status, _, _ in boxes}
    assert statuses == {
        "reserve": "COMPLETED",
        "charge": "COMPLETED",
        "notify": "COMPLETED",
        "ship": "FAILED",
        "invoice": "NOT_STARTED",
    }
    assert all(0 < label_w < box_w for _, _, box_w, label_w in boxes), boxes
    undo = svg.find_elements(By.CSS_SELECTOR, "path.qwg-undo-edge")
    assert [(p.get_attribute("data-from"), p.get_attribute("data-to")) for p in undo] == [
        ("ship", "charge"),
        ("charge", "reserve"),
    ]
    # and the page and the picture can be captured
    page_png, picture_png = tmp_path / "run-page.png", tmp_path / "run-graph.png"
    assert browser.save_screenshot(str(page_png))
    assert svg.screenshot(str(picture_png))
    for png in (page_png, picture_png):
        data = png.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, png
