"""dmsetup's commands that make, change and remove devices: create (also --concise), load,
reload, suspend, resume, clear, remove, wipe_table, remove_all, rename, wait, message and
setgeometry."""

from __future__ import annotations

import errno
import re
import sys
import time
from typing import Any

import click

from minidisk.cli.common import require_server
from minidisk.cli.dmsetup.base import (
    MAX_NAME,
    F,
    Invocation,
    dmsetup,
    failed,
    no_device,
    pass_invocation,
    refuse,
    select_options,
    strerror,
    too_many,
    uint_arg,
    usage_exit,
)
from minidisk.cli.progress import Progress
from minidisk.dm import report
from minidisk.dm.commands import DmCommand
from minidisk.dm.table import TableError, split_args


def _read_table(table: str | None, table_file: str | None) -> str:
    if table is not None:
        return table
    if table_file is not None:
        with open(table_file) as f:
            return f.read()
    return sys.stdin.read()



def _check_name(name: str) -> None:
    """What dmsetup refuses before asking the kernel (DM_NAME_LEN, no '/')."""
    if len(name) > MAX_NAME:
        refuse(f'Name "{name}" too long.')
    if "/" in name:
        refuse(f'Name "{name}" invalid. It contains "/".')


def node_options(func: F) -> F:
    """dmsetup's options for the /dev/mapper node (its owner, group and mode, when udev does
    not make it): accepted and ignored, as the udev flags are, since /dev/mapper/NAME is a
    namespace key here, not a node."""
    for decls, text in ((("-U", "--uid"), "Owner of the node (no node here)."),
                        (("-G", "--gid"), "Group of the node (no node here)."),
                        (("-M", "--mode"), "Mode of the node (no node here).")):
        func = click.option(*decls, metavar="ID", expose_value=False, help=text)(func)
    for flag in ("--addnodeonresume", "--addnodeoncreate"):
        func = click.option(flag, is_flag=True, expose_value=False,
                            help="When to make the node (no node here).")(func)
    return func


def _set_readahead(inv: Invocation, name: str, value: str | None) -> None:
    """--readahead as dmsetup reads it: auto (leave it), none (0), +N (at least N), N; a
    word that is no number is atoi's 0, as there."""
    if value is None or value.lower() == "auto":
        return
    at_least = value.startswith("+")
    digits = re.match(r"\d*", value[1:] if at_least else value)
    sectors = 0 if value.lower() == "none" or digits is None or not digits[0] \
        else int(digits[0])
    inv.call(DmCommand.READAHEAD, {"name": name, "sectors": sectors, "at_least": at_least},
          "readahead", name)


def _table_text(text: str, source: str) -> str | None:
    """The table as dmsetup reads it before any ioctl: each line needs a start and a length
    (unsigned numbers) and a target type, else 'Invalid format'. None if there is no
    segment at all (dmsetup then creates the device without a table)."""
    lines = 0
    for number, raw in enumerate(text.splitlines(), 1):
        words = raw.split()
        if not words or words[0].startswith("#"):
            continue
        if len(words) < 3 or not words[0].isdigit() or not words[1].isdigit():
            refuse(f"Invalid format on line {number} of table {source}.")
        lines += 1
    return text if lines else None


def _create_concise(inv: Invocation, spec: str) -> None:
    """create --concise "NAME,UUID,MINOR,ro|rw,TABLE[,TABLE...];...": several devices, each
    with its table lines after the flags, as dmsetup reads them."""
    for entry in spec.split(";"):
        fields = entry.split(",")
        if len(fields) < 5:
            shown = [*fields, *["(null)"] * (5 - len(fields))]
            refuse("Five comma-separated fields are required for each device\n"
                    f"Parsed {len(fields)} fields: name: {shown[0]} uuid: {shown[1]} "
                    f"minor: {shown[2]} flags: {shown[3]} table: {shown[4]}")
        name, uuid, minor, flags = fields[:4]
        _create(inv, name, "\n".join(fields[4:]), uuid, flags == "ro", None,
                int(minor) if minor.isdigit() else None, None)


