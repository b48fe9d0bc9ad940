"""Metrics: the JSON figures of ``/api/metrics/`` and the Prometheus exposition of ``/metrics``."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone
from kombu import pools
from prometheus_client.parser import text_string_to_metric_families

from queueworker import metrics as project_metrics
from queueworker.celery import app
from tasks_app import dispatch, metrics
from tasks_app.models import DeadLetterMessage, Task, TaskStatus
from tests.factories import TaskFactory, UserFactory
from workflows_app.models import Workflow, WorkflowRun, WorkflowVersion

pytestmark = pytest.mark.django_db

S = TaskStatus


def _task(owner: Any, status: str, *, took_s: float | None = None, ago_s: float = 0, **fields):
    """A task in ``status``; finished ``ago_s`` seconds ago after running ``took_s`` seconds."""
    now = timezone.now()
    values: dict[str, Any] = {"owner": owner, "status": status, "next_attempt_at": None}
    if took_s is not None:
        values["finished_at"] = now - timedelta(seconds=ago_s)
        values["started_at"] = values["finished_at"] - timedelta(seconds=took_s)
    values.update(fields)
    return TaskFactory(**values)


def _run(owner: Any, status: str) -> WorkflowRun:
    workflow, _ = Workflow.objects.get_or_create(owner=owner, name="wf")
    version, _ = WorkflowVersion.objects.get_or_create(
        workflow=workflow, version=1, defaults={"definition": {}}
    )
    return WorkflowRun.objects.create(
        workflow=workflow, version=version, owner=owner, status=status
    )


@pytest.fixture
def known(db):
    """Alice's and Bob's tasks and runs, with known durations and finishing times."""
    alice = UserFactory(password=None)
    bob = UserFactory(password=None)
    now = timezone.now()
    # alice: three NOOP completed 30 s ago, in 1, 2 and 4 s, with 0, 1 and 2 retries
    for took, retries in ((1, 0), (2, 1), (4, 2)):
        _task(alice, S.COMPLETED, took_s=took, ago_s=30, retries=retries)
    _task(alice, S.COMPLETED, took_s=0.5, ago_s=3600)  # outside every window
    _task(alice, S.FAILED, took_s=1, ago_s=120, failure_class="timeout", retries=3)
    _task(alice, S.CANCELLED, finished_at=now - timedelta(seconds=600))
    _task(
        alice,
        S.PENDING,
        type="HTTP_REQUEST",
        queue="http.request",
        next_attempt_at=now - timedelta(seconds=100),
    )
    _task(alice, S.RETRYING, next_attempt_at=now + timedelta(seconds=300), retries=1)  # not due
    run = _run(alice, "COMPENSATING")
    _task(
        alice,
        S.COMPLETED,
        type="COMPENSATION",
        queue="compensation",
        workflow_run=run,
        step="a",
        took_s=0.2,
        ago_s=200,
    )
    _task(alice, S.PENDING, type="COMPENSATION", queue="compensation", workflow_run=run, step="b")
    _task(alice, S.PENDING, type="COMPENSATION", queue="compensation")  # by hand: not a saga's
    # bob: one NOOP completed in 8 s, one failed as worker_lost, one run completed
    _task(bob, S.COMPLETED, took_s=8, ago_s=10)
    _task(bob, S.FAILED, took_s=1, ago_s=20, failure_class="worker_lost")
    _run(bob, "COMPLETED")
    # a message a worker refused (no owner)
    DeadLetterMessage.objects.create(failure_class="invalid_message", reason="not JSON")
    return {"alice": alice, "bob": bob, "now": now}


# --- the JSON figures ---------------------------------------------------------------------------


def test_summary_for_staff_covers_every_task_and_run(known):
    summary = project_metrics.summary(UserFactory(is_staff=True, password=None), known["now"])

    assert summary["scope"] == "all"
    tasks = summary["tasks"]
    assert tasks["total"] == 13
    assert tasks["by_status"] == {
        "PENDING": 3,
        "PROCESSING": 0,
        "COMPLETED": 6,
        "FAILED": 2,
        "RETRYING": 1,
        "CANCELLED": 1,
    }
    assert tasks["by_type"] == {"COMPENSATION": 3, "HTTP_REQUEST": 1, "NOOP": 9}
    assert tasks["by_type_status"]["NOOP"] == {
        "PENDING": 0,
        "PROCESSING": 0,
        "COMPLETED": 5,
        "FAILED": 2,
        "RETRYING": 1,
        "CANCELLED": 1,
    }
    assert summary["dead_letters"]["total"] == 3
    assert summary["dead_letters"]["by_failure_class"]["timeout"] == 1
    assert summary["dead_letters"]["by_failure_class"]["worker_lost"] == 1
    assert summary["dead_letters"]["by_failure_class"]["invalid_message"] == 1
    assert summary["dead_letters"]["by_failure_class"]["poison_message"] == 0
    assert summary["workflow_runs"]["by_status"]["COMPENSATING"] == 1
    assert summary["workflow_runs"]["by_status"]["COMPLETED"] == 1
    # the compensation made by hand (no run) is not a saga's
    assert summary["compensations"]["by_status"]["COMPLETED"] == 1
    assert summary["compensations"]["by_status"]["PENDING"] == 1


def test_summary_windows_give_throughput_error_and_retry_rates(known):
    windows = project_metrics.summary(UserFactory(is_staff=True, password=None), known["now"])[
        "windows"
    ]

    # 1 min: alice's three (30 s ago) and bob's two (10 s, 20 s ago)
    one = windows["1m"]
    assert (one["finished"], one["completed"], one["failed"], one["retries"]) == (5, 4, 1, 3)
    assert one["throughput_per_s"] == pytest.approx(4 / 60)
    assert one["error_rate"] == pytest.approx(1 / 5)
    assert one["retry_rate"] == pytest.approx(3 / 5)
    # 5 min adds alice's failure (2 min ago, 3 retries) and the compensation (200 s ago)
    five = windows["5m"]
    assert (five["finished"], five["completed"], five["failed"], five["retries"]) == (7, 5, 2, 6)
    # 15 min adds the cancelled task
    fifteen = windows["15m"]
    assert (fifteen["finished"], fifteen["cancelled"]) == (8, 1)
    assert fifteen["error_rate"] == pytest.approx(2 / 8)


def test_summary_percentiles_and_oldest_due_task(known):
    summary = project_metrics.summary(UserFactory(is_staff=True, password=None), known["now"])

    noop = summary["durations"]["by_type"]["NOOP"]
    # 1, 2, 4, 8 s (the hour-old one is outside the window)
    assert noop["count"] == 4
    assert noop["p50"] == pytest.approx(3.0)
    assert noop["p95"] == pytest.approx(4 + 4 * 0.85)
    assert noop["p99"] == pytest.approx(4 + 4 * 0.97)
    assert set(summary["durations"]["by_type"]) == {"NOOP", "COMPENSATION"}
    # the HTTP task due 100 s ago; the RETRYING one is not due yet
    assert summary["oldest_pending_age_s"] == pytest.approx(100, abs=1)


def test_summary_for_a_user_covers_only_their_own(known):
    summary = project_metrics.summary(known["bob"], known["now"])

    assert summary["scope"] == "own"
    assert summary["tasks"]["total"] == 2
    assert summary["tasks"]["by_type"] == {"NOOP": 2}
    assert summary["dead_letters"]["by_failure_class"]["worker_lost"] == 1
    assert summary["dead_letters"]["by_failure_class"]["timeout"] == 0
    assert summary["dead_letters"]["by_failure_class"]["invalid_message"] == 0  # staff only
    assert summary["durations"]["by_type"]["NOOP"]["count"] == 1
    assert summary["oldest_pending_age_s"] == 0
    assert summary["workflow_runs"]["by_status"]["COMPENSATING"] == 0
    assert summary["workflow_runs"]["by_status"]["COMPLETED"] == 1
    assert summary["compensations"]["by_status"]["PENDING"] == 0


def test_summary_of_an_empty_database_is_zeros_and_nulls(db):
    summary = project_metrics.summary(UserFactory(is_staff=True, password=None))

    assert summary["tasks"]["total"] == 0
    assert set(summary["tasks"]["by_status"].values()) == {0}
    assert summary["tasks"]["by_type"] == {}
    for window in summary["windows"].values():
        assert window["finished"] == 0 and window["throughput_per_s"] == 0
        assert window["error_rate"] is None and window["retry_rate"] is None
    assert summary["durations"]["by_type"] == {}
    assert summary["dead_letters"]["total"] == 0
    assert summary["oldest_pending_age_s"] == 0
    assert set(summary["workflow_runs"]["by_status"].values()) == {0}


def test_waiting_task_without_a_due_time_counts_from_its_creation(db):
    task = _task(UserFactory(password=None), S.PENDING)
    Task.objects.filter(pk=task.pk).update(created_at=timezone.now() - timedelta(seconds=50))

    assert metrics.oldest_waiting_age_s(Task.objects.all(), timezone.now()) == pytest.approx(
        50, abs=1
    )


def test_python_percentiles_match_postgresql_percentile_cont(known):
    tasks, now = Task.objects.all(), known["now"]

    in_sql = metrics.duration_percentiles(tasks, now, use_sql=True)
    in_python = metrics.duration_percentiles(tasks, now, use_sql=False)

    assert in_sql.keys() == in_python.keys()
    for task_type, figures in in_sql.items():
        assert figures == pytest.approx(in_python[task_type]), task_type


def test_percentile_cont_interpolates_between_ranks():
    assert metrics.percentile_cont([5.0], 0.99) == 5.0
    assert metrics.percentile_cont([4.0, 1.0, 2.0, 3.0], 0.5) == 2.5
    assert metrics.percentile_cont(range(101), 0.95) == pytest.approx(95)
    with pytest.raises(ValueError):
        metrics.percentile_cont([], 0.5)


def test_api_metrics_needs_credentials_and_answers_the_callers_scope(known, client_for):
    assert Client().get("/api/metrics/").status_code == 401

    response = client_for(known["bob"]).get("/api/metrics/")

    assert response.status_code == 200
    body = response.json()
    assert body["scope"] == "own" and body["tasks"]["total"] == 2
    assert set(body["windows"]) == {"1m", "5m", "15m"}
    assert body["durations"]["by_type"]["NOOP"]["p50"] == pytest.approx(8)


def test_api_metrics_is_documented_with_its_response(db):
    schema = Client().get("/api/schema/", HTTP_ACCEPT="application/json").json()

    operation = schema["paths"]["/api/metrics/"]["get"]
    ref = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/MetricsOutput")
    output = schema["components"]["schemas"]["MetricsOutput"]["properties"]
    assert {"tasks", "windows", "durations", "dead_letters", "oldest_pending_age_s"} <= set(output)
    windows = schema["components"]["schemas"]["WindowsOutput"]["properties"]
    assert set(windows) == {"1m", "5m", "15m"}


# --- the Prometheus exposition ------------------------------------------------------------------


def _scrape(client: Client | None = None, **headers: str) -> dict[str, Any]:
    response = (client or Client()).get("/metrics", **headers)
    assert response.status_code == 200, response.content
    families = text_string_to_metric_families(response.content.decode())
    return {family.name: family for family in families}


def _value(family: Any, suffix: str = "", **labels: str) -> float:
    matches = [
        s.value
        for s in family.samples
        if s.name == family.name + suffix and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(matches) == 1, (family.name, suffix, labels, family.samples)
    return matches[0]


def test_scrape_counters_and_gauges_match_the_rows(known):
    families = _scrape()

    noop = {"type": "NOOP", "queue": "task.created"}
    assert _value(families["queueworker_tasks_created"], "_total", **noop) == 9
    assert _value(families["queueworker_tasks_started"], "_total", **noop) == 7
    assert _value(families["queueworker_tasks_completed"], "_total", **noop) == 5
    assert _value(families["queueworker_tasks_failed"], "_total", **noop) == 2
    assert _value(families["queueworker_tasks_retried"], "_total", **noop) == 7
    assert families["queueworker_tasks_created"].type == "counter"

    tasks = families["queueworker_tasks"]
    assert _value(tasks, type="NOOP", status="RETRYING") == 1
    assert _value(tasks, type="HTTP_REQUEST", status="PENDING") == 1
    assert _value(tasks, type="HTTP_REQUEST", status="FAILED") == 0
    dead = families["queueworker_dead_letters"]
    assert _value(dead, failure_class="timeout") == 1
    assert _value(dead, failure_class="invalid_message") == 1
    assert _value(dead, failure_class="poison_message") == 0
    assert _value(families["queueworker_workflow_runs"], status="COMPENSATING") == 1
    assert _value(families["queueworker_compensations"], status="PENDING") == 1
    oldest = _value(families["queueworker_oldest_pending_age_seconds"])
    assert oldest == pytest.approx(100, abs=2)


def test_scrape_duration_histogram_has_cumulative_buckets_per_type(known):
    histogram = _scrape()["queueworker_task_duration_seconds"]

    assert histogram.type == "histogram"
    # NOOP completed in 1, 2, 4, 8 and 0.5 s
    assert _value(histogram, "_bucket", type="NOOP", le="0.5") == 1
    assert _value(histogram, "_bucket", type="NOOP", le="1.0") == 2
    assert _value(histogram, "_bucket", type="NOOP", le="5.0") == 4
    assert _value(histogram, "_bucket", type="NOOP", le="10.0") == 5
    assert _value(histogram, "_bucket", type="NOOP", le="+Inf") == 5
    assert _value(histogram, "_count", type="NOOP") == 5
    assert _value(histogram, "_sum", type="NOOP") == pytest.approx(15.5)
    assert _value(histogram, "_count", type="HTTP_REQUEST") == 0


def test_scrape_of_an_empty_database_has_every_registered_type_at_zero(db):
    families = _scrape()

    http = {"type": "HTTP_REQUEST", "queue": "http.request"}
    assert _value(families["queueworker_tasks_created"], "_total", **http) == 0
    assert _value(families["queueworker_tasks"], status="PENDING", **http) == 0
    assert _value(families["queueworker_task_duration_seconds"], "_count", type="NOOP") == 0
    assert _value(families["queueworker_oldest_pending_age_seconds"]) == 0
    assert _value(families["queueworker_workflow_runs"], status="RUNNING") == 0


def test_scrape_speaks_openmetrics_when_asked(db):
    response = Client().get("/metrics", HTTP_ACCEPT="application/openmetrics-text; version=1.0.0")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/openmetrics-text")
    assert response.content.decode().rstrip().endswith("# EOF")


def test_scrape_is_open_when_no_token_is_set(db, settings):
    settings.QW_METRICS_TOKEN = ""

    assert Client().get("/metrics").status_code == 200


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, 401),
        ("Bearer wrong-token", 401),
        ("Token s3cret-token", 401),
        ("Bearer s3cret-token", 200),
        ("bearer s3cret-token", 200),
    ],
)
def test_scrape_needs_the_bearer_token_when_one_is_set(db, settings, header, expected):
    settings.QW_METRICS_TOKEN = "s3cret-token"
    extra = {"HTTP_AUTHORIZATION": header} if header else {}

    response = Client().get("/metrics", **extra)

    assert response.status_code == expected
    if expected == 401:
        assert response["WWW-Authenticate"].startswith("Bearer")
        assert b"queueworker_" not in response.content


def test_scrape_with_the_broker_up_says_so(db):
    assert _value(_scrape()["queueworker_broker_up"]) == 1


@pytest.fixture
def broker_down():
    """Point the app at a closed port (as tests/integration/test_recovery.py does); restore."""

    def use(url: str) -> None:
        os.environ["CELERY_BROKER_URL"] = url  # Celery reads it before its own configuration
        app.conf.broker_url = url
        pools.reset()
        app._pool = None
        app.amqp._producer_pool = None
        dispatch.reset_breaker()

    good = app.conf.broker_url
    use("amqp://guest:guest@127.0.0.1:1//")
    yield
    use(good)


def test_scrape_with_the_broker_unreachable_answers_fast_without_queue_gauges(known, broker_down):
    started = time.monotonic()
    families = _scrape()
    elapsed = time.monotonic() - started

    assert elapsed < 2.0
    assert _value(families["queueworker_broker_up"]) == 0
    assert "queueworker_queue_messages" not in families
    assert "queueworker_queue_consumers" not in families
    # the database figures are still there
    assert _value(families["queueworker_tasks_completed"], "_total", type="NOOP") == 5
