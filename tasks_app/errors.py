"""What a handler raises to say how its attempt ended (the pipeline classifies the rest)."""

from __future__ import annotations


class HandlerError(Exception):
    """Base of the errors a handler raises on purpose."""


class RetryableError(HandlerError):
    """A transient failure: try again after a backoff (or ``retry_after`` seconds)."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(HandlerError):
    """A failure that another attempt cannot fix: the task fails at once."""


class TaskCancelled(HandlerError):  # a signal, not a fault
    """Raised by ``TaskContext.check_cancelled`` when a cancel was requested."""


class Deferred(HandlerError):  # a signal, not a fault
    """The handler handed the rest of its work to other Celery tasks (DATA_PROCESSING's chord
    of batches), which finish the task under the same attempt. Until then the task stays
    PROCESSING under its lease: if they never finish, the lease expires and the sweep retries."""
