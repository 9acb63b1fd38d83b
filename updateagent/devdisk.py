"""Emulated machines for trying the agent without a real A/B disk: a CoreOS-layout GPT image and
the emulated bootloader's boot record (``updatectl dev make-disk`` and ``updatectl dev boot``).

The image is written here, byte by byte (protective MBR, both GPT copies with their CRCs), so no
partitioning tool is needed; ``sgdisk -v`` and ``cgpt show`` accept it. Layout, as on a Flatcar
disk: 1 EFI-SYSTEM (8 MiB), 2 BIOS-BOOT (4 MiB), 3 USR-A, 4 USR-B (CoreOS usr type, gptprio
bits), 5 ROOT (16 MiB). The file is sparse: only the tables take space until slots are written.
Slot A starts good at priority 1 (a freshly installed machine), slot B empty; then the emulated
bootloader "boots" it, which writes the boot record the agent reads as its host facts.
"""

from __future__ import annotations

import os
import struct
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

from updateagent import gpt
from updateagent.bootloader import BootRecord, EmulatedBootloader
from updateagent.errors import UpdateAgentError
from updateagent.slots import USR_PARTITION_TYPE

__all__ = ["DevDisk", "boot", "default_boot_record", "make_disk"]

MiB = 1024 * 1024
SECTOR = gpt.DEFAULT_SECTOR_SIZE
_ENTRIES = 128
_ENTRY_SIZE = 128
_ENTRY_SECTORS = _ENTRIES * _ENTRY_SIZE // SECTOR  # 32
_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")  # the UEFI GPT header (92 bytes)
_ENTRY = struct.Struct("<16s16sQQQ72s")
_ALIGN = 2048  # sectors (1 MiB), as partitioning tools align

EFI_TYPE = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
BIOS_BOOT_TYPE = uuid.UUID("21686148-6449-6e6f-744e-656564454649")
LINUX_TYPE = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")  # Linux filesystem data
MIN_SLOT_MIB = 1
MAX_SLOT_MIB = 64 * 1024


class DevDiskError(UpdateAgentError):
    """The emulated disk cannot be made as asked."""


@dataclass(frozen=True)
class DevDisk:
    path: Path
    boot_record: Path
    size: int
    slot_size: int
    version: str
    booted: BootRecord

    def config_snippet(self) -> str:
        """The agent config lines that make it run on this disk (host.kind = "emulated")."""
        return (f'[disk]\npath = "{self.path.resolve()}"\n\n[host]\nkind = "emulated"\n'
                f'boot_record = "{self.boot_record.resolve()}"\nversions = {{ A = "{self.version}" }}\n')


def default_boot_record(disk: str | os.PathLike[str]) -> Path:
    """``<disk without suffix>.boot.json`` next to the image."""
    p = Path(disk)
    return p.with_name(p.stem + ".boot.json")


def _protective_mbr(total_sectors: int) -> bytes:
    mbr = bytearray(SECTOR)
    count = min(total_sectors - 1, 0xFFFFFFFF)
    # status, CHS start, type 0xEE, CHS end, first LBA, sector count
    struct.pack_into("<B3sB3sII", mbr, 446, 0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1, count)
    mbr[510:512] = b"\x55\xaa"
    return bytes(mbr)


def _entry(type_guid: uuid.UUID, first: int, last: int, name: str, attributes: int = 0) -> bytes:
    return _ENTRY.pack(type_guid.bytes_le, uuid.uuid4().bytes_le, first, last, attributes,
                       name.encode("utf-16-le").ljust(72, b"\x00"))


def _header(my_lba: int, alt_lba: int, first_usable: int, last_usable: int, disk_guid: bytes, entry_lba: int,
            entries_crc: int) -> bytes:
    fields = [b"EFI PART", 0x00010000, _HEADER.size, 0, 0, my_lba, alt_lba, first_usable, last_usable,
              disk_guid, entry_lba, _ENTRIES, _ENTRY_SIZE, entries_crc]
    raw = _HEADER.pack(*fields)
    fields[3] = zlib.crc32(raw)
    return _HEADER.pack(*fields).ljust(SECTOR, b"\x00")


def _write_image(path: Path, slot_size: int) -> int:
    sizes = [8 * MiB, 4 * MiB, slot_size, slot_size, 16 * MiB]
    total = MiB + sum(sizes) + MiB  # 1 MiB ahead of the first partition, room for the backup table behind
    sectors = total // SECTOR
    first_usable = 2 + _ENTRY_SECTORS
    last_usable = sectors - 2 - _ENTRY_SECTORS
    a_bits = gpt.set_gptprio(0, priority=1, tries=0, successful=True)
    specs = [(EFI_TYPE, "EFI-SYSTEM", 0), (BIOS_BOOT_TYPE, "BIOS-BOOT", 0), (USR_PARTITION_TYPE, "USR-A", a_bits),
             (USR_PARTITION_TYPE, "USR-B", 0), (LINUX_TYPE, "ROOT", 0)]
    entries = bytearray()
    lba = _ALIGN
    for size, (type_guid, name, bits) in zip(sizes, specs, strict=True):
        count = size // SECTOR
        entries += _entry(type_guid, lba, lba + count - 1, name, bits)
        lba += count
    assert lba - 1 <= last_usable
    entries = bytes(entries.ljust(_ENTRIES * _ENTRY_SIZE, b"\x00"))
    crc = zlib.crc32(entries)
    disk_guid = uuid.uuid4().bytes_le
    backup_entries = sectors - 1 - _ENTRY_SECTORS
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as f:
            f.truncate(total)
            f.write(_protective_mbr(sectors))
            f.write(_header(1, sectors - 1, first_usable, last_usable, disk_guid, 2, crc))
            f.write(entries)
            f.seek(backup_entries * SECTOR)
            f.write(entries)
            f.write(_header(sectors - 1, 1, first_usable, last_usable, disk_guid, backup_entries, crc))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return total


def make_disk(path: str | os.PathLike[str], *, version: str, slot_size: int = 64 * MiB,
              boot_record: str | os.PathLike[str] | None = None, force: bool = False) -> DevDisk:
    """Create the image at ``path`` and boot it once (slot A, which runs ``version``)."""
    from updateagent.channel import Version

    try:
        Version(version)
    except ValueError as exc:
        raise DevDiskError(f"--version: {exc}") from None
    if slot_size % MiB or not MIN_SLOT_MIB * MiB <= slot_size <= MAX_SLOT_MIB * MiB:
        raise DevDiskError(f"slot size must be a whole number of MiB from {MIN_SLOT_MIB} to {MAX_SLOT_MIB}, "
                           f"got {slot_size} bytes")
    disk = Path(path)
    record = Path(boot_record) if boot_record is not None else default_boot_record(disk)
    if disk.exists() and not force:
        raise DevDiskError(f"{disk}: already exists (pass --force to replace it)")
    if not disk.parent.is_dir():
        raise DevDiskError(f"{disk.parent}: no such directory")
    total = _write_image(disk, slot_size)
    booted = EmulatedBootloader(disk, record).boot()
    return DevDisk(disk, record, total, slot_size, version, booted)


def boot(disk: str | os.PathLike[str], boot_record: str | os.PathLike[str] | None = None) -> BootRecord:
    """Power-cycle an emulated machine: the bootloader picks a slot (GRUB gptprio rules), spends a
    try if it has any, and writes the boot record."""
    record = Path(boot_record) if boot_record is not None else default_boot_record(disk)
    return EmulatedBootloader(disk, record).boot()
