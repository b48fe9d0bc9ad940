"""Queues, purge, redrive by filter, the admin redrive, health deadlines, wait reasons."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from queueworker import broker, health
from tasks_app import dispatch, selectors
from tasks_app.models import Task, TaskStatus
from tests.factories import TaskFactory

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def no_broker(monkeypatch):
    monkeypatch.setattr(dispatch, "publish", lambda wakeups: len(wakeups))


def _dead(owner, **fields):
    defaults = {
        "status": TaskStatus.FAILED,
        "failure_class": "retries_exhausted",
        "finished_at": timezone.now(),
        "attempt": 1,
    }
    return TaskFactory(owner=owner, **{**defaults, **fields})


def test_purge_is_staff_only_confirmed_and_limited_to_declared_queues(
    api, client_for, staff_user, monkeypatch
):
    purged = []
    monkeypatch.setattr(broker, "purge", lambda name: purged.append(name) or 7)
    staff = client_for(staff_user)

    assert (
        api.post(
            "/api/queues/task.created/purge/", {"confirm": "task.created"}, format="json"
        ).status_code
        == 403
    )
    assert (
        staff.post("/api/queues/nope/purge/", {"confirm": "nope"}, format="json").status_code == 404
    )
    wrong = staff.post(
        "/api/queues/task.created/purge/", {"confirm": "http.request"}, format="json"
    )
    right = staff.post(
        "/api/queues/task.created/purge/", {"confirm": "task.created"}, format="json"
    )

    assert wrong.status_code == 400 and "confirm" in wrong.json()
    assert right.status_code == 200 and right.json() == {"purged": 7}
    assert purged == ["task.created"]


def test_redrive_by_filter_takes_only_the_matching_dead_letters(user, staff_user, client_for):
    api = client_for(staff_user)  # redrive is staff-only
    lost = _dead(user, failure_class="worker_lost")
    other_type = _dead(user, failure_class="worker_lost", type="OTHER")
    exhausted = _dead(user, failure_class="retries_exhausted")

    response = api.post(
        "/api/queues/dead-letter/redrive/",
        {"filter": {"failure_class": ["worker_lost"], "type": "NOOP"}},
        format="json",
    )

    assert response.status_code == 202 and response.json() == {"redriven": 1}
    statuses = dict(Task.objects.values_list("pk", "status"))
    assert statuses[lost.pk] == TaskStatus.PENDING
    assert statuses[other_type.pk] == statuses[exhausted.pk] == TaskStatus.FAILED


@pytest.mark.parametrize(
    "body", [{}, {"all": True, "task_ids": ["x"]}, {"filter": {"failure_class": ["nope"]}}]
)
def test_redrive_refuses_ambiguous_or_bad_selections(staff_user, client_for, body):
    assert (
        client_for(staff_user)
        .post("/api/queues/dead-letter/redrive/", body, format="json")
        .status_code
        == 400
    )


@pytest.mark.parametrize(
    ("task_type", "payload", "field"),
    [
        ("HTTP_REQUEST", {"url": "http://127.0.0.1:8080/admin"}, "url"),  # the SSRF guard
        ("HTTP_REQUEST", {"url": "https://example.com/", "timeout_s": 60}, "timeout_s"),
        ("NOOP", {"sleep_ms": -1}, "sleep_ms"),
    ],
)
def test_redrive_with_a_payload_create_refuses_answers_400_and_changes_nothing(
    user, staff_user, client_for, task_type, payload, field
):
    # given a dead task whose own timeout_s is 30
    dead = _dead(user, type=task_type, payload={"url": "https://example.com/"})

    # when staff redrive it with a payload that create would refuse
    response = client_for(staff_user).post(
        "/api/queues/dead-letter/redrive/",
        {"task_ids": [str(dead.pk)], "payload": payload},
        format="json",
    )

    # then 400 names the field, and the task is as it was
    assert response.status_code == 400
    assert field in response.json()["payload"]
    dead.refresh_from_db()
    assert dead.status == TaskStatus.FAILED
    assert dead.payload == {"url": "https://example.com/"}


def test_redrive_with_a_valid_payload_replaces_it(user, staff_user, client_for):
    dead = _dead(user, type="NOOP")

    response = client_for(staff_user).post(
        "/api/queues/dead-letter/redrive/",
        {"task_ids": [str(dead.pk)], "payload": {"sleep_ms": 5}},
        format="json",
    )

    assert response.status_code == 202 and response.json() == {"redriven": 1}
    dead.refresh_from_db()
    assert dead.status == TaskStatus.PENDING and dead.payload == {"sleep_ms": 5}


def test_admin_redrive_action_requeues_failed_tasks_only(client, staff_user):
    dead = _dead(staff_user)
    done = TaskFactory(owner=staff_user, status=TaskStatus.COMPLETED)
    client.force_login(staff_user)

    response = client.post(
        "/admin/tasks_app/task/",
        {"action": "redrive_dead_letters", "_selected_action": [dead.pk, done.pk]},
        follow=True,
    )

    assert response.status_code == 200
    assert "Redriven: 1; not FAILED: 1." in response.content.decode()
    assert Task.objects.get(pk=dead.pk).status == TaskStatus.PENDING
    assert Task.objects.get(pk=done.pk).status == TaskStatus.COMPLETED


def test_a_hanging_check_is_reported_timed_out_by_the_deadline(settings):
    settings.QW_HEALTH_TIMEOUT_S = 0.3
    started = time.monotonic()

    healthy, results = health.run_checks(
        {"slow": lambda: time.sleep(5) or "late", "fast": lambda: "ok"}
    )

    assert time.monotonic() - started < 1.0
    assert not healthy
    assert results["slow"]["detail"] == "timed out" and results["fast"]["ok"]


def test_wait_reason_names_a_queue_without_consumers(user, monkeypatch):
    monkeypatch.setattr(broker, "cached_consumers", lambda name: 0)
    task = TaskFactory(owner=user, queue="data.processing")

    reason = selectors.wait_reason(task)

    assert reason["code"] == "no_consumer"
    assert "celery -A queueworker worker -Q data.processing" in reason["detail"]


# --- /api/health/: what an anonymous caller learns, and what it costs ---------------------------


def _broker_down() -> str:
    raise OSError("connect to amqp://queueworker@rabbitmq.internal:5672/prod refused")


@pytest.fixture
def fake_checks(monkeypatch, settings):
    """HealthView over checks that name hosts, with no results kept from earlier tests."""
    settings.QW_HEALTH_CACHE_S = 60
    calls: list[str] = []

    def workers() -> str:
        calls.append("ping")
        return "2 answered: worker-a@host-17.internal, worker-b@host-18.internal"

    monkeypatch.setattr(health.HealthView, "checks", {"broker": _broker_down, "workers": workers})
    monkeypatch.setattr(health.HealthView, "_recent", health._RecentResults())
    return calls


def test_health_anonymous_gets_status_per_check_only(client, fake_checks):
    response = client.get("/api/health/")

    assert response.status_code == 503
    assert response.json() == {
        "status": "unavailable",
        "failing": ["broker"],
        "warnings": [],
        "checks": {"broker": {"ok": False}, "workers": {"ok": True}},
    }
    assert "internal" not in response.content.decode()


def test_health_staff_and_metrics_token_get_the_details(
    client, client_for, staff_user, api, fake_checks, settings
):
    settings.QW_METRICS_TOKEN = "metrics-token-123"

    staff = client_for(staff_user).get("/api/health/").json()
    scraper = client.get("/api/health/", HTTP_AUTHORIZATION="Bearer metrics-token-123").json()
    wrong_token = client.get("/api/health/", HTTP_AUTHORIZATION="Bearer nope").json()
    bad_credentials = client.get("/api/health/", HTTP_AUTHORIZATION="Token nope")
    not_staff = api.get("/api/health/").json()

    for body in (staff, scraper):
        assert "rabbitmq.internal" in body["checks"]["broker"]["detail"]
        assert "host-17.internal" in body["checks"]["workers"]["detail"]
        assert "latency_ms" in body["checks"]["workers"]
    assert bad_credentials.status_code == 503  # anonymous here, not a 401
    for body in (wrong_token, bad_credentials.json(), not_staff):
        assert body["checks"] == {"broker": {"ok": False}, "workers": {"ok": True}}


def test_health_metrics_token_unset_shows_no_details_to_anonymous(client, fake_checks, settings):
    settings.QW_METRICS_TOKEN = ""  # /metrics is open then; the details stay closed

    body = client.get("/api/health/", HTTP_AUTHORIZATION="Bearer ").json()

    assert body["checks"]["workers"] == {"ok": True}


def test_health_flood_of_requests_runs_the_checks_once_per_interval(client, fake_checks):
    # when 40 anonymous requests come at once, 8 at a time
    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = list(pool.map(lambda _: APIClient().get("/api/health/").status_code, range(40)))

    # then one run of the checks answered them all: one broadcast ping
    assert codes == [503] * 40
    assert fake_checks == ["ping"]


def test_health_runs_the_checks_again_after_the_interval(client, fake_checks, settings):
    settings.QW_HEALTH_CACHE_S = 0.2
    client.get("/api/health/")

    time.sleep(0.25)
    client.get("/api/health/")

    assert fake_checks == ["ping", "ping"]
