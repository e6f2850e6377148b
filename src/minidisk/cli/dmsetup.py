"""`minidisk dmsetup ...`: dmsetup's commands and output, against a running server.

Output formats are lvm2 dmsetup's (see minidisk.dm.report). A failure prints what dmsetup
prints — `device-mapper: <op> ioctl on <name>  failed: <strerror>` — then the server's
one-line reason (for a refused table: which segment and why) and `Command failed.`, and
exits 1.
"""

from __future__ import annotations

import errno
import os
import re
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
        if e.errno == errno.ENXIO and op in ("info", "status"):  # dmsetup's own wording
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

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        found = super().get_command(ctx, cmd_name)
        if found is None:  # dmsetup's words and status, then its usage (ours here)
            click.echo("Unknown command.", err=True)
            click.echo(self.get_help(ctx), err=True)
            ctx.exit(1)
        return found

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        cmd.params.extend(self._udev_flags())
        super().add_command(cmd, name)

    @staticmethod
    def _udev_flags() -> list[click.Parameter]:
        return [click.Option([flag], is_flag=True, expose_value=False,
                             help="Accepted and ignored: there is no udev here.")
                for flag in UDEV_FLAGS]


@click.group(name="dmsetup", cls=DmsetupGroup, invoke_without_command=True)
@server_option
@click.option("-v", "--verbose", count=True, help="Show device info with results.")
@click.option("--version", "show_version", is_flag=True, help="The same as `version`.")
@click.pass_context
def dmsetup(ctx: click.Context, server: str | None, verbose: int, show_version: bool) -> None:
    """Device-mapper on a running server, with dmsetup's commands and output.

    There is no udev here: mapped devices are namespace keys (/dev/mapper/NAME), so the
    udev flags are accepted and ignored, and the udev commands have nothing to do."""
    ctx.obj = Session(server or (ctx.obj or {}).get("server"), verbose)
    if ctx.invoked_subcommand is None:
        if show_version:
            click.echo(report.version(_call(ctx.obj, "dm.version", {}, "version")), nl=False)
            ctx.exit(0)
        click.echo(ctx.get_help(), err=True)  # as dmsetup without a command: usage, status 1
        ctx.exit(1)


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


