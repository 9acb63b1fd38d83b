"""The agent on D-Bus: update_engine's interface exactly, plus one interface of our own.

- ``com.coreos.update1.Manager`` on ``/com/coreos/update1`` (bus name ``com.coreos.update1``):
  ``AttemptUpdate()``, ``ResetStatus()``, ``GetStatus() -> (x d s s x)`` and the signal
  ``StatusUpdate (x d s s x)``, so locksmithd, the Flatcar update operator and ``update_engine_client``
  keep working.
- ``io.coreupdate.Agent1`` on the same object: what update_engine's interface cannot carry
  (booted slot, errors with detail, deny list, slot table, history, MarkGood). See docs/dbus.md.

This module also holds :class:`AgentClient`, the client side ``updatectl`` uses.
"""

# No `from __future__ import annotations` here: dbus-fast reads the annotations at runtime.

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Annotated, Any

from dbus_fast import BusType, DBusError, Message, MessageType, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusSignature
from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_property, method, signal

from locksmith.log import get_logger
from updateagent.agent import Agent, AgentBusy, AgentEvent, StatusSnapshot
from updateagent.errors import UpdateAgentError

log = get_logger("updateagent.dbus")

BUS_NAME = "com.coreos.update1"
OBJECT_PATH = "/com/coreos/update1"
MANAGER_INTERFACE = "com.coreos.update1.Manager"
AGENT_INTERFACE = "io.coreupdate.Agent1"
ERROR_BUSY = "io.coreupdate.Agent1.Error.Busy"
ERROR_FAILED = "io.coreupdate.Agent1.Error.Failed"

StatusTuple = Annotated[list[Any], DBusSignature("xdssx")]
Str = Annotated[str, DBusSignature("s")]
Bool = Annotated[bool, DBusSignature("b")]
UInt32 = Annotated[int, DBusSignature("u")]
StrList = Annotated[list[str], DBusSignature("as")]
EventBody = Annotated[list[Any], DBusSignature("ss")]


class DBusServiceError(UpdateAgentError):
    """The agent could not connect to the bus or own its name."""


def _dbus_error(exc: Exception) -> DBusError:
    name = ERROR_BUSY if isinstance(exc, AgentBusy) else ERROR_FAILED
    return DBusError(name, str(exc) or type(exc).__name__)


class ManagerInterface(ServiceInterface):
    """update_engine's ``com.coreos.update1.Manager``, to the letter."""

    def __init__(self, agent: Agent) -> None:
        super().__init__(MANAGER_INTERFACE)
        self._agent = agent

    @method()
    def AttemptUpdate(self) -> None:
        self._agent.request_check()

    @method()
    async def ResetStatus(self) -> None:
        try:
            await self._agent.reset_status()
        except UpdateAgentError as exc:
            raise _dbus_error(exc) from None

    @method()
    def GetStatus(self) -> StatusTuple:
        return list(self._agent.status().as_tuple())

    @signal()
    def StatusUpdate(self, snapshot: StatusSnapshot) -> StatusTuple:
        return list(snapshot.as_tuple())


_STATUS_ARG_NAMES = ("last_checked_time", "progress", "current_operation", "new_version", "new_size")


def _name_args(interface: type[ServiceInterface], member: str, names: tuple[str, ...]) -> None:
    """Give introspection the argument names update_engine publishes (dbus-fast has no syntax for it)."""
    fn = interface.__dict__[member]
    spec = getattr(fn, "__DBUS_METHOD", None) or getattr(fn, "__DBUS_SIGNAL", None)
    intro = getattr(spec, "introspection", None)
    if intro is None:  # a dbus-fast without this internal layout: names stay generic, calls still work
        return
    args = getattr(intro, "out_args", None) or getattr(intro, "args", [])
    for arg, name in zip(args, names, strict=False):
        arg.name = name


_name_args(ManagerInterface, "GetStatus", _STATUS_ARG_NAMES)
_name_args(ManagerInterface, "StatusUpdate", _STATUS_ARG_NAMES)


_PROPERTIES = ("Phase", "CurrentVersion", "BootedVersion", "BootedSlot", "LastBootOutcome", "LastError")


