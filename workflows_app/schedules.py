"""Schedules (docs/schedules.md): writes, the fire, and the slot and cron schedule beat uses.

Timing is stored in django-celery-beat's models (``PeriodicTask`` with a ``CrontabSchedule``,
``IntervalSchedule`` or one-off ``ClockedSchedule``) so its admin pages show and edit it; a
``Schedule`` keeps the owner, name, target and overlap rule. Beat sends the task
``queueworker.schedule.fire`` with ``{schedule_id, slot}``; ``schedule_fire`` records
``ScheduleFire(schedule, slot)`` under a unique constraint, so a slot fires once.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from celery import schedules as celery_schedules
from django.conf import settings
from django.contrib.auth.models import User
from django.db import IntegrityError, transaction
from django.utils import timezone
from django_celery_beat.models import (
    ClockedSchedule,
    CrontabSchedule,
    IntervalSchedule,
    PeriodicTask,
)

from queueworker.errors import Conflict, InvalidInput
from tasks_app.models import TERMINAL_STATUSES, Task
from workflows_app import cron
from workflows_app.models import (
    FINISHED_RUN_STATUSES,
    Overlap,
    Schedule,
    ScheduleFire,
    WorkflowRun,
)

logger = logging.getLogger(__name__)

FIRE_TASK = "queueworker.schedule.fire"
FIRE_QUEUE = "task.created"


# --- timing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Exactly one of cron, interval_s, run_at; already validated."""

    cron: str | None = None
    interval_s: int | None = None
    run_at: datetime | None = None


def _cron_of(periodic: PeriodicTask) -> cron.Cron | None:
    ct = periodic.crontab
    if ct is None:
        return None
    try:
        return cron.parse(_cron_text(periodic))
    except cron.CronError:  # edited in the admin beyond our syntax (names): celery's crontab
        return None


def _cron_text(periodic: PeriodicTask) -> str:
    ct = periodic.crontab
    return f"{ct.minute} {ct.hour} {ct.day_of_month} {ct.month_of_year} {ct.day_of_week}"


def _not_before(last_run_at: datetime, start_time: datetime | None) -> datetime:
    # django-celery-beat backdates last_run_at by 30 years when a start_time is set.
    if start_time is not None and last_run_at < start_time:
        return start_time - timedelta(microseconds=1)
    return last_run_at


class LocalCron(celery_schedules.schedule):  # type: ignore[misc]
    """Beat's schedule for a cron ``Schedule``: due at ``cron.next_fire`` (DST-correct)."""

    def __init__(
        self,
        expression: cron.Cron,
        tz: ZoneInfo,
        start_time: datetime | None = None,
        app: Any = None,
    ) -> None:
        super().__init__(run_every=timedelta(minutes=1), app=app)
        self.expression = expression
        self.zone = tz
        self.start_time = start_time

    def next_after(self, last_run_at: datetime) -> datetime | None:
        last = (
            timezone.make_aware(last_run_at, UTC) if timezone.is_naive(last_run_at) else last_run_at
        )
        return cron.next_fire(self.expression, self.zone, _not_before(last, self.start_time))

    def is_due(self, last_run_at: datetime) -> celery_schedules.schedstate:
        now = timezone.now()
        due = self.next_after(last_run_at)
        if due is None:
            return celery_schedules.schedstate(False, 3600.0)
        if due <= now:
            following = cron.next_fire(self.expression, self.zone, now)
            wait = (following - now).total_seconds() if following else 3600.0
            return celery_schedules.schedstate(True, max(wait, 0.1))
        return celery_schedules.schedstate(False, (due - now).total_seconds())

    def remaining_estimate(self, last_run_at: datetime) -> timedelta:
        due = self.next_after(last_run_at)
        return (due - timezone.now()) if due else timedelta(hours=1)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LocalCron) and (
            self.expression.fields,
            str(self.zone),
            self.start_time,
        ) == (other.expression.fields, str(other.zone), other.start_time)

    def __hash__(self) -> int:
        return hash((self.expression.fields, str(self.zone)))

    def __repr__(self) -> str:
        return f"<LocalCron {' '.join(self.expression.fields)} {self.zone}>"

    def __reduce__(self) -> Any:
        return (self.__class__, (self.expression, self.zone, self.start_time))


def beat_schedule_for(periodic: PeriodicTask) -> LocalCron | None:
    """The DST-correct schedule beat uses in place of celery's crontab, for our cron rows."""
    expression = _cron_of(periodic)
    if expression is None or periodic.task != FIRE_TASK:
        return None
    return LocalCron(expression, ZoneInfo(str(periodic.crontab.timezone)), periodic.start_time)


