"""Project-wide API pieces: JSON parsing, OPTIONS, pagination, the create throttle and the one
exception handler."""

from __future__ import annotations

import json
from typing import Any

import kombu.exceptions
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.db.models import ProtectedError, RestrictedError
from rest_framework import exceptions, status
from rest_framework.metadata import SimpleMetadata
from rest_framework.pagination import CursorPagination
from rest_framework.parsers import JSONParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import ScopedRateThrottle

from queueworker.errors import DomainError


class SafeJSONParser(JSONParser):
    """DRF's JSON parser, plus clear 400s for input that would crash the standard one.

    Deeply nested documents raise ``RecursionError`` in ``json.loads`` (not a ``ValueError``),
    and ``NaN``/``Infinity`` are not JSON; both become a ``ParseError``. So do strings that
    PostgreSQL cannot store: ``\\u0000`` (jsonb and text refuse NUL) and lone surrogates such as
    ``\\ud800`` (not encodable as UTF-8); they would fail at the insert, as a 500.
    """

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        parser_context = parser_context or {}
        encoding = parser_context.get("encoding", settings.DEFAULT_CHARSET)
        try:
            raw = stream.read() if stream is not None else b""
        except RequestDataTooBig:
            raise
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError as exc:
            raise exceptions.ParseError(f"JSON parse error - body is not {encoding}") from exc
        try:
            document = json.loads(text, parse_constant=_reject_constant)
        except RecursionError:
            raise exceptions.ParseError(
                "JSON parse error - document is nested too deeply"
            ) from None
        except ValueError as exc:
            raise exceptions.ParseError(f"JSON parse error - {exc}") from None
        if "\\u" in text:  # NUL and surrogates can only arrive as \u escapes
            where = _unstorable_string(document)
            if where is not None:
                raise exceptions.ParseError(
                    f"JSON parse error - {where}: NUL (\\u0000) and unpaired surrogates "
                    "are not allowed in strings"
                )
        return document


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _storable(text: str) -> bool:
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unstorable_string(document: Any) -> str | None:
    """The JSON path of the first key or string PostgreSQL cannot store, or None.

    Iterative: a document that ``json.loads`` accepted may still be deeper than Python's
    recursion limit leaves room for.
    """
    stack: list[tuple[str, Any]] = [("$", document)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if not _storable(value):
                return path
        elif isinstance(value, dict):
            for key, item in value.items():
                if not _storable(key):
                    return path
                stack.append((f"{path}.{key}", item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{index}]", item) for index, item in enumerate(value))
    return None


class SchemaMetadata(SimpleMetadata):
    """OPTIONS: the view's name, description and media types; the bodies are in /api/schema/.

    DRF's default also describes the fields of the view's ``serializer_class``. These views
    have none (each command declares its own input serializer), so that answered a 500.
    """

    def determine_actions(self, request: Request, view: Any) -> dict[str, Any]:
        return {}


class CreateThrottle(ScopedRateThrottle):
    """``QW_THROTTLE_CREATE`` per user on the view's ``throttled_actions`` (task and run
    creation share it; a bulk call counts once). Off when unset.

    The rate is read from the settings at each request rather than from DRF's
    ``DEFAULT_THROTTLE_RATES``, which DRF copies once at import.
    """

    def allow_request(self, request: Request, view: Any) -> bool:
        if getattr(view, "action", None) not in getattr(view, "throttled_actions", ()):
            return True
        return super().allow_request(request, view)

    def get_rate(self) -> str | None:
        rate: str | None = settings.QW_THROTTLE_CREATE
        return rate


class DefaultCursorPagination(CursorPagination):
    ordering = "-created_at"
    page_size_query_param = "page_size"
    max_page_size = 500


# An error answer stays small whatever the input: a message that quotes the input (a JSON Schema
# error quotes the whole instance) is cut at MAX_MESSAGE_CHARS, and a field with more than
# MAX_ERRORS errors (one per unknown key of a large payload) shows the first ones and a count.
MAX_MESSAGE_CHARS = 500
MAX_ERRORS = 100
MORE = "…"  # the key, in a dict of errors, of the count of those not shown


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    response = _handle(exc, context)
    if response is not None:
        response.data = _shortened(response.data)
    return response


def _handle(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, DomainError):
        detail = exc.detail
        if isinstance(detail, str):
            detail = {"detail": detail}
        return Response(detail, status=exc.status_code)
    if isinstance(exc, RequestDataTooBig):
        limit = settings.QW_MAX_PAYLOAD_BYTES
        return Response(
            {"detail": f"Request body exceeds the limit of {limit} bytes (QW_MAX_PAYLOAD_BYTES)."},
            status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
        )
    if isinstance(exc, ProtectedError | RestrictedError):
        return Response({"detail": _still_referenced(exc)}, status=status.HTTP_409_CONFLICT)
    if isinstance(exc, kombu.exceptions.OperationalError):
        return Response(
            {"detail": "The message broker is unavailable; try again later."},
            status=status.HTTP_503_SERVICE_UNAVAILABLE,
        )
    # Imported here: rest_framework.views reads the API settings, which name this module.
    from rest_framework.views import exception_handler as drf_exception_handler

    return drf_exception_handler(exc, context)


def _shortened(data: Any) -> Any:
    if isinstance(data, str) and len(data) > MAX_MESSAGE_CHARS:
        cut = data[: MAX_MESSAGE_CHARS - 1] + "…"
        code = getattr(data, "code", None)
        return exceptions.ErrorDetail(cut, code) if code is not None else cut
    if isinstance(data, dict):
        shown = {key: _shortened(value) for key, value in list(data.items())[:MAX_ERRORS]}
        if len(data) > MAX_ERRORS:
            shown[MORE] = [f"{len(data) - MAX_ERRORS} more errors not shown."]
        return shown
    if isinstance(data, list):
        listed = [_shortened(value) for value in data[:MAX_ERRORS]]
        if len(data) > MAX_ERRORS:
            listed.append(f"{MORE} {len(data) - MAX_ERRORS} more errors not shown.")
        return listed
    return data


def _still_referenced(exc: ProtectedError | RestrictedError) -> str:
    """A delete refused by a protected foreign key, said without naming the models' internals."""
    objects = exc.protected_objects if isinstance(exc, ProtectedError) else exc.restricted_objects
    counts: dict[str, int] = {}
    for obj in objects:
        meta = obj._meta
        counts[str(meta.verbose_name)] = counts.get(str(meta.verbose_name), 0) + 1
    said = ", ".join(f"{n} {name}{'' if n == 1 else 's'}" for name, n in sorted(counts.items()))
    return f"Cannot delete it: it is referenced by {said or 'other objects'}."
