"""Request ids, and the request body limit answered as JSON 413 before parsing (docs/api.md).

``RequestIdMiddleware`` gives every request an id: the caller's ``X-Request-ID`` when it is
1–128 characters of ``[A-Za-z0-9._-]``, else a new one (uuid4 hex). It is bound to the request's
log lines, returned in the response's ``X-Request-ID``, and carried into the tasks the request
creates (their wake-up message's ``metadata`` and their ``created`` log row).

Django checks ``DATA_UPLOAD_MAX_MEMORY_SIZE`` only when ``request.body`` or ``request.POST``
is read; DRF's parsers read the raw stream and would let a large JSON body through. This
middleware enforces ``QW_MAX_PAYLOAD_BYTES`` on the declared length and, for chunked bodies
without one, on the bytes actually read.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse

from queueworker import logcontext


class RequestIdMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        given = request.headers.get(logcontext.REQUEST_ID_HEADER)
        request_id = logcontext.valid_request_id(given) or uuid.uuid4().hex
        with logcontext.bind(request_id=request_id):
            response = self.get_response(request)
        response[logcontext.REQUEST_ID_HEADER] = request_id
        return response


def too_large_response() -> JsonResponse:
    limit = settings.QW_MAX_PAYLOAD_BYTES
    return JsonResponse(
        {"detail": f"Request body exceeds the limit of {limit} bytes (QW_MAX_PAYLOAD_BYTES)."},
        status=413,
    )


class BodySizeLimitMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        limit = settings.QW_MAX_PAYLOAD_BYTES
        declared = request.META.get("CONTENT_LENGTH")
        try:
            length = int(declared) if declared else None
        except ValueError:
            return JsonResponse({"detail": "Invalid Content-Length header."}, status=400)
        if length is not None and length > limit:
            return too_large_response()
        if length is None and "chunked" in request.META.get("HTTP_TRANSFER_ENCODING", "").lower():
            # Django bounds request.read() by Content-Length (absent here): read the server's
            # stream, which gunicorn terminates at the end of the chunked body.
            meta = request.META
            source = meta["wsgi.input"] if meta.get("wsgi.input_terminated") else request
            try:
                body = source.read(limit + 1)
            except RequestDataTooBig:
                return too_large_response()
            if len(body) > limit:
                return too_large_response()
            request._body = body  # type: ignore[attr-defined]  # Django's cached body
            request._stream = io.BytesIO(body)  # type: ignore[attr-defined]
            meta["CONTENT_LENGTH"] = str(len(body))  # DRF parses no body of unknown length
        try:
            return self.get_response(request)
        except RequestDataTooBig:
            return too_large_response()
