"""Grouped publishing against the real broker: a bulk create is a few multi-id messages, and a
message the broker refuses leaves each of its ids to the dispatcher."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from kombu import Queue

from queueworker.celery import app
from queueworker.messaging import tasks_exchange
from tasks_app import dispatch, services
from tasks_app.models import Task
from tests.factories import TaskFactory

pytestmark = [pytest.mark.integration, pytest.mark.django_db]

QUEUE = "compensation"  # COMPENSATION's queue; no worker consumes it in these tests


def _read(queue: str) -> list[dict[str, Any]]:
    messages = []
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            messages.append({"headers": message.headers, "body": json.loads(message.body)})
    return messages


@pytest.fixture
def drained() -> Any:
    with app.connection_for_write() as conn:
        app.amqp.queues[QUEUE](conn.default_channel).declare()
    _read(QUEUE)
    yield lambda: _read(QUEUE)
    _read(QUEUE)


def test_a_bulk_create_of_250_is_three_messages_naming_every_id(
    user, drained, settings, django_capture_on_commit_callbacks
):
    settings.QW_MESSAGE_MAX_TASKS = 100
    dispatch.reset_breaker()
    specs = [
        services.TaskSpec(type="COMPENSATION", payload={}, max_retries=0, priority=2, timeout_s=7)
        for _ in range(250)
    ]

    with django_capture_on_commit_callbacks(execute=True):
        tasks = services.task_bulk_create(owner=user, specs=specs)

    messages = drained()
    assert len(messages) == 3
    ids = [kwargs["taskIds"] for _, kwargs, _ in (m["body"] for m in messages)]
    assert sorted(len(group) for group in ids) == [50, 100, 100]
    assert sorted(i for group in ids for i in group) == sorted(str(t.id) for t in tasks)
    for message in messages:
        _, kwargs, _ = message["body"]
        assert message["headers"]["task"] == dispatch.EXECUTE_TASK
        assert message["headers"]["shadow"] == "COMPENSATION"
        assert message["headers"]["id"] == kwargs["taskId"] == kwargs["taskIds"][0]
        assert kwargs["metadata"]["timeout_s"] == 7
    assert (
        Task.objects.filter(pk__in=[t.id for t in tasks], dispatched_at__isnull=True).count() == 0
    )


def test_a_refused_message_clears_dispatched_at_of_each_of_its_ids(user):
    # given a queue that takes one message and refuses the rest (reject-publish nacks them)
    name = f"test.refusing.{uuid.uuid4().hex[:8]}"
    queue = Queue(
        name,
        exchange=tasks_exchange,
        routing_key=name,
        queue_arguments={"x-max-length": 1, "x-overflow": "reject-publish", "x-max-priority": 9},
        auto_delete=False,
    )
    with app.connection_for_write() as conn:
        queue(conn.default_channel).declare()
    app.amqp.queues[name] = queue
    try:
        tasks = [TaskFactory(owner=user, type="NOOP", queue=name) for _ in range(6)]
        wakeups = [dispatch.wakeup_for(t) for t in tasks]
        dispatch.reset_breaker()

        # when six wake-ups go out as three messages of two
        taken = dispatch.publish(wakeups, max_tasks=2)

        # then the first message's ids stay dispatched, the refused ones' wait for the dispatcher
        assert taken == 2
        cleared = set(Task.objects.filter(dispatched_at__isnull=True).values_list("id", flat=True))
        assert cleared == {t.id for t in tasks[2:]}
        assert not dispatch.breaker_open()  # a refusal is no outage
    finally:
        del app.amqp.queues[name]
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(name)