def slot_for(periodic: PeriodicTask, last_run_at: datetime) -> datetime:
    """The due time of the fire beat sends now, from the entry's previous ``last_run_at``.

    Deterministic: a beat restarted before it saved ``last_run_at`` computes the same slot.
    """
    if timezone.is_naive(last_run_at):
        last_run_at = timezone.make_aware(last_run_at, UTC)
    if periodic.clocked is not None:
        return periodic.clocked.clocked_time
    if periodic.interval is not None:
        every = timedelta(**{periodic.interval.period: periodic.interval.every})
        slot = last_run_at + every
        if periodic.start_time is not None and slot < periodic.start_time:
            slot = periodic.start_time
        return slot
    schedule = beat_schedule_for(periodic)
    if schedule is not None:
        due = schedule.next_after(last_run_at)
        if due is not None:
            return due
    return last_run_at  # not one of ours: best effort


def next_run_at(schedule: Schedule) -> datetime | None:
    periodic = schedule.periodic_task
    now = timezone.now()
    if not periodic.enabled or (periodic.expires is not None and periodic.expires <= now):
        return None
    if periodic.clocked is not None:
        return periodic.clocked.clocked_time
    not_before = max(now, periodic.start_time) if periodic.start_time else now
    if periodic.interval is not None:
        every = timedelta(seconds=periodic.interval.every)
        last = periodic.last_run_at or periodic.date_changed
        return max(last + every, not_before)
    expression = _cron_of(periodic)
    if expression is None:
        return None
    tz = ZoneInfo(str(periodic.crontab.timezone))  # as beat reads it (the admin may edit it)
    return cron.next_fire(expression, tz, not_before)


def timing_of(schedule: Schedule) -> dict[str, Any]:
    periodic = schedule.periodic_task
    ct = periodic.crontab
    return {
        "cron": _cron_text(periodic) if ct is not None else None,
        "interval_s": periodic.interval.every if periodic.interval is not None else None,
        "run_at": periodic.clocked.clocked_time if periodic.clocked is not None else None,
    }


def _apply_timing(periodic: PeriodicTask, timing: Timing, tz: str) -> list[Any]:
    """Point ``periodic`` at new timing rows; returns the old rows to drop once unused."""
    old = [periodic.crontab, periodic.interval, periodic.clocked]
    periodic.crontab = periodic.interval = periodic.clocked = None
    periodic.one_off = False
    if timing.cron is not None:
        minute, hour, dom, month, dow = timing.cron.split()
        periodic.crontab = CrontabSchedule.objects.create(
            minute=minute,
            hour=hour,
            day_of_month=dom,
            month_of_year=month,
            day_of_week=dow,
            timezone=tz,
        )
    elif timing.interval_s is not None:
        periodic.interval = IntervalSchedule.objects.create(
            every=timing.interval_s, period=IntervalSchedule.SECONDS
        )
    else:
        assert timing.run_at is not None
        periodic.clocked = ClockedSchedule.objects.create(clocked_time=timing.run_at)
        periodic.one_off = True
    periodic.last_run_at = None
    return [row for row in old if row is not None]


def _drop_unused(rows: list[Any]) -> None:
    for row in rows:
        if not row.periodictask_set.exists():
            row.delete()


# --- writes ------------------------------------------------------------------------------------


def schedule_create(
    *,
    owner: User,
    name: str,
    timing: Timing,
    timezone_name: str,
    target: dict[str, Any],
    overlap: str = Overlap.ALLOW,
    enabled: bool = True,
    start_at: datetime | None = None,
    expires_at: datetime | None = None,
) -> Schedule:
    """Create a schedule; at most ``QW_MAX_SCHEDULES_PER_USER`` per owner, staff included.

    Each schedule keeps beat and the workers busy on its own, so the cap is on the owner's
    total; the owner's row is locked while counting, so two creations cannot both pass it.
    """
    try:
        with transaction.atomic():
            User.objects.select_for_update().get(pk=owner.pk)
            limit = settings.QW_MAX_SCHEDULES_PER_USER
            if Schedule.objects.filter(owner=owner).count() >= limit:
                raise InvalidInput(
                    {
                        "detail": f"You already have {limit} schedules, the most allowed "
                        "(QW_MAX_SCHEDULES_PER_USER): delete one first."
                    }
                )
            periodic = PeriodicTask(
                name=f"qw-schedule-pending-{timezone.now().timestamp()}",
                task=FIRE_TASK,
                queue=FIRE_QUEUE,
                enabled=enabled,
                start_time=start_at,
                expires=expires_at,
            )
            _apply_timing(periodic, timing, timezone_name)
            periodic.save()
            schedule = Schedule.objects.create(
                owner=owner,
                name=name,
                periodic_task=periodic,
                timezone=timezone_name,
                target=target,
                overlap=overlap,
            )
            periodic.name = f"qw-schedule:{schedule.pk}"
            periodic.kwargs = json.dumps({"schedule_id": str(schedule.pk)})
            periodic.save()
    except IntegrityError:
        raise Conflict({"name": [f"You already have a schedule named '{name}'."]}) from None
    return schedule


