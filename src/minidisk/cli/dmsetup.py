"""`minidisk dmsetup ...` (dmsetup's commands and output, against a running server) and
`minidisk replay-log` (replay a log-writes log onto a host file).

Output formats are lvm2 dmsetup's (see minidisk.dm.report). A failure prints what dmsetup
prints — `device-mapper: <op> ioctl on <name>  failed: <strerror>` — then the server's
one-line reason (for a refused table: which segment and why) and `Command failed.`, and
exits 1.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import click

from minidisk.cli.common import require_server, server_option
from minidisk.dm import report

MAX_NAME = 127  # DM_NAME_LEN - 1


@dataclass
class Session:
    server: str | None
    verbose: int
    # -u UUID / -j MAJOR -m MINOR of the command being run (see `select_options`)
    uuid: str | None = None
    major: int | None = None
    minor: int | None = None

    def selection(self) -> tuple[dict[str, Any], str] | None:
        """The device chosen by -u or -j/-m, as control arguments and as error messages
        name it; None if neither was given."""
        if self.uuid is not None:
            return {"uuid": self.uuid}, f"UUID {self.uuid}"
        if self.major is None and self.minor is None:
            return None
        if self.major is None or self.minor is None:
            raise click.UsageError("-j MAJOR and -m MINOR go together")
        return {"major": self.major, "minor": self.minor}, f"({self.major}:{self.minor})"

    def device(self, name: str | None) -> tuple[dict[str, Any], str | None]:
        """NAME when given (as in dmsetup, a name wins), else -u or -j/-m; ({}, None) when
        none is: the commands that take that as 'every device' do so."""
        if name is not None:
            return {"name": name}, name
        return self.selection() or ({}, None)

    def leading_device(self, args: tuple[str, ...]) -> tuple[dict[str, Any], str,
                                                              tuple[str, ...]]:
        """For commands with arguments after the device (load, wait, message): with -u or
        -j/-m every argument is the command's own; otherwise the first one names the
        device. Returns the device, its label and the remaining arguments."""
        selection = self.selection()
        if selection is not None:
            return selection[0], selection[1], args
        if not args:
            _no_device()
        return {"name": args[0]}, args[0], args[1:]


def _no_device() -> NoReturn:
    click.echo("No device specified.", err=True)  # dmsetup's words
    click.echo("Command failed.", err=True)
    sys.exit(1)


def _uint(word: str, what: str) -> int:
    if not word.isdigit():
        raise click.BadParameter(f"{word!r} is not a non-negative integer", param_hint=what)
    return int(word)


def _too_many(rest: tuple[str, ...], allowed: int) -> None:
    if len(rest) > allowed:
        raise click.UsageError(f"unexpected extra arguments: {' '.join(rest[allowed:])}")


def _failed(op: str, name: str | None, err: int, devno: str = "") -> NoReturn:
    """dmsetup's words for a failed ioctl: the errno only (the reason is in the server's
    log, as the kernel's is in its log), with the device's number when the request gave
    one (a create with -j/-m, the load of a create)."""
    click.echo(f"device-mapper: {op} ioctl on {name or ''} {devno} failed: "
               f"{os.strerror(err)}", err=True)
    click.echo("Command failed.", err=True)
    sys.exit(1)


def _call(s: Session, command: str, args: dict[str, Any], op: str,
          name: str | None = None, devno: str = "") -> dict[str, Any]:
    from minidisk.control_client import ControlError, call

    url = require_server(s.server)
    try:
        return call(url, command, args)
    except ControlError as e:
        if e.errno == errno.ENXIO and op == "info":  # dmsetup's own wording
            click.echo("Device does not exist.", err=True)
            click.echo("Command failed.", err=True)
            sys.exit(1)
        _failed(op, name, e.errno, devno)


def _read_table(table: str | None, table_file: str | None) -> str:
    if table is not None:
        return table
    if table_file is not None:
        with open(table_file) as f:
            return f.read()
    return sys.stdin.read()


# lvm2's DM_COOKIE_MAGIC: the key prefix of the semaphores dmsetup's udev commands report.
DM_COOKIE_MAGIC = 0x0D4D
UDEV_FLAGS = ("--noudevsync", "--noudevrules", "--verifyudev")


class DmsetupGroup(click.Group):
    """dmsetup takes its udev flags before or after any command; so do we, and ignore them:
    no udev watches our devices (/dev/mapper/NAME is a namespace key, made and removed
    with the device), so there is nothing to wait for or to tell."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.extend(self._udev_flags())

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        cmd.params.extend(self._udev_flags())
        super().add_command(cmd, name)

    @staticmethod
    def _udev_flags() -> list[click.Parameter]:
        return [click.Option([flag], is_flag=True, expose_value=False,
                             help="Accepted and ignored: there is no udev here.")
                for flag in UDEV_FLAGS]


