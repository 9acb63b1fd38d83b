"""Power cuts in the middle of a GPT write.

Model: a write is cut after its first k bytes reach the disk, in the order the writer issues
them (within a copy the order does not matter, see docs/gpt.md; between the copies the
writer's fsync is a barrier). The hook in updateagent.gpt really writes those k bytes (the
last buffer cut mid-way) to the image, then raises.

At each of 20 points (5 operations x 4 regions of the write, k random inside the region,
fixed seed), this test asserts:
  1. the image is byte for byte the old image with the first k bytes of the write applied;
  2. our reader returns exactly the old table or exactly the new one -- the old one whenever
     the cut came before the first copy was complete -- and cgpt reads the same gptprio bits;
  3. the emulated bootloader boots the slot GRUB gptprio picks from that table, which is a
     bootable slot (never "nothing bootable");
  4. after that boot and ``repair_gpt``, ``sgdisk -v`` reports no problem at all, both copies
     are identical, and the table is still the one the bootloader left.
Across the 20 points: some cuts left a copy sgdisk flags as damaged (so the cuts were real),
and both the "old" and the "new" outcome occurred.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
from gptimg import (
    Disk,
    MiB,
    cgpt_attr,
    clone_disk,
    corrupt,
    make_disk,
    region_offset,
    sgdisk_problems,
    sgdisk_verify,
)

from updateagent import gpt
from updateagent.bootloader import EmulatedBootloader, choose_partition
from updateagent.slots import SlotTable

SEED = 20261127
ENTRIES, HEADER = 128 * 128, 512
# One write: the first copy's entries, its header, then the second copy's entries, its header.
REGIONS = [(0, ENTRIES), (ENTRIES, ENTRIES + HEADER), (ENTRIES + HEADER, 2 * ENTRIES + HEADER),
           (2 * ENTRIES + HEADER, 2 * (ENTRIES + HEADER))]
FIRST_COPY_DONE = ENTRIES + HEADER
SMALL = {"slot_size": MiB, "disk_size": 24 * MiB}  # whole images are compared at every point

Op = Callable[[Disk, Path], object]
# name: (A fields, B fields, damage before the write, operation)
SCENARIOS: dict[str, tuple[tuple[int, int, bool], tuple[int, int, bool], str | None, Op]] = {
    "mark_new": ((1, 0, True), (0, 0, False), None, lambda d, _r: SlotTable(d).mark_new("B")),
    "boot_spends_try": ((1, 0, True), (2, 1, False), None, lambda d, r: EmulatedBootloader(d, r).boot()),
    "mark_good": ((1, 0, True), (2, 0, False), None, lambda d, _r: SlotTable(d).mark_good("B")),
    "mark_bad": ((1, 0, True), (2, 0, False), None, lambda d, _r: SlotTable(d).mark_bad("B")),
    "mark_new_primary_damaged": ((1, 0, True), (0, 0, False), "primary_header",
                                 lambda d, _r: SlotTable(d).mark_new("B")),
}


def _points() -> list[tuple[str, int]]:
    rng = random.Random(SEED)
    names = list(SCENARIOS)
    return [(names[i % 5], rng.randrange(*REGIONS[i // 5])) for i in range(20)]


def _attrs(table: gpt.GptTable) -> dict[int, int]:
    return {p.index: p.attributes for p in table.partitions}


def _write_order(disk: Disk, source: str) -> list[tuple[int, int]]:
    """(offset, length) of each buffer the writer issues, in order."""
    primary = [(region_offset(disk, "primary_entries"), ENTRIES), (region_offset(disk, "primary_header"), HEADER)]
    backup = [(region_offset(disk, "backup_entries"), ENTRIES), (region_offset(disk, "backup_header"), HEADER)]
    return backup + primary if source == "primary" else primary + backup


def _expected_torn(before: bytes, after: bytes, order: list[tuple[int, int]], k: int) -> bytes:
    image = bytearray(before)
    for offset, length in order:
        n = min(k, length)
        image[offset:offset + n] = after[offset:offset + n]
        k -= n
    return bytes(image)


def _run_point(tmp_path: Path, name: str, k: int) -> tuple[bool, str]:
    a, b, damage, op = SCENARIOS[name]
    disk = make_disk(tmp_path / "disk.img", usr_a=a, usr_b=b, **SMALL)
    twin = clone_disk(disk, tmp_path / "twin.img")
    if damage:
        corrupt(disk, damage)  # type: ignore[arg-type]
        corrupt(twin, damage)  # type: ignore[arg-type]
    before = Path(disk).read_bytes()
    assert Path(twin).read_bytes() == before
    old_table = gpt.read_gpt(disk)
    old = _attrs(old_table)
    op(twin, tmp_path / "twin-boot.json")  # the same write, uninterrupted
    after = Path(twin).read_bytes()
    new = _attrs(gpt.read_gpt(twin))
    assert new != old

    with pytest.raises(gpt._PowerCut), gpt._simulated_power_cut(k):
        op(disk, tmp_path / "boot.json")

    # 1. real bytes: exactly the first k bytes of the write landed, in the writer's order
    torn_image = Path(disk).read_bytes()
    assert torn_image == _expected_torn(before, after, _write_order(disk, old_table.source), k)
    damaged = sgdisk_problems(disk) is not None

    # 2. the reader sees the old table or the new one, nothing in between
    torn = gpt.read_gpt(disk)
    seen = _attrs(torn)
    assert seen in (old, new)
    if k < FIRST_COPY_DONE:
        assert seen == old, "the copy being read was touched before the other copy was complete"
    assert (cgpt_attr(disk, 3), cgpt_attr(disk, 4)) == (seen[3] >> 48, seen[4] >> 48)

    # 3. the machine still boots, and boots what gptprio says
    expected = choose_partition(torn.partitions)
    assert expected is not None, f"nothing bootable after a cut at {k}"
    record = EmulatedBootloader(disk, tmp_path / "boot.json").boot()
    assert record.partition == expected.index
    booted_state = _attrs(gpt.read_gpt(disk))

    # 4. a repair leaves a disk sgdisk fully accepts, with the same table
    repaired = gpt.repair_gpt(disk)
    assert repaired.in_sync
    sgdisk_verify(disk)
    assert _attrs(repaired) == booted_state
    return damaged, "old" if seen == old else "new"


def test_power_cut_at_20_points(tmp_path: Path) -> None:
    outcomes: list[tuple[str, int, bool, str]] = []
    for i, (name, k) in enumerate(_points()):
        point_dir = tmp_path / f"p{i:02d}"
        point_dir.mkdir()
        try:
            damaged, seen = _run_point(point_dir, name, k)
        except AssertionError as exc:
            raise AssertionError(f"point {i}: {name}, power cut after {k} bytes (seed {SEED}): {exc}") from exc
        outcomes.append((name, k, damaged, seen))
    assert sum(d for _, _, d, _ in outcomes) >= 10, outcomes
    assert {s for _, _, _, s in outcomes} == {"old", "new"}, outcomes
