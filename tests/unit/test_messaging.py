"""Broker topology (``queueworker.messaging``) and the Celery configuration that uses it."""

from __future__ import annotations

import json
import uuid

import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from queueworker import messaging
from queueworker.celery import app
from queueworker.tasking import DECLARED
from tasks_app import dispatch

STANDARD = {"http.request", "data.processing", "compensation", "task.created"}


def _declared_queue_names() -> set[str]:
    return {q.name for q in settings.CELERY_TASK_QUEUES}


@pytest.fixture(scope="module")
def project_tasks() -> dict[str, object]:
    """Every Celery task the project registers (what a worker imports at start)."""
    app.loader.import_default_modules()
    return {name: task for name, task in app.tasks.items() if not name.startswith("celery.")}


# --- the queues --------------------------------------------------------------------------------


@pytest.mark.parametrize("queue", settings.CELERY_TASK_QUEUES, ids=lambda q: q.name)
def test_work_queue_durable_priority_dead_lettered(queue):
    assert queue.durable is True
    assert queue.queue_arguments["x-max-priority"] == 9
    assert queue.queue_arguments["x-dead-letter-exchange"] == "tasks.dlx"


@pytest.mark.parametrize("queue", settings.CELERY_TASK_QUEUES, ids=lambda q: q.name)
def test_work_queue_bound_to_tasks_exchange_by_name(queue):
    assert queue.exchange.name == "tasks"
    assert queue.exchange.type == "direct"
    assert queue.exchange.durable is True
    assert queue.routing_key == queue.name


def test_standard_queues_declared():
    assert STANDARD <= _declared_queue_names()
    assert set(messaging.STANDARD_QUEUES) == STANDARD


def test_dead_letter_queue_not_a_work_queue():
    assert "tasks.dead_letter" not in _declared_queue_names()
    # what a plain `celery worker` (no -Q) consumes
    assert "tasks.dead_letter" not in set(app.amqp.queues)
    assert _declared_queue_names() == set(app.amqp.queues)


def test_dead_letter_queue_bound_to_dlx():
    queue = messaging.dead_letter_queue()
    assert queue.name == "tasks.dead_letter"
    assert queue.durable is True
    assert queue.exchange.name == "tasks.dlx"
    assert queue.exchange.type == "fanout"


def test_work_queues_add_routed_custom_queue_once():
    routes = messaging.parse_type_routes(["RESIZE=images", "THUMB=images"])
    names = [q.name for q in messaging.work_queues(routes)]
    assert names == [*messaging.STANDARD_QUEUES, "images"]


def test_work_queues_route_to_dead_letter_refused():
    routes = messaging.parse_type_routes(["RESIZE=tasks.dead_letter"])
    with pytest.raises(ImproperlyConfigured, match=r"tasks\.dead_letter"):
        messaging.work_queues(routes)


# --- QW_TYPE_ROUTES ----------------------------------------------------------------------------


def test_parse_type_routes_empty_gives_defaults():
    assert messaging.parse_type_routes([]) == {
        "HTTP_REQUEST": "http.request",
        "DATA_PROCESSING": "data.processing",
        "COMPENSATION": "compensation",
    }


def test_parse_type_routes_overrides_and_adds_stripped():
    routes = messaging.parse_type_routes([" HTTP_REQUEST = http.slow ", "RESIZE=images"])
    assert routes["HTTP_REQUEST"] == "http.slow"
    assert routes["RESIZE"] == "images"
    assert routes["COMPENSATION"] == "compensation"


def test_parse_type_routes_does_not_mutate_defaults():
    messaging.parse_type_routes(["HTTP_REQUEST=elsewhere"])
    assert messaging.DEFAULT_TYPE_ROUTES["HTTP_REQUEST"] == "http.request"


@pytest.mark.parametrize("entry", ["RESIZE", "=images", "RESIZE=", " = ", "RESIZE images"])
def test_parse_type_routes_bad_entry_refused(entry):
    with pytest.raises(ImproperlyConfigured, match="QW_TYPE_ROUTES") as excinfo:
        messaging.parse_type_routes([entry])
    assert repr(entry) in str(excinfo.value)


# --- THE configuration test --------------------------------------------------------------------


def test_every_project_task_names_a_declared_queue(project_tasks):
    # given every task a worker registers, beyond Celery's own
    assert "queueworker.execute" in project_tasks
    declared = _declared_queue_names()

    # then each was declared with the project decorator, on a queue the configuration declares
    for name in project_tasks:
        assert name in DECLARED, f"{name} is not declared with @instrumented_task"
        assert DECLARED[name] in declared, f"{name} names undeclared queue {DECLARED[name]}"


def test_every_declared_task_is_registered_on_a_declared_queue(project_tasks):
    declared = _declared_queue_names()
    for name, queue in DECLARED.items():
        assert name in project_tasks
        assert queue in declared, f"{name} names undeclared queue {queue}"


def test_every_type_route_names_a_declared_queue():
    declared = _declared_queue_names()
    for task_type, queue in settings.QW_TYPE_ROUTES.items():
        assert queue in declared, f"{task_type} routes to undeclared queue {queue}"


def test_default_queue_declared_and_missing_queues_not_created():
    assert settings.CELERY_TASK_DEFAULT_QUEUE in _declared_queue_names()
    assert app.conf.task_create_missing_queues is False


