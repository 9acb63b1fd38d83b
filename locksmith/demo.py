"""``python -m locksmith.demo`` (``make demo``): many nodes contending for a few reboot slots.

Starts an embedded etcd, sets the group's max, and lets ``--nodes`` nodes (each its own
``Semaphore`` on its own etcd connection, ids ``node-01``...) wait for a slot, hold it for a
short random time and release it. A watch on the group shows every holder change as it happens,
with the same rendering as ``locksmithctl status``: redrawn in place on a terminal, one line per
change (and the full status now and then) otherwise. It ends with a summary and exits 0 only if
every node got its turn and no more than max nodes ever held a slot at one revision.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

import click

from locksmith.cli.status import group_status, render_status
from locksmith.embedded import EmbeddedEtcd
from locksmith.errors import LocksmithError
from locksmith.etcd import Etcd, EtcdConfig
from locksmith.keys import DEFAULT_PREFIX, Layout
from locksmith.log import configure
from locksmith.semaphore import Semaphore

# On a pipe the full status is printed every this many holder changes, so a log stays readable.
_PLAIN_STATUS_EVERY = 10
_TTY_EVENTS_SHOWN = 8


@dataclass(frozen=True)
class DemoResult:
    nodes: int
    slots: int
    cycles: int            # lock/unlock cycles completed (one per node)
    max_concurrent: int    # most holders at any one revision, as the watch saw them
    elapsed: float

    @property
    def ok(self) -> bool:
        return self.cycles == self.nodes and 0 < self.max_concurrent <= self.slots

    def summary(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        return (
            f"{verdict}: {self.cycles} lock/unlock cycles by {self.nodes} nodes through {self.slots} slots "
            f"in {self.elapsed:.1f}s; max concurrent holders observed: {self.max_concurrent} (limit {self.slots})"
        )


class _Screen:
    """Shows holder changes: in-place redraw on a terminal, appended lines on a pipe."""

    def __init__(self, out: TextIO, tty: bool) -> None:
        self.out = out
        self.tty = tty
        self.events: collections.deque[str] = collections.deque(maxlen=_TTY_EVENTS_SHOWN)
        self.changes = 0
        self.status_printed_at = -1  # the change after which a pipe last got the full status

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def show(self, title: str, event_lines: list[str], status_text: str) -> None:
        self.changes += 1
        if self.tty:
            self.events.extend(event_lines)
            frame = [title, "", status_text, "", *self.events]
            # Home, rewrite each line clearing its tail, clear below: no flicker, no scrolling.
            self.write("\x1b[H" + "".join(f"{line}\x1b[K\n" for line in frame) + "\x1b[J")
        else:
            text = "\n".join(event_lines) + "\n"
            if self.changes % _PLAIN_STATUS_EVERY == 0:
                text += "\n" + status_text + "\n\n"
                self.status_printed_at = self.changes
            self.write(text)

    def final(self, status_text: str) -> None:
        if self.tty:
            self.write("\n")
        elif self.status_printed_at != self.changes:
            self.write("\n" + status_text + "\n\n")


async def _watch_holders(
    etcd: Etcd, layout: Layout, prefix: str, screen: _Screen, title: Callable[[], str], slots: int,
    expect_releases: int, max_seen: list[int], all_released: asyncio.Event, t0: float,
) -> None:
    # Holders and queue are followed from the watch itself, so each line's counts are exact at
    # its revision; the status rendering is read afterwards and may be a moment newer.
    kvs, rev = await etcd.get_prefix(layout.base)
    holders = {kv.key.removeprefix(layout.holders) for kv in kvs if kv.key.startswith(layout.holders)}
    queue = {kv.key.removeprefix(layout.queue) for kv in kvs if kv.key.startswith(layout.queue)}
    releases = 0
    async for batch in etcd.watch_prefix(layout.base, start_revision=rev + 1):
        lines: list[str] = []
        # Count per revision: the events of one transaction happen at once.
        for _rev, events in itertools.groupby(batch.events, key=lambda e: e.kv.mod_revision):
            changes = []
            for ev in events:
                key = ev.kv.key
                if key.startswith(layout.queue):
                    hid = key.removeprefix(layout.queue)
                    (queue.discard if ev.kind == "delete" else queue.add)(hid)
                    continue
                if not key.startswith(layout.holders):
                    continue
                hid = key.removeprefix(layout.holders)
                if ev.kind == "delete":
                    if hid in holders:
                        holders.discard(hid)
                        releases += 1
                        changes.append(f"- {hid} released")
                elif hid not in holders:
                    holders.add(hid)
                    changes.append(f"+ {hid} locked")
            max_seen[0] = max(max_seen[0], len(holders))
            stamp = f"[{time.monotonic() - t0:5.1f}s]"
            lines += [f"{stamp} {c:<18} held {len(holders)}/{slots}, waiting {len(queue)}" for c in changes]
        if lines:
            st = await group_status(etcd, layout.group, prefix)
            screen.show(title(), lines, render_status(st, max_queue=5))
        if releases >= expect_releases:
            all_released.set()
            return


async def _node(
    cfg: EtcdConfig, group: str, prefix: str, node_id: str, hold: float, start_delay: float, done: list[int],
) -> None:
    await asyncio.sleep(start_delay)
    async with await Etcd.connect(cfg) as etcd:
        sem = Semaphore(etcd, group, prefix=prefix)
        try:
            await sem.lock(node_id, reason="demo: reboot after update")
            await asyncio.sleep(hold)  # "rebooting"
            if await sem.unlock(node_id):
                done[0] += 1
        finally:
            await sem.close()


async def run_demo(
    cfg: EtcdConfig, *, nodes: int = 20, slots: int = 3, hold: tuple[float, float] = (2.0, 4.5),
    group: str = "demo", prefix: str = DEFAULT_PREFIX, out: TextIO | None = None, tty: bool | None = None,
    seed: int | None = None,
) -> DemoResult:
    """Run the contention demo against the etcd at ``cfg``; returns what was observed."""
    out = out or sys.stdout
    if tty is None:
        tty = out.isatty()
    rng = random.Random(seed)
    layout = Layout(group, prefix)
    screen = _Screen(out, tty)
    t0 = time.monotonic()
    max_seen = [0]
    done = [0]
    all_released = asyncio.Event()

    def title() -> str:
        return (f"locksmith demo: {nodes} nodes, {slots} slots, group {group!r}  "
                f"[{time.monotonic() - t0:5.1f}s, {done[0]}/{nodes} done]")

    async with await Etcd.connect(cfg) as etcd:
        admin = Semaphore(etcd, group, prefix=prefix)
        try:
            await admin.set_max(slots)
        finally:
            await admin.close()
        if tty:
            screen.write("\x1b[2J")
        else:
            screen.write(title() + "\n")
        watcher = asyncio.create_task(_watch_holders(
            etcd, layout, prefix, screen, title, slots, nodes, max_seen, all_released, t0,
        ))
        workers = [
            asyncio.create_task(_node(cfg, group, prefix, f"node-{i:02d}", rng.uniform(*hold),
                                      rng.uniform(0, 0.5), done))
            for i in range(1, nodes + 1)
        ]
        released = asyncio.create_task(all_released.wait())
        try:
            await asyncio.gather(*workers)
            # The watch may trail the last unlock by a moment; wait for it, not for a timeout.
            await asyncio.wait([watcher, released], return_when=asyncio.FIRST_COMPLETED)
            if watcher.done():
                watcher.result()  # re-raise what stopped it
        finally:
            tasks = [*workers, watcher, released]
            for t in tasks:
                t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)
        final = render_status(await group_status(etcd, group, prefix), max_queue=5)
    screen.final(final)
    return DemoResult(nodes, slots, done[0], max_seen[0], time.monotonic() - t0)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--nodes", type=click.IntRange(1, 200), default=20, show_default=True)
@click.option("--slots", type=click.IntRange(1, 50), default=3, show_default=True)
@click.option("--hold-min", type=click.FloatRange(0), default=2.0, show_default=True, help="Seconds.")
@click.option("--hold-max", type=click.FloatRange(0), default=4.5, show_default=True, help="Seconds.")
@click.option("--seed", type=int, help="Random seed, for a repeatable run.")
@click.option("--plain", is_flag=True, help="Append lines even on a terminal (no in-place redraw).")
def main(nodes: int, slots: int, hold_min: float, hold_max: float, seed: int | None, plain: bool) -> None:
    """Contention demo: NODES nodes share SLOTS reboot slots in an embedded etcd."""
    if hold_max < hold_min:
        raise click.BadParameter("--hold-max must be >= --hold-min")
    configure("WARNING")
    tty = sys.stdout.isatty() and not plain
    try:
        with EmbeddedEtcd() as server:
            result = asyncio.run(run_demo(
                server.config(), nodes=nodes, slots=slots, hold=(hold_min, hold_max), seed=seed, tty=tty,
            ))
    except LocksmithError as exc:
        click.echo(f"demo: error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("demo: interrupted", err=True)
        sys.exit(130)
    click.echo(result.summary())
    sys.exit(0 if result.ok else 1)


if __name__ == "__main__":
    main()
