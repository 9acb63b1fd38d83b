"""The etcd users and roles of docs/security.md, set up with etcdctl exactly as documented
(tests/test_security_doc.py checks the document shows these commands)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from locksmith.embedded import EmbeddedEtcd
from locksmith.etcd import Etcd, EtcdConfig
from locksmith.keys import DEFAULT_PREFIX

PASSWORDS = {"root": "root-pw-1", "agent": "agent-pw-2", "operator": "operator-pw-3", "intruder": "intruder-pw-4"}

# (arguments to etcdctl) in order; "{prefix}" and "{<user>_password}" are filled in.
ROLE_COMMANDS: tuple[tuple[str, ...], ...] = (
    ("role", "add", "agent"),
    ("role", "grant-permission", "agent", "--prefix=true", "readwrite", "{prefix}"),
    ("role", "add", "operator"),
    ("role", "grant-permission", "operator", "--prefix=true", "readwrite", "{prefix}"),
    ("user", "add", "agent", "--new-user-password={agent_password}", "--interactive=false"),
    ("user", "grant-role", "agent", "agent"),
    ("user", "add", "operator", "--new-user-password={operator_password}", "--interactive=false"),
    ("user", "grant-role", "operator", "operator"),
)
# A user with no role at all: what a stolen but unprivileged credential looks like.
INTRUDER = ("user", "add", "intruder", "--new-user-password={intruder_password}", "--interactive=false")
# The tighter alternative: one role per group, for hosts that log in by certificate (CN = user).
GROUP_ROLE_COMMANDS: tuple[tuple[str, ...], ...] = (
    ("role", "add", "agent-web"),
    ("role", "grant-permission", "agent-web", "--prefix=true", "readwrite", "{prefix}groups/web/"),
    ("role", "grant-permission", "agent-web", "--prefix=true", "readwrite", "{prefix}audit/web/"),
    ("user", "add", "web-host", "--no-password"),
    ("user", "grant-role", "web-host", "agent-web"),
)


def fill(args: tuple[str, ...], prefix: str, passwords: dict[str, str] = PASSWORDS) -> list[str]:
    values = {"prefix": prefix, **{f"{u}_password": p for u, p in passwords.items()}}
    return [a.format(**values) for a in args]


def setup_roles(server: EmbeddedEtcd, prefix: str = DEFAULT_PREFIX) -> None:
    """Create the agent and operator roles and users and a role-less intruder, then turn auth on
    with a root user (``server.config()`` then logs in as root)."""
    for args in (*ROLE_COMMANDS, INTRUDER, *GROUP_ROLE_COMMANDS):
        server.etcdctl(*fill(args, prefix))
    server.enable_auth(PASSWORDS["root"])


def agent_cycle(config_toml: str, tmp: Path, group: str) -> tuple[list[str], list[str]]:
    """The agent's own path: its config file's [locksmith] table, then the etcd-lock backend
    taking and giving back a slot. Returns (holders while held, holders after)."""
    from updateagent.config import load_settings
    from updateagent.strategy.etcd_lock import EtcdSlot

    path = tmp / "config.toml"
    path.write_text(config_toml)
    settings = load_settings(path, update_conf_paths=(), env={})
    assert settings.reboot.strategy == "etcd-lock" and settings.locksmith.group == group

    async def go() -> tuple[list[str], list[str]]:
        slot = EtcdSlot(settings.locksmith)
        await slot.open("host-1")
        try:
            await slot.acquire("update to 2.0")
            held = [h.id for h in (await slot.sem.state()).holders]  # type: ignore[union-attr]
            await slot.release()
            after = [h.id for h in (await slot.sem.state()).holders]  # type: ignore[union-attr]
            return held, after
        finally:
            await slot.close()

    return asyncio.run(go())


def fleetlock_exchange(config_toml: str, tmp: Path, node: str, group: str) -> tuple[int, int, str | None]:
    """The FleetLock server started from its own config file (``[etcd3]`` credentials), then
    ``GET /-/ready`` and a pre-reboot for ``node``: (ready status, pre-reboot status, error kind)."""
    import aiohttp
    from fleetlockrig import HEADERS, body, call

    from locksmith.fleetlock.config import load_settings as load_server_settings
    from locksmith.fleetlock.server import FleetLockServer

    path = tmp / "fleetlock.toml"
    path.write_text(config_toml)
    settings = load_server_settings(str(path))

    async def go() -> tuple[int, int, str | None]:
        server = FleetLockServer(settings)
        await server.start()
        try:
            async with aiohttp.ClientSession() as http:
                ready = await call(http, server.urls[0] + "/-/ready", method="GET", headers={})
                grant = await call(http, server.urls[0] + "/v1/pre-reboot", data=body(node, group), headers=HEADERS)
                return ready.status, grant.status, grant.kind
        finally:
            await server.stop()

    return asyncio.run(go())


T = TypeVar("T")


def run(cfg: EtcdConfig, fn: Callable[[Etcd], Awaitable[T]]) -> T:
    """``fn`` on a fresh connection made with ``cfg``, from synchronous test code."""

    async def go() -> T:
        async with await Etcd.connect(cfg) as etcd:
            return await fn(etcd)

    return asyncio.run(go())


def store_revision(server: EmbeddedEtcd) -> int:
    """etcd's current revision, read as root: what a refused request must leave unchanged."""
    return run(server.config(), lambda etcd: etcd.revision())
