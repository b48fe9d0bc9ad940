"""The one table of allowed task status changes (docs/concepts.md).

Every status change goes through ``tasks_app.state``, which looks its transition up here and
turns it into a guarded ``UPDATE … WHERE status IN (from)``; transitions taken by a worker also
check the attempt number (the fencing token), so a stale worker cannot finish a task that has
moved on.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from tasks_app.models import TaskStatus

S = TaskStatus


class Transition(StrEnum):
    CLAIM = "claim"
    COMPLETE = "complete"
    SCHEDULE_RETRY = "schedule_retry"
    FAIL = "fail"
    CANCEL = "cancel"
    CANCEL_RUNNING = "cancel_running"
    EXPIRE_LEASE_RETRY = "expire_lease_retry"
    EXPIRE_LEASE_FAIL = "expire_lease_fail"
    REQUEUE = "requeue"


@dataclass(frozen=True)
class Rule:
    sources: frozenset[TaskStatus]
    target: TaskStatus
    fenced: bool  # guarded by the attempt number as well as the status
    event: str  # TaskLog.event written with it


TRANSITIONS: dict[Transition, Rule] = {
    Transition.CLAIM: Rule(frozenset({S.PENDING, S.RETRYING}), S.PROCESSING, False, "started"),
    Transition.COMPLETE: Rule(frozenset({S.PROCESSING}), S.COMPLETED, True, "completed"),
    Transition.SCHEDULE_RETRY: Rule(frozenset({S.PROCESSING}), S.RETRYING, True, "retry_scheduled"),
    Transition.FAIL: Rule(frozenset({S.PROCESSING}), S.FAILED, True, "failed"),
    Transition.CANCEL: Rule(frozenset({S.PENDING, S.RETRYING}), S.CANCELLED, False, "cancelled"),
    Transition.CANCEL_RUNNING: Rule(frozenset({S.PROCESSING}), S.CANCELLED, True, "cancelled"),
    Transition.EXPIRE_LEASE_RETRY: Rule(
        frozenset({S.PROCESSING}), S.RETRYING, True, "lease_expired"
    ),
    Transition.EXPIRE_LEASE_FAIL: Rule(frozenset({S.PROCESSING}), S.FAILED, True, "lease_expired"),
    Transition.REQUEUE: Rule(frozenset({S.FAILED, S.CANCELLED}), S.PENDING, False, "requeued"),
}


def allowed(transition: Transition, status: str) -> bool:
    return status in TRANSITIONS[transition].sources


def transitions_from(status: str) -> set[Transition]:
    return {t for t, rule in TRANSITIONS.items() if status in rule.sources}