@dmsetup.command()
@click.argument("name", required=False)
@click.argument("table_file", required=False)
@click.option("--concise", "concise", is_flag=True,
              help="NAME is a list of devices: name,uuid,minor,ro|rw,table;...")
@click.option("--table", "table", metavar="TABLE", help="A one-line table.")
@click.option("-n", "--notable", is_flag=True, help="Create without a table.")
@click.option("-u", "--uuid", default="", help="The device's UUID.")
@click.option("-r", "--readonly", is_flag=True, help="Create read-only.")
@click.option("-j", "--major", type=click.IntRange(min=0), help="With -m: the device number.")
@click.option("-m", "--minor", type=click.IntRange(min=0), help="The minor number to use.")
@click.option("--readahead", metavar="[+]SECTORS|auto|none", help="Read-ahead to show.")
@node_options
@pass_invocation
def create(inv: Invocation, name: str | None, table_file: str | None, concise: bool,
           table: str | None, notable: bool, uuid: str, readonly: bool, major: int | None,
           minor: int | None, readahead: str | None) -> None:
    """Create NAME; with a table (TABLE_FILE, --table or stdin) make it live.

    As libdevmapper does it: create the device, load the table, resume; a refused table
    removes the device again (its minor is free for the next one)."""
    if concise:
        _create_concise(inv, name if name is not None else sys.stdin.read())
        return
    if name is None:
        raise click.UsageError("give NAME")
    text = None if notable else _read_table(table, table_file)
    _create(inv, name, text, uuid, readonly, major, minor, readahead, table_file or "")


def _create(inv: Invocation, name: str, text: str | None, uuid: str, readonly: bool,
            major: int | None, minor: int | None, readahead: str | None,
            source: str = "") -> None:
    _check_name(name)
    text = None if text is None else _table_text(text, source)
    args: dict[str, Any] = {"name": name, "table": None, "uuid": uuid, "read_only": readonly}
    devno = uuid  # what dmsetup prints after the name: the UUID, or the number asked for
    if minor is not None:
        args["minor"] = minor
        devno = devno or f"({major if major is not None else report.DM_MAJOR}:{minor})"
    info = inv.call(DmCommand.CREATE, args, "create", name, devno)
    if text is None:
        return
    from minidisk.control_client import ControlError, call

    url = require_server(inv.server)
    try:
        call(url, DmCommand.LOAD, {"name": name, "table": text})
    except ControlError as e:
        try:
            call(url, DmCommand.REMOVE, {"name": name})
        except ControlError:
            pass
        failed("reload", name, e.errno, f"({info['major']}:{info['minor']})")
    inv.call(DmCommand.RESUME, {"name": name}, "resume", name)
    _set_readahead(inv, name, readahead)


def _load(inv: Invocation, args: tuple[str, ...], table: str | None) -> None:
    device, label, rest = inv.leading_device(args)
    too_many(rest, 1)
    text = _read_table(table, rest[0] if rest else None)
    inv.call(DmCommand.LOAD, {**device, "table": text}, "reload", label)


@dmsetup.command()
@click.argument("args", nargs=-1, metavar="[NAME] [TABLE_FILE]")
@click.option("--table", "table", metavar="TABLE", help="A one-line table.")
@select_options
@pass_invocation
def load(inv: Invocation, args: tuple[str, ...], table: str | None) -> None:
    """Load a table into NAME's inactive slot."""
    _load(inv, args, table)


@dmsetup.command()
@click.argument("args", nargs=-1, metavar="[NAME] [TABLE_FILE]")
@click.option("--table", "table", metavar="TABLE", help="A one-line table.")
@select_options
@pass_invocation
def reload(inv: Invocation, args: tuple[str, ...], table: str | None) -> None:
    """Same as load."""
    _load(inv, args, table)


def _each_device(inv: Invocation, names: tuple[str, ...]) -> list[tuple[dict[str, Any], str]]:
    """The devices of a command that takes several names, or the one -u or -j/-m choose."""
    if names:
        return [({"name": name}, name) for name in names]
    selection = inv.selection()
    if selection is None:
        no_device()
    return [selection]


