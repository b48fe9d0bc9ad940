"""Settings for a highly available deployment, loaded as a process loads them (a subprocess):
broker failover lists, quorum queues, TLS to RabbitMQ and PostgreSQL, a read replica."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

LOADER = """
import json, os, django
os.environ["DJANGO_SETTINGS_MODULE"] = "queueworker.settings"
django.setup()
from django.conf import settings
from queueworker import broker
from queueworker.celery import app
print(json.dumps({
    "databases": settings.DATABASES,
    "routers": settings.DATABASE_ROUTERS,
    "broker_use_ssl": app.conf.broker_use_ssl,
    "transport_options": app.conf.broker_transport_options,
    "alternates": app.connection_for_write().alt,
    "vhost": broker._vhost(),
    "queues": {q.name: q.queue_arguments for q in app.amqp.queues.values()},
    "eta_max_seconds": settings.QW_ETA_MAX_SECONDS,
}))
"""

AMQP = "amqp://guest:guest@127.0.0.1:5672/qw"
FAILOVER = f"amqp://guest:guest@127.0.0.1:1/qw;{AMQP}"


def _load(**environ: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QW_BROKER_SSL", "QW_QUEUE"))}
    env.pop("DATABASE_REPLICA_URL", None)
    env.update(environ)
    proc = subprocess.run(
        [sys.executable, "-c", LOADER],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1]}
    loaded: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return loaded


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, str]:
    files = {}
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / name).write_text("stand-in\n")
        files[name] = str(tmp_path / name)
    return files


# --- failover lists ----------------------------------------------------------------------------


def test_failover_list_loads_with_every_url_as_alternate():
    loaded = _load(CELERY_BROKER_URL=FAILOVER)

    assert loaded["alternates"] == FAILOVER.split(";")
    assert loaded["vhost"] == "qw"
    assert loaded["transport_options"]["confirm_publish"] is True


def test_failover_list_mixing_tls_and_plain_refused_without_password():
    loaded = _load(CELERY_BROKER_URL="amqps://guest:s3cret@a:5671/qw;amqp://guest:s3cret@b/qw")

    assert "ImproperlyConfigured: CELERY_BROKER_URL must be amqp:// or amqps://" in loaded["error"]
    assert "s3cret" not in loaded["error"]


def test_broker_url_with_spaces_refused():
    loaded = _load(CELERY_BROKER_URL=f"amqp://guest:guest@127.0.0.1:1/qw; {AMQP}")
    assert "CELERY_BROKER_URL must not contain spaces" in loaded["error"]


# --- quorum queues -----------------------------------------------------------------------------


def test_quorum_queue_type_declares_quorum_queues_without_priority():
    loaded = _load(CELERY_BROKER_URL=AMQP, QW_QUEUE_TYPE="quorum", QW_QUEUE_DELIVERY_LIMIT="5")

    # Celery's own queue table, as a worker declares it (it adds x-max-priority when told to)
    for name, arguments in loaded["queues"].items():
        assert arguments == {
            "x-queue-type": "quorum",
            "x-delivery-limit": 5,
            "x-dead-letter-exchange": "tasks.dlx",
        }, name
    assert loaded["eta_max_seconds"] == 0


def test_classic_queue_type_by_default_keeps_priorities():
    loaded = _load(CELERY_BROKER_URL=AMQP)

    assert {args["x-max-priority"] for args in loaded["queues"].values()} == {9}
    assert loaded["eta_max_seconds"] == 60


def test_unknown_queue_type_refused():
    loaded = _load(CELERY_BROKER_URL=AMQP, QW_QUEUE_TYPE="stream")
    assert "QW_QUEUE_TYPE must be one of classic, quorum" in loaded["error"]


# --- TLS ---------------------------------------------------------------------------------------


def test_amqps_with_tls_files_gives_celery_broker_use_ssl(tls_files):
    loaded = _load(
        CELERY_BROKER_URL="amqps://guest:guest@rabbit-0:5671/qw;amqps://guest:guest@rabbit-1/qw",
        QW_BROKER_SSL_CA=tls_files["ca.pem"],
        QW_BROKER_SSL_CERT=tls_files["client.pem"],
        QW_BROKER_SSL_KEY=tls_files["client.key"],
    )

    assert loaded["broker_use_ssl"] == {
        "cert_reqs": 2,  # ssl.CERT_REQUIRED
        "server_hostname": None,
        "ca_certs": tls_files["ca.pem"],
        "certfile": tls_files["client.pem"],
        "keyfile": tls_files["client.key"],
    }


def test_amqps_alone_verifies_against_system_cas():
    loaded = _load(CELERY_BROKER_URL="amqps://guest:guest@rabbit-0/qw")

    assert loaded["broker_use_ssl"]["cert_reqs"] == 2
    assert loaded["broker_use_ssl"]["ca_certs"] is None


def test_plain_amqp_has_no_tls():
    assert _load(CELERY_BROKER_URL=AMQP)["broker_use_ssl"] is None


def test_tls_files_with_plain_amqp_refused(tls_files):
    loaded = _load(CELERY_BROKER_URL=AMQP, QW_BROKER_SSL_CA=tls_files["ca.pem"])
    assert "QW_BROKER_SSL_CA needs amqps://" in loaded["error"]


def test_tls_file_missing_refused(tmp_path):
    loaded = _load(
        CELERY_BROKER_URL="amqps://guest:guest@rabbit-0/qw",
        QW_BROKER_SSL_CA=str(tmp_path / "nope.pem"),
    )
    assert "QW_BROKER_SSL_CA: no such file" in loaded["error"]


def test_postgres_sslmode_passed_to_options():
    loaded = _load(
        DATABASE_URL="postgres://qw:pw@db.internal:5432/qw?sslmode=require&sslrootcert=/ca.pem"
    )

    options = loaded["databases"]["default"]["OPTIONS"]
    assert options["sslmode"] == "require"
    assert options["sslrootcert"] == "/ca.pem"
    assert options["connect_timeout"] == 5


# --- read replica ------------------------------------------------------------------------------


def test_replica_url_adds_replica_database_and_router():
    loaded = _load(
        DATABASE_URL="postgres://qw:pw@primary:5432/qw?sslmode=require",
        DATABASE_REPLICA_URL="postgres://qw_ro:pw@replica:5432/qw?sslmode=verify-full",
    )

    replica = loaded["databases"]["replica"]
    assert (replica["HOST"], replica["USER"], replica["NAME"]) == ("replica", "qw_ro", "qw")
    assert replica["ENGINE"] == "django.db.backends.postgresql"
    assert replica["OPTIONS"]["sslmode"] == "verify-full"
    assert replica["OPTIONS"]["connect_timeout"] == 5
    assert replica["TEST"]["MIRROR"] == "default"  # tests never create a replica database
    assert loaded["routers"] == ["queueworker.db_router.PrimaryReplicaRouter"]


def test_without_replica_url_one_database_no_router():
    loaded = _load(DATABASE_URL="postgres://qw:pw@primary:5432/qw")

    assert list(loaded["databases"]) == ["default"]
    assert loaded["routers"] == []


def test_replica_beside_sqlite_refused(tmp_path):
    loaded = _load(
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        DATABASE_REPLICA_URL="postgres://qw_ro:pw@replica:5432/qw",
    )
    assert "DATABASE_REPLICA_URL and DATABASE_URL must be PostgreSQL" in loaded["error"]
