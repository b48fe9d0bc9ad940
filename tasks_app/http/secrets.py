"""``{"$secret": "NAME"}``: a payload names a secret; the worker reads it when it sends.

The value comes from ``QW_SECRET_<NAME>`` (or the file named by ``QW_SECRET_<NAME>_FILE``) in
the worker's environment at the moment the request is made. It is never written back: the
stored payload keeps the reference, and every value resolved is registered with
``queueworker.redaction`` so that no log line, error or result of this process shows it.
"""

from __future__ import annotations

import re
from typing import Any

from queueworker import redaction
from queueworker.config import Env

KEY = "$secret"
ENV_PREFIX = redaction.SECRET_ENV_PREFIX
NAME_PATTERN = r"^[A-Z][A-Z0-9_]{0,63}$"

REF_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "A secret, read from QW_SECRET_<NAME> on the worker when the request is made.",
    "required": [KEY],
    "additionalProperties": False,
    "properties": {KEY: {"type": "string", "pattern": NAME_PATTERN}},
}


class MissingSecret(Exception):
    """A referenced secret is not set in the worker's environment."""


def or_secret(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema``, or a secret reference in its place (an object is read as the reference)."""
    return {"if": {"type": "object"}, "then": REF_SCHEMA, "else": schema}


def is_ref(value: Any) -> bool:
    return isinstance(value, dict) and KEY in value


def ref_problems(value: Any, path: str = "") -> list[tuple[str, str]]:
    """(path, message) for every malformed reference inside ``value`` (e.g. inside ``json``)."""
    problems: list[tuple[str, str]] = []
    if is_ref(value):
        name = value[KEY]
        if set(value) != {KEY}:
            problems.append((path, f"a secret reference has only the key {KEY}"))
        elif not isinstance(name, str) or not re.match(NAME_PATTERN, name):
            problems.append((f"{path}.{KEY}", f"a secret name matches {NAME_PATTERN}"))
    elif isinstance(value, dict):
        for key, item in value.items():
            problems.extend(ref_problems(item, f"{path}.{key}" if path else str(key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            problems.extend(ref_problems(item, f"{path}[{index}]"))
    return problems


def read(name: str, env: Env | None = None) -> str:
    value = (env or Env()).raw(f"{ENV_PREFIX}{name}")
    if value is None:
        raise MissingSecret(
            f"secret {name} is not set on the worker "
            f"({ENV_PREFIX}{name} or {ENV_PREFIX}{name}_FILE)"
        )
    redaction.register_secret(value)
    return value


def resolve(value: Any, found: list[str], env: Env | None = None) -> Any:
    """A copy of ``value`` with every reference replaced by its value; values go to ``found``."""
    if is_ref(value):
        secret = read(str(value[KEY]), env)
        found.append(secret)
        return secret
    if isinstance(value, dict):
        return {key: resolve(item, found, env) for key, item in value.items()}
    if isinstance(value, list):
        return [resolve(item, found, env) for item in value]
    return value
