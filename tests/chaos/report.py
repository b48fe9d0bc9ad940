"""The suite's table: one row per fault, printed at the end of the session and kept as JSON.

Tests call ``record`` (before asserting, so that a broken invariant still shows in the table);
``tests/chaos/conftest.py`` prints ``render()`` in pytest's terminal summary and writes
``var/chaos-last.json`` (faults) and ``var/soak-last.json`` (the soak).
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.chaos import harness
from tests.chaos.invariants import Findings

VAR = Path(__file__).resolve().parents[2] / "var"


@dataclass
class Row:
    fault: str
    injected: int
    injected_detail: str
    tasks: int
    runs: int
    completed: int
    failed: int
    executions: int
    duplicates_executed: int
    duplicates_completed: int
    lost: int
    stuck: int
    joins_twice: int
    queues_left: int
    recovery_s: float
    wall_s: float
    passed: bool
    violations: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


ROWS: list[Row] = []
SOAK: dict[str, Any] = {}


def record(
    fault: str,
    found: Findings,
    *,
    injected: int,
    detail: str,
    wall_s: float,
    extra: dict[str, Any] | None = None,
    problems: list[str] | None = None,
) -> Row:
    """Add a fault's row; ``problems`` are the test's own failed expectations, if any."""
    violations = [*found.violations, *(problems or [])]
    row = Row(
        fault=fault,
        injected=injected,
        injected_detail=detail,
        tasks=found.tasks,
        runs=found.runs,
        completed=found.completed,
        failed=found.failed,
        executions=found.executions,
        duplicates_executed=found.duplicates_executed,
        duplicates_completed=len(found.duplicates_completed),
        lost=len(found.lost) + len(found.missing),
        stuck=len(found.stuck),
        joins_twice=len(found.joins_twice),
        queues_left=found.queues_left,
        recovery_s=found.settle_s,
        wall_s=wall_s,
        passed=not violations,
        violations=violations,
        extra=extra or {},
    )
    ROWS.append(row)
    return row


COLUMNS = (
    ("fault", "fault"),
    ("injected", "faults injected"),
    ("tasks", "tasks"),
    ("runs", "runs"),
    ("completed", "completed"),
    ("failed", "failed"),
    ("duplicates_executed", "dup. executed"),
    ("duplicates_completed", "dup. completed"),
    ("lost", "lost"),
    ("stuck", "stuck"),
    ("joins_twice", "joins ×2"),
    ("queues_left", "queued"),
    ("recovery_s", "recovery s"),
    ("wall_s", "wall s"),
    ("passed", "ok"),
)


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]


def _in_issue_order() -> list[Row]:
    """Rows by the issue's numbering of the faults, which starts each name ("2b …")."""
    return sorted(ROWS, key=lambda row: row.fault.split(" ", 1)[0])


def render_faults() -> list[str]:
    if not ROWS:
        return []
    rows = _in_issue_order()
    header = [title for _, title in COLUMNS]
    body = [[_cell(getattr(row, key)) for key, _ in COLUMNS] for row in rows]
    total = ["total", *[""] * (len(COLUMNS) - 1)]
    for index, (key, _) in enumerate(COLUMNS):
        if key in ("injected", "tasks", "runs", "completed", "failed") or key.startswith(
            ("duplicates", "lost", "stuck", "joins", "queues")
        ):
            total[index] = _cell(sum(getattr(row, key) for row in ROWS))
    total[-1] = _cell(all(row.passed for row in ROWS))
    lines = [f"chaos suite, QW_CHAOS_SCALE={harness.SCALE:g}", *_table(header, [*body, total])]
    lines.append("faults injected:")
    lines += [f"  {row.fault}: {row.injected_detail}" for row in rows]
    for row in rows:
        lines += [f"  {row.fault}: {key} = {value}" for key, value in row.extra.items()]
        lines += [f"  {row.fault}: BROKEN {violation}" for violation in row.violations]
    return lines


def render_soak() -> list[str]:
    if not SOAK:
        return []
    s = SOAK
    lines = [
        f"soak: {s['seconds']} s at a target of {s['target_rate']} tasks/s "
        f"({s['mix']}), one worker SIGKILLed at {s['kill_at_s']} s",
        f"  submitted {s['tasks']:,} tasks ({s['runs']:,} workflow runs) at "
        f"{s['submitted_rate']} tasks/s; API calls {s['api_calls']:,}, errors {s['api_errors']}; "
        + ", ".join(f"{a['call']} p50/p99 {a['p50_ms']}/{a['p99_ms']} ms" for a in s["api"]),
        f"  throughput {s['throughput']} tasks/s (first create → last completion), "
        f"drained {s['drain_s']} s after the last submission",
        f"  worker RSS {s['rss_start_mib']} → {s['rss_end_mib']} MiB "
        f"({s['rss_growth_pct']:+.1f}%, the worker not killed, with its pool)",
        f"  leases expired: {s['leases_expired_before_kill']} before the kill; after it "
        f"{s['leases_expired_killed_worker']} of the killed worker, "
        f"{s['leases_expired_live_holder']} of live processes, "
        f"{s['leases_expired_no_holder']} of no process",
        f"  completed {s['completed']:,}, failed {s['failed']}, duplicates executed "
        f"{s['duplicates_executed']}, duplicates completed {s['duplicates_completed']}, "
        f"lost {s['lost']}, stuck {s['stuck']}, joins ×2 {s['joins_twice']}, "
        f"HTTP calls {s['http_calls']:,} (repeated for a task: {s['http_repeated']}), "
        f"invariants {'ok' if s['passed'] else 'BROKEN'}",
    ]
    header = ["window (by create time)", "created", "completed/s", "p50 s", "p99 s"]
    rows = [
        [
            w["window"],
            _cell(w["created"]),
            str(w["completed_per_s"]),
            "–" if w["p50_s"] is None else str(w["p50_s"]),
            "–" if w["p99_s"] is None else str(w["p99_s"]),
        ]
        for w in s["windows"]
    ]
    lines += ["  " + line for line in _table(header, rows)]
    lines += [f"  BROKEN {violation}" for violation in s.get("violations", [])]
    return lines


def _write(name: str, payload: dict[str, Any]) -> Path:
    VAR.mkdir(exist_ok=True)
    path = VAR / name
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def write_json() -> list[Path]:
    meta = {
        "finished_at": datetime.now(UTC).isoformat(),
        "scale": harness.SCALE,
        "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    written = []
    if ROWS:
        written.append(
            _write(
                "chaos-last.json",
                {
                    **meta,
                    "passed": all(r.passed for r in ROWS),
                    "faults": [asdict(r) for r in _in_issue_order()],
                },
            )
        )
    if SOAK:
        written.append(_write("soak-last.json", {**meta, "soak": SOAK}))
    return written
