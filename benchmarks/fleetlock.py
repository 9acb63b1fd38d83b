"""FleetLock server benchmark: requests per second and latency of pre-reboot and steady-state,
next to the etcd floor measured in the same run.

    .venv/bin/python benchmarks/fleetlock.py [--requests 1000] [--concurrency 1,16] [--json]

It starts its own single-member EmbeddedEtcd *with* fsync (every commit waits for the WAL, as in
production) and one server replica as its own process (``locksmithctl fleetlock serve``); the
load comes from this process over real HTTP (aiohttp, one keep-alive connection per concurrent
client). Each row is ``--requests`` requests at each concurrency:

- ``pre-reboot grant`` and ``steady-state release``, measured together: each client takes a free
  slot (a new id each time; one range read of the group, one transaction with the holder key and
  the audit entry) and releases it at once (the semaphore's unlock: a range read, one
  transaction with its audit entry), ``--requests / 2`` times in all, so both rows show the same
  rate (cycles per second) and each its own latency. At most ``c`` slots are held at a time;
- ``pre-reboot held``: a holder asking again (the protocol's recursive lock), in a group of 10
  holders: one read, no write;
- ``pre-reboot refused``: a full group (no_slot): one read and a lease keep-alive (the host's
  place in line; its first refusal also wrote the queue key, done before timing);
- ``steady-state not held``: one read, no write.

The floor, measured from this process straight to etcd without HTTP: ``etcd read`` (the range
read each request starts with) and ``etcd read+txn`` (that read, then a grant-shaped transaction:
compares on the holder key and the holders range, put holder + put audit entry). The ratio column
is the server's rate over the floor of the same kind of work at the same concurrency: read-only
rows over ``etcd read``; the grant/release cycle (two requests, each a read and a transaction)
as twice its rate over ``etcd read+txn``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from locksmith.embedded import EmbeddedEtcd, _free_ports
from locksmith.etcd import Etcd, Put, absent, unchanged_since
from locksmith.keys import Layout
from locksmith.policy import parse_policy_text
from locksmith.policystore import apply_policy

PREFIX = "bench/"
HEADERS = {"fleet-lock-protocol": "true"}
LOCKSMITHCTL = str(Path(sys.executable).with_name("locksmithctl"))


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s)) - 1))]


async def _run(n: int, concurrency: int, op: Callable[[int], Awaitable[None]]) -> dict[str, float]:
    latencies: list[float] = []
    next_i = 0

    async def worker() -> None:
        nonlocal next_i
        while next_i < n:
            i = next_i
            next_i += 1
            t = time.perf_counter()
            await op(i)
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {"requests": n, "per_s": n / elapsed, "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": _pct(latencies, 99) * 1000}


def _body(node_id: str, group: str) -> bytes:
    return json.dumps({"client_params": {"id": node_id, "group": group}}).encode()


async def bench(requests: int, concurrencies: list[int]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    with EmbeddedEtcd(unsafe_no_fsync=False) as server:
        etcd = await Etcd.connect(server.config())
        port = _free_ports(1)[0]
        proc = await asyncio.create_subprocess_exec(
            LOCKSMITHCTL, "--endpoint", server.endpoints[0], "--prefix", PREFIX, "fleetlock", "serve",
            "--listen", f"127.0.0.1:{port}", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        base = f"http://127.0.0.1:{port}"
        drain: asyncio.Task[None] | None = None
        try:
            assert proc.stderr is not None
            async with asyncio.timeout(60):  # the replica's start: its "listening" log line
                while b"fleetlock_listening" not in (line := await proc.stderr.readline()):
                    if not line:
                        raise RuntimeError("the server did not start")

            async def discard(stream: asyncio.StreamReader) -> None:
                while await stream.read(1 << 16):
                    pass

            drain = asyncio.create_task(discard(proc.stderr))
            for group, toml in (("big", "slots = 10000"), ("full", "slots = 1"), ("ten", "slots = 10")):
                await apply_policy(etcd, parse_policy_text(f'format_version = 1\ngroup = "{group}"\n{toml}'),
                                   prefix=PREFIX)
            connector = aiohttp.TCPConnector(limit=max(concurrencies))
            async with aiohttp.ClientSession(connector=connector) as session:
                async def post(path: str, node_id: str, group: str, expect: int) -> None:
                    async with session.post(f"{base}{path}", data=_body(node_id, group), headers=HEADERS) as r:
                        await r.read()
                        if r.status != expect:
                            raise RuntimeError(f"{path} {node_id}: HTTP {r.status}, expected {expect}")

                await post("/v1/pre-reboot", "holder", "full", 200)
                for i in range(10):
                    await post("/v1/pre-reboot", f"t-{i}", "ten", 200)
                layout = Layout("big", PREFIX)
                for c in concurrencies:
                    tag = f"c{c}"

                    async def floor_read(i: int) -> None:
                        await etcd.get_prefix(layout.base)

                    async def floor_txn(i: int, tag: str = tag) -> None:
                        key = f"{layout.holders}floor-{tag}-{i}"
                        _, rev = await etcd.get_prefix(layout.base)
                        await etcd.txn([absent(key), unchanged_since(layout.holders + "floor-", rev)],
                                       [Put(key, b"{}"), Put(f"{PREFIX}audit/floor/{tag}-{i}", b"{}")])

                    rows.append({"row": "etcd read", "c": c, **await _run(requests, c, floor_read)})
                    rows.append({"row": "etcd read+txn", "c": c, **await _run(requests, c, floor_txn)})
                    await etcd.delete(f"{layout.holders}floor-", prefix=True)
                    await etcd.delete(f"{PREFIX}audit/floor/", prefix=True)

                    async def grant(i: int, tag: str = tag) -> None:
                        await post("/v1/pre-reboot", f"h-{tag}-{i}", "big", 200)


                    async def held(i: int) -> None:
                        await post("/v1/pre-reboot", f"t-{i % 10}", "ten", 200)

                    async def release(i: int, tag: str = tag) -> None:
                        await post("/v1/steady-state", f"h-{tag}-{i}", "big", 200)

                    async def not_held(i: int, tag: str = tag) -> None:
                        await post("/v1/steady-state", f"n-{tag}-{i}", "big", 200)

                    async def refused(i: int, tag: str = tag) -> None:
                        await post("/v1/pre-reboot", f"q-{tag}-{i % 50}", "full", 409)

                    grant_ms: list[float] = []
                    release_ms: list[float] = []

                    async def cycle(i: int, grant_ms: list[float] = grant_ms,
                                    release_ms: list[float] = release_ms) -> None:
                        t = time.perf_counter()
                        await grant(i)
                        grant_ms.append((time.perf_counter() - t) * 1000)
                        t = time.perf_counter()
                        await release(i)
                        release_ms.append((time.perf_counter() - t) * 1000)

                    both = await _run(requests // 2, c, cycle)
                    for name, ms in (("pre-reboot grant", grant_ms), ("steady-state release", release_ms)):
                        rows.append({"row": name, "c": c, "requests": len(ms), "per_s": both["per_s"],
                                     "p50_ms": statistics.median(ms), "p99_ms": _pct(ms, 99)})
                    rows.append({"row": "pre-reboot held", "c": c, **await _run(requests, c, held)})
                    rows.append({"row": "steady-state not held", "c": c, **await _run(requests, c, not_held)})
                    for i in range(50):  # their places in line, written before timing
                        await refused(i)
                    rows.append({"row": "pre-reboot refused", "c": c, **await _run(requests, c, refused)})
        finally:
            proc.terminate()
            try:
                async with asyncio.timeout(15):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
            if drain is not None:
                drain.cancel()
            await etcd.close()
    floor = {(r["row"], r["c"]): r["per_s"] for r in rows if r["row"].startswith("etcd")}
    for r in rows:
        if r["row"].startswith("etcd"):
            continue
        if r["row"] in ("pre-reboot grant", "steady-state release"):
            # a cycle is two requests, each a read and a transaction: against two floor operations
            r["vs_floor"] = 2 * r["per_s"] / floor[("etcd read+txn", r["c"])]
        else:
            r["vs_floor"] = r["per_s"] / floor[("etcd read", r["c"])]
    return {"requests": requests, "concurrency": concurrencies, "fsync": True, "cpus": os.cpu_count(), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", default="1,16", help="comma-separated client concurrencies")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    result = asyncio.run(bench(args.requests, concurrencies))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"FleetLock server, {args.requests} requests per row, etcd with fsync, {result['cpus']} CPUs")
    print(f"{'row':<24} {'c':>3} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'vs floor':>9}")
    for r in result["rows"]:
        ratio = f"{r['vs_floor']:.2f}x" if "vs_floor" in r else "-"
        print(f"{r['row']:<24} {r['c']:>3} {r['per_s']:>9.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {ratio:>9}")


if __name__ == "__main__":
    main()
