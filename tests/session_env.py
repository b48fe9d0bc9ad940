"""Per-session isolation, loaded with ``-p tests.session_env`` before Django reads its settings.

Queue names are fixed by the contract, so a test session isolates itself with its own RabbitMQ
vhost (made with ``rabbitmqctl``, removed at the end) and its own PostgreSQL database; under
pytest-xdist every worker gets its own of both. ``make run``, ``make test`` and CI on one
machine therefore never take each other's messages or rows.

Services come from ``DATABASE_URL`` / ``CELERY_BROKER_URL`` when set, else localhost. A service
that cannot be reached fails the run under ``CI=true`` and skips the tests that need it elsewhere.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from urllib.parse import urlsplit, urlunsplit

import pytest

from queueworker import messaging

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/postgres"
DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"

SESSION = os.environ.setdefault("QW_TEST_SESSION", uuid.uuid4().hex[:8])
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

_base_db = urlsplit(
    os.environ.get("QW_TEST_DATABASE_URL") or os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
)
# One URL, or a cluster's ";"-separated failover list: every URL gets the session's vhost.
BASE_BROKER_URL = (
    os.environ.get("QW_TEST_BROKER_URL")
    or os.environ.get("CELERY_BROKER_URL")
    or DEFAULT_BROKER_URL
)
_brokers = [urlsplit(url) for url in messaging.broker_urls(BASE_BROKER_URL)]
os.environ["QW_TEST_DATABASE_URL"] = urlunsplit(_base_db)
os.environ["QW_TEST_BROKER_URL"] = BASE_BROKER_URL

VHOST = f"qw_test_{SESSION}_{XDIST_WORKER}"
MISSING: list[str] = []


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


if not _base_db.scheme.startswith("postgres") or not _reachable(
    _base_db.hostname or "127.0.0.1", _base_db.port or 5432
):
    MISSING.append(f"PostgreSQL at {_base_db.hostname}:{_base_db.port or 5432}")
if not any(_reachable(b.hostname or "127.0.0.1", b.port or 5672) for b in _brokers):
    MISSING.append("RabbitMQ at " + ", ".join(f"{b.hostname}:{b.port or 5672}" for b in _brokers))
elif shutil.which("rabbitmqctl") is None:
    MISSING.append("rabbitmqctl (needed to create the session's vhost)")

# The database name is the session's; pytest-django creates test_<name>[_gwN] from it.
os.environ["DATABASE_URL"] = urlunsplit(_base_db._replace(path=f"/qw_{SESSION}"))
os.environ["CELERY_BROKER_URL"] = messaging.with_vhost(BASE_BROKER_URL, VHOST)
os.environ.setdefault("QW_VAR_DIR", f"/tmp/qw-test-{SESSION}-{XDIST_WORKER}")
os.environ.setdefault("DJANGO_SECRET_KEY", f"test-secret-{SESSION}")
# One database per session: a test that needs a replica makes its own (test_read_replica.py).
os.environ.pop("DATABASE_REPLICA_URL", None)
_vhost_created = False


def ensure_vhost() -> None:
    """Create the session's vhost (once per process, on first use by a test)."""
    global _vhost_created
    if _vhost_created or MISSING:
        return
    _rabbitmqctl("add_vhost", VHOST)
    _rabbitmqctl("set_permissions", "-p", VHOST, _brokers[0].username or "guest", ".*", ".*", ".*")
    _vhost_created = True


def pytest_configure(config: pytest.Config) -> None:
    if MISSING and IN_CI:
        raise pytest.UsageError(f"CI=true and these services are unreachable: {', '.join(MISSING)}")


def pytest_unconfigure(config: pytest.Config) -> None:
    if _vhost_created:
        try:
            _rabbitmqctl("delete_vhost", VHOST)
        except (subprocess.SubprocessError, OSError) as exc:
            print(f"could not delete RabbitMQ vhost {VHOST}: {exc}")
