"""updateagent.slots: slot discovery and state changes, checked against cgpt and a reference model."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from gptimg import (
    LINUX_TYPE,
    Disk,
    MiB,
    cgpt_attr,
    cgpt_set,
    gptprio_bits,
    make_disk,
    sgdisk_problems,
    sgdisk_verify,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from updateagent import gpt
from updateagent.bootloader import EmulatedBootloader, NoBootableSlot
from updateagent.errors import GptError
from updateagent.slots import Slot, SlotTable

Fields = tuple[int, int, bool]


def _state(s: Slot) -> Fields:
    return (s.priority, s.tries, s.successful)


def test_slots_found_by_label(disk: Disk) -> None:
    a, b = SlotTable(disk).read()
    table = gpt.read_gpt(disk)
    assert (a.name, a.label, a.partition, b.name, b.label, b.partition) == ("A", "USR-A", 3, "B", "USR-B", 4)
    for slot in (a, b):
        part = table.partition(slot.partition)
        assert slot.partuuid == str(part.unique_guid) and slot.partuuid == slot.partuuid.lower()
        assert slot.offset == part.first_lba * 512 and slot.size == disk.slot_size
    assert _state(a) == (1, 0, True) and a.bootable
    assert _state(b) == (0, 0, False) and not b.bootable
    assert b.offset == a.offset + a.size


def test_slots_found_by_type_when_unlabelled(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "nolabel.img", labels=False)
    a, b = SlotTable(disk).read()
    assert (a.partition, a.label, b.partition, b.label) == (3, "", 4, "")


def test_inactive_slot_range_for_the_installer(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "big.img", slot_size=48 * MiB)
    table = SlotTable(disk)
    target = table.inactive("A")
    assert target.name == "B" and target.size == 48 * MiB
    out = subprocess.run(["cgpt", "show", "-i", "4", "-b", os.fspath(disk)], capture_output=True, text=True,
                         check=True).stdout
    assert target.offset == int(out) * 512
    assert table.inactive(target).name == "A" and table.other("A").name == "B"
    # Writing the whole range leaves both GPT copies intact: the range is inside the partition.
    with open(disk, "r+b") as f:
        f.seek(target.offset)
        f.write(b"\xa5" * target.size)
    sgdisk_verify(disk)
    assert table.read() == (table.slot("A"), table.slot("B"))


def test_discovery_errors_are_named(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "d.img")
    subprocess.run(["cgpt", "add", "-i", "4", "-t", LINUX_TYPE, os.fspath(disk)], check=True)
    with pytest.raises(GptError, match=r"partition 4 \(USR-B\) has type 0fc63daf-.*not CoreOS usr"):
        SlotTable(disk).read()
    subprocess.run(["cgpt", "add", "-i", "4", "-l", "OTHER", os.fspath(disk)], check=True)
    with pytest.raises(GptError, match="expected one partition labelled USR-B, found 0"):
        SlotTable(disk).read()
    unlabelled = make_disk(tmp_path / "u.img", labels=False)
    subprocess.run(["cgpt", "add", "-i", "3", "-t", LINUX_TYPE, os.fspath(unlabelled)], check=True)
    with pytest.raises(GptError, match="1 partitions of CoreOS usr type"):
        SlotTable(unlabelled).read()
    with pytest.raises(GptError, match="no slot named 'C'"):
        SlotTable(disk).slot("C")  # type: ignore[arg-type]


def test_update_cycle_exact_bits(disk: Disk) -> None:
    table = SlotTable(disk)
    a, b = table.mark_new("B")
    assert (_state(a), _state(b)) == ((1, 0, True), (2, 1, False))
    assert (cgpt_attr(disk, 3), cgpt_attr(disk, 4)) == (0x101, 0x12)
    sgdisk_verify(disk)
    a, b = table.mark_good("B")
    assert (cgpt_attr(disk, 3), cgpt_attr(disk, 4)) == (0x101, 0x102)
    a, b = table.mark_new("A")
    assert (cgpt_attr(disk, 3), cgpt_attr(disk, 4)) == (0x12, 0x101)
    a, b = table.mark_bad("A")
    assert (cgpt_attr(disk, 3), cgpt_attr(disk, 4)) == (0x0, 0x101)
    sgdisk_verify(disk)


def test_mark_bad_refuses_to_leave_nothing_bootable(disk: Disk) -> None:
    before = Path(disk).read_bytes()
    with pytest.raises(GptError, match="refusing to mark slot A bad: slot B is not bootable"):
        SlotTable(disk).mark_bad("A")
    assert Path(disk).read_bytes() == before


# cgpt prioritize only ranks ChromeOS kernel partitions, so the cross-check retypes a copy.
_OPS_AS_CGPT = {
    "mark_new": (["-S", "0", "-T", "1"], ["-i", "4"]),
    "mark_good": (["-S", "1", "-T", "0"], ["-i", "4"]),
    "mark_bad": (["-S", "0", "-T", "0", "-P", "0"], []),
}


@pytest.mark.parametrize("op", sorted(_OPS_AS_CGPT))
@pytest.mark.parametrize(
    ("a", "b"),
    [((1, 0, True), (0, 0, False)), ((5, 0, True), (3, 1, False)), ((2, 0, True), (2, 0, True)),
     ((15, 0, True), (1, 0, True)), ((0, 0, False), (0, 0, False)), ((3, 0, False), (7, 2, False))],
)
def test_priorities_match_cgpt_add_and_prioritize(tmp_path: Path, op: str, a: Fields, b: Fields) -> None:
    ours = make_disk(tmp_path / "ours.img", usr_a=a, usr_b=b)
    theirs = make_disk(tmp_path / "theirs.img", usr_a=a, usr_b=b)
    for i in ("3", "4"):
        subprocess.run(["cgpt", "add", "-i", i, "-t", "kernel", os.fspath(theirs)], check=True)
    add, prio = _OPS_AS_CGPT[op]
    subprocess.run(["cgpt", "add", "-i", "4", *add, os.fspath(theirs)], check=True)
    subprocess.run(["cgpt", "prioritize", *prio, os.fspath(theirs)], check=True)
    if op == "mark_bad" and not (a[0] > 0 and (a[1] > 0 or a[2])):
        with pytest.raises(GptError, match="refusing"):
            SlotTable(ours).mark_bad("B")
        return
    getattr(SlotTable(ours), op)("B")
    assert (cgpt_attr(ours, 3), cgpt_attr(ours, 4)) == (cgpt_attr(theirs, 3), cgpt_attr(theirs, 4))
    sgdisk_verify(ours)


# --- property: random operation sequences against a reference model -------------------


def _bootable(f: Fields) -> bool:
    return f[0] > 0 and (f[1] > 0 or f[2])


def _model_step(state: dict[str, Fields], op: tuple[str, str]) -> str | None:
    """Apply ``op`` to the reference model. Returns the booted slot for "boot", raises on refusal."""
    kind, name = op
    if kind == "boot":
        best: str | None = None
        for n in ("A", "B"):  # table order: A is partition 3, B is 4
            if _bootable(state[n]) and state[n][0] > (state[best][0] if best else 0):
                best = n
        if best is None:
            raise LookupError("nothing bootable")
        p, t, s = state[best]
        state[best] = (p, max(t - 1, 0), s)
        return best
    other = "B" if name == "A" else "A"
    op_prio, ot, os_ = state[other]
    if kind == "bad":
        if not _bootable(state[other]):
            raise LookupError("refused")
        state[name] = (0, 0, False)
        state[other] = (1, ot, os_)
        return None
    top, low = (2, 1) if op_prio > 0 else (1, 0)
    state[name] = (top, 1, False) if kind == "new" else (top, 0, True)
    state[other] = (low, ot, os_)
    return None


_fields = st.tuples(st.integers(0, 15), st.integers(0, 15), st.booleans())
_op = st.one_of(
    st.tuples(st.sampled_from(["new", "good", "bad"]), st.sampled_from(["A", "B"])),
    st.just(("boot", "")),
)


@pytest.fixture(scope="module")
def shared_disk(tmp_path_factory: pytest.TempPathFactory) -> Disk:
    return make_disk(tmp_path_factory.mktemp("prop") / "disk.img")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=_fields, b=_fields, ops=st.lists(_op, min_size=1, max_size=12))
def test_random_sequences_match_model(shared_disk: Disk, tmp_path: Path, a: Fields, b: Fields,
                                      ops: list[tuple[str, str]]) -> None:
    disk = shared_disk
    cgpt_set(disk, 3, priority=a[0], tries=a[1], successful=a[2])  # the other writer sets the start
    cgpt_set(disk, 4, priority=b[0], tries=b[1], successful=b[2])
    table = SlotTable(disk)
    loader = EmulatedBootloader(disk, tmp_path / "boot.json")
    model: dict[str, Fields] = {"A": a, "B": b}
    assert tuple(_state(s) for s in table.read()) == (a, b)
    for op in ops:
        expected_refusal = False
        try:
            booted = _model_step(model, op)
        except LookupError:
            expected_refusal = True
        if op[0] == "boot":
            if expected_refusal:
                with pytest.raises(NoBootableSlot):
                    loader.boot()
            else:
                assert loader.boot().slot == booted
        elif expected_refusal:
            with pytest.raises(GptError, match="refusing"):
                table.mark_bad(op[1])  # type: ignore[arg-type]
        else:
            getattr(table, "mark_" + op[0])(op[1])
        gt = gpt.read_gpt(disk)  # our own full CRC validation of both copies, every step
        assert gt.in_sync and gt.primary_problem is None and gt.backup_problem is None
        assert tuple(_state(s) for s in table.read()) == (model["A"], model["B"]), op
    assert (cgpt_attr(disk, 3), cgpt_attr(disk, 4)) == (gptprio_bits(*model["A"]), gptprio_bits(*model["B"]))
    assert sgdisk_problems(disk) is None
