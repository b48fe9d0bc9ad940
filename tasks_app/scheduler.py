"""Beat's scheduler: django-celery-beat's ``DatabaseScheduler`` plus the dispatcher and sweep.

Running them inside beat gives exactly one dispatcher per deployment with no queue of its own:
``celery -A queueworker beat`` uses this class by default (``CELERY_BEAT_SCHEDULER``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from django.db import close_old_connections
from django_celery_beat.schedulers import DatabaseScheduler

logger = logging.getLogger(__name__)


class QueueWorkerScheduler(DatabaseScheduler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from django.conf import settings

        self.dispatch_interval = settings.QW_DISPATCH_INTERVAL_S
        self.sweep_interval = settings.QW_SWEEP_INTERVAL_S
        self._next_dispatch = 0.0
        self._next_sweep = 0.0

    def tick(self, *args: Any, **kwargs: Any) -> float:
        wait = super().tick(*args, **kwargs)
        self.run_recovery()
        return min(wait, self.dispatch_interval)

    def run_recovery(self) -> None:
        from tasks_app import recovery
        from workflows_app.recovery import reconcile_runs

        now = time.monotonic()
        try:
            if now >= self._next_sweep:
                self._next_sweep = now + self.sweep_interval
                recovery.expire_leases()
                reconcile_runs()
            if now >= self._next_dispatch:
                self._next_dispatch = now + self.dispatch_interval
                recovery.dispatch_due()
        except Exception:  # a database outage must not stop beat; the next tick tries again
            logger.exception("recovery sweep failed")
            close_old_connections()
