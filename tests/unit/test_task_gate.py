"""The create gate (``tasks_app.services.task_validate``) and the one JSON-path spelling."""

from __future__ import annotations

import uuid

import pytest
from django.conf import settings

from tasks_app.paths import join_path, json_path
from tasks_app.services import TaskInvalid, TaskSpec, task_validate

pytestmark = pytest.mark.django_db


def _problems(data: object, **kwargs: object) -> list[tuple[str, str]]:
    with pytest.raises(TaskInvalid) as caught:
        task_validate(data, owner=kwargs.pop("owner", None), **kwargs)  # type: ignore[arg-type]
    return caught.value.problems


def test_a_valid_body_gives_a_spec_with_the_defaults(user):
    # given a body naming only a known type
    # when it passes the gate
    spec = task_validate({"type": "NOOP"}, owner=user)
    # then the spec carries the type and the configured defaults
    assert isinstance(spec, TaskSpec)
    assert (spec.type, spec.payload, spec.priority) == ("NOOP", {}, 0)
    assert spec.max_retries == settings.QW_DEFAULT_MAX_RETRIES
    assert spec.timeout_s == settings.QW_DEFAULT_TIMEOUT_S


def test_an_unknown_type_is_named_at_type(user):
    problems = _problems({"type": "NOPE"}, owner=user)
    assert [path for path, _ in problems] == ["type"]
    assert problems[0][1].startswith("Unknown task type 'NOPE'.")


def test_a_payload_against_the_schema_is_named_at_its_field(user):
    # given a payload breaking the type's schema
    problems = _problems({"type": "NOOP", "payload": {"sleep_ms": -1}}, owner=user)
    # then the problem sits under payload, at the field
    assert problems == [("payload.sleep_ms", "-1 is less than the minimum of 0")]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_retries", settings.QW_MAX_RETRIES_LIMIT + 1),
        ("timeout_s", settings.QW_MAX_TIMEOUT_S + 1),
        ("timeout_s", 0),
        ("priority", 10),
        ("delay_ms", -1),
    ],
)
def test_bounds_are_checked_per_field(user, field, value):
    problems = _problems({"type": "NOOP", field: value}, owner=user)
    assert [path for path, _ in problems] == [field]


def test_unknown_fields_and_both_schedules_are_refused(user):
    assert _problems({"type": "NOOP", "extra": 1}, owner=user) == [("extra", "Unknown field.")]
    both = {"type": "NOOP", "scheduled_at": "2030-01-01T00:00:00Z", "delay_ms": 5}
    assert _problems(both, owner=user) == [("delay_ms", "Give scheduled_at or delay_ms, not both.")]


def test_a_parent_must_be_a_task_the_owner_sees(user):
    missing = uuid.uuid4()
    assert _problems({"type": "NOOP", "parent": str(missing)}, owner=user) == [
        ("parent", f"No task {missing}.")
    ]


def test_a_prefix_names_the_place_of_the_body(user):
    # given the task of a schedule's target
    problems = _problems(
        {"type": "NOOP", "payload": {"sleep_ms": -1}}, owner=user, path_prefix="target.task"
    )
    # then each path starts at the target
    assert [path for path, _ in problems] == ["target.task.payload.sleep_ms"]


def test_the_detail_is_the_api_answer(user):
    with pytest.raises(TaskInvalid) as caught:
        task_validate({"type": "NOOP", "payload": {"sleep_ms": -1}}, owner=user)
    assert caught.value.detail == {"payload": {"sleep_ms": ["-1 is less than the minimum of 0"]}}


def test_json_path_spells_keys_and_indexes():
    assert json_path(["payload", "url"]) == "payload.url"
    assert json_path([3, "payload", "x"], "tasks") == "tasks[3].payload.x"
    assert json_path(["items", 0, 2, "a"]) == "items[0][2].a"
    assert json_path([0]) == "[0]"
    assert json_path([]) == ""


def test_join_path_puts_a_relative_path_below_its_prefix():
    assert join_path("steps.a.payload", "url") == "steps.a.payload.url"
    assert join_path("steps.a.payload", "[2].x") == "steps.a.payload[2].x"
    assert join_path("steps.a.payload", "") == "steps.a.payload"
    assert join_path("", "url") == "url"


def test_bulk_item_errors_read_as_indexed_paths():
    # given errors shaped as the bulk answer ({"tasks": {"3": {...}}})
    detail = {"tasks": {"3": {"payload": {"x": ["bad"]}}, "17": {"type": ["unknown"]}}}
    # then the flat problems name the item by index
    assert TaskInvalid(detail).problems == [
        ("tasks[3].payload.x", "bad"),
        ("tasks[17].type", "unknown"),
    ]
