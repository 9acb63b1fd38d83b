"""The A/B ``/usr`` slot model on top of the GPT gptprio attribute bits.

Slots are the partitions labelled ``USR-A`` and ``USR-B``; on a disk without those labels,
the two partitions of the CoreOS usr type, in table order. Every state change is one GPT
write (both copies) that leaves priorities as ``cgpt add`` followed by ``cgpt prioritize``
would: the slot being promoted gets the top rank, an active (priority > 0) other slot is
ranked 1 below it, an inactive one stays at 0.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Literal

from locksmith.log import get_logger
from updateagent import gpt
from updateagent.errors import GptError

__all__ = ["USR_PARTITION_TYPE", "Slot", "SlotName", "SlotRefused", "SlotTable", "slots_from_table"]

log = get_logger(__name__)

USR_PARTITION_TYPE = uuid.UUID("5dfbf5f4-2848-4bac-aa5e-0d9a20b745a6")
SlotName = Literal["A", "B"]
_LABELS: dict[SlotName, str] = {"A": "USR-A", "B": "USR-B"}


class SlotRefused(GptError):
    """A slot change refused by rule (marking a slot bad while the other is not bootable), as
    opposed to a disk that cannot be read or written: the caller may act on the refusal."""


@dataclass(frozen=True)
class Slot:
    """One ``/usr`` slot as the GPT describes it now. ``offset``/``size`` are in bytes."""

    name: SlotName
    label: str
    partition: int
    partuuid: str  # lowercase canonical form, as in /dev/disk/by-partuuid
    offset: int
    size: int
    priority: int
    tries: int
    successful: bool

    @property
    def bootable(self) -> bool:
        """Whether GRUB gptprio would consider this slot at all."""
        return self.priority > 0 and (self.tries > 0 or self.successful)


def _slot(name: SlotName, part: gpt.Partition, sector_size: int) -> Slot:
    return Slot(
        name=name,
        label=part.name,
        partition=part.index,
        partuuid=str(part.unique_guid),
        offset=part.first_lba * sector_size,
        size=(part.last_lba - part.first_lba + 1) * sector_size,
        priority=part.priority,
        tries=part.tries,
        successful=part.successful,
    )


def slots_from_table(table: gpt.GptTable) -> tuple[Slot, Slot]:
    """Find slots A and B in a table read by ``gpt.read_gpt``."""
    by_label = {n: [p for p in table.partitions if p.name == lab] for n, lab in _LABELS.items()}
    if by_label["A"] or by_label["B"]:
        found: dict[SlotName, gpt.Partition] = {}
        for name, parts in by_label.items():
            if len(parts) != 1:
                raise GptError(f"{table.path}: expected one partition labelled {_LABELS[name]}, "
                               f"found {len(parts)}")
            part = parts[0]
            if part.type_guid != USR_PARTITION_TYPE:
                raise GptError(f"{table.path}: partition {part.index} ({part.name}) has type "
                               f"{part.type_guid}, not CoreOS usr {USR_PARTITION_TYPE}; "
                               f"the bootloader would never pick it")
            found[name] = part
        a, b = found["A"], found["B"]
    else:
        typed = [p for p in table.partitions if p.type_guid == USR_PARTITION_TYPE]
        if len(typed) != 2:
            raise GptError(f"{table.path}: no USR-A/USR-B labels and {len(typed)} partitions of "
                           f"CoreOS usr type (need exactly 2)")
        a, b = typed
    return _slot("A", a, table.sector_size), _slot("B", b, table.sector_size)


def _rank(other: Slot) -> tuple[int, int]:
    """(top priority, other's new priority), as ``cgpt prioritize -i <promoted>`` leaves them."""
    return (2, 1) if other.priority > 0 else (1, 0)


class SlotTable:
    """The two slots of one disk (image file or block device)."""

    def __init__(self, disk: str | os.PathLike[str], *, sector_size: int = gpt.DEFAULT_SECTOR_SIZE) -> None:
        self._disk = os.fspath(disk)
        self._sector_size = sector_size

    @property
    def disk(self) -> str:
        return self._disk

    def read(self) -> tuple[Slot, Slot]:
        """Current (A, B)."""
        return slots_from_table(gpt.read_gpt(self._disk, sector_size=self._sector_size))

    def slot(self, name: SlotName | Slot) -> Slot:
        """Current state of slot ``name``."""
        key = _key(name)
        a, b = self.read()
        return a if key == "A" else b

    def other(self, slot: SlotName | Slot) -> Slot:
        """Current state of the slot that is not ``slot``."""
        key = _key(slot)
        return self.slot("B" if key == "A" else "A")

    def inactive(self, booted: SlotName | Slot) -> Slot:
        """The slot the installer may overwrite while ``booted`` is running; see ``offset``/``size``."""
        return self.other(booted)

    def mark_new(self, slot: SlotName | Slot) -> tuple[Slot, Slot]:
        """Freshly written image in ``slot``: try it once at next boot (S=0, T=1, top priority)."""
        return self._update(slot, "mark_new")

    def mark_good(self, slot: SlotName | Slot) -> tuple[Slot, Slot]:
        """``slot`` booted and is healthy: S=1, T=0, top priority."""
        return self._update(slot, "mark_good")

    def mark_bad(self, slot: SlotName | Slot) -> tuple[Slot, Slot]:
        """Never boot ``slot`` again (P=0, T=0, S=0). Refused (SlotRefused) if the other slot is not bootable."""
        return self._update(slot, "mark_bad")

    def _update(self, slot: SlotName | Slot, op: str) -> tuple[Slot, Slot]:
        key = _key(slot)

        def compute(table: gpt.GptTable) -> dict[int, int]:
            a, b = slots_from_table(table)
            target, other = (a, b) if key == "A" else (b, a)
            t_attr = table.partition(target.partition).attributes
            o_attr = table.partition(other.partition).attributes
            if op == "mark_bad":
                if not other.bootable:
                    raise SlotRefused(f"{self._disk}: refusing to mark slot {target.name} bad: slot "
                                   f"{other.name} is not bootable (priority {other.priority}, tries "
                                   f"{other.tries}, successful {int(other.successful)})")
                t_attr = gpt.set_gptprio(t_attr, priority=0, tries=0, successful=False)
                # cgpt prioritize with no -i: the remaining active slot moves down to rank 1
                o_attr = gpt.set_gptprio(o_attr, priority=1)
            else:
                top, low = _rank(other)
                if op == "mark_new":
                    t_attr = gpt.set_gptprio(t_attr, priority=top, tries=1, successful=False)
                else:
                    t_attr = gpt.set_gptprio(t_attr, priority=top, tries=0, successful=True)
                o_attr = gpt.set_gptprio(o_attr, priority=low)
            return {target.partition: t_attr, other.partition: o_attr}

        after = gpt.modify_attributes(self._disk, compute, sector_size=self._sector_size)
        result = slots_from_table(after)
        log.info("slot_" + op, disk=self._disk, slot=key,
                 state={s.name: (s.priority, s.tries, int(s.successful)) for s in result})
        return result


def _key(slot: SlotName | Slot) -> SlotName:
    key = slot.name if isinstance(slot, Slot) else slot
    if key not in _LABELS:
        raise GptError(f"no slot named {key!r} (slots are 'A' and 'B')")
    return key
