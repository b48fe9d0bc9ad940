"""Five-field cron expressions and their next fire time in a local timezone (docs/schedules.md).

``next_fire`` walks local days and minutes itself instead of relying on celery's ``crontab``
(django-celery-beat issues #134 and #604): a local time that does not exist (spring forward)
fires at the next valid instant, one that occurs twice (fall back) fires at its first
occurrence only.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

# (name, min, max) of the five fields, in order.
FIELDS = (
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day_of_month", 1, 31),
    ("month_of_year", 1, 12),
    ("day_of_week", 0, 7),
)
SEARCH_DAYS = 366 * 9  # long enough for "29 February", short enough to end "31 February"


class CronError(ValueError):
    pass


def _parse_field(text: str, name: str, low: int, high: int) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        base, _, step_text = part.partition("/")
        try:
            step = int(step_text) if step_text else 1
            if base == "*":
                start, end = low, high
            elif "-" in base:
                a, b = base.split("-", 1)
                start, end = int(a), int(b)
            else:
                start = end = int(base)
                if step_text:
                    end = high
        except ValueError:
            raise CronError(f"{name}: '{part}' is not a number, range, list or step.") from None
        if step < 1:
            raise CronError(f"{name}: the step in '{part}' must be at least 1.")
        if not (low <= start <= high and low <= end <= high) or start > end:
            raise CronError(f"{name}: '{part}' is outside {low}-{high}.")
        values.update(range(start, end + 1, step))
    if name == "day_of_week" and 7 in values:
        values.discard(7)
        values.add(0)  # 7 is Sunday too
    return frozenset(values)


@dataclass(frozen=True)
class Cron:
    minute: frozenset[int]
    hour: frozenset[int]
    day_of_month: frozenset[int]
    month_of_year: frozenset[int]
    day_of_week: frozenset[int]  # 0 = Sunday
    dom_any: bool
    dow_any: bool
    fields: tuple[str, str, str, str, str]

    def day_matches(self, day: date) -> bool:
        if day.month not in self.month_of_year:
            return False
        dom = day.day in self.day_of_month
        dow = (day.isoweekday() % 7) in self.day_of_week
        if self.dom_any or self.dow_any:  # cron: both restricted means either one matches
            return dom and dow
        return dom or dow


def parse(expression: str) -> Cron:
    """Parse ``"m h dom mon dow"`` (numbers, ``*``, ranges, lists, steps); ``CronError`` else."""
    if not isinstance(expression, str):
        raise CronError("Must be a string of five fields.")
    parts = expression.split()
    if len(parts) != 5:
        raise CronError(f"Must have five fields (minute hour day month weekday), got {len(parts)}.")
    sets = [_parse_field(text, *spec) for text, spec in zip(parts, FIELDS, strict=True)]
    return Cron(
        minute=sets[0],
        hour=sets[1],
        day_of_month=sets[2],
        month_of_year=sets[3],
        day_of_week=sets[4],
        dom_any=parts[2] == "*",
        dow_any=parts[4] == "*",
        fields=(parts[0], parts[1], parts[2], parts[3], parts[4]),
    )


def _exists(naive: datetime, tz: ZoneInfo) -> bool:
    aware = naive.replace(tzinfo=tz, fold=0)
    return aware.astimezone(UTC).astimezone(tz).replace(tzinfo=None) == naive


def resolve(naive: datetime, tz: ZoneInfo) -> datetime:
    """The UTC instant of a local wall time: its first occurrence, or when it does not exist,
    the first valid instant after the gap (the moment the clocks jump)."""
    if _exists(naive, tz):
        return naive.replace(tzinfo=tz, fold=0).astimezone(UTC)
    # In a gap: fold=1 maps to the earliest instant, fold=0 the latest; walk minutes between.
    low = naive.replace(tzinfo=tz, fold=1).astimezone(UTC)
    high = naive.replace(tzinfo=tz, fold=0).astimezone(UTC)
    instant = low
    while instant < high and instant.astimezone(tz).replace(tzinfo=None) < naive:
        instant += timedelta(minutes=1)
    return instant


def next_fire(cron: Cron, tz: ZoneInfo, after: datetime) -> datetime | None:
    """The first fire instant (UTC) strictly after ``after``; None when there is none."""
    after_utc = after.astimezone(UTC)
    first_day = after_utc.astimezone(tz).date() - timedelta(days=1)
    hours = sorted(cron.hour)
    minutes = sorted(cron.minute)
    for offset in range(SEARCH_DAYS):
        day = first_day + timedelta(days=offset)
        if not cron.day_matches(day):
            continue
        for hour in hours:
            for minute in minutes:
                candidate = resolve(datetime.combine(day, time(hour, minute)), tz)
                if candidate > after_utc:
                    return candidate
    return None
