"""The handler registry: one entry per task type, with the JSON Schema of its payload.

A deployment registers its own types the same way the built-ins do::

    from tasks_app.handlers import register

    @register("RESIZE_IMAGE", schema={"type": "object", "required": ["src"], ...})
    def resize_image(ctx: TaskContext, payload: dict) -> dict: ...

and lists the module in ``QW_HANDLER_MODULES`` so that web and workers import it.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError as SchemaError

from tasks_app.paths import json_path

_TYPE_NAME = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")


class Context(Protocol):
    """What a handler may use of its task (see ``tasks_app.worker.TaskContext``)."""

    task_id: Any
    attempt: int
    retries: int
    max_retries: int
    timeout_s: int

    def check_cancelled(self) -> None: ...

    def log(self, event: str, message: str, data: dict[str, Any] | None = None) -> None: ...


Handler = Callable[[Any, Any], Any]
Validator = Callable[[Any], list[tuple[str, str]]]
# Rules between the payload and the task's own fields, e.g. a request timeout within the task's.
TaskValidator = Callable[..., list[tuple[str, str]]]
# Rules that need the creating user, e.g. that a referenced artifact or task is theirs.
OwnerValidator = Callable[[Any, Any], list[tuple[str, str]]]


@dataclass(frozen=True)
class HandlerSpec:
    type: str
    func: Handler
    schema: dict[str, Any]
    description: str = ""
    # Extra checks beyond the schema (cross-field rules): returns (json path, message) pairs.
    extra_validator: Validator | None = None
    # Checks against the task's own fields (called with timeout_s=…).
    task_validator: TaskValidator | None = None
    # Checks against the creating user (called with the payload and the user).
    owner_validator: OwnerValidator | None = None
    # A payload that is a whole document (a data pipeline): its errors are reported as one
    # list of "json.path: message" strings, as for a workflow definition (docs/api.md).
    document: bool = False
    # The handler mostly waits on I/O (the network): a message's tasks of this type run several
    # at a time in the process's thread pool (tasks_app.concurrent), where the SIGALRM time
    # limit cannot reach them, so the handler must bound its own waits by the task's timeout_s.
    io_bound: bool = False
    _validator: Draft202012Validator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        Draft202012Validator.check_schema(self.schema)
        object.__setattr__(self, "_validator", Draft202012Validator(self.schema))

    def validate(
        self, payload: Any, *, timeout_s: int | None = None, owner: Any = None
    ) -> list[tuple[str, str]]:
        """Return (json path, message) for every problem in ``payload``, by path.

        ``timeout_s``: the task's own time limit, for the type's task-level rules; ``owner``:
        the creating user, for references to their own objects.
        """
        problems: list[tuple[str, str]] = []
        for error in self._validator.iter_errors(payload):
            problems.extend(describe(error))
        problems.sort()
        if not problems and self.extra_validator is not None:
            problems = self.extra_validator(payload)
        if not problems and self.task_validator is not None and timeout_s is not None:
            problems = self.task_validator(payload, timeout_s=timeout_s)
        if not problems and self.owner_validator is not None and owner is not None:
            problems = self.owner_validator(payload, owner)
        return problems


def describe(error: SchemaError) -> list[tuple[str, str]]:
    """Name the field at fault: a missing or unknown property gets its own path."""
    base = list(error.absolute_path)
    if error.validator == "required" and isinstance(error.instance, dict):
        missing = [name for name in error.validator_value if name not in error.instance]
        return [(json_path([*base, name]), "this field is required") for name in missing]
    if (
        error.validator == "additionalProperties"
        and isinstance(error.instance, dict)
        and isinstance(error.schema, dict)
    ):
        known = set(error.schema.get("properties", {}))
        patterns = list(error.schema.get("patternProperties", {}))
        extra = [
            name
            for name in error.instance
            if name not in known and not any(re.search(p, name) for p in patterns)
        ]
        return [(json_path([*base, name]), "unknown field") for name in extra]
    return [(json_path(base), error.message)]


class HandlerRegistry:
    def __init__(self) -> None:
        self._specs: dict[str, HandlerSpec] = {}

    def register(
        self,
        task_type: str,
        *,
        schema: dict[str, Any],
        description: str = "",
        extra_validator: Validator | None = None,
        task_validator: TaskValidator | None = None,
        owner_validator: OwnerValidator | None = None,
        document: bool = False,
        io_bound: bool = False,
    ) -> Callable[[Handler], Handler]:
        if not _TYPE_NAME.match(task_type):
            raise ValueError(f"task type {task_type!r} must be UPPER_SNAKE_CASE, at most 64 chars")
        task_type = str(task_type)  # a plain name, also for a ``TaskType`` member

        def decorator(func: Handler) -> Handler:
            if task_type in self._specs and self._specs[task_type].func is not func:
                raise ValueError(f"task type {task_type} is already registered")
            self._specs[task_type] = HandlerSpec(
                task_type,
                func,
                schema,
                description or inspect.cleandoc(func.__doc__ or ""),
                extra_validator,
                task_validator,
                owner_validator,
                document,
                io_bound,
            )
            return func

        return decorator

    def get(self, task_type: str) -> HandlerSpec | None:
        return self._specs.get(task_type)

    def types(self) -> list[str]:
        return sorted(self._specs)

    def __iter__(self) -> Iterator[HandlerSpec]:
        return iter(self._specs[name] for name in self.types())

    def __contains__(self, task_type: object) -> bool:
        return task_type in self._specs


registry = HandlerRegistry()
register = registry.register