class AgentInterface(ServiceInterface):
    """``io.coreupdate.Agent1``: our own, richer view. Complex values are versioned JSON documents."""

    def __init__(self, agent: Agent) -> None:
        super().__init__(AGENT_INTERFACE)
        self._agent = agent

    # read-only ----------------------------------------------------------------------------

    @method()
    def GetDetails(self) -> Str:
        return json.dumps(self._agent.details())

    @method()
    def GetSlots(self) -> Str:
        try:
            return json.dumps(self._agent.slot_table())
        except UpdateAgentError as exc:
            raise _dbus_error(exc) from None

    @method()
    def GetHistory(self, limit: UInt32) -> Str:
        return json.dumps(self._agent.history(limit))

    @method()
    def GetDenyList(self) -> StrList:
        return [entry.version for entry in self._agent.state.deny_list]

    def _coordinator(self) -> dict[str, Any]:
        describe = getattr(self._agent.reboot_strategy, "describe", None)  # a test's own strategy may lack it
        return describe() if callable(describe) else {"format_version": 1, "state": "", "status": ""}

    @method()
    def GetCoordinator(self) -> Str:
        """The reboot coordinator's state, status line and group view (docs/coordinator.md)."""
        return json.dumps(self._coordinator(), default=str)

    @dbus_property(access=PropertyAccess.READ)
    def CoordinatorState(self) -> Str:
        return str(self._coordinator().get("state", ""))

    @dbus_property(access=PropertyAccess.READ)
    def CoordinatorStatus(self) -> Str:
        return str(self._coordinator().get("status", ""))

    def coordinator_changed(self) -> None:
        self.emit_properties_changed({"CoordinatorState": self.CoordinatorState,
                                      "CoordinatorStatus": self.CoordinatorStatus})

    @dbus_property(access=PropertyAccess.READ)
    def Phase(self) -> Str:
        return self._agent.phase.value

    @dbus_property(access=PropertyAccess.READ)
    def CurrentVersion(self) -> Str:
        return self._agent.state.current_version

    @dbus_property(access=PropertyAccess.READ)
    def BootedVersion(self) -> Str:
        return self._agent.state.booted_version

    @dbus_property(access=PropertyAccess.READ)
    def BootedSlot(self) -> Str:
        return self._agent.state.booted_slot

    @dbus_property(access=PropertyAccess.READ)
    def LastBootOutcome(self) -> Str:
        return self._agent.state.last_boot_outcome

    @dbus_property(access=PropertyAccess.READ)
    def LastError(self) -> Str:
        return self._agent.state.last_error

    # changing -----------------------------------------------------------------------------

    @method()
    def Check(self) -> Bool:
        return self._agent.request_check()

    @method()
    async def MarkGood(self) -> Str:
        try:
            return await self._agent.mark_good()
        except UpdateAgentError as exc:
            raise _dbus_error(exc) from None

    @signal()
    def Event(self, event: AgentEvent) -> EventBody:
        return [event.event, json.dumps({"time": event.time, **event.details}, default=str)]

    def properties_changed(self) -> None:
        # Reading a dbus_property on the instance runs its getter: one definition of each value.
        self.emit_properties_changed({name: getattr(self, name) for name in _PROPERTIES})


class _Bus(MessageBus):
    """Signals are sent without waiting (dbus-fast drops the future ``send`` returns). When the bus
    dies with signals still queued, their futures get the socket error, and asyncio would print
    "Future exception was never retrieved" with a traceback for each; the service's watcher
    reports the loss once instead. Awaited sends (replies, RequestName) still see their errors."""

    def send(self, msg: Message) -> "asyncio.Future[None]":
        writer, loop = getattr(self, "_writer", None), getattr(self, "_loop", None)
        if writer is None or loop is None:  # another dbus-fast layout: its own send, unguarded
            return super().send(msg)
        # dbus-fast's send, with the callback attached before the write is tried: a write to a
        # dead socket fails inside schedule_write, which then raises, and the caller never gets
        # the future to retrieve.
        if not msg.serial:
            msg.serial = self.next_serial()
        future: asyncio.Future[None] = loop.create_future()
        future.add_done_callback(_retrieve)
        writer.schedule_write(msg, future)
        return future


def _retrieve(future: "asyncio.Future[None]") -> None:
    if not future.cancelled():
        future.exception()


async def connect(bus_address: str | None) -> MessageBus:
    """A connected bus: the system bus when ``bus_address`` is None."""
    where = bus_address or "the system bus"
    try:
        # The constructor parses the address: a malformed one fails here, not in connect().
        bus = _Bus(bus_address=bus_address) if bus_address else _Bus(bus_type=BusType.SYSTEM)
        return await bus.connect()
    except Exception as exc:
        raise DBusServiceError(f"cannot connect to {where}: {exc}") from None


