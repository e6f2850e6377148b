"""dmsetup's commands that report: info (long and -c), ls, deps, table, status, targets,
target-version, version, help, splitname, measure, mangle, and the udev ones (no udev here)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import click

from minidisk.cli.dmsetup.base import (
    Invocation,
    dmsetup,
    failed,
    pass_invocation,
    refuse,
    select_options,
    usage_exit,
)
from minidisk.cli.dmsetup.usage import USAGE
from minidisk.dm import report, selection
from minidisk.dm.commands import DmCommand
from minidisk.dm.fields import help_text as fields_help

# lvm2's DM_COOKIE_MAGIC: the key prefix of the semaphores dmsetup's udev commands report.
DM_COOKIE_MAGIC = 0x0D4D
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
@pass_invocation
def info(inv: Invocation, names: tuple[str, ...], columns: bool, noheadings: bool,
         fields: str | None, separator: str | None, nameprefixes: bool, unquoted: bool,
         verbose: int, sort_keys: str | None, selection: str | None) -> None:
    """State, tables present, open count, event number of NAME (or all)."""
    if columns:
        spec = report_spec(fields, sort_keys, selection)
    devices, _ = inv.gather(DmCommand.INFO, "info", names)
    if not devices:
        click.echo("No devices found")
    elif columns:
        _info_columns(inv, devices, spec, noheadings, separator, nameprefixes, unquoted)
    else:
        for d in devices:
            if not report.openable(d):  # dmsetup's failed open for the read-ahead
                click.echo(f"/dev/mapper/{d['name']}: open failed: "
                           f"{os.strerror(errno.ENXIO)}", err=True)
            click.echo(report.info_long(d), nl=False)


@dataclass(frozen=True)
class ReportSpec:
    """-o, -O and -S of a report, checked as libdm checks them before any ioctl."""

    fields: list[str]
    sort_keys: str | None
    selection: selection.Node | None


def report_spec(option: str | None, sort_keys: str | None, select: str | None,
                default: str = report.DEFAULT_REPORT,
                values: Mapping[str, Callable[[Any], Any]] = report.DEVICE_VALUES,
                kinds: selection.Fields = report.DEVICE_FIELDS) -> ReportSpec:
    """libdm's report set-up: the fields (`help` lists them: exit 0), the sort keys, the
    selection (`help` lists fields and operators: exit 0); each error after the help
    libdm prints with it, and exit 1 (without dmsetup's `Command failed.`)."""
    if option is not None and "help" in option.split(","):
        click.echo(report.report_help(), nl=False, err=True)  # as libdm: on stderr
        sys.exit(0)
    try:
        wanted = report.report_fields(option, default, values)
    except ValueError as e:
        _help_then(report.report_help(), str(e))
    try:
        report.sort_rows([], sort_keys, values)
    except ValueError as e:
        _help_then(report.report_help(), f"dm_report: {e}")
    if select in ("help", "?"):
        click.echo(fields_help(True) + selection.operators_help(), nl=False, err=True)
        sys.exit(0)
    try:
        node = selection.parse(select or "", kinds)
    except selection.SelectionError as e:
        preface = {"fields": fields_help(True), "operators": selection.operators_help(),
                   None: ""}[e.preface]
        _help_then(preface, "\n".join(e.lines))
    return ReportSpec(wanted, sort_keys, node)


def _help_then(preface: str, message: str) -> NoReturn:
    click.echo(preface, nl=False, err=True)
    click.echo(message, err=True)
    sys.exit(1)


def _info_columns(inv: Invocation, devices: list[dict[str, Any]], spec: ReportSpec,
                  noheadings: bool, separator: str | None, nameprefixes: bool,
                  unquoted: bool) -> None:
    """info -c: libdm's report of the devices, with their dependencies and users."""
    every = {d["name"]: d for d in inv.call(DmCommand.LS, {}, "list")["devices"]}
    for d in every.values():
        d["users"] = [u for u in every.values()
                      if any(dep["name"] == d["name"] for dep in u["deps"])]
    rows = [every[d["name"]] for d in devices if d["name"] in every]
    rows = [d for d in report.sort_rows(rows, spec.sort_keys)
            if selection.matches(spec.selection, d)]
    wanted = spec.fields
    unopenable = [d for d in rows if not report.openable(d)]  # no block device to ask
    if "blkdevname" in wanted and unopenable:
        shown = [d for d in rows if report.openable(d)]
        click.echo(report.info_columns(shown, not noheadings, wanted, separator,
                                       nameprefixes, not unquoted), nl=False)
        d = unopenable[0]
        refuse(f"Could not resolve block device name for {d['major']}:{d['minor']}.\n"
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
@click.option("--exec", "command", metavar="COMMAND",
              help="Run COMMAND with each device's /dev/mapper path after its words.")
@click.option("-S", "--select", "selection", metavar="SELECTION",
              help="Accepted and ignored, as dmsetup's ls does.")
@click.argument("extra", nargs=-1)
@click.pass_context
def ls_(ctx: click.Context, tree: bool, target_type: str | None, output: str | None,
        command: str | None, selection: str | None, extra: tuple[str, ...]) -> None:
    """List devices."""
    inv = ctx.find_object(Invocation)
    assert inv is not None
    if extra:
        usage_exit(ctx, "Incorrect number of arguments.")
    words = frozenset(w for w in (output or "").split(",") if w)
    if tree:
        unknown = sorted(words - report.TREE_OPTIONS)
        if unknown:
            refuse(f"Tree options not recognised: {','.join(unknown)}.")
        names = "devno"
    elif words - {"devno", "devname", "blkdevname"}:
        bad = sorted(words - {"devno", "devname", "blkdevname"})[0]
        click.echo(f"Option not recognised: {bad}.\nCouldn't process command line.", err=True)
        sys.exit(1)
    else:
        names = _names_output(output)
    devices = inv.call(DmCommand.LS, {}, "list")["devices"]
    if command is not None:  # as dmsetup: through its status code, each (matching) device
        using = None if target_type is None else {
            d["name"] for d in inv.call(DmCommand.TABLE, {"target": target_type},
                                        "table")["devices"]}
        _exec_each(command.split(), [d["name"] for d in devices
                                     if using is None or d["name"] in using])
    elif target_type is not None:
        # dmsetup lists these through its table code: --tree and -o do not apply.
        using = {d["name"] for d in inv.call(DmCommand.TABLE, {"target": target_type},
                                           "table")["devices"]}
        click.echo(report.ls_target(devices, using), nl=False)
    elif tree:
        click.echo(report.tree(devices, _utf8_locale(), words), nl=False)
    else:
        click.echo(report.ls(devices, names), nl=False)


def _exec_each(words: list[str], names: list[str]) -> None:
    """ls --exec: the command's words, then the device's path; one run per device, in
    turn, its output straight to ours (the /dev/mapper name is the namespace key)."""
    if not words:
        refuse("Command failed.")
    for name in names:
        sys.stdout.flush()
        subprocess.run([*words, f"/dev/mapper/{name}"], check=False)


@dmsetup.command()
@click.argument("names", nargs=-1)
@select_options
@pass_invocation
def measure(inv: Invocation, names: tuple[str, ...]) -> None:
    """Each segment's IMA measurement (what the kernel measures of the table)."""
    devices, multiple = inv.gather(DmCommand.MEASURE, "status", names)
    if not devices:
        click.echo("No devices found")
        return
    click.echo(report.lines(devices, multiple), nl=False)


@dmsetup.command()
@click.argument("names", nargs=-1)
@select_options
@pass_invocation
def mangle(inv: Invocation, names: tuple[str, ...]) -> None:
    """Put names in libdm's mangled form (auto: characters outside its whitelist as
    \\xNN); rename the devices whose names are not. A UUID cannot change: refused."""
    devices, _ = inv.gather(DmCommand.INFO, "status", names)
    if not devices:
        click.echo("No devices found")
        return
    for d in devices:
        name, uuid = d["name"], d["uuid"]
        if report.mangle(uuid) != uuid:
            refuse(f"{name}: {uuid}: UUID in incorrect form. \n"
                   "Unable to change device UUID. The device must be deactivated first.")
        new = report.mangle(name)
        if new == name:
            click.echo(f"{name}: {uuid or '[no UUID]'}: name "
                       f"{'and UUID ' if uuid else ''}already in correct form")
            continue
        click.echo(f"{name}: renaming to {new}")
        inv.call(DmCommand.RENAME, {"name": name, "new_name": new}, "rename", name)


@dmsetup.command()
@click.argument("names", nargs=-1)
@click.option("-o", "output", metavar="devno|devname", help="How to show devices.")
@select_options
@pass_invocation
def deps(inv: Invocation, names: tuple[str, ...], output: str | None) -> None:
    """Devices NAME's live table uses."""
    devices, multiple = inv.gather(DmCommand.DEPS, "deps", names)
    if not devices:
        click.echo("No devices found")
        return
    click.echo(report.deps(devices, multiple, _names_output(output)), nl=False)


def _segment_lines(inv: Invocation, op: str, names: tuple[str, ...], inactive: bool,
                   target_type: str | None, verbose: int = 0, showkeys: bool = True,
                   as_json: bool = False) -> None:
    """table and status: one line per segment, `name: ` first when several are listed;
    with -v the device's info first, as dmsetup; crypt and integrity keys zeroed unless
    `showkeys`. With `as_json`, the segments' data instead (dm/status.py's shape; the
    server zeroes the keys)."""
    if as_json:
        _segment_json(inv, op, names, inactive, target_type, showkeys)
        return
    if (verbose or inv.verbose) and len(names) == 1:
        for d in inv.call(DmCommand.INFO, {"name": names[0]}, "info", names[0])["devices"]:
            click.echo(report.info_long(d), nl=False)
    devices, multiple = inv.gather(DmCommand(f"dm.{op}"), op, names,
                                {"inactive": inactive, "target": target_type})
    if not devices and target_type is None:
        click.echo("No devices found")
        return
    if not showkeys:
        devices = [{**d, "lines": [report.hide_key(line) for line in d["lines"]]}
                   for d in devices]
    click.echo(report.lines(devices, multiple), nl=False)


def _segment_json(inv: Invocation, op: str, names: tuple[str, ...], inactive: bool,
                  target_type: str | None, showkeys: bool) -> None:
    """--json: one JSON document, {"status_type": "info"|"table", "devices": [{"name",
    "targets": [{"start", "length", "target_type", "status": {...}}]}]}, every device
    asked for (none: an empty list)."""
    devices, _ = inv.gather(DmCommand(f"dm.{op}"), op, names,
                            {"inactive": inactive, "target": target_type, "data": True,
                             "showkeys": showkeys})
    kind = "table" if op == "table" else "info"
    click.echo(json.dumps({"status_type": kind, "devices": devices}, indent=2))


@dmsetup.command()
@click.argument("names", nargs=-1)
@click.option("--inactive", is_flag=True, help="Show the inactive table.")
@click.option("--target", "target_type", metavar="TYPE", help="Only segments of type TYPE.")
@click.option("--showkeys", is_flag=True, help="Print crypt keys (zeroes otherwise).")
@click.option("-v", "--verbose", count=True, help="The device's info first.")
@click.option("--concise", is_flag=True, help="In the form create --concise takes.")
@click.option("--json", "as_json", is_flag=True,
              help="Each segment's table arguments as data, in JSON (not dmsetup's).")
@select_options
@pass_invocation
def table(inv: Invocation, names: tuple[str, ...], inactive: bool, target_type: str | None,
          showkeys: bool, verbose: int, concise: bool, as_json: bool) -> None:
    """NAME's table, in a form `load` accepts."""
    if concise and as_json:
        refuse("--concise and --json exclude each other.")
    if concise:
        _concise(inv, names, inactive, target_type, showkeys)
        return
    _segment_lines(inv, "table", names, inactive, target_type, verbose, showkeys, as_json)


def _concise(inv: Invocation, names: tuple[str, ...], inactive: bool,
             target_type: str | None, showkeys: bool) -> None:
    """table --concise as dmsetup 1.02.185 prints it: keys hidden unless --showkeys, as
    in `table`; with --target only those segments, and a device without one left out."""
    infos, _ = inv.gather(DmCommand.INFO, "info", names)
    if not infos:
        click.echo("No devices found")
        return
    tables, _ = inv.gather(DmCommand.TABLE, "table", names,
                           {"inactive": inactive, "target": target_type})
    lines = {d["name"]: d["lines"] if showkeys else [report.hide_key(x) for x in d["lines"]]
             for d in tables}
    click.echo(report.concise([(i, lines[i["name"]]) for i in infos if i["name"] in lines]),
               nl=False)


@dmsetup.command()
@click.argument("names", nargs=-1)
@click.option("--inactive", is_flag=True, help="Status of the inactive table.")
@click.option("--target", "target_type", metavar="TYPE", help="Only segments of type TYPE.")
@click.option("--noflush", is_flag=True, help="Accepted for dmsetup compatibility.")
@click.option("-v", "--verbose", count=True, help="The device's info first.")
@click.option("--json", "as_json", is_flag=True,
              help="Each segment's status as data, in JSON (not dmsetup's).")
@select_options
@pass_invocation
def status(inv: Invocation, names: tuple[str, ...], inactive: bool, target_type: str | None,
           noflush: bool, verbose: int, as_json: bool) -> None:
    """Each target's status line."""
    _segment_lines(inv, "status", names, inactive, target_type, verbose, as_json=as_json)


@dmsetup.command()
@pass_invocation
def targets(inv: Invocation) -> None:
    """Target types and their versions."""
    click.echo(report.targets(inv.call(DmCommand.TARGETS, {}, "list_versions")["targets"]),
               nl=False)


@dmsetup.command(name="help")
@click.option("-c", "-C", "--columns", is_flag=True, help="Also the fields of info -c.")
@click.pass_context
def help_(ctx: click.Context, columns: bool) -> None:
    """dmsetup's usage, on stderr as dmsetup prints it; with -c the report fields too."""
    click.echo(USAGE, err=True, nl=False)
    if columns:
        click.echo(report.report_help(), err=True, nl=False)


@dmsetup.command(name="target-version")
@click.argument("types", nargs=-1)
@pass_invocation
def target_version(inv: Invocation, types: tuple[str, ...]) -> None:
    """The versions of the target types named (the kernel's GET_TARGET_VERSION)."""
    known = {t["name"]: t for t in inv.call(DmCommand.TARGETS, {}, "list_versions")["targets"]}
    for name in types:
        if name not in known:  # the kernel's answer: EINVAL
            failed("target-version", name, errno.EINVAL)
        click.echo(report.targets([known[name]]), nl=False)


@dmsetup.command()
@pass_invocation
def version(inv: Invocation) -> None:
    """Library and driver versions."""
    click.echo(report.version(inv.call(DmCommand.VERSION, {}, "version")), nl=False)


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

