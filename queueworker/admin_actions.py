"""What admin actions share: apply a service to each selected object, count the refusals."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from django.contrib import messages

from queueworker.errors import InvalidTransition

T = TypeVar("T")


def apply_each(objects: Iterable[T], action: Callable[[T], Any]) -> tuple[int, int]:
    """Run ``action`` on each object; return (done, refused by the state machine)."""
    done = refused = 0
    for obj in objects:
        try:
            action(obj)
            done += 1
        except InvalidTransition:
            refused += 1
    return done, refused


def outcome_level(refused: int) -> int:
    return messages.SUCCESS if not refused else messages.WARNING
