"""Fixtures shared by the unit tests of the worker's paths."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from tasks_app import dispatch


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> list[list[dispatch.Wakeup]]:
    """Every batch of wake-ups the code under test would publish to the broker (a module may
    define its own ``published`` with another shape; it then takes precedence)."""
    calls: list[list[dispatch.Wakeup]] = []

    def record(wakeups: Sequence[dispatch.Wakeup], **options: object) -> int:
        calls.append(list(wakeups))
        return len(wakeups)

    monkeypatch.setattr(dispatch, "publish", record)
    return calls
