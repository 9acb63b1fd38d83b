"""Test helper: real GPT disk images made with sgdisk, checked with sgdisk and cgpt.

Importable from any test module in tests/ (``from gptimg import make_disk``); the ``disk``
fixture (a default image) is in agentfixtures.py. Layout, like a Flatcar disk: 1 EFI-SYSTEM,
2 BIOS-BOOT, 3 USR-A, 4 USR-B (CoreOS usr type), 5 ROOT. Images are sparse files, so big slots
cost no disk space until written. Every image of the same shape is a copy of one sgdisk-made
template with fresh disk and partition GUIDs (``clone_disk`` makes a byte-for-byte twin instead).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import struct
import subprocess
import tempfile
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

MiB = 1024 * 1024
SECTOR = 512
USR_TYPE = "5dfbf5f4-2848-4bac-aa5e-0d9a20b745a6"
EFI_TYPE = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
BIOS_BOOT_TYPE = "21686148-6449-6e6f-744e-656564454649"
LINUX_TYPE = "0fc63daf-8483-4772-8e79-3d69c47d6b8e"
_BACKUP_SECTORS = 33  # 32 sectors of entries + 1 header

Region = Literal["primary_header", "primary_entries", "backup_header", "backup_entries"]


@dataclass(frozen=True)
class Disk:
    path: Path
    size: int  # bytes
    slot_size: int  # bytes, each of USR-A and USR-B
    usr_a: int = 3  # partition indexes
    usr_b: int = 4

    def __fspath__(self) -> str:
        return str(self.path)


def gptprio_bits(priority: int, tries: int, successful: bool | int) -> int:
    """The 16-bit value ``cgpt show -A`` prints for these fields (bits 48-63 of the attributes)."""
    return priority | tries << 4 | int(bool(successful)) << 8


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False, timeout=60)


def make_disk(
    path: str | os.PathLike[str],
    *,
    slot_size: int = 16 * MiB,
    disk_size: int | None = None,
    labels: bool = True,
    usr_a: tuple[int, int, bool] = (1, 0, True),
    usr_b: tuple[int, int, bool] = (0, 0, False),
) -> Disk:
    """Create a GPT disk image. ``usr_a``/``usr_b`` are (priority, tries, successful).

    The default state is a freshly installed machine: A good at priority 1, B empty.
    ``labels=False`` leaves USR-A/USR-B unnamed so slots must be found by type GUID.
    """
    if slot_size <= 0 or slot_size % MiB:
        raise ValueError(f"slot_size {slot_size} must be a positive multiple of 1 MiB")
    needed = 1 * MiB + 8 * MiB + 4 * MiB + 2 * slot_size + 8 * MiB + 1 * MiB
    size = disk_size if disk_size is not None else max(64 * MiB, needed)
    if size < needed or size % MiB:
        raise ValueError(f"disk_size {size} must be a multiple of 1 MiB and at least {needed}")
    key = (slot_size, size, labels, usr_a, usr_b)
    template = _TEMPLATES.get(key)
    if template is None:
        template = Path(tempfile.mkdtemp(prefix="gptimg-")) / "template.img"
        atexit.register(shutil.rmtree, template.parent, True)
        _sgdisk_create(template, slot_size, size, labels, usr_a, usr_b)
        _TEMPLATES[key] = template
    # sgdisk sleeps a second after every write, so copy a cached image and give it its own GUIDs.
    disk = clone_disk(Disk(template, size, slot_size), path)
    _new_guids(disk.path)
    sgdisk_verify(disk)
    return disk


def clone_disk(disk: Disk, path: str | os.PathLike[str]) -> Disk:
    """A byte-for-byte twin of ``disk`` (GUIDs included) with the GPT regions copied and the rest
    left a hole: enough for images whose slots were never written."""
    with open(disk.path, "rb") as src, open(path, "wb") as dst:
        dst.truncate(disk.size)
        for offset in (0, disk.size - MiB):  # MBR + primary GPT, backup GPT
            src.seek(offset)
            dst.seek(offset)
            dst.write(src.read(MiB))
    return Disk(Path(path), disk.size, disk.slot_size, disk.usr_a, disk.usr_b)


_TEMPLATES: dict[tuple[object, ...], Path] = {}
_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")  # the UEFI GPT header, as in updateagent.gpt


def _new_guids(path: Path) -> None:
    """Fresh random disk GUID and partition GUIDs in both GPT copies, CRCs fixed; what ``sgdisk -G``
    does, without its one-second sleep."""
    disk_guid = uuid.uuid4().bytes_le
    part_guids: dict[int, bytes] = {}
    with open(path, "r+b") as f:
        for lba in (1, os.path.getsize(path) // SECTOR - 1):
            f.seek(lba * SECTOR)
            header = bytearray(f.read(SECTOR))
            fields = list(_HEADER.unpack_from(header))
            hsize, entry_lba, count, esize = fields[2], fields[10], fields[11], fields[12]
            f.seek(entry_lba * SECTOR)
            entries = bytearray(f.read(count * esize))
            for i in range(count):
                if entries[i * esize:i * esize + 16] != bytes(16):  # a used entry
                    guid = part_guids.setdefault(i, uuid.uuid4().bytes_le)
                    entries[i * esize + 16:i * esize + 32] = guid
            fields[3], fields[9], fields[13] = 0, disk_guid, zlib.crc32(entries)
            _HEADER.pack_into(header, 0, *fields)
            struct.pack_into("<I", header, 16, zlib.crc32(header[:hsize]))
            f.seek(entry_lba * SECTOR)
            f.write(entries)
            f.seek(lba * SECTOR)
            f.write(header)


def _sgdisk_create(p: Path, slot_size: int, size: int, labels: bool,
                   usr_a: tuple[int, int, bool], usr_b: tuple[int, int, bool]) -> None:
    with open(p, "wb") as f:
        f.truncate(size)
    sectors = size // SECTOR
    last_usable = sectors - _BACKUP_SECTORS - 1
    root_end = (last_usable + 1) // 2048 * 2048 - 1  # aligned, so sgdisk -v stays silent
    names = ["EFI-SYSTEM", "BIOS-BOOT", "USR-A" if labels else "", "USR-B" if labels else "", "ROOT"]
    spans = ["2048:+8M", "0:+4M", f"0:+{slot_size // MiB}M", f"0:+{slot_size // MiB}M", f"0:{root_end}"]
    types = [EFI_TYPE, BIOS_BOOT_TYPE, USR_TYPE, USR_TYPE, LINUX_TYPE]
    args = ["sgdisk", "-o"]
    for i, (span, typ, name) in enumerate(zip(spans, types, names, strict=True), start=1):
        args += [f"-n{i}:{span}", f"-t{i}:{typ}"]
        if name:
            args += [f"-c{i}:{name}"]
    for index, (prio, tries, ok) in ((3, usr_a), (4, usr_b)):
        value = gptprio_bits(prio, tries, ok) << 48
        args += [f"-A{index}:=:{value:016x}"]
    res = _run(*args, str(p))
    if res.returncode != 0:
        raise RuntimeError(f"sgdisk failed: {res.stdout}{res.stderr}")


def sgdisk_problems(path: str | os.PathLike[str]) -> str | None:
    """None if ``sgdisk -v`` is fully happy with both GPT copies, else its complete output.

    sgdisk exits 0 even when it finds problems, and says "No problems found" even when it
    silently regenerated a damaged backup header, so both the verdict and every caution count.
    """
    res = _run("sgdisk", "-v", os.fspath(path))
    out = res.stdout + res.stderr
    bad = re.search(r"corrupt|invalid|differ|ERROR|Warning|Caution|mismatch|problems!", out, re.IGNORECASE)
    if res.returncode != 0 or "No problems found" not in out or bad:
        return out
    return None


def sgdisk_verify(path: str | os.PathLike[str]) -> None:
    problems = sgdisk_problems(path)
    assert problems is None, f"sgdisk -v {os.fspath(path)}:\n{problems}"


def cgpt_attr(path: str | os.PathLike[str], index: int) -> int:
    """``cgpt show -i N -A``: the 16-bit gptprio field as cgpt reads it."""
    res = _run("cgpt", "show", "-i", str(index), "-A", os.fspath(path))
    if res.returncode != 0:
        raise RuntimeError(f"cgpt show failed: {res.stdout}{res.stderr}")
    return int(res.stdout.strip(), 16)


def cgpt_set(path: str | os.PathLike[str], index: int, *, priority: int, tries: int, successful: bool) -> None:
    """``cgpt add -i N -S -T -P``: write gptprio fields with cgpt (the independent writer)."""
    res = _run("cgpt", "add", "-i", str(index), "-S", str(int(successful)), "-T", str(tries),
               "-P", str(priority), os.fspath(path))
    if res.returncode != 0:
        raise RuntimeError(f"cgpt add failed: {res.stdout}{res.stderr}")


def region_offset(path: str | os.PathLike[str], region: Region) -> int:
    """Byte offset of a GPT structure in a standard (sgdisk-made) layout."""
    sectors = os.path.getsize(path) // SECTOR
    return {
        "primary_header": 1,
        "primary_entries": 2,
        "backup_entries": sectors - _BACKUP_SECTORS,
        "backup_header": sectors - 1,
    }[region] * SECTOR


def corrupt(path: str | os.PathLike[str], region: Region, *, at: int = 24) -> None:
    """Flip one byte inside a GPT structure so its CRC no longer matches."""
    off = region_offset(path, region) + at
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0xFF]))
