"""The handler registry: one entry per task type, with the JSON Schema of its payload.

A deployment registers its own types the same way the built-ins do::

    from tasks_app.handlers import register

    @register("RESIZE_IMAGE", schema={"type": "object", "required": ["src"], ...})
    def resize_image(ctx: TaskContext, payload: dict) -> dict: ...

and lists the module in ``QW_HANDLER_MODULES`` so that web and workers import it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError as SchemaError

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


@dataclass(frozen=True)
class HandlerSpec:
    type: str
    func: Handler
    schema: dict[str, Any]
    description: str = ""
    # Extra checks beyond the schema (cross-field rules): returns (json path, message) pairs.
    extra_validator: Validator | None = None
    _validator: Draft202012Validator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        Draft202012Validator.check_schema(self.schema)
        object.__setattr__(self, "_validator", Draft202012Validator(self.schema))

    def validate(self, payload: Any) -> list[tuple[str, str]]:
        """Return (json path, message) for every problem in ``payload``, best first."""
        errors = sorted(self._validator.iter_errors(payload), key=lambda e: list(e.path))
        problems = [(json_path(e), _message(e)) for e in errors]
        if not problems and self.extra_validator is not None:
            problems = self.extra_validator(payload)
        return problems


def json_path(error: SchemaError) -> str:
    path = ""
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _message(error: SchemaError) -> str:
    if error.validator == "required":
        return error.message.replace("is a required property", "is required")
    if error.validator == "additionalProperties":
        return error.message.replace("were unexpected", "are not allowed").replace(
            "was unexpected", "is not allowed"
        )
    return error.message


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
    ) -> Callable[[Handler], Handler]:
        if not _TYPE_NAME.match(task_type):
            raise ValueError(f"task type {task_type!r} must be UPPER_SNAKE_CASE, at most 64 chars")

        def decorator(func: Handler) -> Handler:
            if task_type in self._specs and self._specs[task_type].func is not func:
                raise ValueError(f"task type {task_type} is already registered")
            self._specs[task_type] = HandlerSpec(
                task_type, func, schema, description or (func.__doc__ or "").strip(),
                extra_validator,
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
