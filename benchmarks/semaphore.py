"""Semaphore benchmark: etcd writes per acquire+release and hand-off latency, at 10, 100 and 1,000
waiters.

    .venv/bin/python benchmarks/semaphore.py [--waiters 10,100,1000] [--json]

It starts its own single-member EmbeddedEtcd *with* fsync (``unsafe_no_fsync=False``), so every
commit waits for the WAL to reach the disk, as in production. For each size N, with max 1:

1. the benchmark takes the slot itself ("blocker"), then starts worker processes (1 for N <= 100,
   4 above, one Semaphore object each, N/P waiter tasks each) whose waiters all call lock() and
   queue up;
2. once all N are queued it releases the blocker; each waiter then does ``cycles`` acquire+release
   cycles (lock, unlock at once, lock again: back to the end of the line), so for N = 10 and 100
   the line stays N long throughout; the default gives about 1,000 hand-offs (at least 2 cycles).

Writes: etcd's own /metrics deltas over the whole run (workers' start to exit), divided by the
number of cycles ("writes": everything, fixed costs included):
``grpc_server_handled_total`` for the write RPCs (Put, DeleteRange, Txn, LeaseGrant, LeaseRevoke)
and ``etcd_mvcc_put_total`` / ``etcd_mvcc_delete_total``, plus the store revision delta. The
workers also classify their own transactions (grant, release, audit prune, failed) so the
amortised cost of audit pruning is shown separately, and "cycle" is Put + Txn + DeleteRange
without the fixed costs (the blocker's release, audit prunes; lease grant/revoke are one per
process).

Hand-off latency: from the moment the releaser's unlock transaction returned to the moment the next
holder's grant transaction returned (``time.monotonic()``, CLOCK_MONOTONIC, comparable across
processes on Linux). Pairing by revision: with max 1 grants and releases alternate, so the
hand-off into the grant at revision g_k+1 starts at the release of the holder granted at g_k.
It includes the watch event's trip to the
next waiter's process, its mirror update, a range read of holders/ and the fsynced grant commit.

Floor, measured in the same run against the same server: one transaction commit plus one watch
delivery, the least any hand-off can cost. A "releaser" connection commits a transaction; from
the moment it returned, the time until a "waiter" connection in another process has received
the event over its watch and committed a transaction of its own (500 rounds). The table gives
hand-off p50 and p99 as multiples of the floor's p50 and p99.

Frozen follower (on by default, ``--no-freeze`` skips it): a 3-member cluster (also with fsync), contender
processes from locksmith.soak each given all three endpoints, 10 s of grants, then one follower
SIGSTOPped for 10 s: grants per second during the freeze against the 10 s before it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from locksmith.embedded import EmbeddedEtcd
from locksmith.etcd import Compare as _Compare
from locksmith.etcd import Delete, Etcd, EtcdConfig, Op, Put, TxnResult
from locksmith.keys import Layout
from locksmith.semaphore import Semaphore
from locksmith.soak import Contenders, layout_specs

WRITE_METHODS = ("Put", "DeleteRange", "Txn", "LeaseGrant", "LeaseRevoke")
PREFIX = "bench/"


# -- worker process -----------------------------------------------------------------------------


class _CountingEtcd(Etcd):
    """Classifies this process's transactions; the calls themselves go to etcd unchanged."""

    counts: Counter[str]

    async def txn(self, compare: Sequence[_Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        res = await super().txn(compare, success, failure)
        kind = "other"
        if any(isinstance(o, Delete) and o.range_end for o in success):
            kind = "audit_prune"
        elif any(isinstance(o, Put) and "/holders/" in o.key for o in success):
            kind = "grant"
        elif any(isinstance(o, Delete) and "/holders/" in o.key for o in success):
            kind = "release"
        self.counts[kind if res.succeeded else f"{kind}_failed"] += 1
        return res


async def _worker(endpoint: str, group: str, ids: list[str], cycles: int) -> dict[str, Any]:
    etcd = await _CountingEtcd.connect(EtcdConfig(endpoints=(endpoint,)))
    assert isinstance(etcd, _CountingEtcd)
    etcd.counts = Counter()
    sem = Semaphore(etcd, group, prefix=PREFIX)
    cycles_done: list[tuple[int, float, float]] = []  # (grant revision, grant returned, release returned)

    async def one(holder_id: str) -> None:
        for _ in range(cycles):
            h = await sem.lock(holder_id)  # after the first cycle: back to the end of the line
            granted = time.monotonic()
            await sem.unlock(holder_id)
            cycles_done.append((h.revision, granted, time.monotonic()))

    await asyncio.gather(*(one(i) for i in ids))
    await sem.close()
    await etcd.close()
    return {"cycles": cycles_done, "txn": dict(etcd.counts)}


# -- floor: one commit plus one watch delivery ----------------------------------------------------


async def _floor_waiter(endpoint: str, key: str, rounds: int) -> dict[str, Any]:
    """The waiter's side: on each event for ``key``, commit one transaction at once."""
    etcd = await Etcd.connect(EtcdConfig(endpoints=(endpoint,)))
    rev = await etcd.revision()
    sys.stdout.write(json.dumps({"ready": True}) + "\n")
    sys.stdout.flush()
    done: list[float] = []
    async for batch in etcd.watch_prefix(key, start_revision=rev + 1):
        for _ in batch.events:
            await etcd.txn([], [Put(f"{PREFIX}floor-ack", b"1")])
            done.append(time.monotonic())
        if len(done) >= rounds:
            break
    await etcd.close()
    return {"done": done}


async def _measure_floor(server: EmbeddedEtcd, rounds: int = 500) -> dict[str, float]:
    endpoint = server.endpoints[0]
    key = f"{PREFIX}floor/release"
    proc = await asyncio.create_subprocess_exec(sys.executable, __file__, "--floor-waiter", endpoint, key,
                                                str(rounds), stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    await asyncio.wait_for(proc.stdout.readline(), 60)  # the waiter's watch is open
    etcd = await Etcd.connect(EtcdConfig(endpoints=(endpoint,)))
    committed: list[float] = []
    ack_seen = 0
    try:
        ack_rev = await etcd.revision()
        async for batch in etcd.watch_prefix(f"{PREFIX}floor-ack", start_revision=ack_rev + 1):
            if batch.created or batch.events:
                ack_seen += len(batch.events)
                if len(committed) >= rounds:
                    if ack_seen >= rounds:
                        break
                    continue
                await etcd.txn([], [Put(key, b"x")])
                committed.append(time.monotonic())
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await etcd.close()
    done = json.loads(out.decode().splitlines()[-1])["done"]
    samples = [(d - c) * 1000 for c, d in zip(committed, done, strict=False)]
    return {"p50": round(_pct(samples, 50), 2), "p99": round(_pct(samples, 99), 2), "n": len(samples)}


# -- one follower frozen ----------------------------------------------------------------------------


async def _frozen_follower(seconds: float = 10.0) -> dict[str, Any]:
    """Grants per second with one follower of 3 SIGSTOPped, against the same span before it."""
    from locksmith.semaphore import Semaphore

    with EmbeddedEtcd(members=3, unsafe_no_fsync=False) as cluster:
        etcd = await Etcd.connect(cluster.config())
        groups = ["f0", "f1"]
        for g in groups:
            async with Semaphore(etcd, g, prefix="soak/") as sem:
                await sem.set_max(2)
        pool = Contenders(cluster.endpoints, layout_specs(4, 3, groups), hold=0.02, think=0.02)
        try:
            await pool.start()
            await pool.wait_all_granted_since(0, within=60)

            def rate(a: float, b: float) -> float:
                return sum(1 for c in pool.by_key.values() for _, t in c.grants if a <= t < b) / (b - a)

            t0 = time.monotonic()
            await asyncio.sleep(seconds)
            t1 = time.monotonic()
            leader = cluster.wait_leader()
            follower = (leader + 1) % 3
            cluster.members[follower].pause()
            try:
                await asyncio.sleep(seconds)
            finally:
                cluster.members[follower].resume()
            t2 = time.monotonic()
            per_second = [round(rate(t1 + i, t1 + i + 1), 1) for i in range(int(seconds))]
            return {"before": round(rate(t0, t1), 1), "during": round(rate(t1, t2), 1), "per_second": per_second,
                    "contenders": len(pool.by_key), "processes": len(pool.procs)}
        finally:
            await pool.stop()
            pool.cleanup()
            await etcd.close()


# -- driver -------------------------------------------------------------------------------------


def _write_counts(m: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {k: 0.0 for k in WRITE_METHODS}
    for name, value in m.items():
        if name.startswith("grpc_server_handled_total{"):
            for meth in WRITE_METHODS:
                if f'grpc_method="{meth}"' in name:
                    out[meth] += value
    out["mvcc_put"] = m.get("etcd_mvcc_put_total", 0.0)
    out["mvcc_delete"] = m.get("etcd_mvcc_delete_total", 0.0)
    return out


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]


async def _run_size(server: EmbeddedEtcd, n: int, cycles: int, procs: int) -> dict[str, Any]:
    endpoint = server.endpoints[0]
    group = f"n{n}"
    layout = Layout(group, PREFIX)
    procs = procs or (1 if n <= 100 else 4)
    etcd = await Etcd.connect(server.config())
    sem = Semaphore(etcd, group, prefix=PREFIX)
    await sem.set_max(1)
    await sem.lock("blocker")
    start_rev = await etcd.revision()
    before = _write_counts(server.metrics())

    ids = [f"w{i:04d}" for i in range(n)]
    chunks = [ids[i::procs] for i in range(procs)]
    workers = [
        await asyncio.create_subprocess_exec(sys.executable, __file__, "--worker", endpoint, group, ",".join(c),
                                             str(cycles), stdout=asyncio.subprocess.PIPE)
        for c in chunks
    ]
    try:
        # Wait (on the watch) until every waiter is queued, then start the hand-offs.
        seen: set[str] = set()
        async with asyncio.timeout(120):
            async for batch in etcd.watch_prefix(layout.queue, start_revision=start_rev + 1):
                seen |= {e.kv.key for e in batch.events if e.kind == "put"}
                if len(seen) == n:
                    break
        assert await sem.unlock("blocker")
        blocker_released = time.monotonic()
        outs = []
        for w in workers:
            async with asyncio.timeout(600):
                out, _ = await w.communicate()
            if w.returncode != 0:
                raise SystemExit(f"worker failed with exit code {w.returncode}")
            outs.append(json.loads(out.decode().splitlines()[-1]))  # the last line; before it, the worker's log
    finally:
        for w in workers:  # never leave a worker behind, whatever went wrong
            if w.returncode is None:
                w.kill()
                await w.wait()
    await sem.close()
    end_rev = await etcd.revision()
    after = _write_counts(server.metrics())
    await etcd.close()

    # With max 1 grants and releases alternate: the hand-off into the grant at revision g_k+1 starts
    # when the release of the holder granted at g_k returned (the blocker's, before the first).
    done: list[tuple[int, float, float]] = []
    txn: Counter[str] = Counter()
    for o in outs:
        done += [(int(r), float(g), float(u)) for r, g, u in o["cycles"]]
        txn.update(o["txn"])
    done.sort()
    latencies = []
    released = blocker_released
    for _, granted, unlocked in done:
        latencies.append((granted - released) * 1000)
        released = unlocked
    total = len(done)
    assert total == n * cycles
    delta = {k: (after[k] - before[k]) / total for k in after}
    # Writes of the cycles themselves: all Put/Txn/DeleteRange minus the blocker's release and the
    # audit prunes (shown in their own column); lease grants/revokes are one per worker process.
    marginal = (sum(after[m] - before[m] for m in ("Put", "Txn", "DeleteRange")) - 1 - txn.get("audit_prune", 0))
    return {
        "waiters": n, "processes": procs, "cycles": total,
        "writes_per_cycle": sum(delta[m] for m in WRITE_METHODS),
        "cycle_writes_per_cycle": round(marginal / total, 3),
        "by_method": {m: round(delta[m], 3) for m in WRITE_METHODS},
        "mvcc_put_per_cycle": round(delta["mvcc_put"], 3), "mvcc_delete_per_cycle": round(delta["mvcc_delete"], 3),
        "revisions_per_cycle": round((end_rev - start_rev) / total, 3),
        "txn_kinds": dict(txn),
        "audit_prune_txn_per_cycle": round(txn.get("audit_prune", 0) / total, 4),
        "handoff_ms_p50": round(_pct(latencies, 50), 2), "handoff_ms_p99": round(_pct(latencies, 99), 2),
        "handoff_ms_max": round(max(latencies), 2), "handoffs": len(latencies),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--waiters", default="10,100,1000")
    p.add_argument("--json", action="store_true")
    p.add_argument("--cycles", type=int, default=0,
                   help="acquire+release cycles per waiter (default: enough for about 1,000 hand-offs, at least 2)")
    p.add_argument("--procs", type=int, default=0, help="worker processes (default: 1 up to 100 waiters, else 4)")
    p.add_argument("--no-freeze", action="store_true", help="skip the frozen-follower measurement")
    p.add_argument("--worker", nargs=4, metavar=("ENDPOINT", "GROUP", "IDS", "CYCLES"), help=argparse.SUPPRESS)
    p.add_argument("--floor-waiter", nargs=3, metavar=("ENDPOINT", "KEY", "ROUNDS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        endpoint, group, ids, cycles = args.worker
        res = asyncio.run(_worker(endpoint, group, ids.split(","), int(cycles)))
        sys.stdout.write("\n" + json.dumps(res) + "\n")
        return
    if args.floor_waiter:
        endpoint, key, rounds = args.floor_waiter
        res = asyncio.run(_floor_waiter(endpoint, key, int(rounds)))
        sys.stdout.write("\n" + json.dumps(res) + "\n")
        return
    sizes = [int(x) for x in args.waiters.split(",")]
    rows = []
    with EmbeddedEtcd(unsafe_no_fsync=False) as server:
        floor = asyncio.run(_measure_floor(server))
        for n in sizes:
            rows.append(asyncio.run(_run_size(server, n, args.cycles or max(2, 1000 // n), args.procs)))
    for r in rows:
        r["floor_ms_p50"], r["floor_ms_p99"] = floor["p50"], floor["p99"]
        r["handoff_p50_over_floor"] = round(r["handoff_ms_p50"] / floor["p50"], 2)
        r["handoff_p99_over_floor"] = round(r["handoff_ms_p99"] / floor["p99"], 2)
    frozen = None if args.no_freeze else asyncio.run(_frozen_follower())
    if args.json:
        sys.stdout.write(json.dumps({"sizes": rows, "floor": floor, "frozen_follower": frozen}, indent=2) + "\n")
        return
    print(f"etcd with fsync (unsafe_no_fsync=False), max 1, cpus={os.cpu_count()}; per acquire+release cycle:")
    print(f"{'waiters':>8} {'procs':>5} {'cycles':>6} {'writes':>6} {'cycle':>5} {'Put':>5} {'Txn':>5} {'Del':>5} "
          f"{'LGrant':>6} {'LRevoke':>7} {'mvcc put':>8} {'mvcc del':>8} {'prune txn':>9} "
          f"{'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}")
    for r in rows:
        b = r["by_method"]
        print(f"{r['waiters']:>8} {r['processes']:>5} {r['cycles']:>6} {r['writes_per_cycle']:>6.3f} "
              f"{r['cycle_writes_per_cycle']:>5.2f} {b['Put']:>5.2f} {b['Txn']:>5.2f} "
              f"{b['DeleteRange']:>5.2f} {b['LeaseGrant']:>6.3f} {b['LeaseRevoke']:>7.3f} "
              f"{r['mvcc_put_per_cycle']:>8.3f} {r['mvcc_delete_per_cycle']:>8.3f} "
              f"{r['audit_prune_txn_per_cycle']:>9.4f} {r['handoff_ms_p50']:>7.2f} {r['handoff_ms_p99']:>7.2f} "
              f"{r['handoff_ms_max']:>7.2f}")
    print("txn kinds per size:", "; ".join(f"{r['waiters']}: {r['txn_kinds']}" for r in rows))
    print(f"floor (one txn commit + one watch delivery, same server, {floor['n']} samples): "
          f"p50 {floor['p50']:.2f} ms, p99 {floor['p99']:.2f} ms")
    print(f"{'waiters':>8} {'p50/floor p50':>14} {'p99/floor p99':>14}")
    for r in rows:
        print(f"{r['waiters']:>8} {r['handoff_p50_over_floor']:>14.2f} {r['handoff_p99_over_floor']:>14.2f}")
    if frozen is not None:
        ratio = frozen["during"] / frozen["before"] if frozen["before"] else 0.0
        print(f"one follower of 3 frozen (SIGSTOP) for 10 s, {frozen['contenders']} contenders in "
              f"{frozen['processes']} processes, all endpoints each: grants/s before {frozen['before']:.1f}, "
              f"during {frozen['during']:.1f} (ratio {ratio:.2f}); per second of the freeze: {frozen['per_second']}")


if __name__ == "__main__":
    main()
