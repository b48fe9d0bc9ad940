"""The handler registry (``tasks_app.handlers.registry``) and the built-in NOOP handler."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from jsonschema.exceptions import SchemaError

from tasks_app.errors import PermanentError, RetryableError, TaskCancelled
from tasks_app.handlers import registry as global_registry
from tasks_app.handlers.noop import noop
from tasks_app.handlers.registry import HandlerRegistry

ITEMS_SCHEMA = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "items": {
            "type": "array",
            "items": {"type": "object", "properties": {"x": {"type": "integer"}}},
        },
    },
}


@pytest.fixture
def reg() -> HandlerRegistry:
    """A registry of its own, so that these tests leave the global one as it was."""
    return HandlerRegistry()


def _handler(ctx: Any, payload: Any) -> Any:
    """Returns its payload."""
    return payload


# --- registering -------------------------------------------------------------------------------


def test_register_makes_type_available(reg):
    returned = reg.register("RESIZE_IMAGE", schema={"type": "object"})(_handler)

    assert returned is _handler  # usable as a decorator
    spec = reg.get("RESIZE_IMAGE")
    assert spec is not None
    assert (spec.type, spec.func) == ("RESIZE_IMAGE", _handler)
    assert spec.description == "Returns its payload."
    assert "RESIZE_IMAGE" in reg
    assert reg.types() == ["RESIZE_IMAGE"]


def test_registry_lists_types_sorted(reg):
    for name in ("ZED", "ALPHA", "MIDDLE_2"):
        reg.register(name, schema={"type": "object"})(_handler)
    assert reg.types() == ["ALPHA", "MIDDLE_2", "ZED"]
    assert [spec.type for spec in reg] == ["ALPHA", "MIDDLE_2", "ZED"]


def test_unknown_type_absent(reg):
    assert reg.get("NOPE") is None
    assert "NOPE" not in reg


def test_duplicate_registration_of_other_handler_refused(reg):
    reg.register("RESIZE", schema={"type": "object"})(_handler)

    def other(ctx: Any, payload: Any) -> Any:
        return None

    with pytest.raises(ValueError, match="already registered"):
        reg.register("RESIZE", schema={"type": "object"})(other)
    assert reg.get("RESIZE").func is _handler


def test_reregistering_same_handler_harmless(reg):
    # a module imported twice (web and worker start-up paths) registers the same function again
    reg.register("RESIZE", schema={"type": "object"})(_handler)
    reg.register("RESIZE", schema={"type": "object"})(_handler)
    assert reg.types() == ["RESIZE"]


@pytest.mark.parametrize(
    "name", ["noop", "Noop", "1TYPE", "_TYPE", "HAS-DASH", "HAS SPACE", "", "A" * 65, "ÄRGER"]
)
def test_bad_type_name_refused(reg, name):
    with pytest.raises(ValueError, match="UPPER_SNAKE_CASE"):
        reg.register(name, schema={"type": "object"})
    assert reg.types() == []


def test_longest_type_name_accepted(reg):
    reg.register("A" * 64, schema={"type": "object"})(_handler)
    assert "A" * 64 in reg


@pytest.mark.parametrize(
    "schema",
    [{"type": "nope"}, {"type": "object", "required": "name"}, {"minimum": "zero"}],
    ids=["bad-type", "required-not-list", "minimum-not-number"],
)
def test_invalid_schema_refused_at_registration(reg, schema):
    with pytest.raises(SchemaError):
        reg.register("BROKEN", schema=schema)(_handler)
    assert "BROKEN" not in reg


# --- validate ----------------------------------------------------------------------------------


@pytest.fixture
def items_spec(reg):
    reg.register("ITEMS", schema=ITEMS_SCHEMA)(_handler)
    return reg.get("ITEMS")


def test_validate_valid_payload_no_problems(items_spec):
    assert items_spec.validate({"name": "a", "items": [{"x": 1}]}) == []


def test_validate_nested_error_json_path(items_spec):
    payload = {"name": "a", "items": [{"x": 1}, {"x": 2}, {"x": "three"}]}

    assert items_spec.validate(payload) == [("items[2].x", "'three' is not of type 'integer'")]


def test_validate_reports_every_problem_sorted_by_path(items_spec):
    payload = {"name": 5, "items": [{"x": "a"}, {"x": 1}, {"x": "b"}]}

    problems = items_spec.validate(payload)

    assert [path for path, _ in problems] == ["items[0].x", "items[2].x", "name"]


def test_validate_required_and_unexpected_messages(items_spec):
    problems = items_spec.validate({"colour": "red"})

    # each problem names its own field, missing or unknown (docs/api.md)
    assert problems == [("colour", "unknown field"), ("name", "this field is required")]


def test_validate_extra_validator_runs_after_schema_passes(reg):
    calls: list[Any] = []

    def extra(payload: Any) -> list[tuple[str, str]]:
        calls.append(payload)
        return [("a.b", "must be less than c")] if payload.get("a") else []

    reg.register("CROSS", schema={"type": "object"}, extra_validator=extra)(_handler)
    spec = reg.get("CROSS")

    assert spec.validate({"a": {"b": 2}}) == [("a.b", "must be less than c")]
    assert spec.validate({}) == []
    assert spec.validate([]) != []  # the schema fails: the extra check is not consulted
    assert len(calls) == 2


def test_noop_registered_globally_with_its_schema():
    spec = global_registry.get("NOOP")
    assert spec is not None and spec.func is noop
    assert spec.validate({"sleep_ms": 10, "fail_times": 1, "fail": False, "result": [1]}) == []
    assert [p for p, _ in spec.validate({"sleep_ms": -1})] == ["sleep_ms"]
    assert [p for p, _ in spec.validate({"fail": "yes"})] == ["fail"]
    assert spec.validate({"bogus": 1}) == [("bogus", "unknown field")]


# --- NOOP --------------------------------------------------------------------------------------


@dataclass
class FakeContext:
    task_id: Any = "task-1"
    attempt: int = 1
    retries: int = 0
    max_retries: int = 3
    timeout_s: float = 300
    cancelled: bool = False
    checks: int = 0
    logs: list[tuple[str, str]] = field(default_factory=list)

    def check_cancelled(self) -> None:
        self.checks += 1
        if self.cancelled:
            raise TaskCancelled("cancellation requested")

    def log(self, event: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.logs.append((event, message))


def test_noop_empty_payload_returns_ok():
    assert noop(FakeContext(attempt=2), {}) == {"ok": True, "attempt": 2, "result": None}


def test_noop_result_echoed():
    assert noop(FakeContext(), {"result": {"n": 7}})["result"] == {"n": 7}


def test_noop_fail_raises_permanent_error():
    with pytest.raises(PermanentError, match="fail"):
        noop(FakeContext(), {"fail": True, "fail_times": 0})


@pytest.mark.parametrize("attempt", [1, 2])
def test_noop_fail_times_fails_the_first_attempts(attempt):
    with pytest.raises(RetryableError) as excinfo:
        noop(FakeContext(attempt=attempt), {"fail_times": 2})
    assert f"attempt {attempt} of 2" in str(excinfo.value)
    assert excinfo.value.retry_after is None


@pytest.mark.parametrize("attempt", [3, 6])
def test_noop_fail_times_later_attempts_succeed(attempt):
    # counted by attempt, which a manual retry does not reset (retries it does)
    assert noop(FakeContext(attempt=attempt, retries=0), {"fail_times": 2})["ok"] is True


def test_noop_sleep_bounded_by_timeout():
    ctx = FakeContext(timeout_s=0.05)

    started = time.monotonic()
    result = noop(ctx, {"sleep_ms": 60_000})
    elapsed = time.monotonic() - started

    assert result["ok"] is True
    assert 0.04 <= elapsed < 1.0
    assert ctx.checks >= 1


def test_noop_sleep_checks_cancellation_regularly():
    ctx = FakeContext()

    started = time.monotonic()
    noop(ctx, {"sleep_ms": 450})
    elapsed = time.monotonic() - started

    assert 0.44 <= elapsed < 1.5
    assert ctx.checks >= 3  # at least every 0.2 s


def test_noop_cancelled_while_sleeping_raises_task_cancelled():
    ctx = FakeContext(cancelled=True)

    started = time.monotonic()
    with pytest.raises(TaskCancelled):
        noop(ctx, {"sleep_ms": 60_000})

    assert time.monotonic() - started < 1.0
    assert ctx.checks == 1
