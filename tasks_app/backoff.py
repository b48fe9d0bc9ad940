"""Exponential backoff with full jitter and a cap (docs/concepts.md)."""

from __future__ import annotations

import random


def backoff_ceiling(retries: int, *, base_s: float, cap_s: float) -> float:
    """``min(cap, base × 2^retries)``: the longest wait before retry number ``retries + 1``."""
    if retries < 0:
        raise ValueError("retries must be >= 0")
    # 2**retries grows without bound; past 2**64 the cap has long been reached.
    return min(cap_s, base_s * float(2 ** min(retries, 64)))


def backoff_delay(
    retries: int,
    *,
    base_s: float,
    cap_s: float,
    jitter: bool = True,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before the next attempt.

    With ``jitter`` the wait is uniform in ``[0, ceiling]`` ("full jitter"), which spreads a
    burst of failures across the whole window; without it the wait is the ceiling itself.
    A server's ``retry_after`` wins over the computed wait but never exceeds the cap.
    """
    if retries < 0:
        raise ValueError("retries must be >= 0")
    if retry_after is not None:
        return max(0.0, min(cap_s, retry_after))
    ceiling = backoff_ceiling(retries, base_s=base_s, cap_s=cap_s)
    if not jitter:
        return ceiling
    return (rng or random).uniform(0.0, ceiling)
