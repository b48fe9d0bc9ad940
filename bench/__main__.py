"""``python -m bench [--tasks N] [--skip-bare] [--skip-single] [--keep] [--timeout S]``."""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
import time
import traceback
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from bench import report, scenarios, services
from bench.scenarios import Api, BareResult, BulkResult, SingleResult
from bench.services import BenchError, Isolation, Processes

CONCURRENCY = 2
WEB_WORKERS = 2
BATCH = 1000
SINGLE_REQUESTS = 500


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--tasks",
        type=int,
        default=int(os.environ.get("QW_BENCH_TASKS", "20000")),
        help="tasks for the bulk and bare scenarios (default $QW_BENCH_TASKS or 20000)",
    )
    parser.add_argument("--skip-bare", action="store_true", help="skip the bare Celery scenario")
    parser.add_argument(
        "--skip-single", action="store_true", help="skip the single create latency scenario"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the database, vhost and logs (debugging)"
    )
    parser.add_argument(
        "--prefetch",
        type=int,
        default=None,
        help="worker prefetch multiplier for both QueueWorker (QW_WORKER_PREFETCH) and bare "
        "Celery (default: the service's setting, 1)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds to wait for a scenario's tasks to finish (default max(120, N/20))",
    )
    args = parser.parse_args(argv)
    if args.tasks < 1:
        parser.error("--tasks must be at least 1")
    if args.timeout is None:
        args.timeout = max(120.0, args.tasks / 20)
    return args


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def log(message: str) -> None:
    print(message, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.prefetch is not None:
        # Read by the service's settings in every child, and by the bare app; one mode for both.
        os.environ["QW_WORKER_PREFETCH"] = str(args.prefetch)
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if inherited as ignored
    iso = Isolation()
    processes = Processes(env=iso.env, log_dir=iso.log_dir)
    bulk: BulkResult | None = None
    single: SingleResult | None = None
    saturated: SingleResult | None = None
    bare: BareResult | None = None
    mode: dict[str, Any] = {}
    mode_lines: list[str] = []
    error: str | None = None
    exit_code = 1
    log(f"bench run {iso.run_id}: vhost and database {iso.name}, logs in {iso.log_dir}")
    try:
        log("setting up: vhost, database, migrate, user and token")
        mode = iso.setup(processes)
        port = services.free_port()
        services.start_web(processes, port, workers=WEB_WORKERS)
        services.start_worker(
            processes, iso.broker_url, mode["work_queues"], iso.run_id, concurrency=CONCURRENCY
        )
        mode_lines = report.describe_mode(mode, CONCURRENCY, WEB_WORKERS)
        log("mode:\n" + "\n".join(f"  {line}" for line in mode_lines))
        api = Api(f"http://127.0.0.1:{port}", mode["token"])

        log(f"scenario bulk end to end: {args.tasks:,} NOOP tasks in calls of {BATCH:,}")
        bulk = scenarios.run_bulk(
            api,
            iso.database_url,
            args.tasks,
            batch=BATCH,
            timeout=args.timeout,
            check=processes.check_alive,
            log=log,
        )
        if not args.skip_single:
            log(f"scenario single create latency: {SINGLE_REQUESTS} sequential creates")
            single = scenarios.run_single(
                api, iso.database_url, SINGLE_REQUESTS, check=processes.check_alive
            )
            log(
                f"scenario single create latency, worker saturated: {args.tasks:,} NOOP tasks "
                f"in bulk, then {SINGLE_REQUESTS} sequential creates while they drain"
            )
            saturated = scenarios.run_single_saturated(
                api,
                iso.database_url,
                args.tasks,
                SINGLE_REQUESTS,
                batch=BATCH,
                timeout=args.timeout,
                check=processes.check_alive,
                log=log,
            )
        # The yardstick gets the machine to itself, as the service had.
        processes.stop_all()
        if not args.skip_bare:
            log(f"scenario bare Celery: {args.tasks:,} no-op tasks on queue bench.bare")
            bare = scenarios.run_bare(
                processes,
                iso.broker_url,
                args.tasks,
                timeout=args.timeout,
                concurrency=CONCURRENCY,
                log=log,
            )
        log("")
        log(
            report.render(
                n=args.tasks,
                mode_lines=mode_lines,
                bulk=bulk,
                single=single,
                saturated=saturated,
                bare=bare,
            )
        )
        incomplete = (bulk and not bulk.complete) or (bare and not bare.complete)
        exit_code = 2 if incomplete else 0
    except KeyboardInterrupt:
        error = "interrupted"
        exit_code = 130
        log("\ninterrupted: cleaning up")
    except BenchError as exc:
        error = str(exc)
        log(f"\nFAILED: {exc}")
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        log(f"\nFAILED:\n{traceback.format_exc()}")
    finally:
        processes.stop_all()
        if mode or bulk:
            mode.pop("token", None)
            path = report.write_json(
                report.payload(
                    bulk=bulk,
                    single=single,
                    saturated=saturated,
                    bare=bare,
                    run_id=iso.run_id,
                    finished_at=datetime.now(UTC).isoformat(),
                    tasks=args.tasks,
                    batch=BATCH,
                    single_requests=0 if args.skip_single else SINGLE_REQUESTS,
                    concurrency=CONCURRENCY,
                    web_workers=WEB_WORKERS,
                    mode=mode,
                    mode_description=mode_lines,
                    host={
                        "cpus": os.cpu_count(),
                        "python": platform.python_version(),
                        "platform": platform.platform(),
                    },
                    error=error,
                    exit_code=exit_code,
                )
            )
            log(f"results: {path}")
        iso.finish(keep=args.keep, succeeded=exit_code == 0, log=log)
    return exit_code


if __name__ == "__main__":
    started = time.monotonic()
    code = main()
    print(f"(bench took {time.monotonic() - started:.0f} s)", flush=True)
    sys.exit(code)
