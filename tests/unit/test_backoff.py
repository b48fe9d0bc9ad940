"""Exponential backoff with full jitter and a cap (``tasks_app.backoff``)."""

from __future__ import annotations

import math
import random

import pytest

from tasks_app.backoff import backoff_ceiling, backoff_delay


@pytest.mark.parametrize(
    ("retries", "expected"), [(0, 2.0), (1, 4.0), (2, 8.0), (3, 16.0), (5, 64.0)]
)
def test_ceiling_doubles_per_retry(retries, expected):
    assert backoff_ceiling(retries, base_s=2.0, cap_s=1000.0) == expected


@pytest.mark.parametrize("retries", [6, 7, 10, 30])
def test_ceiling_past_cap_equals_cap(retries):
    assert backoff_ceiling(retries, base_s=2.0, cap_s=100.0) == 100.0


def test_ceiling_is_monotonic_up_to_cap():
    ceilings = [backoff_ceiling(r, base_s=0.5, cap_s=60.0) for r in range(20)]
    assert ceilings == sorted(ceilings)
    assert ceilings[-1] == 60.0


@pytest.mark.parametrize("retries", [64, 65, 1000, 10**9])
def test_ceiling_with_huge_retries_capped_without_overflow(retries):
    ceiling = backoff_ceiling(retries, base_s=2.0, cap_s=600.0)
    assert ceiling == 600.0
    assert math.isfinite(backoff_delay(retries, base_s=2.0, cap_s=600.0))


@pytest.mark.parametrize("retries", [-1, -100])
def test_negative_retries_rejected(retries):
    with pytest.raises(ValueError, match="retries"):
        backoff_ceiling(retries, base_s=2.0, cap_s=600.0)
    with pytest.raises(ValueError, match="retries"):
        backoff_delay(retries, base_s=2.0, cap_s=600.0)


@pytest.mark.parametrize("retries", [0, 1, 3, 8, 20])
def test_full_jitter_within_zero_and_ceiling(retries):
    rng = random.Random(1234)
    ceiling = backoff_ceiling(retries, base_s=1.0, cap_s=50.0)

    delays = [backoff_delay(retries, base_s=1.0, cap_s=50.0, rng=rng) for _ in range(500)]

    assert all(0.0 <= d <= ceiling for d in delays)
    # full jitter spreads over the whole window, not just near the ceiling
    assert min(delays) < 0.1 * ceiling
    assert max(delays) > 0.9 * ceiling


def test_full_jitter_reproducible_with_seeded_rng():
    first = [backoff_delay(4, base_s=1.0, cap_s=60.0, rng=random.Random(7)) for _ in range(3)]
    second = [backoff_delay(4, base_s=1.0, cap_s=60.0, rng=random.Random(7)) for _ in range(3)]
    assert first == second
    assert first[0] == random.Random(7).uniform(0.0, 16.0)


@pytest.mark.parametrize("retries", [0, 2, 4, 12])
def test_no_jitter_equals_ceiling(retries):
    delay = backoff_delay(retries, base_s=1.5, cap_s=30.0, jitter=False, rng=random.Random(0))
    assert delay == backoff_ceiling(retries, base_s=1.5, cap_s=30.0)


def test_retry_after_honoured_over_computed_wait():
    delay = backoff_delay(0, base_s=2.0, cap_s=600.0, retry_after=45.0, rng=random.Random(0))
    assert delay == 45.0


def test_retry_after_capped():
    assert backoff_delay(0, base_s=2.0, cap_s=60.0, retry_after=3600.0) == 60.0


def test_retry_after_negative_clamped_to_zero():
    assert backoff_delay(3, base_s=2.0, cap_s=60.0, retry_after=-5.0) == 0.0
