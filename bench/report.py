"""The printed table and ``bench/results/latest.json``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.scenarios import BareResult, BulkResult, SingleResult
from bench.services import WORKER_NICE

RESULTS_DIR = Path(__file__).resolve().parent / "results"

E2E_TARGET = 1500.0  # tasks/s
RATIO_TARGET = 1.2  # QueueWorker e2e / bare Celery e2e
SINGLE_P99_TARGET_MS = 20.0
CREATION_TARGET = 3000.0  # tasks/s through the bulk endpoint, 1,000 a call


@dataclass
class Target:
    name: str
    target: str
    value: float | None
    status: str  # MET | MISSED | n/a


def targets(
    bulk: BulkResult | None,
    single: SingleResult | None,
    ratio: float | None,
    saturated: SingleResult | None = None,
) -> list[Target]:
    def judge(ok: bool | None) -> str:
        return "n/a" if ok is None else ("MET" if ok else "MISSED")

    e2e = bulk.e2e_throughput if bulk else None
    e2e_ok = None if bulk is None else bool(bulk.complete and e2e is not None and e2e >= E2E_TARGET)
    ratio_ok = None if ratio is None else bool(bulk and bulk.complete and ratio >= RATIO_TARGET)
    p99 = single.p99_ms if single else None
    single_ok = (
        None
        if single is None
        else bool(p99 is not None and not single.errors and p99 < SINGLE_P99_TARGET_MS)
    )
    busy_p99 = saturated.p99_ms if saturated else None
    busy_ok = (
        None
        if saturated is None
        else bool(
            busy_p99 is not None
            and not saturated.errors
            and busy_p99 < SINGLE_P99_TARGET_MS
            and bool(saturated.unfinished_at_end)  # the worker was still busy at the end
        )
    )
    creation = bulk.creation_rate if bulk else None
    creation_ok = None if bulk is None else bool(creation and creation >= CREATION_TARGET)
    return [
        Target(
            "bulk creation rate",
            f">= {CREATION_TARGET:,.0f} tasks/s",
            creation,
            judge(creation_ok),
        ),
        Target("end-to-end throughput", f">= {E2E_TARGET:,.0f} tasks/s", e2e, judge(e2e_ok)),
        Target("QueueWorker / bare Celery", f">= {RATIO_TARGET}x", ratio, judge(ratio_ok)),
        Target("single create p99", f"< {SINGLE_P99_TARGET_MS:.0f} ms", p99, judge(single_ok)),
        Target(
            "single create p99, worker saturated",
            f"< {SINGLE_P99_TARGET_MS:.0f} ms",
            busy_p99,
            judge(busy_ok),
        ),
    ]


def ratio_of(bulk: BulkResult | None, bare: BareResult | None) -> float | None:
    if not bulk or not bare or not bulk.e2e_throughput or not bare.e2e_throughput:
        return None
    return bulk.e2e_throughput / bare.e2e_throughput


def describe_mode(mode: dict[str, Any], concurrency: int, web_workers: int) -> list[str]:
    """The settings that decide the figures, as the service's own processes read them."""
    m = mode.get
    worker_commit = (
        "synchronous" if m("worker_sync_commit") else "async (SET synchronous_commit TO OFF)"
    )
    return [
        f"web: gunicorn queueworker.wsgi --workers {web_workers} (sync workers); API create "
        f"commit synchronous (server synchronous_commit={m('server_synchronous_commit')})",
        f"worker: nice -n {WORKER_NICE} celery -A queueworker worker -c {concurrency} -P prefork, "
        "all work queues; "
        f"prefetch multiplier {m('prefetch_multiplier')}, acks_late {m('acks_late')}, "
        f"reject_on_worker_lost {m('reject_on_worker_lost')}",
        f"broker: publisher confirms (confirm_publish) {m('confirm_publish')}; "
        f"worker commit {worker_commit} (QW_WORKER_SYNC_COMMIT={m('worker_sync_commit')})",
        f"db: CELERY_DB_REUSE_MAX {m('db_reuse_max')}, CONN_MAX_AGE {m('conn_max_age')}; "
        f"DEBUG {m('debug')}, LOG_LEVEL {m('log_level')}, "
        f"QW_THROTTLE_CREATE {m('throttle_create')}",
        f"bare Celery: nice -n {WORKER_NICE}, -c {concurrency} prefork, prefetch multiplier "
        f"{m('prefetch_multiplier')}, acks_late, "
        "confirm_publish, json, results ignored, durable classic queue bench.bare",
    ]


