"""The task API in process (docs/api.md): create, read, list, bulk, cancel, retry, idempotency.

Requests go through DRF's ``APIClient`` inside the test transaction, so ``on_commit`` callbacks
(the wake-up publishing) never reach the broker unless a test runs them itself, with
``app.send_task`` — the broker seam — replaced by a recorder (the ``sent`` fixture).
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.db import connections
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from tasks_app import dispatch, services, state
from tasks_app.models import Task, TaskLog, TaskStatus
from tests.factories import TaskFactory, UserFactory

pytestmark = pytest.mark.django_db

MESSAGE_KEYS = {"taskType", "taskId", "delay", "metadata"}


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """Record what would be published instead of talking to RabbitMQ."""
    calls: list[dict[str, Any]] = []

    def send_task(name: str, args: Any = None, kwargs: Any = None, **options: Any) -> None:
        calls.append({"name": name, "args": args, "kwargs": kwargs, **options})

    monkeypatch.setattr(dispatch.app, "send_task", send_task)
    # No broker connection either: the recorder needs no producer.
    monkeypatch.setattr(
        dispatch.app, "producer_or_acquire", lambda producer=None: contextlib.nullcontext(None)
    )
    dispatch.reset_breaker()
    yield calls
    dispatch.reset_breaker()


def _create(api: APIClient, body: dict[str, Any], **extra: Any) -> Any:
    return api.post("/api/tasks/", body, format="json", **extra)


# --- create ------------------------------------------------------------------------------------


def test_create_answers_201_with_location_and_documented_fields(api, user):
    response = _create(api, {"type": "NOOP", "payload": {"sleep_ms": 5}})

    assert response.status_code == 201, response.content
    body = response.json()
    assert response["Location"] == f"/api/tasks/{body['id']}/"
    assert uuid.UUID(body["id"])
    assert body["status"] == "PENDING"
    assert body["type"] == "NOOP"
    assert body["payload"] == {"sleep_ms": 5}
    assert body["owner"] == user.username
    assert body["children"] == []
    assert body["retries"] == 0
    assert body["result"] is None
    assert body["wait_reason"]["code"] == "queued"
    assert body["wait_reason"]["detail"]
    task = Task.objects.get(pk=body["id"])
    assert task.owner == user
    assert list(task.logs.values_list("event", flat=True)) == ["created"]


def test_create_applies_defaults(api, settings):
    response = _create(api, {"type": "NOOP"})

    assert response.status_code == 201, response.content
    body = response.json()
    assert body["max_retries"] == settings.QW_DEFAULT_MAX_RETRIES
    assert body["timeout_s"] == settings.QW_DEFAULT_TIMEOUT_S
    assert body["priority"] == 0
    assert body["payload"] == {}
    assert body["queue"] == "task.created"
    assert body["parent"] is None
    assert body["idempotency_key"] is None


def test_create_keeps_given_options(api):
    response = _create(api, {"type": "NOOP", "max_retries": 7, "priority": 9, "timeout_s": 12})

    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["max_retries"], body["priority"], body["timeout_s"]) == (7, 9, 12)


def test_create_with_parent_lists_child_on_parent(api, user):
    parent = TaskFactory(owner=user)

    response = _create(api, {"type": "NOOP", "parent": str(parent.id)})

    assert response.status_code == 201, response.content
    child_id = response.json()["id"]
    assert response.json()["parent"] == str(parent.id)
    assert api.get(f"/api/tasks/{parent.id}/").json()["children"] == [child_id]


# --- publishing after commit -------------------------------------------------------------------


def test_create_immediate_task_publishes_only_after_commit(
    api, sent, django_capture_on_commit_callbacks
):
    # given a NOOP task with a priority
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = _create(api, {"type": "NOOP", "priority": 7, "payload": {"sleep_ms": 1}})
    assert response.status_code == 201, response.content
    task_id = response.json()["id"]
    # then nothing was published before the commit, and one callback waits for it
    assert sent == []
    assert len(callbacks) == 1

    # when the transaction commits
    for callback in callbacks:
        callback()

    # then one wake-up carries ids only, routed by type, with the task's priority
    assert len(sent) == 1
    message = sent[0]
    assert message["name"] == dispatch.EXECUTE_TASK
    assert set(message["kwargs"]) == MESSAGE_KEYS
    assert message["kwargs"]["taskType"] == "NOOP"
    assert message["kwargs"]["taskId"] == task_id
    assert message["kwargs"]["delay"] == 0
    assert "payload" not in message["kwargs"]
    assert "sleep_ms" not in repr(message["kwargs"])
    assert message["task_id"] == task_id
    assert message["queue"] == message["routing_key"] == "task.created"
    assert message["priority"] == 7
    assert Task.objects.get(pk=task_id).dispatched_at is not None


def test_create_routes_by_configured_type_route(
    api, sent, settings, django_capture_on_commit_callbacks
):
    settings.QW_TYPE_ROUTES = {**settings.QW_TYPE_ROUTES, "NOOP": "compensation"}

    with django_capture_on_commit_callbacks(execute=True):
        response = _create(api, {"type": "NOOP"})

    assert response.status_code == 201, response.content
    assert response.json()["queue"] == "compensation"
    assert [(m["queue"], m["routing_key"]) for m in sent] == [("compensation", "compensation")]


@pytest.mark.parametrize(
    "timing",
    [
        {"delay_ms": 60_000},
        {"scheduled_at": "2999-01-01T00:00:00Z"},
    ],
    ids=["delay_ms", "scheduled_at"],
)
def test_create_delayed_task_enqueues_no_wakeup(api, timing, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = _create(api, {"type": "NOOP", **timing})

    assert response.status_code == 201, response.content
    assert callbacks == []
    body = response.json()
    assert body["wait_reason"]["code"] == "scheduled"
    assert body["wait_reason"]["until"] == body["next_attempt_at"]
    task = Task.objects.get(pk=body["id"])
    assert task.dispatched_at is None
    assert task.next_attempt_at > timezone.now() + timedelta(seconds=30)


def test_create_scheduled_in_the_past_is_published_at_once(api, django_capture_on_commit_callbacks):
    past = (timezone.now() - timedelta(hours=1)).isoformat()

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = _create(api, {"type": "NOOP", "scheduled_at": past})

    assert response.status_code == 201, response.content
    assert len(callbacks) == 1


# --- detail and logs ---------------------------------------------------------------------------


def test_detail_answers_task_with_children_and_wait_reason(api, user, monkeypatch):
    from queueworker import broker

    monkeypatch.setattr(broker, "cached_consumers", lambda name: 1)  # a worker is there
    task = TaskFactory(owner=user, payload={"result": 1})
    child = TaskFactory(owner=user, parent=task)

    response = api.get(f"/api/tasks/{task.id}/")

    assert response.status_code == 200
    body = response.json()
    assert body["id"] == str(task.id)
    assert body["children"] == [str(child.id)]
    assert body["payload"] == {"result": 1}
    for field in ("result", "error", "retries", "created_at", "started_at", "finished_at"):
        assert field in body
    assert body["wait_reason"]["code"] == "queued"


def test_detail_of_terminal_task_has_no_wait_reason(api, user):
    task = TaskFactory(owner=user, status=TaskStatus.COMPLETED, result={"ok": True})

    body = api.get(f"/api/tasks/{task.id}/").json()

    assert body["status"] == "COMPLETED"
    assert body["result"] == {"ok": True}
    assert body["wait_reason"] is None


def test_detail_of_unknown_id_answers_404(api):
    assert api.get(f"/api/tasks/{uuid.uuid4()}/").status_code == 404
    assert api.get("/api/tasks/not-a-uuid/").status_code == 404


def test_logs_answer_oldest_first(api, user):
    # given logs whose insertion order differs from their time order
    task = TaskFactory(owner=user)
    now = timezone.now()
    second = TaskLog.objects.create(task=task, event="started", message="b")
    first = TaskLog.objects.create(task=task, event="created", message="a")
    third = TaskLog.objects.create(task=task, event="completed", message="c")
    TaskLog.objects.filter(pk=first.pk).update(created_at=now - timedelta(seconds=2))
    TaskLog.objects.filter(pk=second.pk).update(created_at=now - timedelta(seconds=1))
    TaskLog.objects.filter(pk=third.pk).update(created_at=now)

    # when
    response = api.get(f"/api/tasks/{task.id}/logs/")

    # then
    assert response.status_code == 200
    body = response.json()
    assert [row["event"] for row in body] == ["created", "started", "completed"]
    assert set(body[0]) == {"id", "level", "event", "message", "data", "created_at"}


def test_logs_record_the_lifecycle_through_the_api(api):
    task_id = _create(api, {"type": "NOOP"}).json()["id"]
    api.post(f"/api/tasks/{task_id}/cancel/")
    api.post(f"/api/tasks/{task_id}/retry/")

    events = [row["event"] for row in api.get(f"/api/tasks/{task_id}/logs/").json()]

    assert events == ["created", "cancelled", "requeued"]


# --- list --------------------------------------------------------------------------------------


def _ids(response: Any) -> set[str]:
    assert response.status_code == 200, response.content
    return {row["id"] for row in response.json()["results"]}


def test_list_answers_cursor_page_shape(api, user):
    TaskFactory(owner=user)

    response = api.get("/api/tasks/")

    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"next", "previous", "results"}
    assert body["next"] is None and body["previous"] is None
    assert len(body["results"]) == 1
    assert "children" not in body["results"][0]


def test_list_filters_by_several_statuses(api, user):
    pending = TaskFactory(owner=user, status=TaskStatus.PENDING)
    failed = TaskFactory(owner=user, status=TaskStatus.FAILED)
    TaskFactory(owner=user, status=TaskStatus.COMPLETED)

    assert _ids(api.get("/api/tasks/?status=PENDING&status=FAILED")) == {
        str(pending.id),
        str(failed.id),
    }
    assert _ids(api.get("/api/tasks/?status=FAILED")) == {str(failed.id)}


def test_list_rejects_unknown_status(api):
    response = api.get("/api/tasks/?status=DONE")

    assert response.status_code == 400
    assert "status" in response.json()


def test_list_filters_by_type(api, user):
    http = TaskFactory(owner=user, type="HTTP_REQUEST", queue="http.request")
    TaskFactory(owner=user, type="NOOP")

    assert _ids(api.get("/api/tasks/?type=HTTP_REQUEST")) == {str(http.id)}


def test_list_filters_by_parent(api, user):
    parent = TaskFactory(owner=user)
    children = {str(TaskFactory(owner=user, parent=parent).id) for _ in range(2)}
    TaskFactory(owner=user)

    assert _ids(api.get(f"/api/tasks/?parent={parent.id}")) == children


def test_list_filters_by_creation_window(api, user):
    # given tasks created three, two and one days ago
    now = timezone.now()
    old, middle, recent = (TaskFactory(owner=user) for _ in range(3))
    for task, days in ((old, 3), (middle, 2), (recent, 1)):
        Task.objects.filter(pk=task.pk).update(created_at=now - timedelta(days=days))
    after = (now - timedelta(days=2, hours=1)).isoformat()
    before = (now - timedelta(days=1, hours=1)).isoformat()

    # when / then
    assert _ids(api.get("/api/tasks/", {"created_after": after})) == {
        str(middle.id),
        str(recent.id),
    }
    assert _ids(api.get("/api/tasks/", {"created_before": before})) == {str(old.id), str(middle.id)}
    assert _ids(api.get("/api/tasks/", {"created_after": after, "created_before": before})) == {
        str(middle.id)
    }


def test_list_orders_newest_first_by_default_and_by_ordering(api, user):
    now = timezone.now()
    tasks = [TaskFactory(owner=user, priority=p) for p in (5, 1, 9)]
    for age, task in enumerate(tasks):
        Task.objects.filter(pk=task.pk).update(created_at=now - timedelta(minutes=age))

    def order(query: str) -> list[int]:
        return [row["priority"] for row in api.get(f"/api/tasks/{query}").json()["results"]]

    assert order("") == [5, 1, 9]  # newest first
    assert order("?ordering=created_at") == [9, 1, 5]
    assert order("?ordering=priority") == [1, 5, 9]
    assert order("?ordering=-priority") == [9, 5, 1]


def test_list_paginates_with_page_size_and_cursor(api, user):
    # given five tasks with distinct creation times
    now = timezone.now()
    created = []
    for age in range(5):
        task = TaskFactory(owner=user)
        Task.objects.filter(pk=task.pk).update(created_at=now - timedelta(minutes=age))
        created.append(str(task.id))

    # when the pages are walked with page_size 2
    seen: list[str] = []
    first = api.get("/api/tasks/?page_size=2").json()
    page = first
    pages = 0
    while True:
        pages += 1
        assert len(page["results"]) <= 2
        seen += [row["id"] for row in page["results"]]
        if not page["next"]:
            break
        page = api.get(page["next"]).json()

    # then every task shows once, newest first, over three pages
    assert first["previous"] is None and "cursor=" in first["next"]
    assert seen == created
    assert pages == 3
    assert page["previous"]


# --- bulk --------------------------------------------------------------------------------------


def test_bulk_creates_all_and_publishes_the_immediate_ones(
    api, user, sent, django_capture_on_commit_callbacks
):
    items = [
        {"type": "NOOP", "priority": 3},
        {"type": "NOOP", "payload": {"sleep_ms": 1}},
        {"type": "NOOP", "delay_ms": 60_000},
    ]

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = api.post("/api/tasks/bulk/", {"tasks": items}, format="json")

    assert response.status_code == 201, response.content
    ids = response.json()["ids"]
    assert len(ids) == 3
    assert Task.objects.filter(owner=user, pk__in=ids).count() == 3
    assert TaskLog.objects.filter(task_id__in=ids, event="created").count() == 3
    assert len(callbacks) == 1
    assert [m["kwargs"]["taskId"] for m in sent] == ids[:2]
    assert [m["priority"] for m in sent] == [3, 0]
    assert all(set(m["kwargs"]) == MESSAGE_KEYS for m in sent)


def test_bulk_with_one_invalid_item_answers_400_and_writes_nothing(api):
    # given the second of three items has an unknown type
    items = [{"type": "NOOP"}, {"type": "NOPE"}, {"type": "NOOP"}]

    # when
    response = api.post("/api/tasks/bulk/", {"tasks": items}, format="json")

    # then DRF nests the error under tasks, keyed by the index at fault; no row is written
    assert response.status_code == 400
    errors = response.json()["tasks"]
    assert set(errors) == {"1"}
    assert "NOPE" in errors["1"]["type"][0]
    assert Task.objects.count() == 0
    assert TaskLog.objects.count() == 0


def test_bulk_with_invalid_payload_names_item_and_field(api):
    items = [{"type": "NOOP"}, {"type": "NOOP", "payload": {"sleep_ms": -1}}]

    response = api.post("/api/tasks/bulk/", {"tasks": items}, format="json")

    assert response.status_code == 400
    assert set(response.json()["tasks"]) == {"1"}
    assert "sleep_ms" in response.json()["tasks"]["1"]["payload"]
    assert Task.objects.count() == 0


def test_bulk_over_the_limit_answers_400(api, settings):
    settings.QW_BULK_MAX = 2

    response = api.post("/api/tasks/bulk/", {"tasks": [{"type": "NOOP"}] * 3}, format="json")

    assert response.status_code == 400
    assert "QW_BULK_MAX" in str(response.json()["tasks"])
    assert Task.objects.count() == 0


def test_bulk_at_the_limit_is_accepted(api, settings):
    settings.QW_BULK_MAX = 2

    response = api.post("/api/tasks/bulk/", {"tasks": [{"type": "NOOP"}] * 2}, format="json")

    assert response.status_code == 201, response.content
    assert Task.objects.count() == 2


# --- cancel ------------------------------------------------------------------------------------


def test_cancel_pending_answers_200_cancelled(api, user):
    task = TaskFactory(owner=user)

    response = api.post(f"/api/tasks/{task.id}/cancel/")

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "CANCELLED"
    assert body["finished_at"]
    assert body["wait_reason"] is None
    assert Task.objects.get(pk=task.pk).status == TaskStatus.CANCELLED


def test_cancel_processing_answers_202_cancel_requested(api, user):
    # given a task claimed by a worker
    task = TaskFactory(owner=user)
    assert state.claim(task.id, lease_s=30, worker="w1") is not None

    # when
    response = api.post(f"/api/tasks/{task.id}/cancel/")

    # then it keeps running, flagged; a second cancel says the same
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["status"] == "PROCESSING"
    assert body["cancel_requested"] is True
    assert body["wait_reason"]["code"] == "cancel_requested"
    again = api.post(f"/api/tasks/{task.id}/cancel/")
    assert again.status_code == 202
    assert TaskLog.objects.filter(task=task, event="cancel_requested").count() == 1


@pytest.mark.parametrize("status", [TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED])
def test_cancel_terminal_answers_409(api, user, status):
    task = TaskFactory(owner=user, status=status)

    response = api.post(f"/api/tasks/{task.id}/cancel/")

    assert response.status_code == 409
    assert status in response.json()["detail"]
    assert Task.objects.get(pk=task.pk).status == status


# --- retry -------------------------------------------------------------------------------------


def test_retry_failed_answers_202_pending_with_retries_reset(
    api, user, sent, django_capture_on_commit_callbacks
):
    task = TaskFactory(
        owner=user,
        status=TaskStatus.FAILED,
        retries=3,
        error="boom",
        failure_class="retries_exhausted",
        finished_at=timezone.now(),
    )

    with django_capture_on_commit_callbacks(execute=True):
        response = api.post(f"/api/tasks/{task.id}/retry/")

    assert response.status_code == 202, response.content
    body = response.json()
    assert body["status"] == "PENDING"
    assert body["retries"] == 0
    assert body["error"] == "" and body["failure_class"] == ""
    assert body["finished_at"] is None
    assert [m["kwargs"]["taskId"] for m in sent] == [str(task.id)]


def test_retry_cancelled_answers_202_pending(api, user):
    task = TaskFactory(owner=user, status=TaskStatus.CANCELLED)

    response = api.post(f"/api/tasks/{task.id}/retry/")

    assert response.status_code == 202
    assert response.json()["status"] == "PENDING"


@pytest.mark.parametrize("status", [TaskStatus.PENDING, TaskStatus.COMPLETED])
def test_retry_not_failed_answers_409(api, user, status, django_capture_on_commit_callbacks):
    task = TaskFactory(owner=user, status=status)

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = api.post(f"/api/tasks/{task.id}/retry/")

    assert response.status_code == 409
    assert "detail" in response.json()
    assert callbacks == []
    assert Task.objects.get(pk=task.pk).status == status


# --- idempotency -------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["header", "body"])
def test_idempotency_same_key_same_body_returns_first_task(api, user, where):
    # given
    body = {"type": "NOOP", "payload": {"sleep_ms": 1}}
    extra: dict[str, Any] = {}
    if where == "header":
        extra["HTTP_IDEMPOTENCY_KEY"] = "order-42"
    else:
        body["idempotency_key"] = "order-42"

    # when the same request is sent twice
    first = _create(api, body, **extra)
    second = _create(api, body, **extra)

    # then the second answers 200 with the first task, and only one row exists
    assert first.status_code == 201, first.content
    assert second.status_code == 200, second.content
    assert second.json()["id"] == first.json()["id"]
    assert second.json()["idempotency_key"] == "order-42"
    assert Task.objects.filter(owner=user).count() == 1


def test_idempotency_header_and_body_same_key_are_one_request(api, user):
    first = _create(api, {"type": "NOOP"}, HTTP_IDEMPOTENCY_KEY="k1")
    second = _create(api, {"type": "NOOP", "idempotency_key": "k1"}, HTTP_IDEMPOTENCY_KEY="k1")

    assert (first.status_code, second.status_code) == (201, 200)
    assert second.json()["id"] == first.json()["id"]


def test_idempotency_body_compared_as_canonical_json(api):
    # given the same body with other key order and spacing
    first = api.post(
        "/api/tasks/",
        b'{"type": "NOOP", "payload": {"sleep_ms": 1, "result": 2}}',
        content_type="application/json",
        HTTP_IDEMPOTENCY_KEY="k",
    )
    second = api.post(
        "/api/tasks/",
        b'{"payload":{"result":2,"sleep_ms":1},"type":"NOOP"}',
        content_type="application/json",
        HTTP_IDEMPOTENCY_KEY="k",
    )

    assert (first.status_code, second.status_code) == (201, 200)
    assert second.json()["id"] == first.json()["id"]
    assert Task.objects.count() == 1


@pytest.mark.parametrize("where", ["header", "body"])
def test_idempotency_same_key_other_body_answers_409(api, user, where):
    def send(payload: dict[str, Any]) -> Any:
        body: dict[str, Any] = {"type": "NOOP", "payload": payload}
        if where == "header":
            return _create(api, body, HTTP_IDEMPOTENCY_KEY="k")
        return _create(api, {**body, "idempotency_key": "k"})

    first = send({"sleep_ms": 1})
    second = send({"sleep_ms": 2})

    assert first.status_code == 201
    assert second.status_code == 409
    assert "idempotency_key" in second.json()
    assert Task.objects.count() == 1


def test_idempotency_header_and_body_disagree_answers_400(api):
    response = _create(api, {"type": "NOOP", "idempotency_key": "a"}, HTTP_IDEMPOTENCY_KEY="b")

    assert response.status_code == 400
    assert "idempotency_key" in response.json()
    assert Task.objects.count() == 0


def test_idempotency_keys_are_per_owner(api, user, client_for):
    other = UserFactory()
    mine = _create(api, {"type": "NOOP"}, HTTP_IDEMPOTENCY_KEY="shared")

    theirs = _create(
        client_for(other),
        {"type": "NOOP", "payload": {"sleep_ms": 9}},
        HTTP_IDEMPOTENCY_KEY="shared",
    )

    assert (mine.status_code, theirs.status_code) == (201, 201)
    assert theirs.json()["id"] != mine.json()["id"]
    assert Task.objects.filter(idempotency_key="shared").count() == 2


def test_idempotency_expired_key_creates_new_task(api, user, settings):
    # given a task whose key is older than the TTL
    first = _create(api, {"type": "NOOP"}, HTTP_IDEMPOTENCY_KEY="k")
    assert first.status_code == 201
    expired = timezone.now() - timedelta(hours=settings.QW_IDEMPOTENCY_TTL_HOURS, minutes=1)
    Task.objects.filter(pk=first.json()["id"]).update(created_at=expired)

    # when the key is used again, even with another body
    second = _create(api, {"type": "NOOP", "priority": 4}, HTTP_IDEMPOTENCY_KEY="k")

    # then a new task holds the key
    assert second.status_code == 201, second.content
    assert second.json()["id"] != first.json()["id"]
    assert Task.objects.count() == 2
    assert Task.objects.get(idempotency_key="k").pk == uuid.UUID(second.json()["id"])


def test_idempotency_key_within_ttl_still_answers(api, settings):
    first = _create(api, {"type": "NOOP"}, HTTP_IDEMPOTENCY_KEY="k")
    recent = (
        timezone.now() - timedelta(hours=settings.QW_IDEMPOTENCY_TTL_HOURS) + timedelta(minutes=5)
    )
    Task.objects.filter(pk=first.json()["id"]).update(created_at=recent)

    second = _create(api, {"type": "NOOP"}, HTTP_IDEMPOTENCY_KEY="k")

    assert second.status_code == 200
    assert second.json()["id"] == first.json()["id"]


@pytest.mark.django_db(transaction=True)
def test_idempotency_race_creates_one_task(user, sent, monkeypatch):
    # given two clients of the same user, released together, and a look-up of the key that
    # waits until both requests have looked (so both go on to insert: a true race)
    token, _ = Token.objects.get_or_create(user=user)
    start = threading.Barrier(2)
    both_looked = threading.Barrier(2)
    looked = threading.local()
    lookup = services._earlier_with_key

    def racing_lookup(*args: Any, **kwargs: Any) -> Any:
        found = lookup(*args, **kwargs)
        if not getattr(looked, "once", False):
            looked.once = True
            both_looked.wait(timeout=10)
        return found

    monkeypatch.setattr(services, "_earlier_with_key", racing_lookup)
    results: list[Any] = []
    errors: list[BaseException] = []
    body = {"type": "NOOP", "payload": {"sleep_ms": 1}}

    def post() -> None:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
        try:
            start.wait(timeout=10)
            results.append(
                client.post("/api/tasks/", body, format="json", HTTP_IDEMPOTENCY_KEY="race")
            )
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    # when both post the same key and body at once
    threads = [threading.Thread(target=post) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    # then both succeed with the same task, exactly one row exists, one wake-up is published
    assert errors == []
    assert sorted(r.status_code for r in results) == [200, 201], [r.content for r in results]
    ids = {r.json()["id"] for r in results}
    assert len(ids) == 1
    assert Task.objects.filter(owner=user, idempotency_key="race").count() == 1
    assert Task.objects.count() == 1
    assert TaskLog.objects.count() == 1
    assert [m["kwargs"]["taskId"] for m in sent] == list(ids)
