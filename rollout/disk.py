"""Each simulated host's disk: a small sparse GPT image laid out like a Flatcar disk.

One template is made with ``sgdisk`` per run (1 EFI-SYSTEM, 2 BIOS-BOOT, 3 USR-A, 4 USR-B of the
CoreOS usr type, 5 ROOT; A good at priority 1, B empty) and every host gets a copy of its two GPT
regions with the rest left a hole, so a host costs a few KiB of disk until the agent writes its
payload into slot B. The copies share partition GUIDs, which is harmless: each host only ever
reads its own disk.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

MiB = 1024 * 1024
USR_TYPE = "5dfbf5f4-2848-4bac-aa5e-0d9a20b745a6"
_EFI_TYPE = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
_BIOS_BOOT_TYPE = "21686148-6449-6e6f-744e-656564454649"
_LINUX_TYPE = "0fc63daf-8483-4772-8e79-3d69c47d6b8e"
SLOT_BYTES = 1 * MiB
DISK_BYTES = 32 * MiB


class DiskError(RuntimeError):
    """The template image could not be made (no sgdisk, or it failed)."""


def make_template(path: Path) -> Path:
    """Create the template image with sgdisk; raises DiskError naming the problem."""
    sgdisk = shutil.which("sgdisk")
    if sgdisk is None:
        raise DiskError("sgdisk not found: install the gdisk package (make setup does, as root)")
    with open(path, "wb") as f:
        f.truncate(DISK_BYTES)
    slot = f"+{SLOT_BYTES // MiB}M"
    parts = [("2048:+8M", _EFI_TYPE, "EFI-SYSTEM"), ("0:+4M", _BIOS_BOOT_TYPE, "BIOS-BOOT"),
             (f"0:{slot}", USR_TYPE, "USR-A"), (f"0:{slot}", USR_TYPE, "USR-B"), ("0:0", _LINUX_TYPE, "ROOT")]
    args = [sgdisk, "-o"]
    for i, (span, typ, name) in enumerate(parts, start=1):
        args += [f"-n{i}:{span}", f"-t{i}:{typ}", f"-c{i}:{name}"]
    # gptprio (bits 48-63): priority | tries << 4 | successful << 8. A: priority 1, successful.
    args += [f"-A3:=:{(1 | 1 << 8) << 48:016x}", f"-A4:=:{0:016x}", str(path)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise DiskError(f"sgdisk failed on {path}: {proc.stderr.strip() or proc.stdout.strip()}")
    return path


def clone(template: Path, path: Path) -> Path:
    """A copy of ``template``'s partition tables (in its first and last MiB), the rest a hole:
    only the non-zero 4 KiB blocks are written, so a host's disk costs a few KiB."""
    size = template.stat().st_size
    block = 4096
    with open(template, "rb") as src, open(path, "wb") as dst:
        dst.truncate(size)
        for offset in (0, size - MiB):
            src.seek(offset)
            data = src.read(MiB)
            for at in range(0, len(data), block):
                chunk = data[at:at + block]
                if chunk.count(0) != len(chunk):
                    dst.seek(offset + at)
                    dst.write(chunk)
    return path
