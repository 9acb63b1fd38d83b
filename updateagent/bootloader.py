"""An emulated bootloader that follows GRUB ``gptprio.next`` to the letter.

Selection, over the partitions of the CoreOS usr type in table order:
  * a partition is a candidate if ``priority > 0`` and (``tries > 0`` or ``successful``);
  * the candidate with the highest priority wins; on a tie the first in table order wins;
  * if the winner has ``tries > 0`` its tries are decremented and the GPT written back
    (both copies) *before* booting. GRUB decrements whenever tries > 0, successful or not;
    for the states our slot model writes (successful slots have tries 0) that is the same as
    "decrement if not successful".
The ChromeOS firmware rule "tries reach 0 while unsuccessful -> priority 0" is NOT applied:
GRUB does not apply it; such a slot simply stops being a candidate because tries is 0.

"Booting" means writing a JSON record (atomically) that the agent reads as its host facts.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from locksmith.files import InputFileError, read_bytes
from locksmith.log import get_logger
from updateagent import gpt
from updateagent._atomic import write_atomic
from updateagent.errors import GptError, UpdateAgentError
from updateagent.slots import USR_PARTITION_TYPE, SlotName, slots_from_table

__all__ = [
    "BOOT_RECORD_FORMAT",
    "BootRecord",
    "BootRecordError",
    "EmulatedBootloader",
    "NoBootableSlot",
    "choose_partition",
    "read_boot_record",
]

log = get_logger(__name__)

BOOT_RECORD_FORMAT = 1
_HEX32 = re.compile(r"[0-9a-f]{32}")


class NoBootableSlot(GptError):
    """No partition of the CoreOS usr type is a gptprio candidate: the machine would not boot."""


class BootRecordError(UpdateAgentError):
    """A boot record file that is missing, not JSON, or not in the expected shape."""


@dataclass(frozen=True)
class BootRecord:
    """What the emulated bootloader booted. ``time`` is timezone-aware UTC. The file carries
    ``format_version`` too; the reader accepts only ``BOOT_RECORD_FORMAT``."""

    slot: SlotName
    label: str
    partition: int
    partuuid: str
    boot_id: str
    time: datetime

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["time"] = self.time.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
        return {"format_version": BOOT_RECORD_FORMAT, **data}


def choose_partition(partitions: tuple[gpt.Partition, ...]) -> gpt.Partition | None:
    """GRUB gptprio's pick among ``partitions`` (in table order), or None if nothing is bootable."""
    best: gpt.Partition | None = None
    for part in partitions:
        if part.type_guid != USR_PARTITION_TYPE:
            continue
        if (part.tries > 0 or part.successful) and part.priority > (best.priority if best else 0):
            best = part
    return best


