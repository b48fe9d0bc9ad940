"""Domain errors raised by services and mapped to HTTP answers in one place (``api.py``)."""

from __future__ import annotations

from typing import Any


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
