"""``--chart FILE``: the rollout as a picture, drawn with matplotlib (Agg, no display needed).

Top: a Gantt chart, one row per host (grouped by group), with each group's open windows shaded
behind its rows; per host the wait for a slot (queued), the time down (power off to on) and the
time from power on to its slot's release (health checks, post-boot hooks). Failed hosts are
marked. Bottom: hosts down over time, as the independent watcher saw them, against the slot limit.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from rollout.report import Report, coordinator_label


class ChartError(RuntimeError):
    """The chart cannot be drawn (no matplotlib, or an unknown file type)."""


def draw_chart(report: Report, path: Path) -> Path:
    suffix = path.suffix.lower()
    if suffix not in (".png", ".svg"):
        raise ChartError(f"{path}: the chart is written as PNG or SVG; name the file *.png or *.svg")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.dates as mdates
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ChartError("--chart needs matplotlib: pip install 'coreupdate[simulate]'") from exc

    start = report.start

    def at(seconds: float) -> float:
        return mdates.date2num(start + timedelta(seconds=seconds))

    end = report.virtual_total
    rows = sorted(report.rows, key=lambda r: (r.group, r.name))
    n = len(rows)
    height = min(9.0, 3.0 + 0.09 * n)
    fig, (gantt, down) = plt.subplots(2, 1, figsize=(12, height + 2.2), sharex=True,
                                      gridspec_kw={"height_ratios": [height, 2.2]})
    # Windows, per group, behind that group's rows.
    y = 0
    ticks: list[tuple[float, str]] = []
    for group in dict.fromkeys(r.group for r in rows):
        members = [r for r in rows if r.group == group]
        for a, b in report.window_spans.get(group, []):
            gantt.add_patch(matplotlib.patches.Rectangle((at(a), y - 0.5), at(b) - at(a), len(members),
                                                         color="#d8f0d8", zorder=0, linewidth=0))
        ticks.append((y + len(members) / 2 - 0.5, group))
        y += len(members)
    for i, r in enumerate(rows):
        spans = r.queued_intervals or ([(r.queued, r.granted)] if r.queued is not None and r.granted is not None
                                       else [])
        for a, b in spans:
            if b > a:
                gantt.broken_barh([(at(a), at(b) - at(a))], (i - 0.3, 0.6), color="#c9d6ea", zorder=1)
        for a, b in r.down_intervals:
            b2 = b if b is not None else end
            gantt.broken_barh([(at(a), max(at(b2) - at(a), 1e-6))], (i - 0.4, 0.8), color="#d62728", zorder=2)
        last_up = r.down_intervals[-1][1] if r.down_intervals else None
        if last_up is not None and r.released is not None and r.released > last_up:
            gantt.broken_barh([(at(last_up), at(r.released) - at(last_up))], (i - 0.3, 0.6),
                              color="#ff9f40", zorder=2)
        if r.failed is not None:
            gantt.plot([at(r.failed)], [i], marker="x", color="black", markersize=4, zorder=3)
    gantt.set_ylim(n - 0.5, -0.5)
    if n <= 60:
        gantt.set_yticks(range(n), [r.name for r in rows], fontsize=6)
    else:
        gantt.set_yticks([t for t, _ in ticks], [g for _, g in ticks], fontsize=8)
    gantt.set_ylabel("hosts")
    ratio = f", makespan/ideal {report.ratio:.3f}" if report.ratio is not None else ""
    gantt.set_title(f"{report.hosts} hosts, {coordinator_label(report.coordinator)}, release {report.release}: "
                    f"{report.outcome}{ratio}", fontsize=10)
    from matplotlib.patches import Patch

    gantt.legend(handles=[Patch(color="#d8f0d8", label="window open"), Patch(color="#c9d6ea", label="queued"),
                          Patch(color="#d62728", label="down (rebooting)"),
                          Patch(color="#ff9f40", label="up, until slot released")],
                 loc="upper right", fontsize=7, framealpha=0.9)
    # Hosts down over time (a step function) against the slot limit.
    xs, ys = [], []
    for t, count in report.down_series:
        xs.append(at(t))
        ys.append(count)
    xs.append(at(end + max(0.03 * end, 900.0)))
    ys.append(ys[-1] if ys else 0)
    down.step(xs, ys, where="post", color="#d62728", label="hosts down (watcher)")
    down.axhline(report.slot_limit, color="black", linestyle="--", linewidth=1, label=f"slots ({report.slot_limit})")
    down.set_ylim(0, max(report.slot_limit, max(ys, default=0)) + 1)
    down.set_ylabel("down")
    down.legend(loc="upper right", fontsize=7)
    down.xaxis.set_major_formatter(mdates.DateFormatter("%a %H:%M"))
    # A margin on the right, so the last reboots are not cut by the frame.
    down.set_xlim(at(0), at(end + max(0.03 * end, 900.0)))
    down.set_xlabel("virtual time (UTC)")
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=110 if suffix == ".png" else None)
    plt.close(fig)
    return path
