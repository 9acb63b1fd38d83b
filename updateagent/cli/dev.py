"""``updatectl dev make-disk|boot``: an emulated machine to try the agent on (see docs/install.md)."""

from __future__ import annotations

from pathlib import Path

import click

from updateagent.cli import main
from updateagent.cli._common import emit, fail_cleanly, output_option

_fail_cleanly = fail_cleanly("updatectl")


@main.group("dev")
def dev() -> None:
    """Emulated machines: a CoreOS-layout disk image and its bootloader, no real A/B disk needed."""


@dev.command("make-disk")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--version", "version", required=True, help="Version the machine runs (slot A), e.g. 1.0.0.")
@click.option("--slot-size-mib", type=click.IntRange(min=1, max=64 * 1024), default=64, show_default=True,
              help="Size of each of USR-A and USR-B.")
@click.option("--boot-record", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Boot record to write (default: PATH with .boot.json in place of its suffix).")
@click.option("--force", is_flag=True, help="Replace an existing image.")
@output_option
@_fail_cleanly
def make_disk_cmd(path: Path, version: str, slot_size_mib: int, boot_record: Path | None, force: bool,
                  output: str) -> None:
    """Create a sparse GPT image with the CoreOS layout (USR-A good, USR-B empty) and boot it once.

    Prints the [disk] and [host] lines of an agent config that runs on it.
    """
    from updateagent.devdisk import make_disk

    d = make_disk(path, version=version, slot_size=slot_size_mib << 20, boot_record=boot_record, force=force)
    doc = {"disk": str(d.path), "boot_record": str(d.boot_record), "size": d.size, "slot_size": d.slot_size,
           "version": d.version, "booted_slot": d.booted.slot, "booted_partuuid": d.booted.partuuid,
           "config": d.config_snippet()}
    text = (f"created {d.path} ({d.size >> 20} MiB, slots of {d.slot_size >> 20} MiB); booted slot "
            f"{d.booted.slot} running {d.version}; boot record {d.boot_record}\n\n"
            f"# agent config for this machine:\n{d.config_snippet()}")
    emit(output, doc, text.rstrip("\n"))


@dev.command("boot")
@click.argument("disk", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--boot-record", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Boot record to write (default: DISK with .boot.json in place of its suffix).")
@output_option
@_fail_cleanly
def boot_cmd(disk: Path, boot_record: Path | None, output: str) -> None:
    """Power-cycle an emulated machine: its bootloader (GRUB gptprio rules) picks the slot to boot.

    Stop the agent first and start it again afterwards, as a real reboot would.
    """
    from updateagent.devdisk import boot

    record = boot(disk, boot_record)
    doc = {"slot": record.slot, "label": record.label, "partition": record.partition, "partuuid": record.partuuid,
           "boot_id": record.boot_id}
    emit(output, doc, f"booted slot {record.slot} ({record.label}, partition {record.partition})")
