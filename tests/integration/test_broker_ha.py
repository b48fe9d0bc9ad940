"""A RabbitMQ cluster's features on the local broker: a failover list whose first node is down,
and quorum work queues, each with a task run end to end by a real worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kombu import pools
from rest_framework.authtoken.models import Token

from queueworker import broker, messaging
from queueworker.celery import app
from tasks_app import dispatch
from tasks_app.models import Task, TaskStatus
from tests import session_env
from tests.conftest import ROOT, Proc, service_env, wait_for
from tests.factories import UserFactory

pytestmark = pytest.mark.integration


def _use_broker(url: str) -> None:
    # Celery reads CELERY_BROKER_URL from the environment before its own configuration.
    os.environ["CELERY_BROKER_URL"] = url
    app.conf.broker_url = url
    pools.reset()  # kombu keeps connection and producer pools per URL, process-wide
    app._pool = None
    app.amqp._producer_pool = None
    dispatch.reset_breaker()


@pytest.fixture
def failover_url() -> Iterator[str]:
    """The session's broker behind a node that refuses connections, as this process's broker."""
    good = str(app.conf.broker_url)
    url = f"amqp://guest:guest@127.0.0.1:1/{session_env.VHOST};{good}"
    _use_broker(url)
    yield url
    _use_broker(good)


def _status(task_id: str) -> str:
    return Task.objects.values_list("status", flat=True).get(pk=task_id)


def test_failover_list_first_node_down_task_runs_end_to_end(
    api: Any, spawn: Callable[..., Proc], transactional_db: Any, failover_url: str
) -> None:
    # given a worker and this web process that both have a dead node first in their list
    spawn("worker", CELERY_BROKER_URL=failover_url)

    # when a task is created through the API
    response = api.post("/api/tasks/", {"type": "NOOP"}, format="json")

    # then it was published past the dead node and a worker ran it
    assert response.status_code == 201
    task_id = response.json()["id"]
    wait_for(lambda: _status(task_id) == TaskStatus.COMPLETED, timeout=30)
    # and the queue figures come from the live node, for the session's vhost
    assert broker._vhost() == session_env.VHOST
    stats = {s.name: s for s in broker.queue_stats()}
    assert broker.reachable(list(stats.values())), stats
    assert stats["task.created"].consumers == 1


CREATE_TASK = """
import json, os, sys, django
os.environ["DJANGO_SETTINGS_MODULE"] = "queueworker.settings"
django.setup()
from rest_framework.test import APIClient
client = APIClient()
client.credentials(HTTP_AUTHORIZATION="Token " + sys.argv[1])
response = client.post("/api/tasks/", {"type": "NOOP", "priority": 7}, format="json")
print(json.dumps({"status": response.status_code, "body": response.json()}))
"""


@pytest.fixture
def quorum_vhost() -> Iterator[str]:
    """A vhost of this test's own: the session's already holds classic queues of these names."""
    name = f"{session_env.VHOST}_quorum"
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", name], check=True, capture_output=True)
    subprocess.run(
        ["rabbitmqctl", "-q", "set_permissions", "-p", name, "guest", ".*", ".*", ".*"],
        check=True,
        capture_output=True,
    )
    yield name
    subprocess.run(["rabbitmqctl", "-q", "delete_vhost", name], capture_output=True)


def _queues(vhost: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """name → (type, arguments), as ``rabbitmqctl list_queues`` reports them."""
    columns = ["name", "type", "arguments", "--formatter", "json"]
    out = subprocess.run(
        ["rabbitmqctl", "list_queues", "-p", vhost, *columns],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    # arguments come as [name, AMQP type, value] triples
    return {
        q["name"]: (q["type"], {name: value for name, _, value in q["arguments"]})
        for q in json.loads(out)
    }


def test_quorum_queue_type_declares_quorum_queues_and_runs_a_task(
    spawn: Callable[..., Proc], transactional_db: Any, quorum_vhost: str
) -> None:
    # given web and worker processes with QW_QUEUE_TYPE=quorum on a fresh vhost
    quorum = {
        "CELERY_BROKER_URL": messaging.with_vhost(str(app.conf.broker_url), quorum_vhost),
        "QW_QUEUE_TYPE": "quorum",
    }
    worker = spawn("worker", **quorum)
    token = Token.objects.create(user=UserFactory()).key

    # when a task is created (with a priority, which quorum queues ignore)
    created = subprocess.run(
        [sys.executable, "-c", CREATE_TASK, token],
        cwd=ROOT,
        env=service_env(**quorum),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert created.returncode == 0, created.stderr[-3000:]
    answer = json.loads(created.stdout.strip().splitlines()[-1])
    assert answer["status"] == 201, answer

    # then the worker runs it
    task_id = answer["body"]["id"]
    wait_for(lambda: _status(task_id) == TaskStatus.COMPLETED, timeout=30)
    # and every work queue is a quorum queue with a delivery limit, dead-lettered, no priority
    queues = _queues(quorum_vhost)
    for name in messaging.STANDARD_QUEUES:
        assert queues[name] == (
            "quorum",
            {
                "x-queue-type": "quorum",
                "x-delivery-limit": messaging.DEFAULT_DELIVERY_LIMIT,
                "x-dead-letter-exchange": "tasks.dlx",
            },
        )
    # and the dead-letter queue stays classic (it is not a work queue)
    assert queues["tasks.dead_letter"][0] == "classic"
    assert "Global QoS is disabled" in worker.output()
