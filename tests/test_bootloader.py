"""The emulated GRUB gptprio bootloader and its boot record, on real images."""

from __future__ import annotations

import json
import os
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from gptimg import Disk, cgpt_attr, cgpt_set, corrupt, sgdisk_problems, sgdisk_verify

from updateagent import gpt
from updateagent.bootloader import (
    BootRecordError,
    EmulatedBootloader,
    NoBootableSlot,
    read_boot_record,
)
from updateagent.slots import SlotTable


@pytest.fixture
def record(tmp_path: Path) -> Path:
    return tmp_path / "run" / "boot.json"


@pytest.fixture
def loader(disk: Disk, record: Path) -> EmulatedBootloader:
    record.parent.mkdir()
    return EmulatedBootloader(disk, record)


def test_boot_record_format(disk: Disk, loader: EmulatedBootloader, record: Path) -> None:
    before = datetime.now(UTC)
    booted = loader.boot()
    raw = json.loads(record.read_text())
    assert list(raw) == ["format_version", "slot", "label", "partition", "partuuid", "boot_id", "time"]
    part = gpt.read_gpt(disk).partition(3)
    assert raw["format_version"] == 1
    assert (raw["slot"], raw["label"], raw["partition"]) == ("A", "USR-A", 3)
    assert raw["partuuid"] == str(part.unique_guid)
    assert uuid.UUID(hex=raw["boot_id"]).version == 4 and raw["boot_id"] == booted.boot_id
    assert raw["time"].endswith("Z")
    assert before <= datetime.fromisoformat(raw["time"]) <= datetime.now(UTC)
    assert read_boot_record(record) == booted
    assert os.listdir(record.parent) == ["boot.json"]  # the temporary file was renamed, not left
    second = loader.boot()
    assert second.boot_id != booted.boot_id and read_boot_record(record) == second


@pytest.fixture
def booted_new_b(disk: Disk, loader: EmulatedBootloader) -> SlotTable:
    """An update written to slot B and booted once."""
    slots = SlotTable(disk)
    slots.mark_new("B")
    assert loader.boot().slot == "B"
    return slots


def test_update_then_rollback_without_mark_good(disk: Disk, loader: EmulatedBootloader,
                                                booted_new_b: SlotTable) -> None:
    # The one try was spent before "booting".
    assert (cgpt_attr(disk, 3), cgpt_attr(disk, 4)) == (0x101, 0x2)
    sgdisk_verify(disk)
    # Never marked good: tries are 0 and it is not successful, so the old slot boots again.
    assert loader.boot().slot == "A"
    # GRUB does not apply ChromeOS's "priority 0 when tries run out": B keeps priority 2.
    assert (cgpt_attr(disk, 3), cgpt_attr(disk, 4)) == (0x101, 0x2)


def test_update_then_mark_good_sticks(disk: Disk, loader: EmulatedBootloader, booted_new_b: SlotTable) -> None:
    booted_new_b.mark_good("B")
    for _ in range(3):
        assert loader.boot().slot == "B"
    assert (cgpt_attr(disk, 3), cgpt_attr(disk, 4)) == (0x101, 0x102)


def test_mark_bad_after_failed_health_check_boots_old(loader: EmulatedBootloader, booted_new_b: SlotTable) -> None:
    booted_new_b.mark_bad("B")
    assert loader.boot().slot == "A"


def test_ties_go_to_table_order(disk: Disk, loader: EmulatedBootloader) -> None:
    cgpt_set(disk, 3, priority=4, tries=0, successful=True)
    cgpt_set(disk, 4, priority=4, tries=0, successful=True)
    assert loader.boot().slot == "A"
    cgpt_set(disk, 3, priority=4, tries=0, successful=False)  # no longer a candidate
    assert loader.boot().slot == "B"


def test_priority_zero_never_boots_even_if_successful(disk: Disk, loader: EmulatedBootloader) -> None:
    cgpt_set(disk, 3, priority=0, tries=5, successful=True)
    cgpt_set(disk, 4, priority=1, tries=2, successful=False)
    assert loader.boot().slot == "B"
    assert cgpt_attr(disk, 4) == 0x11
    assert cgpt_attr(disk, 3) == 0x150  # untouched


