"""A message Celery cannot even read is refused to tasks.dlx; it never stops the worker.

Regression: a message naming ``queueworker.execute`` without an ``id`` header, or whose JSON
body is not Celery's ``[args, kwargs, embed]``, raised in the worker's consumer ("Unrecoverable
error: KeyError('id')") and stopped the worker; still unacknowledged, it went on to stop the
next worker that took it. A body that was not JSON, or one without ``taskId``, was dropped
instead of dead-lettered (docs/architecture.md). Found by the chaos suite
(tests/chaos/test_malformed_messages.py).
"""

from __future__ import annotations

import json
import uuid

import pytest
from kombu import Producer

from queueworker.celery import app
from tasks_app.dispatch import EXECUTE_TASK
from tasks_app.models import DeadLetterMessage, Task, TaskStatus
from tests.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def _publish(body: bytes, headers: dict) -> None:
    with app.connection_for_write() as conn:
        Producer(conn.default_channel).publish(
            body,
            content_type="application/json",
            content_encoding="utf-8",
            headers=headers,
            exchange="tasks",
            routing_key="task.created",
        )


def test_unreadable_messages_are_dead_lettered_and_the_worker_keeps_running(api, worker):
    # given messages that name the execute task but that Celery cannot turn into a request
    markers = [str(uuid.uuid4()) for _ in range(5)]
    envelope = [[], {"taskType": "NOOP", "taskId": markers[0]}, {}]
    _publish(json.dumps(envelope).encode(), {"task": EXECUTE_TASK})  # no id header
    _publish(
        json.dumps({"taskType": "NOOP", "taskId": markers[1]}).encode(),  # no [args, kwargs, embed]
        {"task": EXECUTE_TASK, "id": markers[1]},
    )
    _publish(json.dumps(f"args {markers[2]}").encode(), {"task": EXECUTE_TASK, "id": markers[2]})
    _publish(b"{broken " + markers[3].encode(), {"task": EXECUTE_TASK, "id": markers[3]})
    no_task_id = [[], {"taskType": "NOOP", "metadata": {"note": markers[4]}}, {}]
    _publish(json.dumps(no_task_id).encode(), {"task": EXECUTE_TASK, "id": markers[4]})

    # when a real task is queued behind them
    task_id = api.post("/api/tasks/", {"type": "NOOP"}, format="json").json()["id"]

    # then it completes, the worker is still running, and each message was dead-lettered
    wait_for(lambda: Task.objects.get(pk=task_id).status == TaskStatus.COMPLETED, timeout=15)
    assert worker.popen.poll() is None, worker.output()[-3000:]
    assert "Unrecoverable error" not in worker.output()

    def recorded() -> set[str]:
        return {
            marker
            for entry in DeadLetterMessage.objects.all()
            for marker in markers
            if marker in entry.body_excerpt
        }

    wait_for(lambda: recorded() == set(markers), timeout=15)
    assert set(DeadLetterMessage.objects.values_list("failure_class", flat=True)) == {
        "invalid_message"
    }
