"""Grouped publishing: which wake-ups share a message, and what the message says."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tasks_app import dispatch


def _wakeup(**overrides: Any) -> dispatch.Wakeup:
    fields: dict[str, Any] = {
        "task_id": str(uuid.uuid4()),
        "type": "NOOP",
        "queue": "task.created",
        "priority": 0,
        "timeout_s": 30,
    }
    fields.update(overrides)
    return dispatch.Wakeup(**fields)


def test_same_type_queue_priority_and_delay_share_messages_of_at_most_max_tasks():
    wakeups = [_wakeup() for _ in range(250)]

    messages = dispatch.group(wakeups, 100)

    assert [len(m) for m in messages] == [100, 100, 50]
    assert [w for m in messages for w in m] == wakeups  # every id once, in order


@pytest.mark.parametrize(
    "other",
    [
        {"type": "SLEEP"},
        {"queue": "compensation"},
        {"priority": 5},
        {"countdown": 2.0},
    ],
    ids=["type", "queue", "priority", "delay"],
)
def test_a_different_type_queue_priority_or_delay_gets_its_own_message(other):
    a, b, c = _wakeup(), _wakeup(**other), _wakeup()

    messages = dispatch.group([a, b, c], 100)

    assert messages == [[a, c], [b]]


def test_one_task_per_message_when_max_tasks_is_one():
    wakeups = [_wakeup() for _ in range(3)]

    assert dispatch.group(wakeups, 1) == [[w] for w in wakeups]


def test_a_group_message_lists_every_id_with_the_largest_time_limit():
    wakeups = [_wakeup(timeout_s=30, request_id="r1"), _wakeup(timeout_s=90, request_id="r1")]

    kwargs = dispatch.message_kwargs(wakeups)

    assert set(kwargs) == {"taskType", "taskId", "taskIds", "delay", "metadata"}
    assert kwargs["taskId"] == wakeups[0].task_id
    assert kwargs["taskIds"] == [w.task_id for w in wakeups]
    assert kwargs["metadata"] == {"timeout_s": 90, "queue": "task.created", "request_id": "r1"}
    assert json.loads(json.dumps(kwargs)) == kwargs


def test_a_group_message_names_a_request_only_when_every_task_shares_it():
    mixed = [_wakeup(request_id="r1"), _wakeup(request_id="r2")]
    partly = [_wakeup(request_id="r1"), _wakeup(request_id=None)]

    assert "request_id" not in dispatch.message_kwargs(mixed)["metadata"]
    assert "request_id" not in dispatch.message_kwargs(partly)["metadata"]


def test_a_message_of_one_keeps_the_single_shape():
    wakeup = _wakeup()

    assert dispatch.message_kwargs([wakeup]) == dispatch.message_kwargs(wakeup)
    assert "taskIds" not in dispatch.message_kwargs([wakeup])


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    calls: list[dict[str, Any]] = []

    def send_task(name: str, args: Any = None, kwargs: Any = None, **options: Any) -> None:
        calls.append({"name": name, "kwargs": kwargs, **options})

    import contextlib

    monkeypatch.setattr(dispatch.app, "send_task", send_task)
    monkeypatch.setattr(dispatch, "_confirms_batchable", lambda: False)
    monkeypatch.setattr(
        dispatch.app, "producer_or_acquire", lambda producer=None: contextlib.nullcontext(None)
    )
    dispatch.reset_breaker()
    yield calls
    dispatch.reset_breaker()


def test_publish_sends_one_message_per_group_named_after_the_type(sent, settings):
    settings.QW_MESSAGE_MAX_TASKS = 2
    wakeups = [_wakeup(timeout_s=10) for _ in range(3)]

    assert dispatch.publish(wakeups) == 3

    assert [m["kwargs"].get("taskIds") for m in sent] == [
        [wakeups[0].task_id, wakeups[1].task_id],
        None,
    ]
    assert [m["task_id"] for m in sent] == [wakeups[0].task_id, wakeups[2].task_id]
    assert {m["name"] for m in sent} == {dispatch.EXECUTE_TASK}
    assert {m["shadow"] for m in sent} == {"NOOP"}
    # a group's limit covers each of its handlers in turn; a single keeps its own
    assert [(m["soft_time_limit"], m["time_limit"]) for m in sent] == [
        (20, 20 + dispatch.HARD_LIMIT_GRACE_S),
        (10, 10 + dispatch.HARD_LIMIT_GRACE_S),
    ]


def test_an_explicit_max_tasks_overrides_the_setting(sent, settings):
    settings.QW_MESSAGE_MAX_TASKS = 100

    assert dispatch.publish([_wakeup() for _ in range(3)], max_tasks=1) == 3

    assert len(sent) == 3
