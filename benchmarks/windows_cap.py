"""What `locksmithctl status` spends on a policy's windows, at the limits of docs/windows.md.

    .venv/bin/python benchmarks/windows_cap.py [--repeat 5]

Status asks three things of a policy's windows at one instant: ``is_open``, then
``current_window_end`` (open) or ``next_open`` (closed), starting from a fresh ``WindowSet`` as a
new process does. This times that for window sets at the caps (``MAX_WINDOWS`` entries,
``MAX_STARTS_PER_WEEK`` starts a week, long overlapping windows, a DST zone, instants on the
spring-forward and fall-back nights) and prints each as a multiple of the baseline measured in
the same run: one daily window in UTC. Before the caps, 10,000 windows made `status` take 35 s.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from locksmith.windows import MAX_STARTS_PER_WEEK, MAX_WINDOWS, parse_windows, weekly_starts

INSTANTS = (datetime(2027, 3, 28, 0, 30, tzinfo=UTC), datetime(2027, 10, 31, 0, 30, tzinfo=UTC),
            datetime(2027, 6, 2, 12, 0, tzinfo=UTC))


def status_queries(raw: list[dict[str, Any]], tz: str) -> Callable[[], None]:
    def run() -> None:
        for t in INSTANTS:
            ws = parse_windows(raw, tz)  # a fresh set: status is a new process each time
            if ws.is_open(t):
                ws.current_window_end(t)
            else:
                ws.next_open(t)
    return run


def hhmm(i: int) -> str:
    return f"{(i // 60) % 24:02d}:{i % 60:02d}"


CASES: dict[str, tuple[list[dict[str, Any]], str]] = {
    "baseline: 1 daily window, UTC": ([{"start": "04:00", "length": "1h"}], "UTC"),
    f"{MAX_WINDOWS} daily windows, 1h-167h, Berlin": (
        [{"start": hhmm(i), "length": f"{i % 167 + 1}h"} for i in range(MAX_WINDOWS)], "Europe/Berlin"),
    f"{MAX_WINDOWS} daily windows, 1m, Lord Howe": (
        [{"start": hhmm(i * 7), "length": "1m"} for i in range(MAX_WINDOWS)], "Australia/Lord_Howe"),
    "2 crons x 48 starts/day + 65 weekday windows, Berlin": (
        [{"cron": f"{i},{i + 30} * * * *", "length": f"{i + 1}h"} for i in range(2)]
        + [{"days": ["Mon", "Tue", "Wed", "Thu", "Fri"], "start": hhmm(i), "length": f"{i % 167 + 1}h"}
           for i in range(65)], "Europe/Berlin"),
    f"{MAX_WINDOWS} monthly crons, Santiago": (
        [{"cron": f"{i % 60} {i % 24} {i % 28 + 1} * *", "length": f"{i % 160 + 1}h"} for i in range(MAX_WINDOWS)],
        "America/Santiago"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    rows = []
    for name, (raw, tz) in CASES.items():
        starts = weekly_starts(parse_windows(raw, tz).windows)
        assert starts <= MAX_STARTS_PER_WEEK, name
        fn = status_queries(raw, tz)
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) / len(INSTANTS))
        rows.append((name, len(raw), starts, statistics.median(times)))
    base = rows[0][3]
    print(f"{'window set':55} {'entries':>7} {'starts/wk':>9} {'per status':>11} {'x baseline':>10}")
    for name, n, starts, t in rows:
        print(f"{name:55} {n:7d} {starts:9d} {t * 1000:9.1f}ms {t / base:10.0f}")


if __name__ == "__main__":
    main()
