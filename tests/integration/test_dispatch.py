"""Publishing against the real broker: batches are confirmed together, nothing is dropped."""

from __future__ import annotations

import json
import uuid

import pytest

from queueworker.celery import app
from tasks_app import dispatch

pytestmark = pytest.mark.integration

QUEUE = "compensation"  # no worker consumes it in these tests


@pytest.fixture
def drain():
    """Messages left on QUEUE, read back with basic_get; the queue is emptied around the test."""

    def read() -> list[dict]:
        bodies = []
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            while (message := channel.basic_get(QUEUE, no_ack=True)) is not None:
                bodies.append({"headers": message.headers, "body": json.loads(message.body)})
        return bodies

    with app.connection_for_write() as conn:
        app.amqp.queues[QUEUE](conn.default_channel).declare()
    read()
    yield read
    read()


def _wakeups(n: int, **overrides) -> list[dispatch.Wakeup]:
    base = {"type": "COMPENSATION", "queue": QUEUE, "priority": 3, "timeout_s": 30}
    base.update(overrides)
    return [dispatch.Wakeup(str(uuid.uuid4()), **base) for _ in range(n)]


@pytest.mark.parametrize("count", [1, 250])
def test_publish_delivers_every_wakeup_with_ids_only(drain, count):
    dispatch.reset_breaker()
    wakeups = _wakeups(count)

    assert dispatch.publish(wakeups) == count

    messages = drain()
    assert sorted(m["headers"]["id"] for m in messages) == sorted(w.task_id for w in wakeups)
    for message in messages:
        args, kwargs, _ = message["body"]
        assert args == []
        assert set(kwargs) == {"taskType", "taskId", "delay", "metadata"}
        assert kwargs["taskType"] == "COMPENSATION" and kwargs["delay"] == 0
        assert message["headers"]["task"] == dispatch.EXECUTE_TASK
        assert message["headers"]["timelimit"] == [30 + dispatch.HARD_LIMIT_GRACE_S, 30]


def test_batches_reuse_the_pooled_connection(drain):
    dispatch.reset_breaker()
    for _ in range(3):
        assert dispatch.publish(_wakeups(20)) == 20
    assert len(drain()) == 60
