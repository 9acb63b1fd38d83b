"""Test helper: a private dbus-daemon on a unix socket in a temp dir.

The config is a minimal session-like one (EXTERNAL auth, everyone may own and talk), plus any
policy fragments a test includes (e.g. systemd/com.coreos.update1.conf)::

    with PrivateBus(tmp_path) as bus:
        client = MessageBus(bus_address=bus.address)

The ``bus`` fixture (an open private bus) is in agentfixtures.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from xml.sax.saxutils import escape

_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
{policy}
{includes}
</busconfig>
"""


def _default_policy(*rules: str) -> str:
    return "\n".join(['  <policy context="default">', *(f"    <{rule}/>" for rule in rules), "  </policy>"])


# Everyone may own any name and call anything: a session bus.
_OPEN_POLICY = _default_policy('allow send_destination="*" eavesdrop="true"', 'allow eavesdrop="true"',
                               'allow own="*"')

# The defaults of a system bus (as in dbus' system.conf): nothing but what fragments allow.
_SYSTEM_POLICY = _default_policy(
    'allow user="*"',
    'deny own="*"',
    'deny send_type="method_call"',
    'allow send_type="signal"',
    *(f'allow send_requested_reply="true" send_type="{t}"' for t in ("method_return", "error")),
    *(f'allow receive_type="{t}"' for t in ("method_call", "method_return", "error", "signal")),
    *(f'allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus{i}"'
      for i in ("", ".Introspectable", ".Properties")),
)


class PrivateBus:
    def __init__(self, directory: str | os.PathLike[str], *, includes: tuple[Path, ...] = (),
                 open_policy: bool = True) -> None:
        self.dir = Path(directory)
        self.includes = includes
        self.open_policy = open_policy
        self.proc: subprocess.Popen[str] | None = None
        self.address = ""

    def config_text(self) -> str:
        socket = self.dir / "bus.sock"
        includes = "\n".join(f"  <include>{escape(str(p))}</include>" for p in self.includes)
        policy = _OPEN_POLICY if self.open_policy else _SYSTEM_POLICY
        return _CONFIG.format(socket=escape(str(socket)), policy=policy, includes=includes)

    def start(self) -> PrivateBus:
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.dir / "bus.conf"
        config.write_text(self.config_text())
        self.proc = subprocess.Popen(
            ["dbus-daemon", f"--config-file={config}", "--nofork", "--nopidfile", "--print-address=1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            self.proc.wait(timeout=5)
            raise RuntimeError(f"dbus-daemon did not start: {err.strip()}")
        self.address = line
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()
        self.proc = None

    def env(self) -> dict[str, str]:
        return {**os.environ, "DBUS_SESSION_BUS_ADDRESS": self.address, "DBUS_SYSTEM_BUS_ADDRESS": self.address}

    def __enter__(self) -> PrivateBus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