class EmulatedBootloader:
    """Boots a disk image the way GRUB gptprio would and records what it booted."""

    def __init__(self, disk_path: str | os.PathLike[str], record_path: str | os.PathLike[str], *,
                 sector_size: int = gpt.DEFAULT_SECTOR_SIZE) -> None:
        self._disk = os.fspath(disk_path)
        self._record = os.fspath(record_path)
        self._sector_size = sector_size

    def _choose(self, table: gpt.GptTable) -> gpt.Partition:
        part = choose_partition(table.partitions)
        if part is None:
            states = ", ".join(f"{p.index} ({p.name}): priority {p.priority} tries {p.tries} "
                               f"successful {int(p.successful)}"
                               for p in table.partitions if p.type_guid == USR_PARTITION_TYPE)
            raise NoBootableSlot(f"{self._disk}: no bootable CoreOS usr partition [{states or 'none'}]")
        return part

    def boot(self) -> BootRecord:
        """Pick a slot, spend one try on it if it has any, write the boot record. Raises ``NoBootableSlot``."""
        chosen: list[gpt.Partition] = []

        def compute(table: gpt.GptTable) -> dict[int, int]:
            chosen.clear()
            part = self._choose(table)
            chosen.append(part)
            if part.tries == 0:  # another writer spent it since our unlocked look
                return {}
            return {part.index: gpt.set_gptprio(part.attributes, tries=part.tries - 1)}

        table = gpt.read_gpt(self._disk, sector_size=self._sector_size)
        if self._choose(table).tries > 0:
            # Spend the try and make it durable before "booting", as GRUB does. The decision is
            # taken again under the write lock; the write also repairs a damaged copy.
            table = gpt.modify_attributes(self._disk, compute, sector_size=self._sector_size)
        else:
            # Nothing to spend: GRUB writes nothing, so neither do we (a damaged copy stays damaged).
            chosen.append(self._choose(table))
        part = chosen[0]
        slot = next((s for s in slots_from_table(table) if s.partition == part.index), None)
        if slot is None:
            raise GptError(f"{self._disk}: bootloader picked partition {part.index} ({part.name}), "
                           f"which is neither slot A nor slot B")
        record = BootRecord(slot=slot.name, label=slot.label, partition=slot.partition,
                            partuuid=slot.partuuid, boot_id=uuid.uuid4().hex, time=datetime.now(UTC))
        write_atomic(self._record, (json.dumps(record.to_json(), indent=2) + "\n").encode())
        log.info("emulated_boot", disk=self._disk, slot=slot.name, partition=slot.partition,
                 tries_left=max(part.tries - 1, 0), boot_id=record.boot_id)
        return record


def _field(data: dict[str, Any], key: str, path: str, kind: type) -> Any:
    if key not in data:
        raise BootRecordError(f"{path}: boot record has no {key!r}")
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BootRecordError(f"{path}: boot record {key!r} is {value!r}, expected {kind.__name__}")
    return value


def read_boot_record(path: str | os.PathLike[str]) -> BootRecord:
    """Read and validate a boot record written by ``EmulatedBootloader.boot``."""
    p = os.fspath(path)
    try:
        raw = read_bytes(p, max_bytes=64 * 1024, what="boot record")
    except InputFileError as exc:
        raise BootRecordError(f"{p}: cannot read boot record: {exc.problem}") from exc
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # also UnicodeDecodeError and int()'s digit limit
        raise BootRecordError(f"{p}: boot record is not valid JSON: {str(exc).split(';')[0]}") from exc
    if not isinstance(data, dict):
        raise BootRecordError(f"{p}: boot record is {type(data).__name__}, expected a JSON object")
    version = _field(data, "format_version", p, int)
    if version != BOOT_RECORD_FORMAT:
        raise BootRecordError(f"{p}: boot record format_version {version} is not {BOOT_RECORD_FORMAT}")
    slot = _field(data, "slot", p, str)
    if slot not in ("A", "B"):
        raise BootRecordError(f"{p}: boot record 'slot' is {slot!r}, expected 'A' or 'B'")
    label = _field(data, "label", p, str)
    partition = _field(data, "partition", p, int)
    if partition < 1:
        raise BootRecordError(f"{p}: boot record 'partition' is {partition}, expected >= 1")
    partuuid = _field(data, "partuuid", p, str)
    try:
        canonical = str(uuid.UUID(partuuid))
    except ValueError:
        canonical = ""
    if canonical != partuuid:
        raise BootRecordError(f"{p}: boot record 'partuuid' {partuuid!r} is not a lowercase GUID")
    boot_id = _field(data, "boot_id", p, str)
    if not _HEX32.fullmatch(boot_id):
        raise BootRecordError(f"{p}: boot record 'boot_id' {boot_id!r} is not 32 lowercase hex digits")
    stamp = _field(data, "time", p, str)
    try:
        when = datetime.fromisoformat(stamp)
    except ValueError as exc:
        raise BootRecordError(f"{p}: boot record 'time' {stamp!r} is not ISO 8601") from exc
    if when.utcoffset() is None:
        raise BootRecordError(f"{p}: boot record 'time' {stamp!r} has no timezone")
    return BootRecord(slot=slot, label=label, partition=partition, partuuid=partuuid,
                      boot_id=boot_id, time=when.astimezone(UTC))
