"""A bare Celery app, the yardstick: a no-op task, no Django, no database.

It keeps the reliability settings the service keeps (JSON, late acks, the same prefetch multiplier,
publisher confirms, no results) and uses its own queue ``bench.bare`` in the run's vhost.
Worker: ``celery -A bench.bare_app worker -c 2 -P prefork -Q bench.bare``.

Completion is counted without a database or a result backend: each pool process keeps a count
of the tasks it ran and, after each one, overwrites a one-line file ``<pid>.count`` in
``$QW_BENCH_BARE_DIR`` with ``<count> <time.time() at completion>`` (one ``pwrite`` of 31 bytes,
a few microseconds, into the page cache). The benchmark sums the counts and takes the latest
timestamp, so the last completion time is exact rather than the time of a poll.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from celery import Celery
from kombu import Exchange, Queue

QUEUE = "bench.bare"
TASK_NAME = "bench.bare.noop"
BROKER_ENV = "QW_BENCH_BARE_BROKER_URL"
COUNTER_DIR_ENV = "QW_BENCH_BARE_DIR"

app = Celery("bench_bare")
app.conf.update(
    broker_url=os.environ.get(BROKER_ENV, "amqp://guest:guest@127.0.0.1:5672//"),
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    # The same prefetch as the service's workers (QW_WORKER_PREFETCH, default 1).
    worker_prefetch_multiplier=int(os.environ.get("QW_WORKER_PREFETCH", "1")),
    broker_transport_options={"confirm_publish": True},
    task_ignore_result=True,
    task_queues=(
        Queue(
            QUEUE,
            Exchange(QUEUE, type="direct", durable=True),
            routing_key=QUEUE,
            durable=True,
        ),
    ),
    task_default_queue=QUEUE,
    task_default_exchange=QUEUE,
    task_default_routing_key=QUEUE,
    task_create_missing_queues=False,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

_fd: int | None = None
_count = 0


@app.task(name=TASK_NAME)
def noop() -> None:
    global _fd, _count
    if _fd is None:
        path = Path(os.environ[COUNTER_DIR_ENV]) / f"{os.getpid()}.count"
        _fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    _count += 1
    os.pwrite(_fd, f"{_count:12d} {time.time():17.6f}\n".encode(), 0)


def read_counters(directory: Path) -> tuple[int, float | None]:
    """(tasks completed, epoch time of the latest completion) over every pool process."""
    total = 0
    latest: float | None = None
    for path in directory.glob("*.count"):
        try:
            count_text, stamp_text = path.read_text().split()
            count, stamp = int(count_text), float(stamp_text)
        except (OSError, ValueError):
            continue  # created but not written yet; the next poll sees it
        total += count
        latest = stamp if latest is None else max(latest, stamp)
    return total, latest
