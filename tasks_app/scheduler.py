"""Beat's scheduler: django-celery-beat's ``DatabaseScheduler`` plus the dispatcher and sweep.

Running them inside beat gives exactly one dispatcher per deployment with no queue of its own:
``celery -A queueworker beat`` uses this class by default (``CELERY_BEAT_SCHEDULER``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from django.db import close_old_connections
from django.db.models import Q
from django_celery_beat.schedulers import DatabaseScheduler, ModelEntry

logger = logging.getLogger(__name__)
# While the recovery sweep keeps failing (a database outage), one log line this often.
FAILURE_REPORT_S = 30.0


class QueueWorkerEntry(ModelEntry):
    """A database entry; a cron ``Schedule`` of ours is due by its DST-correct ``LocalCron``."""

    def __init__(self, model: Any, app: Any = None) -> None:
        super().__init__(model, app=app)
        from workflows_app.schedules import beat_schedule_for

        local = beat_schedule_for(model)
        if local is not None:
            self.schedule = local


class QueueWorkerScheduler(DatabaseScheduler):
    Entry = QueueWorkerEntry

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Save last_run_at after every fire: a restart then recomputes no slot already sent
        # (and the unique (schedule, slot) of ScheduleFire drops one that slips through).
        self.sync_every_tasks = 1
        from django.conf import settings

        self.dispatch_interval = settings.QW_DISPATCH_INTERVAL_S
        self.sweep_interval = settings.QW_SWEEP_INTERVAL_S
        self._next_dispatch = 0.0
        self._next_sweep = 0.0
        self._failing_since: float | None = None
        self._last_failure_report = 0.0

    def _get_crontab_exclude_query(self) -> Q:
        # Upstream leaves out crontabs whose hour is not near now by a UTC-offset guess; a
        # LocalCron decides itself, so keep every crontab row in the schedule.
        return Q(pk__in=[])

    def apply_async(
        self, entry: Any, producer: Any = None, advance: bool = True, **kwargs: Any
    ) -> Any:
        """A schedule fire carries its slot: the due time of this fire, from the entry's
        previous ``last_run_at`` (so a restarted beat computes the same slot)."""
        from workflows_app.schedules import FIRE_TASK, slot_for

        if entry.task != FIRE_TASK:
            return super().apply_async(entry, producer=producer, advance=advance, **kwargs)
        slot = slot_for(entry.model, entry.last_run_at)
        fire_kwargs = {**entry.kwargs, "slot": slot.isoformat()}
        entry = self.reserve(entry) if advance else entry
        options = entry.options.copy()
        options.setdefault("headers", {})["celery_beat_task"] = True
        try:
            return self.send_task(FIRE_TASK, (), fire_kwargs, producer=producer, **options)
        finally:
            if entry.model.one_off:
                self._disable_one_off(entry.model)
            self._tasks_since_sync += 1
            if self.should_sync():
                self._do_sync()

    def schedule_changed(self) -> bool:
        # Upstream misses the first change when beat started with no PeriodicTasks row yet
        # (``ts > (last or ts)`` with last None): a schedule created then would never load.
        last = self._last_timestamp
        changed = bool(super().schedule_changed())
        return changed or (last is None and self._last_timestamp is not None)

    @staticmethod
    def _disable_one_off(model: Any) -> None:
        """A one-off is disabled as it fires: upstream waits for a next is_due check that a
        clocked entry (next check "never") does not get."""
        from django_celery_beat.models import PeriodicTask, PeriodicTasks

        model.enabled = False
        PeriodicTask.objects.filter(pk=model.pk).update(enabled=False)
        PeriodicTasks.update_changed()

    def tick(self, *args: Any, **kwargs: Any) -> float:
        wait = super().tick(*args, **kwargs)
        self.run_recovery()
        return min(wait, self.dispatch_interval)

    def run_recovery(self) -> None:
        from tasks_app import artifacts, recovery
        from workflows_app.recovery import reconcile_runs

        now = time.monotonic()
        try:
            if now >= self._next_sweep:
                self._next_sweep = now + self.sweep_interval
                recovery.expire_leases()
                reconcile_runs()
                artifacts.expire()
            if now >= self._next_dispatch:
                self._next_dispatch = now + self.dispatch_interval
                recovery.dispatch_due()
        except Exception as exc:  # a database outage must not stop beat; the next tick retries
            close_old_connections()
            self._recovery_failed(exc, now)
            return
        if self._failing_since is not None:
            logger.warning("recovery sweep works again after %.0f s", now - self._failing_since)
            self._failing_since = None

    def _recovery_failed(self, exc: Exception, now: float) -> None:
        """The first failure with its traceback; while it lasts, one line every
        ``FAILURE_REPORT_S`` instead of one per tick (a database outage is many ticks)."""
        if self._failing_since is None:
            self._failing_since = self._last_failure_report = now
            logger.exception("recovery sweep failed")
        elif now - self._last_failure_report >= FAILURE_REPORT_S:
            self._last_failure_report = now
            logger.error(
                "recovery sweep still failing after %.0f s: %s", now - self._failing_since, exc
            )
