"""The chaos suite's fixtures and its summary table (``make chaos``, ``make soak``).

It reuses ``tests/conftest.py``: the session's own database and vhost, ``spawn`` for workers
and beat, ``Proc``, ``wait_for``. It runs only when named (``pytest tests/chaos…``): ``make
test`` ignores the directory, and a bare ``pytest`` deselects it, since it takes minutes.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rest_framework.authtoken.models import Token

from tests.chaos import harness, report

CHAOS_DIR = Path(__file__).resolve().parent


def _named(config: pytest.Config) -> bool:
    for arg in config.args:
        path = Path(arg.split("::", 1)[0]).resolve()
        if path == CHAOS_DIR or CHAOS_DIR in path.parents:
            return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _named(config):
        return
    chaos = [item for item in items if CHAOS_DIR in Path(str(item.fspath)).parents]
    if chaos:
        config.hook.pytest_deselected(items=chaos)
        items[:] = [item for item in items if item not in chaos]


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    lines = [*report.render_faults(), *report.render_soak()]
    if not lines:
        return
    terminalreporter.section("reliability")
    for line in lines:
        terminalreporter.write_line(line)
    for path in report.write_json():
        terminalreporter.write_line(f"written: {path}")


@pytest.fixture
def services(tmp_path: Path) -> Iterator[harness.Services]:
    """gunicorn and proxy processes for one test; stopped at its end."""
    started = harness.Services(tmp_path)
    yield started
    started.stop_all()


@pytest.fixture
def token(user: Any) -> str:
    """The ``user`` fixture's API token (committed: the test runs with transactional_db)."""
    return Token.objects.get_or_create(user=user)[0].key


@pytest.fixture(autouse=True)
def _empty_queues(transactional_db: Any) -> None:
    """Start every test from empty queues: an earlier test's messages name flushed rows."""
    harness.purge_queues()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    if rep.when == "call":
        item.stash[_FAILED] = rep.failed
    return rep


_FAILED = pytest.StashKey[bool]()


@pytest.fixture(autouse=True)
def _keep_logs_of_failures(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[None]:
    """A failed test's process logs go to ``var/chaos-logs/<test>/`` (pytest's own temporary
    directories rotate away as other sessions on the machine run)."""
    yield
    if request.node.stash.get(_FAILED, False):
        kept = report.VAR / "chaos-logs" / request.node.name
        shutil.rmtree(kept, ignore_errors=True)
        kept.mkdir(parents=True)
        for log in tmp_path.glob("*.log"):
            shutil.copy(log, kept / log.name)
