"""updateagent.gpt against real sgdisk-made images, cross-checked with sgdisk and cgpt."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import uuid
import zlib
from pathlib import Path

import pytest
from gptimg import (
    USR_TYPE,
    Disk,
    cgpt_attr,
    cgpt_set,
    clone_disk,
    corrupt,
    gptprio_bits,
    make_disk,
    region_offset,
    sgdisk_problems,
    sgdisk_verify,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from updateagent import gpt
from updateagent.errors import GptError


def _cgpt_field(path: os.PathLike[str] | str, index: int, flag: str) -> str:
    out = subprocess.run(["cgpt", "show", "-i", str(index), flag, os.fspath(path)],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_every_image_has_its_own_guids_and_a_clone_is_a_twin(disk: Disk, tmp_path: Path) -> None:
    other = make_disk(tmp_path / "other.img")  # same template as ``disk``
    mine, theirs = gpt.read_gpt(disk), gpt.read_gpt(other)
    assert mine.disk_guid != theirs.disk_guid
    guids = [p.unique_guid for p in (*mine.partitions, *theirs.partitions)]
    assert len(set(guids)) == len(guids) == 10
    for image in (disk, other):
        for part in gpt.read_gpt(image).partitions:  # what an independent reader sees, both copies
            assert str(part.unique_guid).upper() == _cgpt_field(image, part.index, "-u")
    twin = clone_disk(disk, tmp_path / "twin.img")
    assert Path(twin).read_bytes() == Path(disk).read_bytes()


def test_reads_the_table_sgdisk_wrote(disk: Disk) -> None:
    table = gpt.read_gpt(disk)
    assert table.source == "primary" and table.in_sync
    assert table.primary_problem is None and table.backup_problem is None
    assert [p.name for p in table.partitions] == ["EFI-SYSTEM", "BIOS-BOOT", "USR-A", "USR-B", "ROOT"]
    assert [p.index for p in table.partitions] == [1, 2, 3, 4, 5]
    assert table.disk_sectors * 512 == disk.size
    for part in table.partitions:
        assert str(part.unique_guid).upper() == _cgpt_field(disk, part.index, "-u")
        assert str(part.type_guid).upper() == _cgpt_field(disk, part.index, "-t")
        assert part.first_lba == int(_cgpt_field(disk, part.index, "-b"))
        assert part.last_lba - part.first_lba + 1 == int(_cgpt_field(disk, part.index, "-s"))
    usr_a = table.partition(3)
    assert usr_a.type_guid == uuid.UUID(USR_TYPE)
    assert (usr_a.priority, usr_a.tries, usr_a.successful) == (1, 0, True)
    assert (usr_a.last_lba - usr_a.first_lba + 1) * 512 == disk.slot_size
    with pytest.raises(GptError, match="no partition 9"):
        table.partition(9)


@pytest.mark.parametrize(
    ("priority", "tries", "successful"),
    [(0, 0, False), (1, 0, True), (2, 1, False), (15, 15, True), (0, 15, False), (15, 0, False), (3, 7, True)],
)
def test_written_state_is_what_cgpt_reads(disk: Disk, priority: int, tries: int, successful: bool) -> None:
    old = gpt.read_gpt(disk).partition(4).attributes
    value = gpt.set_gptprio(old, priority=priority, tries=tries, successful=successful)
    after = gpt.write_attributes(disk, {4: value})
    assert after.in_sync and after.partition(4).attributes == value
    assert cgpt_attr(disk, 4) == gptprio_bits(priority, tries, successful)
    assert cgpt_attr(disk, 3) == gptprio_bits(1, 0, True)  # untouched neighbour
    sgdisk_verify(disk)


@pytest.mark.parametrize(
    ("priority", "tries", "successful"),
    [(0, 0, False), (1, 0, True), (2, 1, False), (15, 15, True), (9, 4, False)],
)
def test_reads_state_cgpt_wrote(disk: Disk, priority: int, tries: int, successful: bool) -> None:
    cgpt_set(disk, 4, priority=priority, tries=tries, successful=successful)
    part = gpt.read_gpt(disk).partition(4)
    assert (part.priority, part.tries, part.successful) == (priority, tries, successful)
    assert part.attributes >> 48 == gptprio_bits(priority, tries, successful)


def test_other_attribute_bits_survive_a_gptprio_write(disk: Disk) -> None:
    # bit 0 "required", bit 2 "legacy BIOS bootable", bits 60/63 (Microsoft read-only, no automount)
    subprocess.run(["sgdisk", "-A3:set:0", "-A3:set:2", "-A3:set:60", "-A3:set:63", os.fspath(disk)],
                   check=True, capture_output=True)
    before = gpt.read_gpt(disk).partition(3).attributes
    assert before == (1 << 0) | (1 << 2) | (1 << 60) | (1 << 63) | (gptprio_bits(1, 0, True) << 48)
    gpt.write_attributes(disk, {3: gpt.set_gptprio(before, priority=5, tries=3, successful=False)})
    shown = subprocess.run(["sgdisk", "-A3:show", os.fspath(disk)], capture_output=True, text=True,
                           check=True).stdout
    bits = sorted(int(line.split(":")[1].split()[0]) for line in shown.splitlines() if line.startswith("3:"))
    assert bits == [0, 2, 48, 50, 52, 53, 60, 63]  # priority 5 = bits 48+50, tries 3 = bits 52+53
    assert cgpt_attr(disk, 3) == gptprio_bits(5, 3, False) | (1 << 12) | (1 << 15)
    sgdisk_verify(disk)


def test_unchanged_write_touches_nothing(disk: Disk) -> None:
    before = Path(disk).read_bytes()
    table = gpt.read_gpt(disk)
    gpt.write_attributes(disk, {3: table.partition(3).attributes})
    gpt.repair_gpt(disk)
    assert Path(disk).read_bytes() == before


@pytest.mark.parametrize("region", ["primary_header", "primary_entries"])
def test_corrupt_primary_reads_backup_and_write_repairs(disk: Disk, region: str) -> None:
    cgpt_set(disk, 4, priority=2, tries=1, successful=False)
    corrupt(disk, region)  # type: ignore[arg-type]
    assert sgdisk_problems(disk) is not None
    table = gpt.read_gpt(disk)
    assert table.source == "backup" and not table.in_sync
    assert table.primary_problem is not None and "CRC" in table.primary_problem
    assert table.backup_problem is None
    assert table.partition(4).attributes >> 48 == gptprio_bits(2, 1, False)
    value = gpt.set_gptprio(table.partition(4).attributes, tries=0)
    after = gpt.write_attributes(disk, {4: value})
    assert after.source == "primary" and after.in_sync
    sgdisk_verify(disk)
    assert cgpt_attr(disk, 4) == gptprio_bits(2, 0, False)


@pytest.mark.parametrize("region", ["backup_header", "backup_entries"])
def test_corrupt_backup_reads_primary_and_repair_fixes_it(disk: Disk, region: str) -> None:
    corrupt(disk, region)  # type: ignore[arg-type]
    assert sgdisk_problems(disk) is not None
    table = gpt.read_gpt(disk)
    assert table.source == "primary" and not table.in_sync
    assert table.backup_problem is not None and table.primary_problem is None
    repaired = gpt.repair_gpt(disk)
    assert repaired.in_sync and repaired.partitions == table.partitions
    sgdisk_verify(disk)


def test_both_copies_corrupt_is_a_clear_error(disk: Disk) -> None:
    corrupt(disk, "primary_entries")
    corrupt(disk, "backup_header")
    with pytest.raises(GptError, match=r"no valid GPT: primary: entry array CRC mismatch.*backup: header CRC"):
        gpt.read_gpt(disk)
    with pytest.raises(GptError, match="no valid GPT"):
        gpt.write_attributes(disk, {})


def test_valid_but_different_copies_prefer_primary(disk: Disk, tmp_path: Path) -> None:
    # Stale primary, newer backup: the state a power cut between the two phases leaves.
    newer = tmp_path / "newer.img"
    shutil.copyfile(disk, newer)
    cgpt_set(newer, 4, priority=2, tries=1, successful=False)
    start = region_offset(disk, "backup_entries")
    with open(newer, "rb") as src, open(disk, "r+b") as dst:
        src.seek(start)
        dst.seek(start)
        dst.write(src.read())
    table = gpt.read_gpt(disk)
    assert table.source == "primary" and not table.in_sync
    assert table.primary_problem is None and table.backup_problem is None
    assert table.partition(4).attributes == 0
    assert cgpt_attr(disk, 4) == 0  # cgpt makes the same choice
    gpt.repair_gpt(disk)
    sgdisk_verify(disk)
    assert gpt.read_gpt(disk).partition(4).attributes == 0


def test_bad_inputs_are_named(tmp_path: Path, disk: Disk) -> None:
    with pytest.raises(GptError, match="cannot open"):
        gpt.read_gpt(tmp_path / "missing.img")
    tiny = tmp_path / "tiny.img"
    tiny.write_bytes(b"\0" * 1000)
    with pytest.raises(GptError, match="too small"):
        gpt.read_gpt(tiny)
    blank = tmp_path / "blank.img"
    blank.write_bytes(b"\0" * 1024 * 1024)
    with pytest.raises(GptError, match="primary: no GPT signature at LBA 1"):
        gpt.read_gpt(blank)
    with pytest.raises(GptError, match="not a regular file or block device"):
        gpt.read_gpt(tmp_path)
    with pytest.raises(GptError, match="no partition 7"):
        gpt.write_attributes(disk, {7: 0})
    with pytest.raises(GptError, match="do not fit in 64 bits"):
        gpt.write_attributes(disk, {3: 1 << 64})
    with pytest.raises(GptError, match="priority 16 out of range"):
        gpt.set_gptprio(0, priority=16)
    with pytest.raises(GptError, match="tries -1 out of range"):
        gpt.set_gptprio(0, tries=-1)
    with pytest.raises(GptError, match="sector size 1000"):
        gpt.read_gpt(disk, sector_size=1000)
    sgdisk_verify(disk)


def test_header_pointing_outside_the_disk_is_rejected(disk: Disk) -> None:
    # Corrupt a field but fix the CRC, so only the structural check can catch it.
    with open(disk, "r+b") as f:
        f.seek(512)
        hdr = bytearray(f.read(92))
        struct.pack_into("<Q", hdr, 72, 10**9)  # entry array LBA far beyond the end
        struct.pack_into("<I", hdr, 16, 0)
        struct.pack_into("<I", hdr, 16, zlib.crc32(hdr))
        f.seek(512)
        f.write(hdr)
    table = gpt.read_gpt(disk)
    assert table.source == "backup"
    assert table.primary_problem == "header at LBA 1 places its entry array at LBA 1000000000 (bad position)"
    gpt.repair_gpt(disk)
    sgdisk_verify(disk)


_fields = st.tuples(st.integers(0, 15), st.integers(0, 15), st.booleans())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=_fields, b=_fields, noise=st.integers(0, (1 << 48) - 1) | st.just(0))
def test_roundtrip_any_fields(disk: Disk, a: tuple[int, int, bool], b: tuple[int, int, bool], noise: int) -> None:
    table = gpt.read_gpt(disk)
    va = gpt.set_gptprio(noise, priority=a[0], tries=a[1], successful=a[2])
    vb = gpt.set_gptprio(table.partition(4).attributes, priority=b[0], tries=b[1], successful=b[2])
    after = gpt.write_attributes(disk, {3: va, 4: vb})
    assert after.in_sync
    assert (after.partition(3).attributes, after.partition(4).attributes) == (va, vb)
    assert cgpt_attr(disk, 3) == gptprio_bits(*a) and cgpt_attr(disk, 4) == gptprio_bits(*b)


def _attach_loop(image: Path) -> str | None:
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        return None
    res = subprocess.run(["losetup", "--show", "-f", os.fspath(image)], capture_output=True, text=True,
                         check=False)
    return res.stdout.strip() if res.returncode == 0 else None


def test_block_device_same_as_image(disk: Disk) -> None:
    dev = _attach_loop(disk.path)
    if dev is None:
        pytest.skip("needs root and a free loop device to test a real block device")
    try:
        table = gpt.read_gpt(dev)
        assert table.disk_sectors * 512 == disk.size
        assert table.partitions == gpt.read_gpt(disk).partitions
        value = gpt.set_gptprio(table.partition(4).attributes, priority=2, tries=1, successful=False)
        assert gpt.write_attributes(dev, {4: value}).in_sync
        assert cgpt_attr(dev, 4) == 0x12
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)
    assert cgpt_attr(disk, 4) == 0x12  # reached the backing file
    sgdisk_verify(disk)
