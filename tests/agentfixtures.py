"""Fixtures shared by the update agent's tests, loaded for every test by ``pytest_plugins`` in
conftest.py (a plugin module of its own, so that pytest can rewrite its asserts: the helpers it
builds on are imported by the tests directly)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from agentrig import Rig
from dbusbus import PrivateBus
from gptimg import Disk, make_disk


@pytest.fixture
def disk(tmp_path: Path) -> Disk:
    """A default GPT image: slot A good at priority 1, slot B empty."""
    return make_disk(tmp_path / "disk.img")


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    """One emulated machine: disk image, boot record, keys, and a channel served over HTTP."""
    r = Rig(tmp_path / "machine")
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[PrivateBus]:
    """A private dbus-daemon with an open (session-like) policy."""
    with PrivateBus(tmp_path / "bus") as b:
        yield b