class AgentService:
    """Exports both interfaces for one agent and owns the bus name.

    If the bus goes away (dbus-daemon restarted or killed), the loss is logged at error and the
    service reconnects, re-exports and re-acquires the name with a capped backoff, logging each
    failed attempt; the agent keeps working meanwhile (without D-Bus).
    """

    RECONNECT_INITIAL = 1.0
    RECONNECT_MAX = 30.0

    def __init__(self, agent: Agent, bus_address: str | None = None) -> None:
        self.agent = agent
        self.bus_address = bus_address
        self.bus: MessageBus | None = None
        self.manager = ManagerInterface(agent)
        self.agent_iface = AgentInterface(agent)
        self._last: tuple[Any, ...] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._stopping = False

    async def _attach(self) -> MessageBus:
        """Connect, export both interfaces and own the name: a bus ready to serve."""
        bus = await connect(self.bus_address)
        try:
            bus.export(OBJECT_PATH, self.manager)
            bus.export(OBJECT_PATH, self.agent_iface)
            reply = await bus.request_name(BUS_NAME)
        except DBusError as exc:
            self._forget(bus)
            raise DBusServiceError(f"cannot own {BUS_NAME}: {exc.text} (D-Bus policy?)") from None
        except Exception as exc:
            # The bus went away between Hello and the reply (EOFError, ConnectionResetError...):
            # a DBusServiceError like any failed attempt, so the watcher retries instead of dying.
            self._forget(bus)
            raise DBusServiceError(f"cannot own {BUS_NAME}: the bus went away ({type(exc).__name__}: {exc})") from None
        except BaseException:  # cancelled (stop()): close the half-attached connection too
            self._forget(bus)
            raise
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            self._forget(bus)
            raise DBusServiceError(f"cannot own {BUS_NAME}: another process holds it ({reply.name})")
        return bus

    async def start(self) -> None:
        self.bus = await self._attach()
        self._last = None
        self.agent.subscribe(self._on_status, self._on_event)
        follow = getattr(self.agent.reboot_strategy, "subscribe", None)
        if callable(follow):
            follow(self._on_coordinator)
        self._watcher = asyncio.ensure_future(self._watch(self.bus))
        log.info("dbus_ready", name=BUS_NAME, path=OBJECT_PATH, address=self.bus_address or "system")

    async def _watch(self, bus: MessageBus) -> None:
        """Notice the bus going away; reconnect until it is back (or the service stops)."""
        while not self._stopping:
            try:
                # Shielded: cancelling this watcher (stop()) must not cancel the bus's own future.
                await asyncio.shield(bus.wait_for_disconnect())
                reason = "the bus closed the connection"
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else f"connection closed ({type(exc).__name__})"
            if self._stopping:
                return
            self.bus = None  # nothing more is sent on the dead connection
            self._forget(bus)
            log.error("dbus_connection_lost", address=self.bus_address or "system", error=reason,
                      detail="serving D-Bus again once the bus is back; the agent keeps working meanwhile")
            delay = self.RECONNECT_INITIAL
            while not self._stopping:
                await asyncio.sleep(delay)
                if self._stopping:
                    return
                try:
                    bus = await self._attach()
                except DBusServiceError as exc:
                    log.warning("dbus_reconnect_failed", error=str(exc), retry_in=min(delay * 2, self.RECONNECT_MAX))
                    delay = min(delay * 2, self.RECONNECT_MAX)
                    continue
                self.bus = bus
                self._last = None
                log.warning("dbus_reconnected", name=BUS_NAME, address=self.bus_address or "system")
                self._on_status(self.agent.status())
                break

    def _forget(self, bus: MessageBus) -> None:
        """Drop a dead connection: unexport (signals would be written to its closed socket) and
        close it, ignoring what a dead connection answers."""
        for iface in (self.manager, self.agent_iface):
            with contextlib.suppress(Exception):
                bus.unexport(OBJECT_PATH, iface)
        with contextlib.suppress(Exception):
            bus.disconnect()

    def _emit(self, send: Callable[[], None]) -> None:
        """Send signals unless the connection is gone. dbus-fast may still call a connection
        ``connected`` whose socket it already closed; the write then fails at once (EBADF): the
        watcher reports the loss and reconnects, so the signal is only dropped here."""
        if self.bus is None or not self.bus.connected:
            return
        try:
            send()
        except OSError as exc:
            log.warning("dbus_signal_not_sent", error=str(exc))

    def _on_status(self, snapshot: StatusSnapshot) -> None:
        if self.bus is None or not self.bus.connected:
            return
        key = (*snapshot.as_tuple(), snapshot.phase)
        if key == self._last:
            return
        self._last = key

        def send() -> None:
            self.manager.StatusUpdate(snapshot)
            self.agent_iface.properties_changed()

        self._emit(send)

    def _on_coordinator(self, _status: str) -> None:
        self._emit(self.agent_iface.coordinator_changed)

    def _on_event(self, event: AgentEvent) -> None:
        self._emit(lambda: self.agent_iface.Event(event))

    async def stop(self) -> None:
        self._stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watcher
            self._watcher = None
        if self.bus is not None:
            bus, self.bus = self.bus, None
            if bus.connected:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(bus.release_name(BUS_NAME), 2)
            with contextlib.suppress(Exception):
                bus.disconnect()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(bus.wait_for_disconnect(), 2)