def _set_readahead(s: Session, name: str, value: str | None) -> None:
    """--readahead as dmsetup reads it: auto (leave it), none (0), +N (at least N), N; a
    word that is no number is atoi's 0, as there."""
    if value is None or value.lower() == "auto":
        return
    at_least = value.startswith("+")
    digits = re.match(r"\d*", value[1:] if at_least else value)
    sectors = 0 if value.lower() == "none" or digits is None or not digits[0] \
        else int(digits[0])
    _call(s, "dm.readahead", {"name": name, "sectors": sectors, "at_least": at_least},
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
            _refuse(f"Invalid format on line {number} of table {source}.")
        lines += 1
    return text if lines else None


def _create_concise(s: Session, spec: str) -> None:
    """create --concise "NAME,UUID,MINOR,ro|rw,TABLE[,TABLE...];...": several devices, each
    with its table lines after the flags, as dmsetup reads them."""
    for entry in spec.split(";"):
        fields = entry.split(",")
        if len(fields) < 5:
            shown = [*fields, *["(null)"] * (5 - len(fields))]
            _refuse("Five comma-separated fields are required for each device\n"
                    f"Parsed {len(fields)} fields: name: {shown[0]} uuid: {shown[1]} "
                    f"minor: {shown[2]} flags: {shown[3]} table: {shown[4]}")
        name, uuid, minor, flags = fields[:4]
        _create(s, name, "\n".join(fields[4:]), uuid, flags == "ro", None,
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
@pass_session
def create(s: Session, name: str | None, table_file: str | None, concise: bool,
           table: str | None, notable: bool, uuid: str, readonly: bool, major: int | None,
           minor: int | None, readahead: str | None) -> None:
    """Create NAME; with a table (TABLE_FILE, --table or stdin) make it live.

    As libdevmapper does it: create the device, load the table, resume; a refused table
    removes the device again (its minor is free for the next one)."""
    if concise:
        _create_concise(s, name if name is not None else sys.stdin.read())
        return
    if name is None:
        raise click.UsageError("give NAME")
    text = None if notable else _read_table(table, table_file)
    _create(s, name, text, uuid, readonly, major, minor, readahead, table_file or "")


def _create(s: Session, name: str, text: str | None, uuid: str, readonly: bool,
            major: int | None, minor: int | None, readahead: str | None,
            source: str = "") -> None:
    _check_name(name)
    text = None if text is None else _table_text(text, source)
    args: dict[str, Any] = {"name": name, "table": None, "uuid": uuid, "read_only": readonly}
    devno = uuid  # what dmsetup prints after the name: the UUID, or the number asked for
    if minor is not None:
        args["minor"] = minor
        devno = devno or f"({major if major is not None else report.DM_MAJOR}:{minor})"
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
    _set_readahead(s, name, readahead)


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
@click.option("--readahead", metavar="[+]SECTORS|auto|none", help="Read-ahead to show.")
@select_options
@pass_session
def resume(s: Session, names: tuple[str, ...], readahead: str | None) -> None:
    """Make the inactive table live (if any) and release queued I/O."""
    for device, label in _each_device(s, names):
        info = _call(s, "dm.resume", device, "resume", label)
        _set_readahead(s, info["name"], readahead)


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


@dmsetup.command(name="wipe_table")
@click.argument("names", nargs=-1)
@click.option("-f", "--force", is_flag=True, help="Accepted for dmsetup compatibility.")
@click.option("--noflush", is_flag=True, help="Accepted for dmsetup compatibility.")
@click.option("--nolockfs", is_flag=True, help="Accepted for dmsetup compatibility.")
@select_options
@pass_session
def wipe_table(s: Session, names: tuple[str, ...], force: bool, noflush: bool,
               nolockfs: bool) -> None:
    """Make every I/O fail: load an error table of the same size and resume (as
    dmsetup: the size from the live table, then reload and resume)."""
    from minidisk.control_client import ControlError, call

    for device, label in _each_device(s, names):
        try:
            devices = call(require_server(s.server), "dm.table", device)["devices"]
        except ControlError as e:  # dmsetup goes on to the reload, which fails too
            click.echo(f"device-mapper: table ioctl on {label}  failed: "
                       f"{os.strerror(e.errno)}", err=True)
            devices = []
        sectors = sum(int(line.split()[1]) for d in devices for line in d["lines"])
        _call(s, "dm.load", {**device, "table": f"0 {sectors} error"}, "reload", label)
        _call(s, "dm.resume", device, "resume", label)


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
        assert new_name is not None
        if len(new_name) > MAX_NAME:  # dmsetup's words (no full stop, unlike create's)
            _refuse(f'Name "{new_name}" too long')
        args["new_name"] = new_name
    _call(s, "dm.rename", args, "rename", name)


@dmsetup.command()
@click.argument("names", nargs=-1)
@click.option("-c", "-C", "--columns", is_flag=True, help="One line per device.")
@click.option("--noheadings", is_flag=True,
              help="With -c: no heading line (and ':' between fields, as dmsetup).")
@click.option("-o", "--options", "fields", metavar="FIELDS",
              help="With -c: the fields to show, comma-separated (+FIELDS adds to the "
                   "default; 'help' lists them).")
@click.option("--separator", metavar="SEP", help="With -c: between fields, unaligned.")
@click.option("--nameprefixes", is_flag=True, help="With -c: DM_FIELD='value' pairs.")
@click.option("--unquoted", is_flag=True, help="With --nameprefixes: no quotes.")
@click.option("-v", "--verbose", count=True, help="Accepted: info is as verbose already.")
@click.option("-O", "--sort", "sort_keys", metavar="FIELDS", help="With -c: sort by these.")
@click.option("-S", "--select", "selection", metavar="FIELD OP VALUE",
              help="With -c: only the devices that match.")
@select_options
@pass_session
def info(s: Session, names: tuple[str, ...], columns: bool, noheadings: bool, fields: str | None,
         separator: str | None, nameprefixes: bool, unquoted: bool, verbose: int,
         sort_keys: str | None, selection: str | None) -> None:
    """State, tables present, open count, event number of NAME (or all)."""
    if columns and fields is not None and "help" in fields.split(","):
        click.echo(report.report_help(), nl=False, err=True)  # as libdm: on stderr
        return
    if columns:
        try:
            wanted = report.report_fields(fields)
        except ValueError as e:  # libdm: the field list, then what it did not know
            click.echo(report.report_help(), nl=False, err=True)
            click.echo(str(e), err=True)
            sys.exit(1)
    devices, _ = _gather(s, "dm.info", "info", names)
    if not devices:
        click.echo("No devices found")
    elif columns:
        _info_columns(s, devices, wanted, noheadings, separator, nameprefixes, unquoted,
                      sort_keys, selection)
    else:
        for d in devices:
            if not report.openable(d):  # dmsetup's failed open for the read-ahead
                click.echo(f"/dev/mapper/{d['name']}: open failed: "
                           f"{os.strerror(errno.ENXIO)}", err=True)
            click.echo(report.info_long(d), nl=False)


def _gather(s: Session, command: str, op: str, names: tuple[str, ...],
            extra: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], bool]:
    """The devices a listing command reports: each NAME in turn, else the one -u or -j/-m
    choose, else every device; and whether several are meant (dmsetup then prefixes lines
    with `name: `)."""
    extra = extra or {}
    if names:
        out: list[dict[str, Any]] = []
        for name in names:
            out += _call(s, command, {"name": name, **extra}, op, name)["devices"]
        return out, len(names) > 1
    device, label = s.device(None)
    return _call(s, command, {**device, **extra}, op, label)["devices"], label is None


def _info_columns(s: Session, devices: list[dict[str, Any]], wanted: list[str],
                  noheadings: bool, separator: str | None, nameprefixes: bool,
                  unquoted: bool, sort_keys: str | None, selection: str | None) -> None:
    """info -c: libdm's report of the devices, with their dependencies and users."""
    every = {d["name"]: d for d in _call(s, "dm.ls", {}, "list")["devices"]}
    for d in every.values():
        d["users"] = [u for u in every.values()
                      if any(dep["name"] == d["name"] for dep in u["deps"])]
    rows = [every[d["name"]] for d in devices if d["name"] in every]
    try:
        rows = report.sort_rows(rows, sort_keys)
    except ValueError as e:  # libdm's words, after its field list
        click.echo(report.report_help(), err=True, nl=False)
        click.echo(f"dm_report: {e}", err=True)
        sys.exit(1)
    try:
        rows = report.select_rows(rows, selection)
    except ValueError:
        click.echo(report.report_help(), err=True, nl=False)
        field = re.split(r"\W", selection or "", maxsplit=1)[0]
        click.echo(f"Unrecognised selection field: {field}\n"
                   f"Selection syntax error at '{selection}'.\n"
                   "Use 'help' for selection to get more help.", err=True)
        sys.exit(1)
    unopenable = [d for d in rows if not report.openable(d)]  # no block device to ask
    if "blkdevname" in wanted and unopenable:
        shown = [d for d in rows if report.openable(d)]
        click.echo(report.info_columns(shown, not noheadings, wanted, separator,
                                       nameprefixes, not unquoted), nl=False)
        d = unopenable[0]
        _refuse(f"Could not resolve block device name for {d['major']}:{d['minor']}.\n"
                "_do_report_object: report function failed for field blkdevname")
    if "read_ahead" in wanted:
        for d in unopenable:
            click.echo(f"/dev/mapper/{d['name']}: open failed: {os.strerror(errno.ENXIO)}",
                       err=True)
    if rows:  # nothing at all, not even headings, when nothing is selected
        click.echo(report.info_columns(rows, not noheadings, wanted, separator,
                                       nameprefixes, not unquoted), nl=False)


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
@click.argument("extra", nargs=-1)
@click.pass_context
def ls_(ctx: click.Context, tree: bool, target_type: str | None, output: str | None,
        extra: tuple[str, ...]) -> None:
    """List devices."""
    s = ctx.find_object(Session)
    assert s is not None
    if extra:  # dmsetup's words and status, then its usage (ours here)
        click.echo("Incorrect number of arguments.", err=True)
        assert ctx.parent is not None
        click.echo(ctx.parent.get_help(), err=True)
        ctx.exit(1)
    words = frozenset(w for w in (output or "").split(",") if w)
    if tree:
        unknown = sorted(words - report.TREE_OPTIONS)
        if unknown:
            _refuse(f"Tree options not recognised: {','.join(unknown)}.")
        names = "devno"
    elif words - {"devno", "devname", "blkdevname"}:
        bad = sorted(words - {"devno", "devname", "blkdevname"})[0]
        click.echo(f"Option not recognised: {bad}.\nCouldn't process command line.", err=True)
        sys.exit(1)
    else:
        names = _names_output(output)
    devices = _call(s, "dm.ls", {}, "list")["devices"]
    if target_type is not None:
        # dmsetup lists these through its table code: --tree and -o do not apply.
        using = {d["name"] for d in _call(s, "dm.table", {"target": target_type},
                                           "table")["devices"]}
        click.echo(report.ls_target(devices, using), nl=False)
    elif tree:
        click.echo(report.tree(devices, _utf8_locale(), words), nl=False)
    else:
        click.echo(report.ls(devices, names), nl=False)


@dmsetup.command()
@click.argument("names", nargs=-1)
@click.option("-o", "output", metavar="devno|devname", help="How to show devices.")
@select_options
@pass_session
def deps(s: Session, names: tuple[str, ...], output: str | None) -> None:
    """Devices NAME's live table uses."""
    devices, multiple = _gather(s, "dm.deps", "deps", names)
    if not devices:
        click.echo("No devices found")
        return
    click.echo(report.deps(devices, multiple, _names_output(output)), nl=False)


def _segment_lines(s: Session, op: str, names: tuple[str, ...], inactive: bool,
                   target_type: str | None, verbose: int = 0) -> None:
    """table and status: one line per segment, `name: ` first when several are listed;
    with -v the device's info first, as dmsetup."""
    if (verbose or s.verbose) and len(names) == 1:
        for d in _call(s, "dm.info", {"name": names[0]}, "info", names[0])["devices"]:
            click.echo(report.info_long(d), nl=False)
    devices, multiple = _gather(s, f"dm.{op}", op, names,
                                {"inactive": inactive, "target": target_type})
    if not devices and target_type is None:
        click.echo("No devices found")
        return
    click.echo(report.lines(devices, multiple), nl=False)


@dmsetup.command()
@click.argument("names", nargs=-1)
@click.option("--inactive", is_flag=True, help="Show the inactive table.")
@click.option("--target", "target_type", metavar="TYPE", help="Only segments of type TYPE.")
@click.option("--showkeys", is_flag=True, help="Accepted for dmsetup compatibility.")
@click.option("-v", "--verbose", count=True, help="The device's info first.")
@click.option("--concise", is_flag=True, help="In the form create --concise takes.")
@select_options
@pass_session
def table(s: Session, names: tuple[str, ...], inactive: bool, target_type: str | None,
          showkeys: bool, verbose: int, concise: bool) -> None:
    """NAME's table, in a form `load` accepts."""
    if concise:
        infos, _ = _gather(s, "dm.info", "info", names)
        tables, _ = _gather(s, "dm.table", "table", names, {"inactive": inactive})
        lines = {d["name"]: d["lines"] for d in tables}
        click.echo(";".join(
            ",".join([i["name"], i["uuid"], str(i["minor"]), "ro" if i["read_only"] else "rw",
                      *lines.get(i["name"], [])]) for i in infos))
        return
    _segment_lines(s, "table", names, inactive, target_type, verbose)


@dmsetup.command()
@click.argument("names", nargs=-1)
@click.option("--inactive", is_flag=True, help="Status of the inactive table.")
@click.option("--target", "target_type", metavar="TYPE", help="Only segments of type TYPE.")
@click.option("--noflush", is_flag=True, help="Accepted for dmsetup compatibility.")
@click.option("-v", "--verbose", count=True, help="The device's info first.")
@select_options
@pass_session
def status(s: Session, names: tuple[str, ...], inactive: bool, target_type: str | None,
           noflush: bool, verbose: int) -> None:
    """Each target's status line."""
    _segment_lines(s, "status", names, inactive, target_type, verbose)


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
    if not rest[0].isdigit():
        _refuse("Invalid sector.")  # dmsetup's words
    sector = int(rest[0])
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


@dmsetup.command(name="help")
@click.option("-c", "-C", "--columns", is_flag=True, help="Also the fields of info -c.")
@click.pass_context
def help_(ctx: click.Context, columns: bool) -> None:
    """The usage, on stderr as dmsetup prints it (ours: our commands and options)."""
    assert ctx.parent is not None
    click.echo(ctx.parent.get_help(), err=True)
    if columns:
        click.echo(report.report_help(), err=True, nl=False)


@dmsetup.command(name="target-version")
@click.argument("types", nargs=-1)
@pass_session
def target_version(s: Session, types: tuple[str, ...]) -> None:
    """The versions of the target types named (the kernel's GET_TARGET_VERSION)."""
    known = {t["name"]: t for t in _call(s, "dm.targets", {}, "list_versions")["targets"]}
    for name in types:
        if name not in known:  # the kernel's answer: EINVAL
            _failed("target-version", name, errno.EINVAL)
        click.echo(report.targets([known[name]]), nl=False)


@dmsetup.command()
@pass_session
def version(s: Session) -> None:
    """Library and driver versions."""
    click.echo(report.version(_call(s, "dm.version", {}, "version")), nl=False)


@dmsetup.command()
@click.argument("device")
@click.argument("subsystem", default="LVM")
@click.option("-c", "-C", "--columns", is_flag=True, help="Accepted: always in columns.")
@click.option("-o", "--options", "fields", metavar="FIELDS", help="vg_name,lv_name,lv_layer")
def splitname(device: str, subsystem: str, columns: bool, fields: str | None) -> None:
    """Split an LVM device name into VG, LV and layer ('--' is a '-' in a name)."""
    click.echo(report.splitname(device, subsystem, fields), nl=False)


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


def register(cli: click.Group) -> None:
    cli.add_command(dmsetup)