def _num(value: float | None, fmt: str = ",.0f", unit: str = "") -> str:
    return "—" if value is None else f"{value:{fmt}}{unit}"


def render(
    *,
    n: int,
    mode_lines: list[str],
    bulk: BulkResult | None,
    single: SingleResult | None,
    bare: BareResult | None,
    saturated: SingleResult | None = None,
) -> str:
    ratio = ratio_of(bulk, bare)
    status = {t.name: f"{t.target:<18} {t.status}" for t in targets(bulk, single, ratio, saturated)}
    rows: list[tuple[str, str, str]] = []
    if bulk:
        rows += [
            (
                "creation rate (bulk, 1,000/call)",
                f"{_num(bulk.creation_rate, unit=' tasks/s')}",
                f"{status['bulk creation rate']}; {bulk.accepted:,} in {bulk.submit_s:.2f} s",
            ),
            (
                "end-to-end throughput",
                _num(bulk.e2e_throughput, unit=" tasks/s"),
                status["end-to-end throughput"],
            ),
            (
                "create→COMPLETED p50 / p99",
                f"{_num(bulk.latency_p50_ms, ',.0f')} / {_num(bulk.latency_p99_ms, ',.0f')} ms",
                f"({bulk.completed:,} of {n:,} completed)",
            ),
        ]
    if single:
        rows.append(
            (
                "single create p50 / p99, idle",
                f"{_num(single.p50_ms, '.1f')} / {_num(single.p99_ms, '.1f')} ms",
                status["single create p99"],
            )
        )
    if saturated:
        rows.append(
            (
                "single create p50 / p99, saturated",
                f"{_num(saturated.p50_ms, '.1f')} / {_num(saturated.p99_ms, '.1f')} ms",
                f"{status['single create p99, worker saturated']}; "
                f"{saturated.unfinished_at_end or 0:,} tasks still queued at the end",
            )
        )
    if bare:
        rows.append(
            (
                "bare Celery end-to-end",
                _num(bare.e2e_throughput, unit=" tasks/s"),
                f"publish {bare.publish_rate:,.0f}/s; {bare.completed:,} of {n:,} completed",
            )
        )
        rows.append(
            (
                "QueueWorker / bare Celery",
                "—" if ratio is None else f"{ratio:.2f}x",
                status["QueueWorker / bare Celery"],
            )
        )
    width = max(len(r[0]) for r in rows) if rows else 20
    vwidth = max(len(r[1]) for r in rows) if rows else 10
    out = [f"QueueWorker benchmark: {n:,} NOOP tasks", "mode:"]
    out += [f"  {line}" for line in mode_lines]
    out.append("")
    out.append(f"  {'metric':<{width}}  {'value':>{vwidth}}  target / note")
    out.append(f"  {'-' * width}  {'-' * vwidth}  {'-' * 34}")
    for name, value, note in rows:
        out.append(f"  {name:<{width}}  {value:>{vwidth}}  {note}")
    results = (("bulk", bulk), ("single", single), ("saturated", saturated), ("bare", bare))
    for label, res in results:
        for error in (res.errors if res else [])[:10]:
            out.append(f"  ! {label}: {error}")
    if bare:
        out.append(f"  bare completion detection: {bare.completion_method}")
    return "\n".join(out)


def write_json(payload: dict[str, Any], path: Path | None = None) -> Path:
    path = path or RESULTS_DIR / "latest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def payload(
    *,
    bulk: BulkResult | None,
    single: SingleResult | None,
    bare: BareResult | None,
    saturated: SingleResult | None = None,
    **extra: Any,
) -> dict[str, Any]:
    ratio = ratio_of(bulk, bare)
    return {
        **extra,
        "bulk": asdict(bulk) if bulk else None,
        "single": asdict(single) if single else None,
        "single_saturated": asdict(saturated) if saturated else None,
        "bare": asdict(bare) if bare else None,
        "ratio_vs_bare": ratio,
        "targets": [asdict(t) for t in targets(bulk, single, ratio, saturated)],
    }
