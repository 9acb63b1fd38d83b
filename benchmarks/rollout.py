"""Rollout benchmark: makespan against the ideal, for ours and the two models, at 100 and 1,000 hosts.

    .venv/bin/python benchmarks/rollout.py [--hosts 100,1000] [--slots 10] [--json]

For each fleet size N, with one group of ``slots = 10``, no windows (always open), reboot
durations uniform 3-5 minutes, the same seed for every run:

- ``ours`` (the production agent and etcd-lock coordinator) and the ``locksmith-model`` and
  ``kured-model`` baselines (models of those tools' waiting behaviour, on our semaphore), each a
  full ``locksmithctl simulate`` run in its own child process, so that its peak RSS is its own;
- the makespan ratio to the ideal (ceil(N/slots) × the measured mean reboot cycle; see
  docs/simulation.md), measured in the same run as the makespan, so the ratio is the baseline
  comparison; target for ours: <= 1.05;
- wall time of the run (target: 1,000 hosts in at most 3 minutes), peak RSS of the child
  (its own ``ru_maxrss``: the whole simulator, etcd not included), and etcd write
  RPCs per reboot from etcd's own /metrics (Put, Txn, DeleteRange, LeaseGrant, LeaseRevoke),
  which should be flat from 100 to 1,000.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POLICY = """\
format_version = 1
group = "fleet"
slots = {slots}
reboot_timeout = "30m"
failure_budget = 5
"""


# The simulator's own peak RSS, printed last on stderr: ru_maxrss of the child as the parent sees it
# would also cover its waited-for descendants (the embedded etcd).
CHILD = ("import resource, sys\nfrom locksmith.cli import main\ntry:\n    main()\nfinally:\n"
         "    print(f'peak-rss-kib {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}', file=sys.stderr)\n")


def run(hosts: int, slots: int, coordinator: str, seed: int, policy: Path, timeout: float) -> dict[str, object]:
    cmd = [sys.executable, "-c", CHILD, "simulate", "--hosts", str(hosts),
           "--policy", str(policy), "--coordinator", coordinator, "--seed", str(seed), "--output", "json",
           "--no-progress", "--reboot-duration", "uniform:3m,5m"]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"hosts": hosts, "coordinator": coordinator, "error": f"timed out after {timeout:.0f}s"}
    wall = time.monotonic() - t0
    rss = max((int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("peak-rss-kib ")),
              default=0)
    if proc.returncode not in (0, 3):
        return {"hosts": hosts, "coordinator": coordinator, "error": proc.stderr.strip()[-500:]}
    doc = json.loads(proc.stdout)
    return {
        "hosts": hosts, "coordinator": coordinator, "outcome": doc["outcome"], "makespan_s": doc["makespan"],
        "ideal_s": doc["ideal"], "ratio": doc["ratio"], "wall_s": round(wall, 1),
        "peak_rss_mib": round(rss / 1024, 1), "writes_per_reboot": doc["writes_per_reboot"],
        "safe": doc["safe"], "max_holders": doc["max_holders"], "virtual_flowed_s": round(doc["virtual_flowed"], 1),
        "handoff_p50_ms": round((doc["handoff_real"]["p50"] or 0) * 1000, 1),
        "handoff_p99_ms": round((doc["handoff_real"]["p99"] or 0) * 1000, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", default="100,1000")
    ap.add_argument("--slots", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--coordinators", default="ours,locksmith-model,kured-model")
    ap.add_argument("--timeout", type=float, default=1800.0, help="Per run, seconds.")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "fleet.toml"
        policy.write_text(POLICY.format(slots=args.slots))
        for n in (int(x) for x in args.hosts.split(",")):
            for c in args.coordinators.split(","):
                r = run(n, args.slots, c, args.seed, policy, args.timeout)
                results.append(r)
                print(f"  {n} hosts {c}: {r.get('error') or 'done'} ({r.get('wall_s', '-')}s)", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'hosts':>5} {'coordinator':<16} {'outcome':<9} {'makespan':>9} {'ideal':>8} {'ratio':>6} {'wall':>7} "
          f"{'peak RSS':>9} {'writes/reboot':>13} {'handoff p50/p99 real':>21} {'safe':>5}")
    for r in results:
        if "error" in r:
            print(f"{r['hosts']:>5} {r['coordinator']:<16} ERROR {r['error']}")
            continue
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else "-"
        mk = f"{r['makespan_s'] / 60:.1f}m" if r["makespan_s"] is not None else "-"
        label = r["coordinator"] if r["coordinator"] == "ours" else f"{r['coordinator']}*"
        print(f"{r['hosts']:>5} {label:<16} {r['outcome']:<9} {mk:>9} {r['ideal_s'] / 60:>7.1f}m {ratio:>6} "
              f"{r['wall_s']:>6.1f}s {r['peak_rss_mib']:>7.1f}Mi {r['writes_per_reboot']:>13.2f} "
              f"{r['handoff_p50_ms']:>9.1f}/{r['handoff_p99_ms']:<9.1f}ms {'yes' if r['safe'] else 'NO':>5}")
    print("* a model of that tool's documented waiting behaviour on our semaphore, not the tool itself")


if __name__ == "__main__":
    main()
