"""Domain errors raised by services and mapped to HTTP answers in one place (``api.py``), and
the JSON answers under ``/api/`` for what never reaches a view (``handler404`` and co.)."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from rest_framework import exceptions


class DomainError(Exception):
    """Base class: a refusal that leaves everything unchanged."""

    status_code = 400

    def __init__(self, detail: Any) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidInput(DomainError):
    """Input that fails a domain rule; ``detail`` is DRF's nested field-error shape."""

    status_code = 400


class InvalidTransition(DomainError):
    """The object is not in a state that allows the action (a 409)."""

    status_code = 409


class Conflict(DomainError):
    """The request conflicts with an earlier one (an idempotency key reused with another body)."""

    status_code = 409


class Gone(DomainError):
    """The object existed but has expired (a stored result past its TTL): a 410."""

    status_code = 410


# --- Answers Django gives outside any API view ---------------------------------------------------
# An unknown URL, or an exception no view handled, reaches Django's handlers, whose pages are
# HTML. Under /api/ every answer is JSON in DRF's shape; elsewhere (the admin) the pages stay.


def _is_api(request: HttpRequest) -> bool:
    return request.path_info.startswith("/api/")


def bad_request(request: HttpRequest, exception: Exception) -> HttpResponse:
    if _is_api(request):
        return JsonResponse({"detail": "Bad request."}, status=400)  # e.g. a disallowed Host
    return defaults.bad_request(request, exception)


def permission_denied(request: HttpRequest, exception: Exception) -> HttpResponse:
    if _is_api(request):
        detail = str(exceptions.PermissionDenied.default_detail)
        return JsonResponse({"detail": detail}, status=403)
    return defaults.permission_denied(request, exception)


def page_not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    if _is_api(request):
        return JsonResponse({"detail": str(exceptions.NotFound.default_detail)}, status=404)
    return defaults.page_not_found(request, exception)


def server_error(request: HttpRequest) -> HttpResponse:
    if _is_api(request):
        detail = str(exceptions.APIException.default_detail)
        return JsonResponse({"detail": detail}, status=500)
    return defaults.server_error(request)
