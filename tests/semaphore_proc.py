"""A separate process that uses the semaphore, for the tests that kill or end processes.

    python tests/semaphore_proc.py ENDPOINT PREFIX GROUP ID MODE [--ttl N]

MODE ``wait``: lock() and, once granted, print ``granted <revision>`` and keep running (the tests
SIGKILL it while it waits). MODE ``hold``: lock(), print ``granted <revision>`` and exit at once
without unlock or close, as a node going down for its reboot would.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from locksmith.etcd import Etcd, EtcdConfig
from locksmith.semaphore import Semaphore


async def _main(args: argparse.Namespace) -> None:
    etcd = await Etcd.connect(EtcdConfig(endpoints=(args.endpoint,)))
    sem = Semaphore(etcd, args.group, prefix=args.prefix, lease_ttl=args.ttl)
    holder = await sem.lock(args.id, reason=f"semaphore_proc {args.mode}")
    sys.stdout.write(f"granted {holder.revision}\n")
    sys.stdout.flush()
    if args.mode == "hold":
        os._exit(0)  # no unlock, no close: the process is simply gone
    await asyncio.Event().wait()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("endpoint")
    p.add_argument("prefix")
    p.add_argument("group")
    p.add_argument("id")
    p.add_argument("mode", choices=("wait", "hold"))
    p.add_argument("--ttl", type=int, default=2)
    asyncio.run(_main(p.parse_args()))


if __name__ == "__main__":
    main()
