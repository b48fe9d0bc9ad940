"""Project-wide API pieces: JSON parsing, pagination and the one exception handler."""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from rest_framework import exceptions, status
from rest_framework.pagination import CursorPagination
from rest_framework.parsers import JSONParser
from rest_framework.response import Response

from queueworker.errors import DomainError


class SafeJSONParser(JSONParser):
    """DRF's JSON parser, plus clear 400s for input that would crash the standard one.

    Deeply nested documents raise ``RecursionError`` in ``json.loads`` (not a ``ValueError``),
    and ``NaN``/``Infinity`` are not JSON; both become a ``ParseError``.
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
            return json.loads(text, parse_constant=_reject_constant)
        except RecursionError:
            raise exceptions.ParseError(
                "JSON parse error - document is nested too deeply"
            ) from None
        except ValueError as exc:
            raise exceptions.ParseError(f"JSON parse error - {exc}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class DefaultCursorPagination(CursorPagination):
    ordering = "-created_at"
    page_size_query_param = "page_size"
    max_page_size = 500


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
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
    # Imported here: rest_framework.views reads the API settings, which name this module.
    from rest_framework.views import exception_handler as drf_exception_handler

    return drf_exception_handler(exc, context)
