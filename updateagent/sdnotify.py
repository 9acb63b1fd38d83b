"""systemd's notify protocol (sd_notify(3)), spoken directly: one datagram per message.

The service manager passes ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace)
and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``). A message is
newline-separated ``KEY=value`` assignments: ``READY=1``, ``STATUS=...``, ``WATCHDOG=1``,
``STOPPING=1``. Outside systemd (no ``NOTIFY_SOCKET``) every call does nothing, so the daemon
needs no special mode for tests or containers.

Sending never blocks and never raises: a notification that cannot be delivered (systemd
restarting, a full socket buffer) is logged once and dropped, since the daemon's work matters
more than its report. systemd itself treats a missing ping as a hung service, which is the point.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Mapping, MutableMapping

from locksmith.log import get_logger

log = get_logger("updateagent.sdnotify")

# STATUS= is shown on one line by `systemctl status`; a runaway text is cut, not sent whole.
_MAX_STATUS = 512


def _address(value: str) -> str | bytes:
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # abstract namespace
    return value


class Notifier:
    """Notifications to the service manager at ``socket_path`` (None: not under systemd)."""

    def __init__(self, socket_path: str | None, *, watchdog_usec: int | None = None) -> None:
        self.socket_path = socket_path or None
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._warned = False
        self._last_status: str | None = None

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = True) -> Notifier:
        """From ``NOTIFY_SOCKET``/``WATCHDOG_USEC``/``WATCHDOG_PID``. With ``unset`` these are
        removed from the environment, so hooks and health checks the daemon starts do not
        inherit them and cannot speak for it (as ``sd_notify(unset_environment=1)``)."""
        env: MutableMapping[str, str] = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET") or None
        usec = _watchdog_usec(env)
        if unset:
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                env.pop(name, None)
        return cls(path, watchdog_usec=usec)

    @property
    def enabled(self) -> bool:
        return self.socket_path is not None

    @property
    def watchdog_interval(self) -> float | None:
        """How often to send ``WATCHDOG=1``: half the timeout, as sd_watchdog_enabled(3) advises.
        None when systemd watches nothing."""
        if not self.watchdog_usec:
            return None
        return self.watchdog_usec / 2 / 1_000_000

    def send(self, **fields: str) -> bool:
        """Send one message (``send(READY="1", STATUS="...")``). True when it was delivered."""
        if self.socket_path is None:
            return False
        lines = []
        for key, value in fields.items():
            text = value.replace("\n", " ")  # one assignment per line; a newline would start another
            lines.append(f"{key}={text}")
        data = ("\n".join(lines) + "\n").encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(data, _address(self.socket_path))
        except OSError as exc:
            if not self._warned:
                log.warning("sd_notify_failed", socket=self.socket_path, error=exc.strerror or str(exc))
                self._warned = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        fields = {"READY": "1"}
        if status is not None:
            fields["STATUS"] = status[:_MAX_STATUS]
            self._last_status = fields["STATUS"]
        return self.send(**fields)

    def status(self, text: str) -> bool:
        """``STATUS=text``; an unchanged text is not sent again."""
        text = text[:_MAX_STATUS]
        if text == self._last_status:
            return True
        self._last_status = text
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG="1")

    def stopping(self) -> bool:
        return self.send(STOPPING="1")

    async def keep_alive(self) -> None:
        """Send ``WATCHDOG=1`` every half timeout for as long as the event loop runs this task: a
        loop that hangs stops the pings, and systemd restarts the service. Returns at once when
        no watchdog is configured."""
        interval = self.watchdog_interval
        if interval is None or not self.enabled:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    text = env.get("WATCHDOG_USEC", "")
    if not text.isdigit() or int(text) == 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    # systemd sets WATCHDOG_PID to the main process; a child that inherited it must not ping.
    if pid and pid != str(os.getpid()):
        return None
    return int(text)


__all__ = ["Notifier"]
