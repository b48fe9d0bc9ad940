"""The engine's part of every worker and beat process: each task process's heartbeat, and the
dispatcher candidate that every worker and beat runs (``tasks_app.dispatcher``).

``TasksAppConfig.ready()`` imports this module, which connects the handlers: Celery sets Django
up (``import_modules``) before it sends ``worker_init``, ``worker_process_init`` or
``beat_init``, so every handler is connected in time. The process-wide setup that is not the
engine's (database session settings, the broker topology, how messages are read) stays in
``queueworker.worker_signals``, whose handlers are connected first and so run first.

Apps built on the engine add a beat check with ``register_beat_check`` (workflows refuse a
scheduler that would not fire their schedules): the checks run on ``beat_init`` before beat
becomes a dispatcher candidate, so a beat that a check stops never dispatches.
"""

from __future__ import annotations

import atexit
from collections.abc import Callable
from importlib import import_module
from typing import Any

from billiard.process import current_process
from celery import signals

from queueworker.worker_signals import runs_tasks_in_worker_process
from tasks_app import dispatcher, liveness

_beat_checks: list[Callable[[Any], None]] = []


def register_beat_check(check: Callable[[Any], None]) -> None:
    """Run ``check(beat_service)`` on ``beat_init``, before the dispatcher starts; it may
    replace the service's scheduler or raise ``SystemExit`` to stop beat. Once per check
    (``ready()`` may run more than once)."""
    if check not in _beat_checks:
        _beat_checks.append(check)


@signals.worker_process_init.connect
def _start_heartbeat(**kwargs: Any) -> None:
    # The process that runs tasks (a prefork child, or the worker itself under -P solo) is the
    # holder of what it claims: its heartbeat proves it alive.
    liveness.start(pool_child=current_process().name != "MainProcess")


@signals.worker_init.connect
def _start_threaded_worker_heartbeat(sender: Any = None, **kwargs: Any) -> None:
    """Under -P threads the worker process is the holder of every task its threads claim:
    its heartbeat starts before the consumer takes the first message, so that a SIGKILLed
    worker's tasks are recovered within the lease, not the backstop."""
    if sender is not None and runs_tasks_in_worker_process(getattr(sender, "pool_cls", None)):
        liveness.start(pool_child=False)


@signals.worker_init.connect
def _load_data_engine(**kwargs: Any) -> None:
    """Import the DATA_PROCESSING engine (and Polars) once in the worker's main process.

    Nothing imports it at module level any more, so that the web, beat and Flower stay
    without Polars (docs/performance.md, "Process sizes"); the worker loads it here, before
    the pool forks, so that its children share the pages and no first batch pays the import.
    """
    import_module("tasks_app.batches")


@signals.worker_process_shutdown.connect
def _stop_heartbeat(**kwargs: Any) -> None:
    liveness.stop()


@signals.worker_ready.connect
def _start_dispatcher(sender: Any = None, **kwargs: Any) -> None:
    hostname = getattr(sender, "hostname", "") or "worker"
    dispatcher.start(f"worker {hostname}")


@signals.worker_shutdown.connect
def _stop_dispatcher(**kwargs: Any) -> None:
    dispatcher.stop()
    liveness.stop()  # -P solo: the worker's own heartbeat


@signals.beat_init.connect
def _beat_init(sender: Any = None, **kwargs: Any) -> None:
    """Beat passes the registered checks, then is a dispatcher candidate."""
    for check in _beat_checks:
        check(sender)
    dispatcher.start("beat")
    atexit.register(dispatcher.stop)
