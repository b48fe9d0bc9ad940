"""Schedules fired by a real beat process (database scheduler) into a real worker."""

from __future__ import annotations

import signal
import time
from datetime import timedelta

import pytest
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from tasks_app.models import Task
from tests.conftest import wait_for
from workflows_app.models import Schedule, ScheduleFire

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def _create(api, **fields):
    body = {"name": "s", "target": {"task": {"type": "NOOP", "payload": {}}}, **fields}
    response = api.post("/api/schedules/", body, format="json")
    assert response.status_code == 201, response.content
    return response.json()["id"]


def _tasks(schedule_id):
    return Task.objects.filter(schedule_id=schedule_id).count()


def test_interval_fires_repeatedly_then_disable_and_delete_stop_it(api, spawn):
    spawn("worker")
    spawn("beat")
    schedule_id = _create(api, interval_s=1)

    wait_for(lambda: _tasks(schedule_id) >= 3, timeout=30)
    slots = list(
        ScheduleFire.objects.filter(schedule_id=schedule_id).values_list("slot", flat=True)
    )
    assert len(slots) == len(set(slots))
    shown = api.get(f"/api/schedules/{schedule_id}/").json()
    assert shown["total_run_count"] >= 3 and shown["last_run_at"] is not None

    # disabling stops it (a fire already sent may still land)
    assert (
        api.patch(f"/api/schedules/{schedule_id}/", {"enabled": False}, format="json").status_code
        == 200
    )
    time.sleep(2.5)
    settled = _tasks(schedule_id)
    time.sleep(3)
    assert _tasks(schedule_id) == settled

    # enabled again it fires again; deleted it stops for good
    assert (
        api.patch(f"/api/schedules/{schedule_id}/", {"enabled": True}, format="json").status_code
        == 200
    )
    wait_for(lambda: _tasks(schedule_id) > settled, timeout=30)
    assert api.delete(f"/api/schedules/{schedule_id}/").status_code == 204
    time.sleep(2.5)
    after_delete = Task.objects.filter(type="NOOP").count()
    time.sleep(3)
    assert Task.objects.filter(type="NOOP").count() == after_delete
    assert not PeriodicTask.objects.filter(name=f"qw-schedule:{schedule_id}").exists()


def test_trigger_fires_at_once(api, spawn):
    spawn("worker")
    schedule_id = _create(api, cron="0 0 1 1 *", timezone="Europe/Berlin")
    response = api.post(f"/api/schedules/{schedule_id}/trigger/")
    assert response.status_code == 202
    task_id = response.json()["task"]
    wait_for(lambda: Task.objects.get(pk=task_id).status == "COMPLETED", timeout=20)
    assert str(Task.objects.get(pk=task_id).schedule_id) == schedule_id


def test_overlap_skip_skips_fires_while_the_previous_task_runs(api, spawn):
    spawn("worker")
    spawn("beat")
    schedule_id = _create(
        api,
        interval_s=1,
        overlap="skip",
        target={"task": {"type": "NOOP", "payload": {"sleep_ms": 4000}, "timeout_s": 10}},
    )
    wait_for(
        lambda: ScheduleFire.objects.filter(schedule_id=schedule_id, skipped=True).count() >= 2,
        timeout=30,
    )
    # while the first task sleeps, nothing else was created
    assert _tasks(schedule_id) == 1


def test_one_off_fires_once_and_disables_itself(api, spawn):
    spawn("worker")
    spawn("beat")
    run_at = timezone.now() + timedelta(seconds=2)
    schedule_id = _create(api, run_at=run_at.isoformat())

    wait_for(lambda: _tasks(schedule_id) == 1, timeout=30)
    periodic = Schedule.objects.get(pk=schedule_id).periodic_task
    wait_for(lambda: not PeriodicTask.objects.get(pk=periodic.pk).enabled, timeout=15)
    time.sleep(3)
    assert _tasks(schedule_id) == 1
    fire = ScheduleFire.objects.get(schedule_id=schedule_id)
    assert abs((fire.slot - run_at).total_seconds()) < 0.01
    assert api.get(f"/api/schedules/{schedule_id}/").json()["enabled"] is False


def test_beat_killed_and_restarted_fires_no_slot_twice(api, spawn):
    spawn("worker")
    beat = spawn("beat")
    schedule_id = _create(api, interval_s=1)
    wait_for(lambda: _tasks(schedule_id) >= 2, timeout=30)
    beat.kill(signal.SIGKILL)
    before = _tasks(schedule_id)
    spawn("beat")
    wait_for(lambda: _tasks(schedule_id) >= before + 2, timeout=30)
    fires = ScheduleFire.objects.filter(schedule_id=schedule_id, manual=False)
    slots = list(fires.values_list("slot", flat=True))
    assert len(slots) == len(set(slots))
    assert _tasks(schedule_id) == fires.exclude(task=None).count()