@dmsetup.command()
@click.argument("names", nargs=-1)
@click.option("--noflush", is_flag=True, help="Do not flush the table's devices.")
@click.option("--nolockfs", is_flag=True, help="Accepted for dmsetup compatibility.")
@select_options
@pass_invocation
def suspend(inv: Invocation, names: tuple[str, ...], noflush: bool, nolockfs: bool) -> None:
    """Suspend: wait for I/O in flight; later I/O waits until resume."""
    for device, label in inv.each_device(names):
        inv.call(DmCommand.SUSPEND, {**device, "noflush": noflush}, "suspend", label)


@dmsetup.command()
@click.argument("names", nargs=-1)
@click.option("--readahead", metavar="[+]SECTORS|auto|none", help="Read-ahead to show.")
@node_options
@select_options
@pass_invocation
def resume(inv: Invocation, names: tuple[str, ...], readahead: str | None) -> None:
    """Make the inactive table live (if any) and release queued I/O."""
    for device, label in inv.each_device(names):
        info = inv.call(DmCommand.RESUME, device, "resume", label)
        _set_readahead(inv, info["name"], readahead)


@dmsetup.command()
@click.argument("name", required=False)
@select_options
@pass_invocation
def clear(inv: Invocation, name: str | None) -> None:
    """Drop NAME's inactive table."""
    for device, label in inv.each_device(() if name is None else (name,)):
        inv.call(DmCommand.CLEAR, device, "clear", label)


# libdevmapper's retry of a busy remove: 25 tries, 0.2 s apart (DM_IOCTL_RETRIES,
# DM_RETRY_USLEEP_DELAY): long enough for a briefly held device (a blkid probe, a client
# that is just disconnecting) to be let go.
REMOVE_RETRIES = 25
REMOVE_RETRY_DELAY_S = 0.2


@dmsetup.command()
@click.argument("names", nargs=-1)
@click.option("-f", "--force", is_flag=True, help="Swap in an error table if it is open.")
@click.option("--deferred", is_flag=True,
              help="If open, remove when the last user closes it (cancel with "
                   "`message NAME 0 @cancel_deferred_remove`).")
@click.option("--retry", is_flag=True,
              help=f"If the device is busy, try again for about "
                   f"{REMOVE_RETRIES * REMOVE_RETRY_DELAY_S:g} s before failing.")
@select_options
@pass_invocation
def remove(inv: Invocation, names: tuple[str, ...], force: bool, deferred: bool,
           retry: bool) -> None:
    """Remove devices (EBUSY while open)."""
    from minidisk.control_client import ControlError, call

    url = require_server(inv.server)
    for device, label in inv.each_device(names):
        args = {**device, "force": force, "deferred": deferred}
        tries = REMOVE_RETRIES if retry else 1
        with Progress(f"removing {label}: busy, retrying", total=tries, unit=" tries") as shown:
            for attempt in range(tries):
                try:
                    call(url, DmCommand.REMOVE, args)
                    break
                except ControlError as e:
                    if e.errno == errno.EBUSY and attempt + 1 < tries:
                        shown.update(attempt + 1)
                        time.sleep(REMOVE_RETRY_DELAY_S)
                        continue
                    failed("remove", label, e.errno)


@dmsetup.command(name="wipe_table")
@click.argument("names", nargs=-1)
@click.option("-f", "--force", is_flag=True, help="Accepted for dmsetup compatibility.")
@click.option("--noflush", is_flag=True, help="Accepted for dmsetup compatibility.")
@click.option("--nolockfs", is_flag=True, help="Accepted for dmsetup compatibility.")
@select_options
@pass_invocation
def wipe_table(inv: Invocation, names: tuple[str, ...], force: bool, noflush: bool,
               nolockfs: bool) -> None:
    """Make every I/O fail: load an error table of the same size and resume (as
    dmsetup: the size from the live table, then reload and resume)."""
    from minidisk.control_client import ControlError, call

    for device, label in inv.each_device(names):
        try:
            devices = call(require_server(inv.server), DmCommand.TABLE, device)["devices"]
        except ControlError as e:  # dmsetup goes on to the reload, which fails too
            click.echo(f"device-mapper: table ioctl on {label}  failed: "
                       f"{strerror(e.errno)}", err=True)
            devices = []
        sectors = sum(int(line.split()[1]) for d in devices for line in d["lines"])
        inv.call(DmCommand.LOAD, {**device, "table": f"0 {sectors} error"}, "reload", label)
        inv.call(DmCommand.RESUME, device, "resume", label)


