"""Test helper: a stand-in logind on a private bus (``org.freedesktop.login1``).

``Reboot(b)`` records the call (time, and whatever the test's ``on_reboot`` says) and then runs
``on_reboot`` as a task: the fleet rig stops the agent, runs the emulated bootloader on the
machine's disk and starts the agent again, as a real reboot would. ``ListSessions()`` answers
``a(susso)`` from ``sessions``, which a test sets to make the coordinator wait for users.
"""

# No `from __future__ import annotations` here: dbus-fast reads the annotations at runtime.

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusSignature
from dbus_fast.service import ServiceInterface, method

Bool = Annotated[bool, DBusSignature("b")]
Sessions = Annotated[list[Any], DBusSignature("a(susso)")]


@dataclass
class RebootCall:
    at: float  # time.time() of the call
    interactive: bool
    note: dict[str, Any] = field(default_factory=dict)


class _Manager(ServiceInterface):
    def __init__(self, owner: "LogindStandin") -> None:
        super().__init__("org.freedesktop.login1.Manager")
        self._owner = owner

    @method()
    def Reboot(self, interactive: Bool) -> None:
        self._owner._rebooted(interactive)

    @method()
    def ListSessions(self) -> Sessions:
        return [[s_id, uid, user, seat, f"/org/freedesktop/login1/session/_{i}"]
                for i, (s_id, uid, user, seat) in enumerate(self._owner.sessions)]


class LogindStandin:
    def __init__(self, bus_address: str, on_reboot: Callable[[], Awaitable[None]] | None = None) -> None:
        self.bus_address = bus_address
        self.on_reboot = on_reboot
        self.calls: list[RebootCall] = []
        self.sessions: list[tuple[str, int, str, str]] = []
        self.bus: MessageBus | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.changed = asyncio.Event()

    async def start(self) -> "LogindStandin":
        bus = await MessageBus(bus_address=self.bus_address).connect()
        bus.export("/org/freedesktop/login1", _Manager(self))
        await bus.request_name("org.freedesktop.login1")
        self.bus = bus
        return self

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.bus is not None:
            self.bus.disconnect()
            self.bus = None

    def _rebooted(self, interactive: bool) -> None:
        self.calls.append(RebootCall(time.time(), interactive))
        self.changed.set()
        if self.on_reboot is not None:
            task = asyncio.get_running_loop().create_task(self.on_reboot())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
