"""Schedules (docs/schedules.md): validation, the DST-correct next fire, slot dedupe and overlap."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from django_celery_beat.models import PeriodicTask

from tasks_app import dispatch
from tasks_app.models import Task, TaskStatus
from workflows_app import cron, schedules, services
from workflows_app.models import Schedule, ScheduleFire, WorkflowRun

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
ONE_STEP = {"start": "a", "steps": {"a": {"type": "NOOP", "payload": {}}}}


@pytest.fixture(autouse=True)
def published(monkeypatch):
    sent: list[dispatch.Wakeup] = []
    monkeypatch.setattr(dispatch, "publish", lambda wakeups: sent.extend(wakeups) or len(wakeups))
    return sent


def fires(expression, tz, start, count):
    parsed, out, after = cron.parse(expression), [], start
    for _ in range(count):
        after = cron.next_fire(parsed, tz, after)
        out.append(after)
    return out


# --- next fire across daylight saving ----------------------------------------------------------


@pytest.mark.parametrize(
    ("tz", "spring", "fall"),
    [
        (BERLIN, datetime(2026, 3, 29), datetime(2026, 10, 25)),
        (NEW_YORK, datetime(2026, 3, 8), datetime(2026, 11, 1)),
    ],
)
def test_a_0230_daily_fires_once_per_local_day_on_both_transition_days(tz, spring, fall):
    for day in (spring, fall):
        start = (day - timedelta(days=2)).replace(tzinfo=tz).astimezone(UTC)
        got = fires("30 2 * * *", tz, start, 5)
        local_days = [f.astimezone(tz).date() for f in got]
        # exactly one fire per local day, over the two days before, the transition, and after
        assert local_days == [(day + timedelta(days=i)).date() for i in range(-2, 3)]
        assert len(set(got)) == 5


def test_spring_forward_nonexistent_0230_fires_at_the_next_valid_time():
    start = datetime(2026, 3, 28, 12, tzinfo=UTC)
    (fire,) = fires("30 2 * * *", BERLIN, start, 1)
    # 02:30 does not exist on 29 March in Berlin: the clocks jump from 02:00 CET to 03:00 CEST
    assert fire == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)
    assert fire.astimezone(BERLIN).strftime("%H:%M %Z") == "03:00 CEST"


def test_fall_back_ambiguous_0230_fires_at_its_first_occurrence_only():
    start = datetime(2026, 10, 24, 12, tzinfo=UTC)
    first, second = fires("30 2 * * *", BERLIN, start, 2)
    assert first == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # 02:30 CEST, not 02:30 CET
    assert first.astimezone(BERLIN).strftime("%H:%M %Z") == "02:30 CEST"
    assert second == datetime(2026, 10, 26, 1, 30, tzinfo=UTC)  # next day, 02:30 CET


def test_every_15_minutes_through_the_repeated_hour_never_repeats_a_wall_time():
    start = datetime(2026, 10, 24, 23, 50, tzinfo=UTC)  # 01:50 CEST
    got = fires("*/15 * * * *", BERLIN, start, 6)
    walls = [f.astimezone(BERLIN).strftime("%H:%M") for f in got]
    assert walls == ["02:00", "02:15", "02:30", "02:45", "03:00", "03:15"]
    assert len(set(walls)) == len(walls)


def test_cron_parsing_rules():
    parsed = cron.parse("0 9 1 * 1")  # both day fields restricted: either one matches
    got = fires("0 9 1 * 1", ZoneInfo("UTC"), datetime(2026, 6, 1, 10, tzinfo=UTC), 3)
    assert [f.date().isoformat() for f in got] == ["2026-06-08", "2026-06-15", "2026-06-22"]
    assert 0 in cron.parse("0 0 * * 7").day_of_week
    assert parsed.fields == ("0", "9", "1", "*", "1")
    for bad in ("* * * *", "60 * * * *", "a * * * *", "*/0 * * * *", "5-1 * * * *"):
        with pytest.raises(cron.CronError):
            cron.parse(bad)
    assert cron.next_fire(cron.parse("0 0 31 2 *"), ZoneInfo("UTC"), datetime.now(UTC)) is None


# --- validation --------------------------------------------------------------------------------


def body(**overrides):
    base = {"name": "nightly", "cron": "30 2 * * *", "timezone": "Europe/Berlin"}
    base["target"] = {"task": {"type": "NOOP", "payload": {}}}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"cron": "61 * * * *"}, "cron"),
        ({"cron": "* * *"}, "cron"),
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"cron": None, "interval_s": 0}, "interval_s"),
        ({"cron": None, "interval_s": 10**9}, "interval_s"),
        ({"interval_s": 5}, "interval_s"),
        ({"cron": None}, "cron"),
        ({"overlap": "queue"}, "overlap"),
        ({"target": {"task": {"type": "NOPE"}}}, "target"),
        ({"target": {"task": {"type": "NOOP", "priority": 12}}}, "target"),
        ({"target": {"task": {"type": "NOOP", "idempotency_key": "k"}}}, "target"),
        ({"target": {"workflow": "00000000-0000-0000-0000-000000000000"}}, "target"),
        ({"target": {}}, "target"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_invalid_schedule_is_400_naming_the_field_and_nothing_is_saved(api, overrides, field):
    response = api.post("/api/schedules/", body(**overrides), format="json")
    assert response.status_code == 400, response.content
    assert field in response.json(), response.json()
    assert Schedule.objects.count() == 0
    assert PeriodicTask.objects.count() == 0


@pytest.mark.django_db
def test_task_target_errors_name_the_nested_field(api):
    response = api.post(
        "/api/schedules/", body(target={"task": {"type": "NOOP", "priority": 12}}), format="json"
    )
    assert "priority" in response.json()["target"]["task"]


@pytest.mark.django_db
def test_workflow_target_input_is_checked_like_run_start(api, user):
    wf = services.workflow_create(
        owner=user,
        name="wf",
        definition=ONE_STEP,
        input_schema={"type": "object", "required": ["n"]},
    )
    bad = api.post(
        "/api/schedules/", body(target={"workflow": str(wf.pk), "input": {}}), format="json"
    )
    assert bad.status_code == 400
    assert "input" in bad.json()["target"]
    ok = api.post(
        "/api/schedules/", body(target={"workflow": str(wf.pk), "input": {"n": 1}}), format="json"
    )
    assert ok.status_code == 201, ok.content


# --- API ---------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_create_stores_timing_in_django_celery_beat(api):
    response = api.post("/api/schedules/", body(), format="json")
    assert response.status_code == 201, response.content
    data = response.json()
    assert data["cron"] == "30 2 * * *" and data["timezone"] == "Europe/Berlin"
    assert data["total_run_count"] == 0 and data["last_run_at"] is None
    local = datetime.fromisoformat(data["next_run_at"]).astimezone(BERLIN)
    assert (local.hour, local.minute) in {(2, 30), (3, 0)}
    periodic = Schedule.objects.get(pk=data["id"]).periodic_task
    assert periodic.task == schedules.FIRE_TASK and periodic.queue == "task.created"
    assert periodic.crontab.hour == "2" and str(periodic.crontab.timezone) == "Europe/Berlin"


@pytest.mark.django_db
def test_patch_disable_and_change_timing_then_delete(api):
    schedule_id = api.post("/api/schedules/", body(), format="json").json()["id"]
    patched = api.patch(
        f"/api/schedules/{schedule_id}/", {"enabled": False, "interval_s": 60}, format="json"
    )
    assert patched.status_code == 200, patched.content
    data = patched.json()
    assert data["enabled"] is False and data["interval_s"] == 60 and data["cron"] is None
    assert data["next_run_at"] is None
    periodic = PeriodicTask.objects.get()
    assert periodic.interval.every == 60 and periodic.crontab is None
    assert api.delete(f"/api/schedules/{schedule_id}/").status_code == 204
    assert not PeriodicTask.objects.exists() and not Schedule.objects.exists()


@pytest.mark.django_db
def test_schedules_over_the_per_user_cap_are_a_400_naming_it(api, client_for, staff_user, settings):
    # given a user at the cap
    settings.QW_MAX_SCHEDULES_PER_USER = 2
    first, _ = [
        api.post("/api/schedules/", body(name=f"s{i}"), format="json").json()["id"]
        for i in range(2)
    ]

    # when they create one more
    over = api.post("/api/schedules/", body(name="s2"), format="json")

    # then it is refused naming the limit, and the cap is per user (staff included)
    assert over.status_code == 400
    assert "QW_MAX_SCHEDULES_PER_USER" in over.json()["detail"]
    assert Schedule.objects.count() == 2 and PeriodicTask.objects.count() == 2
    staff = client_for(staff_user)
    assert [
        staff.post("/api/schedules/", body(name=f"s{i}"), format="json").status_code
        for i in range(3)
    ] == [201, 201, 400]
    assert api.delete(f"/api/schedules/{first}/").status_code == 204
    assert api.post("/api/schedules/", body(name="s2"), format="json").status_code == 201


@pytest.mark.django_db
def test_another_users_schedule_is_404(api, client_for):
    from tests.factories import UserFactory

    schedule_id = api.post("/api/schedules/", body(), format="json").json()["id"]
    other = client_for(UserFactory())
    assert other.get(f"/api/schedules/{schedule_id}/").status_code == 404
    assert other.post(f"/api/schedules/{schedule_id}/trigger/").status_code == 404
    assert other.get("/api/schedules/").json()["results"] == []


@pytest.mark.django_db
def test_trigger_creates_a_task_linked_to_the_schedule(api):
    schedule_id = api.post("/api/schedules/", body(), format="json").json()["id"]
    response = api.post(f"/api/schedules/{schedule_id}/trigger/")
    assert response.status_code == 202
    task_id = response.json()["task"]
    listed = api.get("/api/tasks/", {"schedule": schedule_id}).json()
    assert [t["id"] for t in listed["results"]] == [task_id]
    shown = api.get(f"/api/schedules/{schedule_id}/").json()
    assert shown["total_run_count"] == 1 and shown["last_run_at"] is not None


# --- the fire ----------------------------------------------------------------------------------


def _schedule(api, **overrides):
    return Schedule.objects.get(
        pk=api.post("/api/schedules/", body(**overrides), format="json").json()["id"]
    )


@pytest.mark.django_db
def test_the_same_slot_fired_twice_creates_one_task(api):
    schedule = _schedule(api)
    slot = datetime(2026, 1, 1, 1, 30, tzinfo=UTC)
    assert schedules.schedule_fire(schedule, slot) is not None
    assert schedules.schedule_fire(schedule, slot) is None
    assert Task.objects.filter(schedule=schedule).count() == 1
    schedules.schedule_fire(schedule, slot + timedelta(days=1))
    assert Task.objects.filter(schedule=schedule).count() == 2


@pytest.mark.django_db
def test_overlap_skip_skips_while_the_previous_task_runs(api):
    schedule = _schedule(api, overlap="skip")
    slot = datetime(2026, 1, 1, tzinfo=UTC)
    first = schedules.schedule_fire(schedule, slot)
    second = schedules.schedule_fire(schedule, slot + timedelta(minutes=1))
    assert first.task is not None and second.skipped and second.task is None
    Task.objects.filter(pk=first.task.pk).update(status=TaskStatus.COMPLETED)
    third = schedules.schedule_fire(schedule, slot + timedelta(minutes=2))
    assert third.task is not None and not third.skipped
    assert ScheduleFire.objects.filter(schedule=schedule, skipped=True).count() == 1


@pytest.mark.django_db
def test_overlap_allow_fires_while_the_previous_task_runs(api):
    schedule = _schedule(api)
    slot = datetime(2026, 1, 1, tzinfo=UTC)
    schedules.schedule_fire(schedule, slot)
    assert schedules.schedule_fire(schedule, slot + timedelta(minutes=1)).task is not None


@pytest.mark.django_db
def test_a_workflow_fire_starts_a_run_filterable_by_schedule(api, user):
    wf = services.workflow_create(owner=user, name="wf", definition=ONE_STEP)
    schedule = _schedule(api, target={"workflow": str(wf.pk), "input": {"x": 1}})
    fire = schedules.schedule_fire(schedule, datetime(2026, 1, 1, tzinfo=UTC))
    assert fire.run is not None and fire.run.input == {"x": 1}
    assert WorkflowRun.objects.get(schedule=schedule).pk == fire.run.pk
    listed = api.get("/api/workflow-runs/", {"schedule": str(schedule.pk)}).json()
    assert [r["id"] for r in listed["results"]] == [str(fire.run.pk)]


# --- the slot beat computes ---------------------------------------------------------------------


@pytest.mark.django_db
def test_slots_are_deterministic_from_last_run_at(api):
    cron_schedule = _schedule(api)
    last = datetime(2026, 3, 28, 12, tzinfo=UTC)
    periodic = cron_schedule.periodic_task
    assert schedules.slot_for(periodic, last) == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)
    assert schedules.slot_for(periodic, last) == schedules.slot_for(periodic, last)
    interval = _schedule(api, name="i", cron=None, interval_s=30).periodic_task
    assert schedules.slot_for(interval, last) == last + timedelta(seconds=30)
    run_at = datetime(2030, 1, 1, tzinfo=UTC)
    clocked = _schedule(api, name="c", cron=None, run_at=run_at.isoformat()).periodic_task
    assert clocked.one_off and schedules.slot_for(clocked, last) == run_at


@pytest.mark.django_db
def test_beat_uses_the_dst_correct_cron_for_our_schedules(api):
    from workflows_app.scheduler import QueueWorkerEntry

    periodic = _schedule(api).periodic_task
    entry = QueueWorkerEntry(periodic)
    assert isinstance(entry.schedule, schedules.LocalCron)
    due = entry.schedule.is_due(datetime.now(UTC) - timedelta(days=2))
    assert due.is_due
    assert not entry.schedule.is_due(datetime.now(UTC)).is_due


@pytest.mark.django_db
def test_a_restarted_beat_recomputes_the_sent_slot_and_creates_nothing(api):
    schedule = _schedule(api, name="i", cron=None, interval_s=60)
    periodic = schedule.periodic_task
    stale = periodic.date_changed
    slot = schedules.slot_for(periodic, stale)
    assert schedules.schedule_fire(schedule, slot) is not None
    # beat died before saving last_run_at: the new beat reads the same one, computes the same slot
    again = schedules.slot_for(PeriodicTask.objects.get(pk=periodic.pk), stale)
    assert again == slot
    assert schedules.schedule_fire(schedule, again) is None
    assert Task.objects.filter(schedule=schedule).count() == 1


@pytest.mark.django_db
def test_admin_shows_the_schedule_linked_to_its_periodic_task(client, staff_user):
    schedule = schedules.schedule_create(
        owner=staff_user,
        name="nightly",
        timing=schedules.Timing(cron="30 2 * * *"),
        timezone_name="Europe/Berlin",
        target={"task": {"type": "NOOP"}},
    )
    client.force_login(staff_user)
    page = client.get(f"/admin/workflows_app/schedule/{schedule.pk}/change/")
    listing = client.get("/admin/workflows_app/schedule/")
    periodic_url = f"/admin/django_celery_beat/periodictask/{schedule.periodic_task_id}/change/"
    assert page.status_code == 200 and listing.status_code == 200
    assert periodic_url in page.content.decode()
    assert client.get(periodic_url).status_code == 200