@dmsetup.command(name="remove_all")
@click.option("-f", "--force", is_flag=True, help="Swap in error tables for open devices.")
@click.option("--deferred", is_flag=True, help="Mark open devices for removal on last close.")
@pass_invocation
def remove_all(inv: Invocation, force: bool, deferred: bool) -> None:
    """Remove every device that is not open."""
    left = inv.call(DmCommand.REMOVE_ALL, {"force": force, "deferred": deferred},
                 "remove_all")["left"]
    if left:
        click.echo(f"Unable to remove {len(left)} device(s): {' '.join(left)}", err=True)


@dmsetup.command()
@click.argument("name")
@click.argument("new_name", required=False)
@click.option("--setuuid", metavar="UUID", help="Give a device without a UUID one.")
@pass_invocation
def rename(inv: Invocation, name: str, new_name: str | None, setuuid: str | None) -> None:
    """Rename NAME to NEW_NAME, or set its UUID."""
    if (new_name is None) == (setuuid is None):
        raise click.UsageError("give NEW_NAME or --setuuid UUID")
    args: dict[str, Any] = {"name": name}
    if setuuid is not None:
        args["uuid"] = setuuid
    else:
        assert new_name is not None
        if len(new_name) > MAX_NAME:  # dmsetup's words (no full stop, unlike create's)
            refuse(f'Name "{new_name}" too long')
        args["new_name"] = new_name
    inv.call(DmCommand.RENAME, args, "rename", name)


@dmsetup.command()
@click.argument("args", nargs=-1, metavar="[NAME] [EVENT_NR]")
@click.option("-v", "--verbose", count=True, help="Print the device's info afterwards.")
@select_options
@pass_invocation
def wait(inv: Invocation, args: tuple[str, ...], verbose: int) -> None:
    """Sleep until NAME's event counter exceeds EVENT_NR (default: its value now)."""
    device, label, rest = inv.leading_device(args)
    too_many(rest, 1)
    event_nr = uint_arg(rest[0], "EVENT_NR") if rest else None
    result = inv.call(DmCommand.WAIT, {**device, "event_nr": event_nr}, "waitevent", label)
    if verbose or inv.verbose:
        click.echo(report.info_long(result), nl=False)


@dmsetup.command()
@click.argument("args", nargs=-1, required=True, metavar="[NAME] SECTOR MESSAGE...")
@select_options
@pass_invocation
def message(inv: Invocation, args: tuple[str, ...]) -> None:
    """Send a message to the target at SECTOR of NAME."""
    device, label, rest = inv.leading_device(args)
    if len(rest) < 2:
        raise click.UsageError("give SECTOR and a MESSAGE")
    if not rest[0].isdigit():
        refuse("Invalid sector.")  # dmsetup's words
    sector = int(rest[0])
    # dmsetup joins its arguments with spaces and the kernel splits the message again on
    # whitespace (dm_split_args), so `message pool 0 "create_thin 1"` is two words.
    try:
        words = split_args(" ".join(rest[1:]))
    except TableError as err:
        refuse(f"message: {err}")
    result = inv.call(DmCommand.MESSAGE, {**device, "sector": sector, "args": words},
                      "message", label)["result"]
    if result:  # as dmsetup: a reply that ends its last line is printed as it is
        click.echo(result, nl=not result.endswith("\n"))


@dmsetup.command()
@click.argument("args", nargs=-1, metavar="[NAME] CYLINDERS HEADS SECTORS START")
@select_options
@pass_invocation
@click.pass_context
def setgeometry(ctx: click.Context, inv: Invocation, args: tuple[str, ...]) -> None:
    """Set the geometry NAME reports to HDIO_GETGEO (as the kernel keeps it)."""
    if len(args) != (4 if inv.selection() is not None else 5):
        usage_exit(ctx, "Incorrect number of arguments.")
    device, label, rest = inv.leading_device(args)
    inv.call(DmCommand.GEOMETRY, {**device, "geometry": list(rest)}, "setgeometry", label)

