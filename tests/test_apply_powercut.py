"""Power cuts during an apply: the agent process (``update-agent --once``) is SIGKILLed at 20
random points while it checks, writes the inactive slot, verifies and marks it.

After every cut: both GPT copies pass ``sgdisk -v``; slot A (running) is untouched; slot B is
either not bootable, or bootable with exactly the old or exactly the new image (never a torn
one); the emulated bootloader boots a valid slot. A restarted agent then finishes the job.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

from agentrig import Rig
from gptimg import MiB, sgdisk_problems, sgdisk_verify

from updateagent.bootloader import EmulatedBootloader
from updateagent.config import load_settings
from updateagent.daemon import build_agent
from updateagent.host import EmulatedHost
from updateagent.slots import SlotTable

AGENT = str(Path(sys.executable).parent / "update-agent")
CUTS = 20
IMAGE_SIZE = 6 * MiB


def _digest(path: Path, offset: int, size: int) -> str:
    with path.open("rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read(size)).hexdigest()


def _prepare_pristine(rig: Rig) -> tuple[str, str]:
    """A machine that updated once before: A booted and good at the top, B an older good image."""
    slots = SlotTable(rig.disk.path)
    a, b = slots.read()
    with rig.disk.path.open("r+b") as f:
        f.seek(b.offset)
        f.write(random.randbytes(b.size))
    slots.mark_good("B")
    slots.mark_good("A")  # A on top, B below it, both successful
    a, b = slots.read()
    assert (a.priority, a.successful, b.priority, b.successful) == (2, True, 1, True)
    rig.boot()
    return _digest(rig.disk.path, a.offset, a.size), _digest(rig.disk.path, b.offset, IMAGE_SIZE)


def _fresh_copy(rig: Rig, n: int) -> tuple[Path, Path]:
    """A copy of the pristine machine (disk image, boot record, state) and its config."""
    root = rig.root / f"run{n}"
    root.mkdir()
    disk = root / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(rig.disk.path), str(disk)], check=True)
    shutil.copy(rig.record, root / "boot.json")
    config = rig.write_config().read_text()
    config = (config.replace(str(rig.disk.path), str(disk))
              .replace(str(rig.record), str(root / "boot.json"))
              .replace(str(rig.state_dir), str(root / "state")))
    path = root / "config.toml"
    path.write_text(config)
    return disk, path


def _start(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([AGENT, "--once", "--config", str(config), "--update-conf", "/nonexistent",
                             "--log-level", "INFO"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for_event(proc: subprocess.Popen[bytes], event: str, timeout: float = 30) -> None:
    assert proc.stderr is not None
    end = time.monotonic() + timeout
    buffered = b""
    while time.monotonic() < end:
        ready, _, _ = select.select([proc.stderr], [], [], 0.5)
        if not ready:
            continue
        chunk = proc.stderr.readline()
        if not chunk:
            raise AssertionError(f"agent exited before {event!r}: {buffered.decode()[-2000:]}")
        buffered += chunk
        try:
            if json.loads(chunk).get("event") == event:
                return
        except ValueError:
            continue
    raise AssertionError(f"no {event!r} within {timeout}s")


def _check_invariants(disk: Path, a_digest: str, old_b: str, new_b: str, n: int) -> str:
    """Right after the cut, before anything repairs anything: what the bootloader would find."""
    a, b = SlotTable(disk).read()
    assert _digest(disk, a.offset, a.size) == a_digest, f"cut {n}: the running slot A was written to"
    b_content = _digest(disk, b.offset, IMAGE_SIZE)
    if b.bootable:
        assert b_content in (old_b, new_b), f"cut {n}: slot B is bootable with a torn image"
        if b.tries > 0:
            assert b_content == new_b, f"cut {n}: B marked new but does not hold the new image"
    record = EmulatedBootloader(disk, disk.with_name("boot-after.json")).boot()
    booted = a if record.slot == "A" else b
    if record.slot == "B":
        assert b_content == new_b, f"cut {n}: the bootloader booted B holding {b_content[:12]}"
    else:
        assert booted.successful
    return "marked" if b.tries > 0 else ("unbootable" if not b.bootable else "old")


async def _after_boot(disk: Path, config: Path) -> None:
    """The agent starting after the reboot (in-process, same code as the daemon): it repairs a
    GPT copy that the cut left torn, then both copies pass ``sgdisk -v``."""
    settings = load_settings(config, update_conf_paths=(), env={})
    record = disk.with_name("boot-after.json")
    agent = build_agent(settings, host=EmulatedHost(disk, record))
    await agent.start()
    await agent.run_until_settled()
    sgdisk_verify(disk)


def test_apply_survives_power_cuts(rig: Rig) -> None:
    a_digest, old_b = _prepare_pristine(rig)
    rig.publish("2.0.0", size=IMAGE_SIZE, compression="gzip")
    new_b = hashlib.sha256(rig.images["2.0.0"]).hexdigest()

    # Calibrate: how long from "update_available" until the new slot is marked, on this machine?
    disk, config = _fresh_copy(rig, 0)
    proc = _start(config)
    _wait_for_event(proc, "update_available")
    started = time.monotonic()
    _wait_for_event(proc, "slot_mark_new")
    # Up to 15% of the cuts land after the marking (also inside its GPT write, and after exit).
    window = (time.monotonic() - started) * 1.15
    assert proc.wait(timeout=60) == 0
    assert proc.stderr is not None
    proc.stderr.close()
    assert _check_invariants(disk, a_digest, old_b, new_b, 0) == "marked"
    sgdisk_verify(disk)

    rnd = random.Random(20261127)
    outcomes: list[str] = []
    torn = 0
    for n in range(1, CUTS + 1):
        disk, config = _fresh_copy(rig, n)
        proc = _start(config)
        _wait_for_event(proc, "update_available")
        time.sleep(rnd.uniform(0, window))  # the cut point itself is the random variable here
        proc.kill()
        proc.wait(timeout=10)
        assert proc.stderr is not None
        proc.stderr.close()
        torn += sgdisk_problems(disk) is not None
        outcomes.append(_check_invariants(disk, a_digest, old_b, new_b, n))
        asyncio.run(_after_boot(disk, config))

    # The cuts landed in different phases (a cut after the agent finished counts as "marked").
    print("cut outcomes:", {o: outcomes.count(o) for o in sorted(set(outcomes))}, "torn GPT copies:", torn)
    assert "unbootable" in outcomes, outcomes

    # A restarted agent after a cut of the interrupted kind finishes the update.
    disk, config = _fresh_copy(rig, CUTS + 1)
    proc = _start(config)
    _wait_for_event(proc, "slot_mark_bad")  # just before the first write into the slot
    proc.kill()
    proc.wait(timeout=10)
    assert proc.stderr is not None
    proc.stderr.close()
    assert _check_invariants(disk, a_digest, old_b, new_b, CUTS + 1) == "unbootable"
    run = rig.root / f"run{CUTS + 1}"
    proc = _start(run / "config.toml")
    assert proc.wait(timeout=60) == 0
    assert proc.stderr is not None
    proc.stderr.close()
    disk = run / "disk.img"
    a, b = SlotTable(disk).read()
    assert (b.priority, b.tries, b.successful) == (2, 1, False)
    assert (a.priority, a.tries, a.successful) == (1, 0, True)
    assert _digest(disk, b.offset, IMAGE_SIZE) == new_b
    sgdisk_verify(disk)
