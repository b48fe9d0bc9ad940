"""Small helpers shared by the unit tests (factories beyond ``tests/factories.py``, races)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from django.db import connection
from django.utils import timezone

from tasks_app.models import Task, TaskLog, TaskStatus
from tests.factories import TaskFactory, UserFactory


def make_task(status: str = TaskStatus.PENDING, **fields: Any) -> Task:
    """A task in ``status`` as a worker would have left it.

    PROCESSING tasks have been claimed (``attempt`` 1, a lease that ran out a minute ago, so
    that ``expire_lease`` applies); other statuses are due now.
    """
    now = timezone.now()
    defaults: dict[str, Any] = {"status": status, "next_attempt_at": None}
    if "owner" not in fields:
        # An unusable password: hashing "pw" with PBKDF2 would cost a quarter second per task.
        defaults["owner"] = UserFactory(password=None)
    if status == TaskStatus.PROCESSING:
        defaults.update(
            attempt=1,
            started_at=now - timedelta(minutes=2),
            lease_expires_at=now - timedelta(minutes=1),
        )
    defaults.update(fields)
    return TaskFactory(**defaults)


def snapshot(task_id: Any) -> dict[str, Any]:
    """Every column of the row, to compare before and after a refused transition."""
    return Task.objects.filter(id=task_id).values().get()


def log_events(task_id: Any) -> list[str]:
    return list(TaskLog.objects.filter(task_id=task_id).values_list("event", flat=True))


def run_concurrently(*calls: Callable[[], Any], timeout: float = 20.0) -> list[Any]:
    """Run ``calls`` in one thread each, released together by a barrier; return their results.

    Each thread has its own Django database connection, closed when the thread ends. An
    exception in a thread is re-raised here.
    """
    barrier = threading.Barrier(len(calls), timeout=timeout)
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def target(index: int, call: Callable[[], Any]) -> None:
        try:
            connection.ensure_connection()  # connect before the barrier: race the UPDATEs only
            barrier.wait()
            results[index] = call()
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [
        threading.Thread(target=target, args=(i, call), daemon=True) for i, call in enumerate(calls)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(t.is_alive() for t in threads), "a racing thread did not finish"
    if errors:
        raise errors[0]
    return results