@click.group(name="dmsetup", cls=DmsetupGroup)
@server_option
@click.option("-v", "--verbose", count=True, help="Show device info with results.")
@click.pass_context
def dmsetup(ctx: click.Context, server: str | None, verbose: int) -> None:
    """Device-mapper on a running server, with dmsetup's commands and output.

    There is no udev here: mapped devices are namespace keys (/dev/mapper/NAME), so the
    udev flags are accepted and ignored, and the udev commands have nothing to do."""
    ctx.obj = Session(server or (ctx.obj or {}).get("server"), verbose)


pass_session = click.make_pass_decorator(Session)
F = TypeVar("F", bound=Callable[..., Any])


def _keep_selection(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    if value is not None and param.name is not None:
        setattr(ctx.find_object(Session), param.name, value)


def select_options(func: F) -> F:
    """-u UUID, -j MAJOR -m MINOR: choose the device by UUID or number (as `info` prints
    it) instead of by name. Kept on the Session rather than passed to each command, since
    what they mean for the command's other arguments is the same everywhere."""
    for decls, kind, metavar, text in (
        (("-m", "--minor"), click.IntRange(min=0), "MINOR", "Device minor number (with -j)."),
        (("-j", "--major"), click.IntRange(min=0), "MAJOR", "Device major number (with -m)."),
        (("-u", "--uuid"), click.STRING, "UUID", "Choose the device by its UUID."),
    ):
        func = click.option(*decls, type=kind, metavar=metavar, expose_value=False,
                            callback=_keep_selection, help=text)(func)
    return func


def _check_name(name: str) -> None:
    """What dmsetup refuses before asking the kernel (DM_NAME_LEN, no '/')."""
    if len(name) > MAX_NAME:
        _refuse(f'Name "{name}" too long.')
    if "/" in name:
        _refuse(f'Name "{name}" invalid. It contains "/".')


def _refuse(message: str) -> NoReturn:
    click.echo(message, err=True)
    click.echo("Command failed.", err=True)
    sys.exit(1)


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
            _refuse(f"Invalid format on line {number} of table {source}.")
        lines += 1
    return text if lines else None


@dmsetup.command()
@click.argument("name")
@click.argument("table_file", required=False)
@click.option("--table", "table", metavar="TABLE", help="A one-line table.")
@click.option("-n", "--notable", is_flag=True, help="Create without a table.")
@click.option("-u", "--uuid", default="", help="The device's UUID.")
@click.option("-r", "--readonly", is_flag=True, help="Create read-only.")
@click.option("-j", "--major", type=click.IntRange(min=0), help="With -m: the device number.")
@click.option("-m", "--minor", type=click.IntRange(min=0), help="The minor number to use.")
@pass_session
def create(s: Session, name: str, table_file: str | None, table: str | None, notable: bool,
           uuid: str, readonly: bool, major: int | None, minor: int | None) -> None:
    """Create NAME; with a table (TABLE_FILE, --table or stdin) make it live.

    As libdevmapper does it: create the device, load the table, resume; a refused table
    removes the device again (its minor is free for the next one)."""
    _check_name(name)
    text = None if notable else _table_text(_read_table(table, table_file), table_file or "")
    args: dict[str, Any] = {"name": name, "table": None, "uuid": uuid, "read_only": readonly}
    devno = ""
    if minor is not None:
        args["minor"] = minor
        devno = f"({major if major is not None else report.DM_MAJOR}:{minor})"
    info = _call(s, "dm.create", args, "create", name, devno)
    if text is None:
        return
    from minidisk.control_client import ControlError, call

    url = require_server(s.server)
    try:
        call(url, "dm.load", {"name": name, "table": text})
    except ControlError as e:
        try:
            call(url, "dm.remove", {"name": name})
        except ControlError:
            pass
        _failed("reload", name, e.errno, f"({info['major']}:{info['minor']})")
    _call(s, "dm.resume", {"name": name}, "resume", name)


def _load(s: Session, args: tuple[str, ...], table: str | None) -> None:
    device, label, rest = s.leading_device(args)
    _too_many(rest, 1)
    text = _read_table(table, rest[0] if rest else None)
    _call(s, "dm.load", {**device, "table": text}, "reload", label)


@dmsetup.command()
@click.argument("args", nargs=-1, metavar="[NAME] [TABLE_FILE]")
@click.option("--table", "table", metavar="TABLE", help="A one-line table.")
@select_options
@pass_session
def load(s: Session, args: tuple[str, ...], table: str | None) -> None:
    """Load a table into NAME's inactive slot."""
    _load(s, args, table)


@dmsetup.command()
@click.argument("args", nargs=-1, metavar="[NAME] [TABLE_FILE]")
@click.option("--table", "table", metavar="TABLE", help="A one-line table.")
@select_options
@pass_session
def reload(s: Session, args: tuple[str, ...], table: str | None) -> None:
    """Same as load."""
    _load(s, args, table)


def _each_device(s: Session, names: tuple[str, ...]) -> list[tuple[dict[str, Any], str]]:
    """The devices of a command that takes several names, or the one -u or -j/-m choose."""
    if names:
        return [({"name": name}, name) for name in names]
    selection = s.selection()
    if selection is None:
        _no_device()
    return [selection]


@dmsetup.command()
@click.argument("names", nargs=-1)
@click.option("--noflush", is_flag=True, help="Do not flush the table's devices.")
@click.option("--nolockfs", is_flag=True, help="Accepted for dmsetup compatibility.")
@select_options
@pass_session
def suspend(s: Session, names: tuple[str, ...], noflush: bool, nolockfs: bool) -> None:
    """Suspend: wait for I/O in flight; later I/O waits until resume."""
    for device, label in _each_device(s, names):
        _call(s, "dm.suspend", {**device, "noflush": noflush}, "suspend", label)


@dmsetup.command()
@click.argument("names", nargs=-1)
@select_options
@pass_session
def resume(s: Session, names: tuple[str, ...]) -> None:
    """Make the inactive table live (if any) and release queued I/O."""
    for device, label in _each_device(s, names):
        _call(s, "dm.resume", device, "resume", label)


@dmsetup.command()
@click.argument("name", required=False)
@select_options
@pass_session
def clear(s: Session, name: str | None) -> None:
    """Drop NAME's inactive table."""
    for device, label in _each_device(s, () if name is None else (name,)):
        _call(s, "dm.clear", device, "clear", label)


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
@pass_session
def remove(s: Session, names: tuple[str, ...], force: bool, deferred: bool,
           retry: bool) -> None:
    """Remove devices (EBUSY while open)."""
    from minidisk.control_client import ControlError, call

    url = require_server(s.server)
    for device, label in _each_device(s, names):
        args = {**device, "force": force, "deferred": deferred}
        tries = REMOVE_RETRIES if retry else 1
        for attempt in range(tries):
            try:
                call(url, "dm.remove", args)
                break
            except ControlError as e:
                if e.errno == errno.EBUSY and attempt + 1 < tries:
                    time.sleep(REMOVE_RETRY_DELAY_S)
                    continue
                _failed("remove", label, e.errno)


@dmsetup.command(name="remove_all")
@click.option("-f", "--force", is_flag=True, help="Swap in error tables for open devices.")
@click.option("--deferred", is_flag=True, help="Mark open devices for removal on last close.")
@pass_session
def remove_all(s: Session, force: bool, deferred: bool) -> None:
    """Remove every device that is not open."""
    left = _call(s, "dm.remove_all", {"force": force, "deferred": deferred},
                 "remove_all")["left"]
    if left:
        click.echo(f"Unable to remove {len(left)} device(s): {' '.join(left)}", err=True)


@dmsetup.command()
@click.argument("name")
@click.argument("new_name", required=False)
@click.option("--setuuid", metavar="UUID", help="Give a device without a UUID one.")
@pass_session
def rename(s: Session, name: str, new_name: str | None, setuuid: str | None) -> None:
    """Rename NAME to NEW_NAME, or set its UUID."""
    if (new_name is None) == (setuuid is None):
        raise click.UsageError("give NEW_NAME or --setuuid UUID")
    args: dict[str, Any] = {"name": name}
    if setuuid is not None:
        args["uuid"] = setuuid
    else:
        args["new_name"] = new_name
    _call(s, "dm.rename", args, "rename", name)


@dmsetup.command()
@click.argument("name", required=False)
@click.option("-c", "-C", "--columns", is_flag=True, help="One line per device.")
@click.option("--noheadings", is_flag=True,
              help="With -c: no heading line (and ':' between fields, as dmsetup).")
@click.option("-o", "--options", "fields", metavar="FIELDS",
              help="With -c: the fields to show, comma-separated (+FIELDS adds to the "
                   "default; 'help' lists them).")
@click.option("--separator", metavar="SEP", help="With -c: between fields, unaligned.")
@click.option("--nameprefixes", is_flag=True, help="With -c: DM_FIELD='value' pairs.")
@click.option("--unquoted", is_flag=True, help="With --nameprefixes: no quotes.")
@select_options
@pass_session
def info(s: Session, name: str | None, columns: bool, noheadings: bool, fields: str | None,
         separator: str | None, nameprefixes: bool, unquoted: bool) -> None:
    """State, tables present, open count, event number of NAME (or all)."""
    if columns and fields is not None and "help" in fields.split(","):
        click.echo(report.report_help(), nl=False)
        return
    if columns:
        try:
            wanted = report.report_fields(fields)
        except ValueError as e:
            click.echo(str(e), err=True)
            click.echo("Command failed.", err=True)
            sys.exit(1)
    device, label = s.device(name)
    devices = _call(s, "dm.info", device, "info", label)["devices"]
    if not devices:
        click.echo("No devices found")
    elif columns:
        click.echo(report.info_columns(devices, not noheadings, wanted, separator,
                                       nameprefixes, not unquoted), nl=False)
    else:
        for d in devices:
            if not d["live_table"]:  # dmsetup's failed open for the read-ahead
                click.echo(f"/dev/mapper/{d['name']}: open failed: "
                           f"{os.strerror(errno.ENXIO)}", err=True)
            click.echo(report.info_long(d), nl=False)


def _names_output(option: str | None) -> str:
    if option not in (None, "devno", "devname", "blkdevname"):
        raise click.BadParameter("expected devno, devname or blkdevname", param_hint="-o")
    return option or "devno"


def _utf8_locale() -> bool:
    """dmsetup draws trees with UTF-8 lines only when the locale's codeset is UTF-8 (not
    Python's stdout encoding, which is UTF-8 under the C locale too)."""
    import locale

    try:
        locale.setlocale(locale.LC_CTYPE, "")
    except locale.Error:
        return False
    return locale.nl_langinfo(locale.CODESET).lower().replace("-", "") == "utf8"


@dmsetup.command(name="ls")
@click.option("--tree", is_flag=True, help="Show how devices stack.")
@click.option("--target", "target_type", metavar="TYPE", help="Only devices using TYPE.")
@click.option("-o", "output", metavar="devno|devname", help="How to show devices.")
@pass_session
def ls_(s: Session, tree: bool, target_type: str | None, output: str | None) -> None:
    """List devices."""
    names = _names_output(output)
    devices = _call(s, "dm.ls", {}, "list")["devices"]
    if target_type is not None:
        # dmsetup lists these through its table code: --tree and -o do not apply.
        using = {d["name"] for d in _call(s, "dm.table", {"target": target_type},
                                           "table")["devices"]}
        click.echo(report.ls_target(devices, using), nl=False)
    elif tree:
        click.echo(report.tree(devices, _utf8_locale()), nl=False)
    else:
        click.echo(report.ls(devices, names), nl=False)


@dmsetup.command()
@click.argument("name", required=False)
@click.option("-o", "output", metavar="devno|devname", help="How to show devices.")
@select_options
@pass_session
def deps(s: Session, name: str | None, output: str | None) -> None:
    """Devices NAME's live table uses."""
    device, label = s.device(name)
    devices = _call(s, "dm.deps", device, "deps", label)["devices"]
    if not devices:
        click.echo("No devices found")
        return
    click.echo(report.deps(devices, label is None, _names_output(output)), nl=False)


def _segment_lines(s: Session, op: str, name: str | None, inactive: bool,
                   target_type: str | None) -> None:
    """table and status: one line per segment, `name: ` first when every device is listed."""
    device, label = s.device(name)
    devices = _call(s, f"dm.{op}", {**device, "inactive": inactive, "target": target_type},
                    op, label)["devices"]
    if not devices and target_type is None:
        click.echo("No devices found")
        return
    click.echo(report.lines(devices, label is None), nl=False)


@dmsetup.command()
@click.argument("name", required=False)
@click.option("--inactive", is_flag=True, help="Show the inactive table.")
@click.option("--target", "target_type", metavar="TYPE", help="Only segments of type TYPE.")
@click.option("--showkeys", is_flag=True, help="Accepted for dmsetup compatibility.")
@select_options
@pass_session
def table(s: Session, name: str | None, inactive: bool, target_type: str | None,
          showkeys: bool) -> None:
    """NAME's table, in a form `load` accepts."""
    _segment_lines(s, "table", name, inactive, target_type)


@dmsetup.command()
@click.argument("name", required=False)
@click.option("--inactive", is_flag=True, help="Status of the inactive table.")
@click.option("--target", "target_type", metavar="TYPE", help="Only segments of type TYPE.")
@click.option("--noflush", is_flag=True, help="Accepted for dmsetup compatibility.")
@select_options
@pass_session
def status(s: Session, name: str | None, inactive: bool, target_type: str | None,
           noflush: bool) -> None:
    """Each target's status line."""
    _segment_lines(s, "status", name, inactive, target_type)


@dmsetup.command()
@click.argument("args", nargs=-1, metavar="[NAME] [EVENT_NR]")
@click.option("-v", "--verbose", count=True, help="Print the device's info afterwards.")
@select_options
@pass_session
def wait(s: Session, args: tuple[str, ...], verbose: int) -> None:
    """Sleep until NAME's event counter exceeds EVENT_NR (default: its value now)."""
    device, label, rest = s.leading_device(args)
    _too_many(rest, 1)
    event_nr = _uint(rest[0], "EVENT_NR") if rest else None
    result = _call(s, "dm.wait", {**device, "event_nr": event_nr}, "waitevent", label)
    if verbose or s.verbose:
        click.echo(report.info_long(result), nl=False)


@dmsetup.command()
@click.argument("args", nargs=-1, required=True, metavar="[NAME] SECTOR MESSAGE...")
@select_options
@pass_session
def message(s: Session, args: tuple[str, ...]) -> None:
    """Send a message to the target at SECTOR of NAME."""
    device, label, rest = s.leading_device(args)
    if len(rest) < 2:
        raise click.UsageError("give SECTOR and a MESSAGE")
    sector = _uint(rest[0], "SECTOR")
    result = _call(s, "dm.message", {**device, "sector": sector, "args": list(rest[1:])},
                   "message", label)["result"]
    if result:
        click.echo(result)


@dmsetup.command()
@pass_session
def targets(s: Session) -> None:
    """Target types and their versions."""
    click.echo(report.targets(_call(s, "dm.targets", {}, "list_versions")["targets"]),
               nl=False)


@dmsetup.command()
@pass_session
def version(s: Session) -> None:
    """Library and driver versions."""
    click.echo(report.version(_call(s, "dm.version", {}, "version")), nl=False)


@dmsetup.command()
def udevcookies() -> None:
    """List udev transaction cookies: there are none (no udev here)."""
    click.echo("Cookie       Semid      Value      Last semop time           Last change time")


@dmsetup.command(name="udevcomplete_all")
@click.argument("age_in_minutes", type=click.IntRange(min=0), required=False)
@click.option("-y", "--yes", is_flag=True, help="Do not ask (there is nothing to destroy).")
def udevcomplete_all(age_in_minutes: int | None, yes: bool) -> None:
    """Destroy stale udev cookie semaphores: there are none (no udev here)."""
    click.echo(f"0 semaphores with keys prefixed by {DM_COOKIE_MAGIC} (0x{DM_COOKIE_MAGIC:x}) "
               "destroyed. 0 skipped.")


@dmsetup.command()
@click.argument("name", required=False)
def mknodes(name: str | None) -> None:
    """Make /dev/mapper nodes: nothing to do, they are namespace keys that come and go
    with their devices (no udev, no device nodes)."""


@click.command(name="replay-log")
@click.option("--log", "log_path", required=True, metavar="FILE", help="The log device/file.")
@click.option("--replay", "replay_path", metavar="FILE", help="Device/file to replay onto.")
@click.option("--limit", type=click.IntRange(min=0), help="Replay the first N entries.")
@click.option("--end-mark", metavar="MARK", help="Replay up to and including MARK.")
@click.option("--start-entry", type=click.IntRange(min=0), default=0,
              help="Skip entries before this one.")
@click.option("--find", is_flag=True, help="Print the entry number of --end-mark.")
@click.option("--num-entries", is_flag=True, help="Print the number of entries.")
@click.option("-v", "--verbose", is_flag=True, help="List entries as they are replayed.")
def replay_log(log_path: str, replay_path: str | None, limit: int | None,
               end_mark: str | None, start_entry: int, find: bool, num_entries: bool,
               verbose: bool) -> None:
    """Replay a log-writes log onto a device, up to an entry or a mark (xfstests style)."""
    from minidisk.device.file import FileDevice
    from minidisk.dm import writelog

    async def run() -> None:
        log = FileDevice(log_path, read_only=True)
        try:
            if num_entries:
                click.echo((await writelog.read_super(log)).nr_entries)
                return
            if find:
                if end_mark is None:
                    raise click.UsageError("--find needs --end-mark")
                index = await writelog.find_mark(log, end_mark)
                if index is None:
                    raise click.ClickException(f"mark {end_mark!r} not found")
                click.echo(index)
                return
            if replay_path is None:
                raise click.UsageError("--replay is required to replay")
            if verbose:
                async for entry in writelog.entries(log):
                    click.echo(entry.describe())
            target = FileDevice(replay_path)
            try:
                await writelog.replay(log, target, limit=limit, end_mark=end_mark,
                                      start_entry=start_entry)
                await target.flush()
            finally:
                await target.close()
        finally:
            await log.close()

    try:
        asyncio.run(run())
    except OSError as e:
        raise click.ClickException(e.strerror or str(e)) from None


def register(cli: click.Group) -> None:
    cli.add_command(dmsetup)
    cli.add_command(replay_log)
