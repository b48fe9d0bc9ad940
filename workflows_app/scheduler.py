"""Beat's scheduler: django-celery-beat's ``DatabaseScheduler`` with our schedules' rules.

``celery -A queueworker beat`` uses it by default (``CELERY_BEAT_SCHEDULER``); a cron
``Schedule`` fires by its DST-correct ``LocalCron`` and each fire carries its slot. Beat with
``-S django`` asks for the parent class, which knows neither: ``ensure_project_scheduler``
(on ``beat_init``) runs this class in its place, and refuses any other scheduler. The
dispatcher and the recovery sweep are not the scheduler's: they run in every worker and beat,
one at a time (``tasks_app.dispatcher``).

It lives with the schedules it fires: the engine knows nothing of them, and
``WorkflowsAppConfig.ready()`` registers ``ensure_project_scheduler`` as a check beat runs
before it becomes a dispatcher candidate (``tasks_app.worker_signals.register_beat_check``).
"""

from __future__ import annotations

import logging
from typing import Any

from django.db.models import Q
from django_celery_beat.schedulers import DatabaseScheduler, ModelEntry

from workflows_app.schedules import FIRE_TASK, beat_schedule_for, slot_for

logger = logging.getLogger(__name__)

PROJECT_SCHEDULER = "workflows_app.scheduler:QueueWorkerScheduler"


class QueueWorkerEntry(ModelEntry):
    """A database entry; a cron ``Schedule`` of ours is due by its DST-correct ``LocalCron``."""

    def __init__(self, model: Any, app: Any = None) -> None:
        super().__init__(model, app=app)
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

    def _get_crontab_exclude_query(self) -> Q:
        # Upstream leaves out crontabs whose hour is not near now by a UTC-offset guess; a
        # LocalCron decides itself, so keep every crontab row in the schedule.
        return Q(pk__in=[])

    def apply_async(
        self, entry: Any, producer: Any = None, advance: bool = True, **kwargs: Any
    ) -> Any:
        """A schedule fire carries its slot: the due time of this fire, from the entry's
        previous ``last_run_at`` (so a restarted beat computes the same slot)."""
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


class WrongScheduler(SystemExit):
    """Beat was started with a scheduler that would not fire our schedules."""


def ensure_project_scheduler(service: Any) -> None:
    """On ``beat_init``: run ``QueueWorkerScheduler`` whatever ``-S`` asked for, or refuse.

    ``-S django`` (django-celery-beat's documented form) names ``DatabaseScheduler``, whose
    entries would fire our cron schedules by plain UTC-offset crontabs (wrong across daylight
    saving) and without their slot: this subclass, on the same tables, takes its place and a
    warning says so. Any other scheduler would never fire our schedules: beat stops, naming
    the command to run.
    """
    current = service.scheduler
    if isinstance(current, QueueWorkerScheduler):
        return
    if type(current) is not DatabaseScheduler:
        raise WrongScheduler(
            f"beat's scheduler {type(current).__module__}.{type(current).__name__} would not "
            "fire QueueWorker's schedules: run `celery -A queueworker beat` (the project's "
            f"scheduler, {PROJECT_SCHEDULER}, is set in CELERY_BEAT_SCHEDULER)"
        )
    logger.warning(
        "beat was asked for django-celery-beat's DatabaseScheduler (-S django): running %s, "
        "its subclass that keeps the schedules' daylight-saving rules and slots; "
        "`celery -A queueworker beat` needs no -S",
        PROJECT_SCHEDULER,
    )
    current.close()
    service.scheduler_cls = PROJECT_SCHEDULER
    service.__dict__["scheduler"] = service.get_scheduler()
