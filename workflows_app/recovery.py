"""Reconcile runs that look stuck: nothing of theirs is waiting or running, yet they are not
finished (a decision that was never taken, say after an operator changed a step task by
hand). Run by beat's sweep; ``coordinator.decide`` is safe to call any number of times."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.db import transaction
from django.db.models import Exists, OuterRef
from django.utils import timezone

from tasks_app.models import TERMINAL_STATUSES, Task
from workflows_app import coordinator
from workflows_app.models import RunStatus, WorkflowRun

logger = logging.getLogger(__name__)

QUIET_FOR = timedelta(seconds=10)


def reconcile_runs(*, now: datetime | None = None, batch: int = 100) -> int:
    now = now or timezone.now()
    busy = Task.objects.filter(workflow_run=OuterRef("pk")).exclude(status__in=TERMINAL_STATUSES)
    stuck = list(
        WorkflowRun.objects.filter(
            status__in=[RunStatus.RUNNING, RunStatus.COMPENSATING],
            updated_at__lt=now - QUIET_FOR,
        )
        .filter(~Exists(busy))
        .values_list("pk", flat=True)[:batch]
    )
    for run_id in stuck:
        with transaction.atomic():
            run, tasks = coordinator.locked_run(run_id)
            before = run.status
            coordinator.decide(run, tasks)
            run.save(update_fields=["updated_at"])
            logger.warning("reconciled workflow run %s (%s → %s)", run.pk, before, run.status)
    return len(stuck)
