"""Celery tasks of workflows_app: the schedule fire beat sends (docs/schedules.md)."""

from __future__ import annotations

import logging

from django.utils.dateparse import parse_datetime

from queueworker.tasking import instrumented_task
from workflows_app import schedules
from workflows_app.models import Schedule

logger = logging.getLogger(__name__)


@instrumented_task(name=schedules.FIRE_TASK, queue=schedules.FIRE_QUEUE)
def fire_schedule(schedule_id: str, slot: str | None = None) -> None:
    """Create the schedule's task or run for ``slot`` (once per slot; see ``schedule_fire``)."""
    schedule = Schedule.objects.filter(pk=schedule_id).first()
    if schedule is None:
        logger.info("schedule %s is gone; fire dropped", schedule_id)
        return
    when = parse_datetime(slot) if slot else None
    if when is None:
        logger.warning("schedule %s fire without a slot; dropped", schedule_id)
        return
    schedules.schedule_fire(schedule, when)
