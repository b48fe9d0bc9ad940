"""The yardstick of ``bench.data_scenario``: the same pipeline as a standalone pandas script.

``python -m bench.pandas_reference PATH.csv`` (or ``python bench/pandas_reference.py PATH.csv``)

It imports neither Django nor the service, runs in its own process (so that its peak RSS is
its own) and prints one JSON object: the seconds from ``read_csv`` to the grouped frame
(``seconds``; ``import pandas`` is in ``process_seconds`` only) and the CPU time of that
part (``cpu_seconds``, all threads),
its peak RSS (``VmHWM``, in MB of 10⁶ bytes), the row counts of each step and the aggregated groups.

The steps, vectorised as a pandas user would write them (no row loops), mirror the operations
that ``bench.data_scenario`` sends to the service:

1. read: every column as a string, nothing turned into NaN by pandas' own guesses
   (``keep_default_na=False``: ``"n/a"`` stays a string that the schema rejects);
2. validate (drop): the required columns exist and each value matches its field's schema
   ``pattern``, on the raw strings, as JSON Schema sees a CSV row: every field is a string and
   present, an empty one too (``""`` fails a pattern such as ``^[0-9]+$``, and an empty
   ``country``, which has none, is left to ``clean``);
3. clean: trim every column, lower ``email``, empty → null, drop the rows with a null
   ``country``;
4. cast: ``amount`` to float, ``age`` to a nullable integer;
5. dedupe by ``email``, keeping the first row (input order);
6. aggregate by ``country``: ``people`` (rows), ``total`` (sum of ``amount``), ``mean_age``
   (mean of ``age`` over the non-null ages).
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

# The required fields and their ``pattern`` (None: any string); bench/data_scenario.py builds
# the JSON Schema of its ``validate`` operation from this table, so the two cannot drift.
REQUIRED_PATTERNS: dict[str, str | None] = {
    "id": r"^[0-9]+$",
    "email": "@",
    "country": None,
    "amount": r"^-?[0-9]+(?:\.[0-9]+)?$",
}


def peak_rss_mb() -> float:
    """This process's peak resident set, in MB (10⁶ bytes), as the benchmark reports it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6  # the kernel's "kB" are KiB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6  # KiB on Linux


def run(path: str) -> dict[str, Any]:
    import pandas as pd

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    t_read = time.perf_counter()
    rows_in = len(frame)

    # 2. validate: a JSON Schema ``pattern`` is a search, not a full match (str.contains).
    missing = [name for name in REQUIRED_PATTERNS if name not in frame.columns]
    if missing:
        raise SystemExit(f"required columns missing from the CSV: {missing}")
    valid = pd.Series(True, index=frame.index)
    for name, pattern in REQUIRED_PATTERNS.items():
        if pattern is not None:
            valid &= frame[name].str.contains(pattern, regex=True, flags=re.ASCII)
    frame = frame[valid]
    rows_valid = len(frame)
    t_validate = time.perf_counter()

    # 3. clean
    frame = frame.apply(lambda column: column.str.strip())
    frame["email"] = frame["email"].str.lower()
    frame = frame.mask(frame == "")
    frame = frame[frame["country"].notna()]
    rows_clean = len(frame)
    t_clean = time.perf_counter()

    # 4. cast
    frame["amount"] = frame["amount"].astype("float64")
    frame["age"] = pd.to_numeric(frame["age"]).astype("Int64")
    t_cast = time.perf_counter()

    # 5. dedupe
    frame = frame.drop_duplicates(subset=["email"], keep="first")
    rows_unique = len(frame)
    t_dedupe = time.perf_counter()

    # 6. aggregate
    grouped = frame.groupby("country", sort=True).agg(
        people=("email", "size"), total=("amount", "sum"), mean_age=("age", "mean")
    )
    t_done = time.perf_counter()
    cpu_seconds = time.process_time() - cpu0

    groups = [
        {
            "country": str(country),
            "people": int(row.people),
            "total": float(row.total),
            "mean_age": None if pd.isna(row.mean_age) else float(row.mean_age),
        }
        for country, row in grouped.iterrows()
    ]
    return {
        "seconds": t_done - t0,
        "cpu_seconds": cpu_seconds,
        "steps_s": {
            "read_csv": t_read - t0,
            "validate": t_validate - t_read,
            "clean": t_clean - t_validate,
            "cast": t_cast - t_clean,
            "dedupe": t_dedupe - t_cast,
            "aggregate": t_done - t_dedupe,
        },
        "rows_in": rows_in,
        "rows_valid": rows_valid,
        "invalid": rows_in - rows_valid,
        "rows_clean": rows_clean,
        "rows_unique": rows_unique,
        "groups": groups,
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.pandas_reference PATH.csv", file=sys.stderr)
        return 2
    started = time.perf_counter()
    import pandas as pd

    imported = time.perf_counter()
    result = run(args[0])
    result.update(
        pandas=pd.__version__,
        import_seconds=imported - started,
        process_seconds=time.perf_counter() - started,
        peak_rss_mb=peak_rss_mb(),
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