def test_project_tasks_ack_late_and_reject_on_worker_lost(project_tasks):
    for name, task in project_tasks.items():
        assert task.acks_late is True, name
        assert task.reject_on_worker_lost is True, name


# --- serialisation and delivery ----------------------------------------------------------------


def test_serializers_json_only():
    assert settings.CELERY_TASK_SERIALIZER == "json"
    assert settings.CELERY_RESULT_SERIALIZER == "json"
    assert settings.CELERY_ACCEPT_CONTENT == ["json"]
    assert app.conf.task_serializer == "json"
    assert app.conf.result_serializer == "json"
    assert list(app.conf.accept_content) == ["json"]


def test_at_least_once_delivery_configured():
    assert app.conf.task_acks_late is True
    assert app.conf.task_reject_on_worker_lost is True
    assert app.conf.worker_prefetch_multiplier == 1


def test_wakeup_message_carries_ids_not_payload():
    task_id = str(uuid.uuid4())
    wakeup = dispatch.Wakeup(task_id, "NOOP", "task.created", 5, 30, countdown=2.5)

    kwargs = dispatch.message_kwargs(wakeup)

    assert set(kwargs) == {"taskType", "taskId", "delay", "metadata"}
    assert (kwargs["taskType"], kwargs["taskId"], kwargs["delay"]) == ("NOOP", task_id, 2.5)
    assert json.loads(json.dumps(kwargs)) == kwargs


def test_router_sends_a_declared_task_to_its_queue(project_tasks):
    route = app.amqp.router.route({}, "queueworker.execute")
    assert route["queue"].name == DECLARED["queueworker.execute"]


# --- QW_QUEUE_TYPE -----------------------------------------------------------------------------


def test_quorum_work_queue_has_delivery_limit_and_no_priority():
    queue = messaging.work_queue("task.created", messaging.QUORUM, delivery_limit=7)

    assert queue.durable is True
    assert queue.queue_arguments == {
        "x-queue-type": "quorum",
        "x-delivery-limit": 7,
        "x-dead-letter-exchange": "tasks.dlx",
    }


def test_classic_work_queue_is_the_default_with_priorities():
    assert messaging.work_queue("task.created").queue_arguments == {
        "x-max-priority": 9,
        "x-dead-letter-exchange": "tasks.dlx",
    }


def test_work_queue_unknown_type_refused_naming_setting():
    with pytest.raises(ImproperlyConfigured, match="QW_QUEUE_TYPE"):
        messaging.work_queue("task.created", "stream")


def test_work_queues_quorum_applies_to_every_queue():
    queues = messaging.work_queues(messaging.parse_type_routes(["RESIZE=images"]), "quorum", 5)
    assert {q.queue_arguments["x-queue-type"] for q in queues} == {"quorum"}
    assert all("x-max-priority" not in q.queue_arguments for q in queues)


# --- broker URLs and failover lists ------------------------------------------------------------

FAILOVER = "amqp://u:p@rabbit-0:5672/qw;amqp://u:p@rabbit-1:5672/qw;amqp://u:p@rabbit-2/qw"


def test_broker_urls_splits_failover_list():
    assert messaging.broker_urls(FAILOVER) == [
        "amqp://u:p@rabbit-0:5672/qw",
        "amqp://u:p@rabbit-1:5672/qw",
        "amqp://u:p@rabbit-2/qw",
    ]


def test_broker_urls_single_url_and_stray_separators():
    assert messaging.broker_urls("amqp://h//") == ["amqp://h//"]
    assert messaging.broker_urls("amqp://a//; amqp://b//;") == ["amqp://a//", "amqp://b//"]


@pytest.mark.parametrize(
    ("url", "vhost"),
    [
        (FAILOVER, "qw"),
        ("amqp://u:p@h:5672//", "/"),
        ("amqp://u:p@h:5672", "/"),
        ("amqp://u:p@h/%2F", "/"),
        ("amqps://u:p@h/team%2Fa;amqps://u:p@g/team%2Fa", "team/a"),
    ],
)
def test_broker_vhost_reads_first_url_of_list(url, vhost):
    assert messaging.broker_vhost(url) == vhost


def test_with_vhost_rewrites_every_url_of_list():
    assert messaging.with_vhost("amqp://u:p@a:5672//;amqp://u:p@b:5672/old", "qw_test") == (
        "amqp://u:p@a:5672/qw_test;amqp://u:p@b:5672/qw_test"
    )


def test_broker_vhost_of_failover_list_used_for_management_api(monkeypatch):
    from queueworker import broker

    # urlsplit over the whole list used to give "qw;amqp://u:p@rabbit-1:5672/qw"
    monkeypatch.setenv("CELERY_BROKER_URL", FAILOVER)  # Celery reads it before its own conf
    monkeypatch.setattr(app.conf, "broker_url", FAILOVER)
    assert broker._vhost() == "qw"


@pytest.mark.parametrize(("url", "retries"), [("amqp://h//", 0), (FAILOVER, 2)])
def test_connect_retries_give_each_url_one_attempt(url, retries):
    from kombu import Connection

    from queueworker import broker

    assert broker._retries_to_try_each_url(Connection(url)) == retries
