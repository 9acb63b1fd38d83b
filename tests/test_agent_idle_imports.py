"""An idle agent does not load what only downloading, verifying or validating needs.

requests + urllib3, zstandard, cryptography and jsonschema cost an idle ``update-agent`` about
13 MB of its 60 MB budget (benchmarks/agent_idle.py prints the floor). They are imported where
they are used; this guards it: the real daemon, in the etcd-lock strategy with a signing key
configured, runs until it is ready and its coordinator has opened the etcd backend, with
``PYTHONPROFILEIMPORTTIME`` set, so the interpreter itself lists every module the process
imported during its life. Again after its first check against a real channel: the check runs in
a child process (updateagent.checker), whose imports show in the log as its stderr lines.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from agentrig import Rig, wait_for_log
from dbusbus import PrivateBus

from locksmith.etcd import EtcdConfig

AGENT = str(Path(sys.executable).parent / "update-agent")

# Top-level packages an idle agent must not import, and the path that does import each.
LAZY = {
    "requests": "fetching a manifest or payload",
    "urllib3": "fetching a manifest or payload",
    "zstandard": "installing a payload",
    "cryptography": "verifying a manifest's signature",
    "jsonschema": "validating a stored policy",
}


def _imported(log: str) -> set[str]:
    """Top-level packages from ``-X importtime`` lines: ``import time: self | cumulative | name``."""
    names = set()
    for line in log.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                names.add(name.split(".")[0])
    return names


def test_lazy_packages_exist() -> None:
    """The guard below is only as good as these names."""
    assert all(importlib.util.find_spec(name) is not None for name in LAZY)


def _run_agent(rig: Rig, bus: PrivateBus, tmp_path: Path, etcd_config: EtcdConfig, prefix: str,
               *events: tuple[str, dict[str, object]], **check: object) -> str:
    """The real daemon, idle in etcd-lock, until it logged each of ``events``; its log."""
    extra = f"""
[reboot]
strategy = "etcd-lock"
coordinator_conf = "{tmp_path / 'no-coordinator.conf'}"
reboot_required_file = "{tmp_path / 'reboot-required'}"

[locksmith]
endpoints = {json.dumps(list(etcd_config.endpoints))}
prefix = "{prefix}"
group = "idle"

[metrics]
listen = "127.0.0.1:0"
"""
    config = rig.write_config(extra=extra, **check)  # with the rig's release key: verified, not insecure
    log = tmp_path / "agent.log"
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen([AGENT, "--config", str(config), "--update-conf", "/nonexistent",
                                 "--bus-address", bus.address], stdout=out, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL)
    try:
        wait_for_log(proc, log, "ready", timeout=30)
        # Idle in etcd-lock: the coordinator has connected, read the (default) policy and
        # follows the group's semaphore.
        wait_for_log(proc, log, "coordinator_backend_open", timeout=30, backend="etcd-lock")
        for event, fields in events:
            wait_for_log(proc, log, event, timeout=60, **fields)
        proc.terminate()
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return log.read_text()


def test_an_idle_etcd_lock_agent_does_not_import_the_download_verify_and_schema_stack(
        rig: Rig, bus: PrivateBus, tmp_path: Path, etcd_config: EtcdConfig, prefix: str) -> None:
    imported = _imported(_run_agent(rig, bus, tmp_path, etcd_config, prefix))
    # The log really lists the process's imports, lazy ones included.
    assert {"grpc", "dbus_fast", "prometheus_client", "locksmith", "updateagent"} <= imported
    loaded = {name: why for name, why in LAZY.items() if name in imported}
    assert not loaded, f"an idle agent imported packages it needs only for: {loaded}"


def test_after_its_first_check_the_agent_has_still_not_imported_them(
        rig: Rig, bus: PrivateBus, tmp_path: Path, etcd_config: EtcdConfig, prefix: str) -> None:
    """The check (manifest and signature over HTTP, verified) runs in a child process
    (updateagent.checker): the daemon stays at its floor between checks."""
    rig.publish("1.0.0", size=64 * 1024)  # the running version, signed: the check finds nothing to do
    text = _run_agent(rig, bus, tmp_path, etcd_config, prefix,
                      ("manifest_fetched", {"version": "1.0.0"}), ("check_done", {"outcome": "no_update"}),
                      on_start=True)
    own = _imported(text)
    assert {"grpc", "dbus_fast", "locksmith", "updateagent"} <= own
    loaded = {name: why for name, why in LAZY.items() if name in own}
    assert not loaded, f"after a check the agent has imported packages it needs only for: {loaded}"
    # The check did fetch and verify, in a process whose stderr the agent logged.
    child = _imported("\n".join(str(entry.get("line", "")) for entry in _entries(text)
                                if entry.get("event") == "check_process_output"))
    assert {"requests", "urllib3", "cryptography"} <= child


def _entries(text: str) -> list[dict[str, object]]:
    entries = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                entries.append(json.loads(line))
    return entries


@pytest.mark.parametrize("code, package", [
    ("from updateagent import install", "requests"),
    ("from updateagent import install", "zstandard"),
    ("from locksmith.policy import validate_policy_data; validate_policy_data({})", "jsonschema"),
    ("from updateagent.signature import KeySet, SignatureError; import contextlib\n"
     "with contextlib.suppress(SignatureError): KeySet().verify(b'', b'')", "cryptography"),
])
def test_the_paths_that_need_them_still_import_them(code: str, package: str) -> None:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint({package!r} in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
