"""``{"$secret": "NAME"}``: a payload names a secret; the worker reads it when it sends.

1. The value comes from ``QW_SECRET_<NAME>`` (or the file named by ``QW_SECRET_<NAME>_FILE``)
   in the worker's environment at the moment the request is made. It is never written back:
   the stored payload keeps the reference, and every value resolved is registered with
   ``queueworker.redaction`` so that no log line, error or result of this process shows it.
2. A secret goes only where its operator bound it: ``QW_SECRET_<NAME>_HOSTS`` lists ``host`` or
   ``host:port`` entries (read like ``QW_HTTP_ALLOWED_HOSTS``). Otherwise any user who can
   create a task could send any secret to a server of their own. The list is configuration,
   not a secret: the web process reads it to refuse a payload at create (``binding_problems``),
   and the worker reads it again when it sends and at every redirect hop (``refusal``), so a
   task queued before the list changed is held to the list of the moment it runs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from queueworker import redaction
from queueworker.config import Env
from tasks_app.http.guard import (
    AllowedHost,
    Target,
    is_allowed,
    parse_allowed_hosts,
    parse_target,
)

KEY = "$secret"
ENV_PREFIX = redaction.SECRET_ENV_PREFIX
HOSTS_SUFFIX = redaction.SECRET_HOSTS_SUFFIX
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


class SecretRefused(Exception):
    """A secret would go to a destination it is not bound to; nothing was sent."""


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


# --- bindings ----------------------------------------------------------------------------------


def references(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(payload path, secret name) of every well-formed reference inside ``value``."""
    if is_ref(value):
        if isinstance(value[KEY], str):
            yield path, value[KEY]
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from references(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from references(item, f"{path}[{index}]")


@dataclass(frozen=True)
class Binding:
    """The destinations one secret may be sent to, as its ``_HOSTS`` variable lists them."""

    name: str
    hosts: tuple[AllowedHost, ...] = ()
    problem: str | None = None  # why the list cannot be used (unset, unreadable, malformed)

    @property
    def variable(self) -> str:
        return f"{ENV_PREFIX}{self.name}{HOSTS_SUFFIX}"

    def refusal(self, target: Target | None, shown: str | None = None) -> str | None:
        """Why the secret must not go to ``target`` (None: not known yet, only the list is
        checked), or None; ``shown`` names the target instead of its host. Hosts compare as
        the SSRF guard's allow-list does: in any case, in IDNA form, an entry without a port
        for every port, an entry with one against the URL's port or its scheme's default."""
        where = shown or ("any host" if target is None else str(target))
        if self.problem is not None:
            return f"secret {self.name} is not bound to {where} ({self.problem})"
        if target is not None and not is_allowed(target.host, target.port, self.hosts):
            return f"secret {self.name} is not bound to {where}"
        return None


def binding(name: str, env: Env | None = None) -> Binding:
    """``name``'s binding, read from the environment now (the value itself is not read)."""
    variable = f"{ENV_PREFIX}{name}{HOSTS_SUFFIX}"
    try:
        raw = (env or Env()).raw(variable)
    except ImproperlyConfigured:
        return Binding(name, problem=f"{variable}_FILE cannot be read")
    if raw is None or not raw.strip():
        return Binding(name, problem=f"{variable} is not set")
    try:
        hosts = parse_allowed_hosts(raw.split(","))
    except ValueError:
        return Binding(name, problem=f"{variable} is not a list of host or host:port")
    return Binding(name, hosts)


def bindings(payload: Any, env: Env | None = None) -> tuple[Binding, ...]:
    """The binding of every secret ``payload`` references, each name once."""
    names = dict.fromkeys(name for _, name in references(payload))
    return tuple(binding(name, env) for name in names)


def refusal(
    bound: Iterable[Binding], target: Target | None, shown: str | None = None
) -> str | None:
    """The first reason why one of ``bound`` must not go to ``target``, or None."""
    for item in bound:
        reason = item.refusal(target, shown)
        if reason is not None:
            return reason
    return None


def binding_problems(payload: Any, env: Env | None = None) -> list[tuple[str, str]]:
    """(payload path, message) for every reference whose secret is not bound to the payload's
    URL (create time, in the web process). A URL that is itself a secret is known only when
    the worker reads it: then every secret only needs a list here, and the worker checks it."""
    url = payload.get("url") if isinstance(payload, dict) else None
    target: Target | None = None
    if isinstance(url, str):
        try:
            target = parse_target(url)
        except ValueError:
            return []  # the URL's own problem is reported on its field
    found: dict[str, Binding] = {}
    problems: list[tuple[str, str]] = []
    for path, name in references(payload):
        if name not in found:
            found[name] = binding(name, env)
        reason = found[name].refusal(target)
        if reason is not None:
            problems.append((path, reason))
    return problems
