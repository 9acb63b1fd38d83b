"""docs/install.md as a new user follows it: the emulated machine, the laptop walk-through run as
a script, the shipped units verified as installed, and every config key in docs/agent.md."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from gptimg import cgpt_attr, gptprio_bits, sgdisk_verify

from updateagent.bootloader import read_boot_record
from updateagent.config import RawConfig, validate
from updateagent.slots import SlotTable

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
UPDATECTL = str(BIN / "updatectl")
INSTALL_MD = ROOT / "docs" / "install.md"


def ctl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([UPDATECTL, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


# ------------------------------------------------------------------------ updatectl dev


def test_make_disk_creates_a_coreos_layout_image_and_boots_it(tmp_path: Path) -> None:
    r = ctl("dev", "make-disk", "disk.img", "--version", "1.0.0", "--slot-size-mib", "16", "-o", "json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    disk = tmp_path / "disk.img"
    assert doc["disk"] == "disk.img" and doc["booted_slot"] == "A" and doc["version"] == "1.0.0"
    sgdisk_verify(disk)
    out = subprocess.run(["sgdisk", "-p", str(disk)], capture_output=True, text=True, check=True).stdout
    names = re.findall(r"^\s+\d+\s+\d+\s+\d+\s+\S+ \S+\s+\S+\s+(\S+)$", out, re.M)
    assert names == ["EFI-SYSTEM", "BIOS-BOOT", "USR-A", "USR-B", "ROOT"], out
    assert cgpt_attr(disk, 3) == gptprio_bits(1, 0, True)
    assert cgpt_attr(disk, 4) == gptprio_bits(0, 0, False)
    a, b = SlotTable(disk).read()
    assert a.size == b.size == 16 << 20
    record = read_boot_record(tmp_path / "disk.boot.json")
    assert record.slot == "A" and record.partuuid == a.partuuid == doc["booted_partuuid"]
    assert disk.stat().st_blocks * 512 < 1 << 20  # sparse: only the tables take space
    # The config lines it prints make a valid emulated host.
    settings = validate(RawConfig(tomllib.loads(doc["config"]), "snippet", {}, "<none>"), env={})
    assert settings.host_kind == "emulated" and settings.disk == disk.resolve()

    r = ctl("dev", "make-disk", "disk.img", "--version", "1.0.0", cwd=tmp_path)
    assert r.returncode == 1 and "already exists" in r.stderr and "Traceback" not in r.stderr
    r = ctl("dev", "make-disk", "other.img", "--version", "v1", cwd=tmp_path)
    assert r.returncode == 1 and "--version" in r.stderr and "Traceback" not in r.stderr

    r = ctl("-o", "json", "dev", "boot", "disk.img", cwd=tmp_path)  # a global option before the subcommand
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["slot"] == "A"


# ------------------------------------------------------------------------ the walk-through


def _walkthrough() -> str:
    text = INSTALL_MD.read_text()
    start = text.index("<!-- walkthrough")
    end = text.index("<!-- end of walkthrough -->")
    blocks = re.findall(r"```sh\n(.*?)```", text[start:end], re.S)
    assert len(blocks) >= 6
    return "\n".join(blocks)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(shutil.which("dbus-daemon") is None, reason="needs dbus-daemon (Debian package dbus)")
def test_the_laptop_walkthrough_runs_from_make_disk_to_marked_good(tmp_path: Path) -> None:
    work = tmp_path / "work"
    script = tmp_path / "walkthrough.sh"
    script.write_text(_walkthrough())
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "WORK": str(work), "PORT": str(_free_port()),
           "HOME": str(tmp_path)}
    for var in ("UPDATECTL_BUS_ADDRESS", "UPDATE_AGENT_BUS_ADDRESS", "DBUS_SESSION_BUS_ADDRESS"):
        env.pop(var, None)
    proc = subprocess.Popen(["bash", "-euo", "pipefail", str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        pid_file = work / "bus.pid"  # dbus-daemon --fork leaves our process group
        if pid_file.exists():
            with_pid = int(pid_file.read_text().split()[0])
            try:
                os.kill(with_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    agent_log = (work / "agent.log").read_text() if (work / "agent.log").exists() else ""
    assert proc.returncode == 0, out[-4000:] + agent_log[-3000:]
    assert "update 2.0.0 applied; reboot to use it" in out
    assert "booted slot B" in out
    assert "Last boot:        success" in out and "Current version:  2.0.0" in out
    a_bits, b_bits = cgpt_attr(work / "disk.img", 3), cgpt_attr(work / "disk.img", 4)
    assert (a_bits, b_bits) == (gptprio_bits(1, 0, True), gptprio_bits(2, 0, True))
    sgdisk_verify(work / "disk.img")
    assert "Traceback" not in agent_log


# ------------------------------------------------------------------------ the shipped units, as installed


def _installed_root(tmp_path: Path) -> Path:
    """A root laid out as docs/install.md installs the agent: the unit in /etc/systemd/system, the
    venv's update-agent at /opt/coreupdate/bin, the tmpfiles entry; plus the host's own units (the
    targets and dbus.socket the unit refers to)."""
    root = tmp_path / "root"
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    (root / "etc" / "tmpfiles.d").mkdir(parents=True)
    (root / "opt" / "coreupdate" / "bin").mkdir(parents=True)
    (root / "usr" / "lib" / "systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    (root / "lib").symlink_to("usr/lib")
    shutil.copy(ROOT / "systemd" / "update-agent.service", root / "etc" / "systemd" / "system")
    shutil.copy(ROOT / "systemd" / "update-agent.tmpfiles.conf", root / "etc" / "tmpfiles.d" / "update-agent.conf")
    shutil.copy2(BIN / "update-agent", root / "opt" / "coreupdate" / "bin" / "update-agent")
    return root


@pytest.mark.skipif(shutil.which("systemd-analyze") is None or not Path("/usr/lib/systemd/system").is_dir(),
                    reason="needs systemd-analyze and the host's systemd units (Debian package systemd)")
def test_systemd_analyze_verify_is_clean_on_the_installed_unit(tmp_path: Path) -> None:
    root = _installed_root(tmp_path)
    r = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "update-agent.service"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr
    unit = (root / "etc" / "systemd" / "system" / "update-agent.service").read_text()
    start = re.search(r"^ExecStart=(\S+)", unit, re.M)
    assert start and start.group(1) == "/opt/coreupdate/bin/update-agent"
    assert "/opt/coreupdate/bin/update-agent" in INSTALL_MD.read_text()
    # Without the program where the unit expects it, verify fails: the check is real.
    (root / "opt" / "coreupdate" / "bin" / "update-agent").unlink()
    r = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "update-agent.service"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "not executable" in r.stderr


@pytest.mark.skipif(shutil.which("systemd-tmpfiles") is None, reason="needs systemd-tmpfiles (Debian package systemd)")
def test_the_tmpfiles_entry_creates_the_directories(tmp_path: Path) -> None:
    root = _installed_root(tmp_path)
    r = subprocess.run(["systemd-tmpfiles", f"--root={root}", "--create", "update-agent.conf"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    for path, mode in (("var/lib/update-agent", 0o700), ("etc/update-agent", 0o755), ("etc/update-agent/keys", 0o755)):
        assert (root / path).is_dir() and (root / path).stat().st_mode & 0o777 == mode, path


# ------------------------------------------------------------------------ docs/agent.md's config example


def test_the_config_example_has_every_key_and_is_valid() -> None:
    from updateagent.config import effective_settings  # every key the agent reads, with its value

    text = (ROOT / "docs" / "agent.md").read_text()
    block = re.search(r"## Configuration.*?```toml\n(.*?)```", text, re.S)
    assert block, "no TOML example under ## Configuration"
    doc = tomllib.loads(block.group(1))
    settings = validate(RawConfig(doc, "docs/agent.md", {}, "<none>"), env={})
    keys = [key for key, _, _ in effective_settings(settings)]

    def flatten(table: dict[str, object], prefix: str = "") -> set[str]:
        found: set[str] = set()
        for k, v in table.items():
            key = prefix + k
            if isinstance(v, dict) and key not in keys:
                found |= flatten(v, key + ".")
            else:
                found.add(key)
        return found

    shown = flatten(doc)
    assert [k for k in keys if k not in shown] == [], "keys missing from the example in docs/agent.md"
    for key in ("host.cmdline", "host.os_release", "host.machine_id_file", "channel.insecure"):
        assert key in shown