# --------------------------------------------------------------------------- client


class AgentClientError(UpdateAgentError):
    """The agent is not on the bus, or answered with an error."""


class AgentClient:
    """Talks to a running agent. Use as ``async with AgentClient(address) as client``."""

    def __init__(self, bus_address: str | None = None) -> None:
        self.bus_address = bus_address
        self.bus: MessageBus | None = None

    async def __aenter__(self) -> "AgentClient":
        try:
            self.bus = await connect(self.bus_address)
        except DBusServiceError as exc:
            raise AgentClientError(str(exc)) from None
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.bus is not None:
            self.bus.disconnect()
            self.bus = None

    async def call(self, interface: str, member: str, signature: str = "", body: list[Any] | None = None) -> Any:
        assert self.bus is not None, "use AgentClient as an async context manager"
        reply = await self.bus.call(Message(destination=BUS_NAME, path=OBJECT_PATH, interface=interface,
                                            member=member, signature=signature, body=body or []))
        if reply is None:
            raise AgentClientError(f"{interface}.{member}: no reply")
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body else ""
            if reply.error_name in ("org.freedesktop.DBus.Error.ServiceUnknown",
                                    "org.freedesktop.DBus.Error.NameHasNoOwner"):
                raise AgentClientError(f"the update agent is not running ({BUS_NAME} is not on the bus)")
            raise AgentClientError(f"{member}: {reply.error_name}: {text}")
        return reply.body

    async def get_status(self) -> tuple[int, float, str, str, int]:
        body = await self.call(MANAGER_INTERFACE, "GetStatus")
        return (int(body[0]), float(body[1]), str(body[2]), str(body[3]), int(body[4]))

    async def attempt_update(self) -> None:
        await self.call(MANAGER_INTERFACE, "AttemptUpdate")

    async def reset_status(self) -> None:
        await self.call(MANAGER_INTERFACE, "ResetStatus")

    async def details(self) -> dict[str, Any]:
        return json.loads((await self.call(AGENT_INTERFACE, "GetDetails"))[0])

    async def slots(self) -> list[dict[str, Any]]:
        return json.loads((await self.call(AGENT_INTERFACE, "GetSlots"))[0])

    async def history(self, limit: int = 0) -> list[dict[str, Any]]:
        return json.loads((await self.call(AGENT_INTERFACE, "GetHistory", "u", [limit]))[0])

    async def coordinator(self) -> dict[str, Any]:
        return json.loads((await self.call(AGENT_INTERFACE, "GetCoordinator"))[0])  # type: ignore[no-any-return]

    async def deny_list(self) -> list[str]:
        return list((await self.call(AGENT_INTERFACE, "GetDenyList"))[0])

    async def check(self) -> bool:
        return bool((await self.call(AGENT_INTERFACE, "Check"))[0])

    async def mark_good(self) -> str:
        return str((await self.call(AGENT_INTERFACE, "MarkGood"))[0])

    async def subscribe(
        self,
        on_status: Callable[[tuple[int, float, str, str, int]], None] | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        """Receive StatusUpdate (and Event) signals; callbacks run on the event loop."""
        assert self.bus is not None
        rules = []
        if on_status is not None:
            rules.append(f"type='signal',sender='{BUS_NAME}',path='{OBJECT_PATH}',"
                         f"interface='{MANAGER_INTERFACE}',member='StatusUpdate'")
        if on_event is not None:
            rules.append(f"type='signal',sender='{BUS_NAME}',path='{OBJECT_PATH}',"
                         f"interface='{AGENT_INTERFACE}',member='Event'")

        def handler(msg: Message) -> None:
            if msg.message_type != MessageType.SIGNAL or msg.path != OBJECT_PATH:
                return
            if msg.interface == MANAGER_INTERFACE and msg.member == "StatusUpdate" and on_status is not None:
                b = msg.body
                on_status((int(b[0]), float(b[1]), str(b[2]), str(b[3]), int(b[4])))
            elif msg.interface == AGENT_INTERFACE and msg.member == "Event" and on_event is not None:
                on_event(str(msg.body[0]), json.loads(msg.body[1]))

        self.bus.add_message_handler(handler)
        for rule in rules:
            reply = await self.bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                                interface="org.freedesktop.DBus", member="AddMatch",
                                                signature="s", body=[rule]))
            if reply is None or reply.message_type == MessageType.ERROR:
                raise AgentClientError(f"cannot subscribe to signals: {reply.body if reply else 'no reply'}")
