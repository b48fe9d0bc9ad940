"""Fixtures shared by the whole suite: users and API clients, and real worker/beat processes.

Integration tests start ``celery -A queueworker worker`` and ``beat`` as real processes against
the session's PostgreSQL database and RabbitMQ vhost (see ``tests/session_env.py``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from tests import session_env
from tests.factories import UserFactory

ROOT = Path(__file__).resolve().parent.parent
ALL_QUEUES = "http.request,data.processing,compensation,task.created"


def pytest_configure(config: pytest.Config) -> None:
    from django.conf import settings

    # Factories hash a password per user; PBKDF2 would cost ~0.5 s each on two cores.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not session_env.MISSING:
        return
    reason = (
        f"needs {', '.join(session_env.MISSING)} (unreachable; set DATABASE_URL/CELERY_BROKER_URL)"
    )
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if (
            item.get_closest_marker("django_db")
            or fixtures & {"db", "transactional_db"}
            or (item.get_closest_marker("integration"))
        ):
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session", autouse=True)
def _broker_vhost() -> None:
    session_env.ensure_vhost()


# --- users and clients -------------------------------------------------------------------------


@pytest.fixture
def user(db: Any) -> Any:
    return UserFactory()


@pytest.fixture
def staff_user(db: Any) -> Any:
    return UserFactory(is_staff=True, is_superuser=True)


def _client_for(user: Any) -> APIClient:
    client = APIClient()
    token, _ = Token.objects.get_or_create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


@pytest.fixture
def api(user: Any) -> APIClient:
    """An API client authenticated with the ``user`` fixture's token."""
    return _client_for(user)


@pytest.fixture
def client_for() -> Callable[[Any], APIClient]:
    return _client_for


# --- processes ---------------------------------------------------------------------------------


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with a clear message."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)


class Proc:
    """A child process (worker or beat) whose output goes to a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        self._log_file = log.open("wb")
        self.popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_output(self, text: str, timeout: float = 30.0) -> None:
        def seen() -> bool:
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.name} exited early:\n{self.output()[-4000:]}")
            return text in self.output()

        wait_for(seen, timeout=timeout, interval=0.1)

    def children(self) -> list[int]:
        out = subprocess.run(
            ["pgrep", "-P", str(self.popen.pid)], capture_output=True, text=True
        ).stdout
        return [int(pid) for pid in out.split()]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the process group (the worker and its pool children)."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass
        self.popen.wait(timeout=30)

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log_file.close()


def child_database_url() -> str:
    """The URL of the test database that pytest-django created for this process."""
    from django.db import connection

    base = urlsplit(os.environ["DATABASE_URL"])
    return urlunsplit(base._replace(path=f"/{connection.settings_dict['NAME']}"))


def service_env(**overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DATABASE_URL=child_database_url(),
        PYTHONUNBUFFERED="1",
        LOG_LEVEL="INFO",
        QW_LEASE_SECONDS="2",
        QW_BACKOFF_BASE_S="0.2",
        QW_BACKOFF_CAP_S="5",
    )
    env.update(overrides)
    return env


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """Start worker or beat processes for one test; all are stopped at its end."""
    started: list[Proc] = []

    def start(
        kind: str = "worker", *, concurrency: int = 2, queues: str = ALL_QUEUES, **env: str
    ) -> Proc:
        name = f"{kind}{len(started)}"
        celery = [sys.executable, "-m", "celery", "-A", "queueworker"]
        if kind == "worker":
            argv = [
                *celery,
                "worker",
                "-Q",
                queues,
                "-c",
                str(concurrency),
                "-P",
                "prefork",
                "-n",
                f"{name}-{session_env.SESSION}@%h",
                "--without-mingle",
                "--without-gossip",
                "-l",
                "INFO",
            ]
            ready = "ready."
        elif kind == "beat":
            argv = [
                *celery,
                "beat",
                "-l",
                "INFO",
                "-s",
                str(tmp_path / "beat-schedule"),
                "--max-interval",
                "1",
            ]
            ready = "beat: Starting..."
        else:
            raise ValueError(kind)
        proc = Proc(name, argv, service_env(**env), tmp_path / f"{name}.log")
        started.append(proc)
        proc.wait_for_output(ready)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def worker(transactional_db: Any, spawn: Callable[..., Proc]) -> Proc:
    """A real Celery worker (prefork, two children) on every work queue."""
    return spawn("worker")


@pytest.fixture
def artifact_root(settings: Any, tmp_path: Path) -> Path:
    """The artifacts storage in a folder of this test (``QW_ARTIFACT_ROOT`` for its workers)."""
    root = tmp_path / "artifacts"
    settings.STORAGES = {
        **settings.STORAGES,
        "artifacts": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": str(root)},
        },
    }
    return root
