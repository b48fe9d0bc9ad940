"""The consumer of ``tasks.dead_letter``: record each message the application refused, ack it.

Work queues dead-letter into ``tasks.dlx`` what a worker rejects: a message that is not JSON,
names a task the workers do not know, carries no valid task id, or names no task. Every
worker runs this small consumer beside its task consumer (a Celery consumer bootstep). It
reads the raw bytes without deserialising them (a pickle is never loaded), records a
``DeadLetterMessage`` (redacted, the body cut short), and acknowledges the message.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from celery import bootsteps
from kombu import Consumer

from queueworker import messaging
from queueworker.redaction import redact
from tasks_app.dispatch import EXECUTE_TASK
from tasks_app.models import DeadLetterMessage, FailureClass, Task

logger = logging.getLogger(__name__)

EXCERPT_CHARS = 2000


def classify(
    body: bytes | str, content_type: str, headers: dict[str, Any]
) -> tuple[str, str, uuid.UUID | None]:
    """(failure class, reason, task id if one is named) for a refused message."""
    task_name = str(headers.get("task") or "")
    if content_type != "application/json":
        return FailureClass.INVALID_MESSAGE, f"not JSON ({content_type or 'no content type'})", None
    if task_name != EXECUTE_TASK:
        return FailureClass.INVALID_MESSAGE, f"unknown task name {task_name!r}", None
    try:
        decoded = json.loads(body)
        kwargs = decoded[1] if isinstance(decoded, list) and len(decoded) > 1 else {}
        task_id = uuid.UUID(str(kwargs["taskId"]))
    except (ValueError, KeyError, TypeError, IndexError):
        return FailureClass.INVALID_MESSAGE, "no valid taskId", None
    if not Task.objects.filter(pk=task_id).exists():
        return FailureClass.INVALID_MESSAGE, f"no task {task_id}", task_id
    # A well-formed message for a real task that a worker still refused.
    return FailureClass.POISON_MESSAGE, "refused for an existing task", task_id


def record(body: bytes | str, content_type: str, headers: dict[str, Any]) -> DeadLetterMessage:
    failure_class, reason, task_id = classify(body, content_type, headers)
    deaths = headers.get("x-death") or [{}]
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    kept = {
        k: headers[k] for k in ("task", "id", "x-death", "x-first-death-reason") if k in headers
    }
    entry = DeadLetterMessage.objects.create(
        failure_class=failure_class,
        reason=reason,
        queue=str(deaths[0].get("queue", ""))[:128],
        content_type=content_type[:128],
        task_name=str(headers.get("task") or "")[:255],
        task_id=task_id,
        headers=json.loads(json.dumps(redact(kept), default=str)),
        body_excerpt=str(redact(text[:EXCERPT_CHARS])).replace("\x00", "\\0"),
    )
    logger.warning("dead letter recorded: %s (%s)", reason, failure_class)
    return entry


class DeadLetterConsumer(bootsteps.ConsumerStep):
    """Consumes ``tasks.dead_letter`` in every worker, beside the task consumer."""

    def get_consumers(self, channel: Any) -> list[Consumer]:
        return [
            Consumer(
                channel,
                queues=[messaging.dead_letter_queue()],
                on_message=self.on_message,
                prefetch_count=10,
            )
        ]

    def on_message(self, message: Any) -> None:
        try:
            record(message.body, message.content_type or "", dict(message.headers or {}))
        except Exception:  # never lose a message to a recording error (the database is down)
            # Left unacknowledged (at most prefetch_count of them), it returns to the queue when
            # this connection closes; requeueing now would spin on the same failure.
            logger.exception("could not record a dead letter; it stays unacknowledged")
            return
        message.ack()