def schedule_update(*, schedule: Schedule, changes: dict[str, Any]) -> Schedule:
    """Apply validated ``changes`` (keys as in the API); timing changes restart the slots."""
    try:
        with transaction.atomic():
            locked = Schedule.objects.select_for_update().get(pk=schedule.pk)
            periodic = PeriodicTask.objects.select_for_update().get(pk=locked.periodic_task_id)
            drop: list[Any] = []
            tz = changes.get("timezone", locked.timezone)
            timing: Timing | None = changes.get("timing")
            if timing is None and "timezone" in changes and periodic.crontab is not None:
                timing = Timing(cron=_cron_text(periodic))
            if timing is not None:
                drop = _apply_timing(periodic, timing, tz)
            for key, attr in (
                ("enabled", "enabled"),
                ("start_at", "start_time"),
                ("expires_at", "expires"),
            ):
                if key in changes:
                    setattr(periodic, attr, changes[key])
            periodic.save()
            _drop_unused(drop)
            for key in ("name", "target", "overlap", "timezone"):
                if key in changes:
                    setattr(locked, key, changes[key])
            locked.save()
    except IntegrityError:
        raise Conflict(
            {"name": [f"You already have a schedule named '{changes['name']}'."]}
        ) from None
    return locked


def schedule_delete(*, schedule: Schedule) -> None:
    with transaction.atomic():
        periodic = schedule.periodic_task
        rows = [r for r in (periodic.crontab, periodic.interval, periodic.clocked) if r]
        periodic.delete()  # cascades to the Schedule and its fires; beat drops the entry
        _drop_unused(rows)


# --- the fire ----------------------------------------------------------------------------------


def _previous_unfinished(schedule: Schedule) -> bool:
    previous = (
        ScheduleFire.objects.filter(schedule=schedule, skipped=False)
        .exclude(task=None, run=None)
        .select_related("task", "run")
        .order_by("-fired_at", "-id")
        .first()
    )
    if previous is None:
        return False
    if previous.task is not None:
        return previous.task.status not in TERMINAL_STATUSES
    assert previous.run is not None
    return previous.run.status not in FINISHED_RUN_STATUSES


def _create_target(schedule: Schedule) -> tuple[Task | None, WorkflowRun | None]:
    from tasks_app import services as task_services
    from workflows_app import selectors
    from workflows_app import services as workflow_services

    owner = schedule.owner
    target = schedule.target
    if "task" in target:
        try:
            spec = task_services.task_validate(
                target["task"], owner=owner, path_prefix="target.task"
            )
        except task_services.TaskInvalid as exc:
            raise InvalidInput({"target": {"task": exc.detail}}) from None
        task, _ = task_services.task_create(owner=owner, spec=spec)
        Task.objects.filter(pk=task.pk).update(schedule=schedule)
        task.schedule = schedule
        return task, None
    workflow = selectors.workflow_queryset(owner).filter(pk=target["workflow"]).first()
    if workflow is None:
        raise InvalidInput({"target": {"workflow": [f"No workflow {target['workflow']}."]}})
    run = workflow_services.run_start(workflow=workflow, owner=owner, input=target.get("input", {}))
    WorkflowRun.objects.filter(pk=run.pk).update(schedule=schedule)
    run.schedule = schedule
    return None, run


def schedule_fire(
    schedule: Schedule, slot: datetime, *, manual: bool = False
) -> ScheduleFire | None:
    """Fire ``schedule`` for ``slot``: create its task or run, linked to it.

    A beat slot that already fired returns None (a restarted or duplicated beat message);
    with overlap=skip and the previous fire's task or run still going, the fire is recorded
    as skipped and nothing is created. A manual fire (trigger) ignores both rules.
    """
    with transaction.atomic():
        # Serialises fires of one schedule, so the overlap check sees the previous fire.
        locked = Schedule.objects.select_for_update().select_related("owner").get(pk=schedule.pk)
        fire = ScheduleFire(schedule=locked, slot=slot, manual=manual)
        try:
            with transaction.atomic():
                fire.save(force_insert=True)
        except IntegrityError:
            logger.info("schedule %s slot %s already fired", locked.pk, slot.isoformat())
            return None
        if not manual and locked.overlap == Overlap.SKIP and _previous_unfinished(locked):
            fire.skipped = True
            fire.save(update_fields=["skipped"])
            logger.info("schedule %s slot %s skipped: previous still running", locked.pk, slot)
            return fire
        try:
            with transaction.atomic():
                fire.task, fire.run = _create_target(locked)
        except Exception as exc:  # a target gone bad since (unknown type, deleted workflow)
            logger.warning("schedule %s fire failed: %s", locked.pk, exc)
            fire.error = str(getattr(exc, "detail", exc))[:2000]
        fire.save(update_fields=["task", "run", "error"])
    return fire
