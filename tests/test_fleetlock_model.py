"""The server against a model of its semantics: Hypothesis draws sequences of pre-reboot and
steady-state requests from a few hosts; each runs over real HTTP against a real server on the
embedded etcd, and every answer and the stored holders and line must be what the model says.

The model (docs/fleetlock.md, "How a pre-reboot is decided" and "Fairness under polling"):
a holder asking again gets 200; otherwise a host gets a slot if one is free and it is within the
first ``free`` places of the line (or the line is empty), else 409 no_slot and, if it had none,
a place at the end of the line. steady-state frees the host's slot or gives up its place; both
are 200 whatever the host had."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field

import aiohttp
from fleetlockrig import apply, pre_reboot, running, steady_state
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from locksmith.embedded import EmbeddedEtcd
from locksmith.etcd import Etcd
from locksmith.keys import Layout

HOSTS = ["h0", "h1", "h2", "h3", "h4"]
OPS = st.lists(st.tuples(st.sampled_from(["pre-reboot", "steady-state"]), st.sampled_from(HOSTS)),
               min_size=1, max_size=25)


@dataclass
class Model:
    slots: int
    holders: set[str] = field(default_factory=set)
    line: list[str] = field(default_factory=list)

    def pre_reboot(self, host: str) -> tuple[int, str | None]:
        if host in self.holders:
            return 200, None
        free = self.slots - len(self.holders)
        place = self.line.index(host) if host in self.line else len(self.line)
        if free > 0 and (place < free if host in self.line else not self.line):
            self.holders.add(host)
            if host in self.line:
                self.line.remove(host)
            return 200, None
        if host not in self.line:
            self.line.append(host)
        return 409, "no_slot"

    def steady_state(self, host: str) -> tuple[int, str | None]:
        self.holders.discard(host)
        if host in self.line:
            self.line.remove(host)
        return 200, None


async def _scenario(server: EmbeddedEtcd, slots: int, ops: list[tuple[str, str]]) -> None:
    prefix = f"m-{secrets.token_hex(4)}/"
    etcd = await Etcd.connect(server.config())
    try:
        await apply(etcd, prefix, "g", f"slots = {slots}")
        model = Model(slots)
        layout = Layout("g", prefix)
        async with running(server.config(), prefix) as srv, aiohttp.ClientSession() as session:
            for op, host in ops:
                send = pre_reboot if op == "pre-reboot" else steady_state
                reply = await send(session, srv.urls[0], host, "g")
                expected = model.pre_reboot(host) if op == "pre-reboot" else model.steady_state(host)
                assert (reply.status, reply.kind) == expected, (op, host, model)
                kvs, _ = await etcd.get_prefix(layout.base)
                holders = {kv.key[len(layout.holders):] for kv in kvs if kv.key.startswith(layout.holders)}
                line = [kv.key[len(layout.queue):] for kv in sorted(kvs, key=lambda k: k.create_revision)
                        if kv.key.startswith(layout.queue)]
                assert (holders, line) == (model.holders, model.line), (op, host)
        # the place-in-line leases are the server's: revoke nothing, they expire by themselves
    finally:
        await etcd.close()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(min_value=1, max_value=3), OPS)
def test_answers_and_state_follow_the_model(etcd_server: EmbeddedEtcd, slots: int, ops: list[tuple[str, str]]) -> None:
    asyncio.run(_scenario(etcd_server, slots, ops))
