"""Test helper: one emulated machine for agent tests (real GPT image, real HTTP channel, real keys).

``Rig`` owns a disk image made with sgdisk (slot A good, B empty), the emulated bootloader's
boot record, a release key pair, a channel directory served by a real HTTP server on 127.0.0.1,
and writes the agent's TOML config so tests go through the same config path as the daemon.
The ``rig`` fixture (one such machine) is in agentfixtures.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import select
import subprocess
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gptimg import Disk, MiB, make_disk
from httpserver import FileServer

from updateagent.agent import Agent
from updateagent.bootloader import BootRecord, EmulatedBootloader
from updateagent.checker import CheckRunner
from updateagent.config import AgentSettings, load_settings
from updateagent.daemon import build_agent
from updateagent.host import EmulatedHost
from updateagent.release import BuildResult, build_release, keygen
from updateagent.slots import SlotTable


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


@dataclass
class Rig:
    root: Path
    slot_size: int = 8 * MiB
    group: str = "stable"
    disk: Disk = field(init=False)
    record: Path = field(init=False)
    server: FileServer = field(init=False)
    images: dict[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.disk = make_disk(self.root / "disk.img", slot_size=self.slot_size)
        self.record = self.root / "boot.json"
        self.keys = keygen(self.root / "keys")
        self.channel_root = self.root / "www"
        (self.channel_root / self.group).mkdir(parents=True)
        (self.channel_root / "healthz").write_text("ok\n")
        self.state_dir = self.root / "state"
        self.server = FileServer(self.channel_root).start()
        self.boot()  # the machine's first boot: slot A

    def close(self) -> None:
        self.server.stop()

    # ----------------------------------------------------------------- machine

    def boot(self) -> BootRecord:
        """An emulated power cycle: the bootloader picks a slot and writes the boot record."""
        return EmulatedBootloader(self.disk.path, self.record).boot()

    def host(self) -> EmulatedHost:
        return EmulatedHost(self.disk.path, self.record)

    def slots(self) -> SlotTable:
        return SlotTable(self.disk.path)

    def slot_digest(self, name: str, size: int) -> str:
        slot = self.slots().slot(name)  # type: ignore[arg-type]
        with open(self.disk.path, "rb") as f:
            f.seek(slot.offset)
            return hashlib.sha256(f.read(size)).hexdigest()

    # ----------------------------------------------------------------- channel

    def publish(self, version: str, *, size: int = 3 * MiB, compression: str = "zstd") -> BuildResult:
        image = self.root / f"image-{version}.img"
        # Half random, half zeros: realistic compression work without a big file.
        data = os.urandom(size // 2) + bytes(size - size // 2)
        image.write_bytes(data)
        self.images[version] = data
        return build_release(image, self.channel_root / self.group, version, self.keys.private_path,
                             compression=compression)

    def payload_path(self, version: str) -> str:
        return f"/{self.group}/payload-{version}.img.zst"

    # ----------------------------------------------------------------- agent

    def write_config(self, *, health: list[dict[str, Any]] | None = None, extra: str = "",
                     **check: Any) -> Path:
        lines = [
            "[channel]",
            f"server = {_toml_value(self.server.base_url)}",
            f"group = {_toml_value(self.group)}",
            f"keys = {_toml_value([str(self.keys.public_path)])}",
            "",
            "[disk]",
            f"path = {_toml_value(str(self.disk.path))}",
            "",
            "[state]",
            f"dir = {_toml_value(str(self.state_dir))}",
            "",
            "[host]",
            'kind = "emulated"',
            f"boot_record = {_toml_value(str(self.record))}",
            'versions = { A = "1.0.0" }',
            "",
            "[check]",
            f"on_start = {_toml_value(check.pop('on_start', False))}",
            f"retry_initial_seconds = {_toml_value(check.pop('retry_initial_seconds', 300))}",
        ]
        lines += [f"{k} = {_toml_value(v)}" for k, v in check.items()]
        lines += ["", "[health]", "deadline_seconds = 0", "retry_interval_seconds = 0.1"]
        for spec in health if health is not None else [{"command": ["true"]}, {"url": self.server.url("healthz")}]:
            lines += ["", "[[health.check]]"] + [f"{k} = {_toml_value(v)}" for k, v in spec.items()]
        path = self.root / "config.toml"
        path.write_text("\n".join(lines) + "\n" + extra)
        return path

    def settings(self, **kwargs: Any) -> AgentSettings:
        return load_settings(self.write_config(**kwargs), update_conf_paths=(), env={})

    def agent(self, settings: AgentSettings | None = None, *, run_check: CheckRunner | None = None,
              **kwargs: Any) -> Agent:
        """The daemon's agent; ``run_check``: where its checks run (default: a child process)."""
        settings = settings or self.settings(**kwargs)
        return build_agent(settings, host=self.host(), run_check=run_check)


def wait_for_log(proc: subprocess.Popen[bytes], path: Path, event: str, *, timeout: float = 30,
                 **fields: object) -> dict[str, object]:
    """Block until a daemon writing JSON log lines to ``path`` logs ``event`` with these field
    values, and return that entry. Fails at once if the daemon exits first."""
    deadline = time.monotonic() + timeout
    with path.open() as reader:
        while time.monotonic() < deadline:
            line = reader.readline()
            if not line:
                if proc.poll() is not None and not reader.readline():
                    raise AssertionError(f"agent exited before logging {event}:\n{path.read_text()}")
                select.select([], [], [], 0.05)  # no inotify here: a short wait for more output
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") == event and all(entry.get(k) == v for k, v in fields.items()):
                return entry
    raise AssertionError(f"no {event} {fields} in the agent's log within {timeout}s:\n{path.read_text()}")


NOW = datetime(2026, 11, 27, 4, 0, tzinfo=UTC)


class ManualClock:
    """The agent's clock, advanced by the test (the simulator swaps clocks the same way)."""

    def __init__(self, now: datetime = NOW) -> None:
        self.current = now

    def now(self) -> datetime:
        return self.current

    def monotonic(self) -> float:
        return self.current.timestamp()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(0)

    def advance(self, seconds: float) -> None:
        self.current += timedelta(seconds=seconds)
