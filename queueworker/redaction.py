"""Redaction: the one rule that keeps secrets out of logs and API output.

``redact`` is the rule. It returns a copy of a value (any JSON-like structure, or text) with:

1. by name, at any depth of a mapping: the values of ``Authorization``,
   ``Proxy-Authorization``, ``Cookie``, ``Set-Cookie`` and ``X-Api-Key`` (any case), and every
   value under an ``auth`` key except its ``type``. A ``{"$secret": NAME}`` reference is kept:
   it names a secret, it is not one;
2. in every string: the userinfo of URLs (``https://user:pw@host`` → ``https://[REDACTED]@host``)
   and ``name: value`` / ``name=value`` / ``"name": "value"`` for those header names and for
   ``password`` and ``token``;
3. in every string: every known secret value — the ``QW_SECRET_*`` variables of this process
   (not ``QW_SECRET_*_HOSTS``: a secret's destinations are configuration, and scrubbing them
   would blank every URL of those hosts), values resolved from ``{"$secret": NAME}``
   (``register_secret``), and, while a handler runs inside ``scrubbing(values)``, the
   sensitive values of the request it is making. Each value also in its percent-encoded forms
   (``quote``, ``quote(safe="")``, ``quote_plus``), as it appears in a URL's path or query.

Two places apply it, and only these two: ``RedactingFilter`` on every log record that reaches
the configured handlers, and ``RedactedFields`` on the API output fields a serializer names.
Handlers write TaskLog rows, errors and results already redacted with the same functions.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote, quote_plus

REDACTED = "[REDACTED]"
SENSITIVE_NAMES = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"}
)
SENSITIVE_SUBTREES = frozenset({"auth"})
SUBTREE_KEEP = frozenset({"type"})
SECRET_ENV_PREFIX = "QW_SECRET_"  # noqa: S105  # a name prefix, not a secret
SECRET_HOSTS_SUFFIX = "_HOSTS"  # noqa: S105  # QW_SECRET_<NAME>_HOSTS: where it may be sent
# Shorter values would blank out ordinary text wherever they happen to occur.
MIN_SECRET_LENGTH = 4

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/?#\s@\"'<>]+@")
_NAMED = re.compile(
    r"""(?ix)
    (?<![\w-])
    (?P<name>proxy-authorization|authorization|set-cookie|cookie|x-api-key|password|token)
    (?P<sep>["']?\s*[:=]\s*)
    (?:
        (?P<quote>["'])(?:\\.|(?!(?P=quote)).)*(?P=quote)
      | [^\s"'&,;}\])][^\r\n"'&]*
    )
    """
)

_lock = threading.Lock()
_known: set[str] = set()
_known_sorted: tuple[str, ...] = ()
_env_loaded = False
_scoped: ContextVar[tuple[str, ...]] = ContextVar("qw_redaction_scoped", default=())


# --- known secret values -----------------------------------------------------------------------


def forms(value: str) -> set[str]:
    """``value`` and the forms a URL gives it: ``quote`` (path), ``quote(safe="")`` and
    ``quote_plus`` (query strings, as ``requests`` encodes ``params``)."""
    return {value, quote(value), quote(value, safe=""), quote_plus(value)}


def register_secret(value: str) -> None:
    """Scrub ``value`` (in every form of ``forms``) from everything this process logs or shows
    from now on."""
    global _known_sorted
    if not isinstance(value, str) or len(value) < MIN_SECRET_LENGTH or value in _known:
        return
    with _lock:
        _known.update(forms(value))
        _known_sorted = tuple(sorted(_known, key=len, reverse=True))


def is_secret_variable(name: str) -> bool:
    """A ``QW_SECRET_*`` variable holding a secret (or the path of a file holding one), not a
    ``QW_SECRET_<NAME>_HOSTS`` list (or the path of a file holding one)."""
    if not name.startswith(SECRET_ENV_PREFIX):
        return False
    base = name.removesuffix("_FILE")
    return not base.endswith(SECRET_HOSTS_SUFFIX)


def _load_environment() -> None:
    """Register the ``QW_SECRET_*`` values (and ``QW_SECRET_*_FILE`` contents) once."""
    global _env_loaded
    if _env_loaded:
        return
    _env_loaded = True
    for name, value in list(os.environ.items()):
        if not is_secret_variable(name):
            continue
        if name.endswith("_FILE"):
            try:
                value = Path(value).read_text().strip()
            except OSError:
                continue
        register_secret(value)


@contextmanager
def scrubbing(values: Iterable[str]) -> Iterator[None]:
    """Also scrub ``values`` (a request's own credentials) inside this block."""
    expanded = {
        form
        for v in values
        if isinstance(v, str) and len(v) >= MIN_SECRET_LENGTH
        for form in forms(v)
    }
    wanted = tuple(sorted(expanded, key=len, reverse=True))
    token = _scoped.set(_scoped.get() + wanted)
    try:
        yield
    finally:
        _scoped.reset(token)


def scrub(text: str) -> str:
    """Rule 3 only: replace every known secret value in ``text``."""
    _load_environment()
    for values in (_scoped.get(), _known_sorted):
        for value in values:
            if value in text:
                text = text.replace(value, REDACTED)
    return text


def scrub_values(value: Any) -> Any:
    """Rule 3 on every string of a structure (for response bodies, which keep their keys)."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: scrub_values(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub_values(v) for v in value]
    return value


# --- the rule ----------------------------------------------------------------------------------


def redact_text(text: str) -> str:
    """Rules 2 and 3 on one string."""
    text = scrub(text)
    if "://" in text:
        text = _USERINFO.sub(rf"\1{REDACTED}@", text)
    if ":" in text or "=" in text:  # every named form has one
        text = _NAMED.sub(_named_replacement, text)
    return text


def _named_replacement(match: re.Match[str]) -> str:
    quote = match.group("quote") or ""
    return f"{match.group('name')}{match.group('sep')}{quote}{REDACTED}{quote}"


def _is_secret_ref(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("$secret"), str)


def _hidden(value: Any) -> Any:
    return value if _is_secret_ref(value) or value is None else REDACTED


def redact(value: Any) -> Any:
    """The rule (all three parts) on any JSON-like value; returns a redacted copy."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        for key, item in value.items():
            name = key.lower() if isinstance(key, str) else key
            if name in SENSITIVE_NAMES:
                out[key] = _hidden(item)
            elif name in SENSITIVE_SUBTREES:
                out[key] = (
                    {k: (redact(v) if k in SUBTREE_KEEP else _hidden(v)) for k, v in item.items()}
                    if isinstance(item, dict) and not _is_secret_ref(item)
                    else _hidden(item)
                )
            else:
                out[key] = redact(item)
        return out
    if isinstance(value, list):
        return [redact(item) for item in value]
    if isinstance(value, tuple):
        return tuple(redact(item) for item in value)
    return value


# --- where the rule applies --------------------------------------------------------------------


class RedactingFilter(logging.Filter):
    """The one logging filter: every record leaves it with its message and traceback redacted.

    Attached to the handlers in ``settings.LOGGING``, so it sees records from every logger
    that propagates there. The arguments are redacted before formatting (so a dict argument
    loses its ``auth`` subtree), then the formatted message as text; a traceback is formatted
    here, redacted, and left in ``exc_text`` (which formatters print after the message, and
    ``JsonFormatter`` puts in its ``exc_info`` field).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.args = redact(record.args)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a bad format string: keep what logging would show
            message = f"{record.msg} {record.args!r}"
        if record.exc_info and record.exc_info[0] is not None:
            if not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None  # no formatter may format it again, unredacted
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        record.msg = redact_text(message)
        record.args = None
        return True


class RedactedFields:
    """The one serializer rule: the output fields named in ``redacted_fields`` pass ``redact``.

    Put it first among a serializer's bases::

        class TaskOutput(RedactedFields, serializers.Serializer):
            redacted_fields = ("payload", "error")
    """

    redacted_fields: ClassVar[tuple[str, ...]] = ()

    def to_representation(self, instance: Any) -> Any:
        data = super().to_representation(instance)  # type: ignore[misc]
        for name in self.redacted_fields:
            if name in data:
                data[name] = redact(data[name])
        return data
