"""How a refused message is classified and recorded (redacted, cut short, never unpickled)."""

from __future__ import annotations

import json
import uuid

import pytest

from tasks_app.dead_letters import EXCERPT_CHARS, classify, record
from tasks_app.dispatch import EXECUTE_TASK
from tests.factories import TaskFactory

pytestmark = pytest.mark.django_db

JSON = "application/json"


def _body(**kwargs) -> bytes:
    return json.dumps([[], kwargs, {}]).encode()


@pytest.mark.parametrize(
    ("body", "content_type", "headers", "reason"),
    [
        (b"\x80\x04...", "application/x-python-serialize", {"task": EXECUTE_TASK}, "not JSON"),
        (_body(), JSON, {"task": "other.task"}, "unknown task name 'other.task'"),
        (_body(taskType="NOOP"), JSON, {"task": EXECUTE_TASK}, "no valid taskId"),
        (b"{not json", JSON, {"task": EXECUTE_TASK}, "no valid taskId"),
        (_body(taskId="nope"), JSON, {"task": EXECUTE_TASK}, "no valid taskId"),
    ],
)
def test_refused_messages_are_invalid_with_a_reason(body, content_type, headers, reason):
    failure_class, why, _ = classify(body, content_type, headers)
    assert failure_class == "invalid_message" and why.startswith(reason)


def test_a_message_for_no_task_and_for_a_real_task(user):
    missing = uuid.uuid4()
    real = TaskFactory(owner=user)

    assert classify(_body(taskId=str(missing)), JSON, {"task": EXECUTE_TASK}) == (
        "invalid_message",
        f"no task {missing}",
        missing,
    )
    assert classify(_body(taskId=str(real.pk)), JSON, {"task": EXECUTE_TASK})[0] == (
        "poison_message"
    )


def test_record_redacts_and_cuts_the_body():
    body = json.dumps({"headers": {"Authorization": "Bearer s3cr3t-v4lue"}, "pad": "x" * 5000})
    entry = record(
        body.encode(),
        JSON,
        {
            "task": "t",
            "x-death": [{"queue": "http.request"}],
            "Authorization": "Bearer s3cr3t-v4lue",
        },
    )

    assert entry.queue == "http.request" and entry.task_name == "t"
    assert "s3cr3t-v4lue" not in entry.body_excerpt and len(entry.body_excerpt) <= EXCERPT_CHARS
    assert "Authorization" not in entry.headers  # only the known headers are kept