def test_grub_decrements_tries_of_a_successful_slot_too(disk: Disk, loader: EmulatedBootloader) -> None:
    # GRUB spends a try whenever tries > 0; our slot model never writes this state, cgpt can.
    cgpt_set(disk, 3, priority=1, tries=2, successful=True)
    assert loader.boot().slot == "A"
    assert cgpt_attr(disk, 3) == 0x111
    loader.boot()
    loader.boot()
    assert cgpt_attr(disk, 3) == 0x101  # floors at 0 and stays bootable by the successful bit


def test_nothing_bootable_is_a_clear_error(disk: Disk, loader: EmulatedBootloader, record: Path) -> None:
    cgpt_set(disk, 3, priority=1, tries=0, successful=False)
    cgpt_set(disk, 4, priority=0, tries=3, successful=True)
    with pytest.raises(NoBootableSlot, match=r"no bootable CoreOS usr partition \[3 \(USR-A\): priority 1 "
                                             r"tries 0 successful 0, 4 \(USR-B\): priority 0 tries 3"):
        loader.boot()
    assert not record.exists()


def test_no_write_when_no_try_is_spent(disk: Disk, loader: EmulatedBootloader) -> None:
    corrupt(disk, "backup_entries")
    loader.boot()  # A is successful with tries 0: GRUB writes nothing, so the damage stays
    assert sgdisk_problems(disk) is not None
    SlotTable(disk).mark_new("B")  # any write repairs both copies
    sgdisk_verify(disk)
    corrupt(disk, "primary_header")
    assert loader.boot().slot == "B"  # read from the backup; spending the try repairs the primary
    sgdisk_verify(disk)
    assert cgpt_attr(disk, 4) == 0x2


def _write(path: Path, data: Any) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _good() -> dict[str, Any]:
    return {"format_version": 1, "slot": "B", "label": "USR-B", "partition": 4,
            "partuuid": str(uuid.uuid4()), "boot_id": uuid.uuid4().hex, "time": "2026-01-02T03:04:05Z"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format_version": 2}, "format_version 2 is not 1"),
        ({"slot": "C"}, "'slot' is 'C', expected 'A' or 'B'"),
        ({"partition": True}, "'partition' is True, expected int"),
        ({"partition": 0}, "'partition' is 0, expected >= 1"),
        ({"label": 3}, "'label' is 3, expected str"),
        ({"partuuid": "F4DE13F2-5518-4924-A8A7-E6C19CBBE6EC"}, "not a lowercase GUID"),
        ({"partuuid": "nope"}, "not a lowercase GUID"),
        ({"boot_id": "xyz"}, "not 32 lowercase hex digits"),
        ({"time": "yesterday"}, "'time' 'yesterday' is not ISO 8601"),
        ({"time": "2026-01-02T03:04:05"}, "has no timezone"),
        ({"slot": None}, "'slot' is None, expected str"),
    ],
)
def test_bad_records_are_named(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    path = _write(tmp_path / "r.json", {**_good(), **change})
    with pytest.raises(BootRecordError, match=f"{re.escape(str(path))}: boot record .*{re.escape(message)}"):
        read_boot_record(path)


def test_record_shape_errors(tmp_path: Path) -> None:
    with pytest.raises(BootRecordError, match="cannot read boot record"):
        read_boot_record(tmp_path / "absent.json")
    with pytest.raises(BootRecordError, match="not valid JSON"):
        read_boot_record(_write(tmp_path / "a.json", '{"slot": "A",'))
    with pytest.raises(BootRecordError, match="is list, expected a JSON object"):
        read_boot_record(_write(tmp_path / "b.json", [1]))
    data = _good()
    del data["boot_id"]
    with pytest.raises(BootRecordError, match="has no 'boot_id'"):
        read_boot_record(_write(tmp_path / "c.json", data))
    rec = read_boot_record(_write(tmp_path / "d.json", {**_good(), "time": "2026-01-02T05:04:05+02:00"}))
    assert rec.time == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC) and rec.time.utcoffset() == timedelta(0)
