"""`dmsetup stats`: regions of I/O statistics, through the kernel's @stats_* messages (the
counting is the dm layer's, dm/stats.py), listed and reported as libdm-stats does
(dm/stats_report.py). create, delete, clear, list, print and report as lvm2 2.03.16's dmsetup
has them, its words and quirks included (print --allregions prints each region twice);
groups, --filemap and the rate fields, which need libdm's sampling, are not here.
"""

from __future__ import annotations

import re
from typing import Any

import click

from minidisk.cli.common import require_server
from minidisk.cli.dmsetup.base import (
    Invocation,
    dmsetup,
    pass_invocation,
    refuse,
    select_options,
    strerror,
)
from minidisk.cli.dmsetup.listing import report_spec
from minidisk.cli.dmsetup.usage import STATS_USAGE
from minidisk.dm import report
from minidisk.dm import stats_report as sr
from minidisk.dm.commands import DmCommand
from minidisk.dm.fields import BY_ID
from minidisk.dm.selection import matches

SIZE_UNITS = {"b": 1, "s": 512, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
              "p": 1 << 50, "e": 1 << 60}
NSEC_PER = {"s": 1_000_000_000, "ms": 1_000_000, "us": 1_000, "ns": 1}


class StatsGroup(click.Group):
    """dmsetup's words for a stats command it does not know, or none."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        found = super().get_command(ctx, cmd_name)
        if found is None:
            text = "Unknown stats command.\n" + STATS_USAGE + report.report_help()
            refuse(text.removesuffix("\n"))
        return found


@dmsetup.group(cls=StatsGroup, invoke_without_command=True)
@click.pass_context
def stats(ctx: click.Context) -> None:
    """I/O statistics of regions of devices (the kernel's dm-stats)."""
    if ctx.invoked_subcommand is None:
        click.echo("Incorrect number of arguments.", err=True)
        click.echo(STATS_USAGE, err=True, nl=False)
        ctx.exit(1)


@stats.command(name="help")
def stats_help() -> None:
    """The stats usage and the report fields."""
    click.echo(STATS_USAGE + report.report_help(), err=True, nl=False)


def _message(inv: Invocation, name: str, *words: str) -> str:
    result = inv.call(DmCommand.MESSAGE, {"name": name, "sector": 0, "args": list(words)},
                      "message", name)["result"]
    return str(result or "")


def _device_names(inv: Invocation, names: tuple[str, ...], all_devices: bool,
                  need_all_flag: bool) -> list[str]:
    """NAMEs, or the device -u / -j -m choose, or (with --alldevices where dmsetup asks for
    it) every device, by name."""
    if names:
        return list(names)
    selection = inv.selection()
    if selection is not None:
        return [d["name"] for d in inv.call(DmCommand.INFO, selection[0], "info",
                                            selection[1])["devices"]]
    if need_all_flag and not all_devices:
        refuse("Please specify device(s) or use --alldevices.")
    return [d["name"] for d in inv.call(DmCommand.INFO, {}, "info")["devices"]]


def _size(text: str, what: str) -> int:
    """dmsetup's _size_from_string, in bytes: a number of sectors, or with a unit."""
    m = re.match(r"\d+", text)
    if m is None:
        refuse(f'Invalid {what} argument: "{text}"')
    value, unit = int(m[0]), text[m.end():]
    if not unit:
        return value * 512
    return value * SIZE_UNITS.get(unit[0].lower(), 1)


def _bounds(text: str, name: str, precise: bool) -> tuple[str, bool]:
    """--bounds as libdm reads it (values in ns unless ms, us or s follow, a unit carrying
    over to the values after it), then the kernel's histogram: argument, in ms unless a
    bound needs finer (which makes the region precise)."""
    values, multiplier = [], 1
    for word in text.split(","):
        m = re.fullmatch(r"(\d+)(s|ms|us|ns)?", word)
        if m is None:
            bad = next((c for c in word if c not in "0123456789muns"), word[:1] or ",")
            refuse(f"Invalid character in histogram: {bad}" if word else
                   f"Empty histogram bin not allowed: {text}")
        if m[2]:
            multiplier = NSEC_PER[m[2]]
        values.append(int(m[1]) * multiplier)
    if any(b < a for a, b in zip(values, values[1:], strict=False)):
        refuse("Histogram boundaries must be in order of increasing magnitude.\n"
               f"{name}: Could not create statistics region.")
    precise = precise or any(v % NSEC_PER["ms"] for v in values)
    scale = 1 if precise else NSEC_PER["ms"]
    return "histogram:" + ",".join(str(v // scale) for v in values), precise


@stats.command()
@click.argument("names", nargs=-1)
@click.option("--start", metavar="START", help="Region start (sectors, or with units).")
@click.option("--length", metavar="LENGTH", help="Region length (default: to the end).")
@click.option("--areas", type=click.IntRange(min=1), help="Split into this many areas.")
@click.option("--areasize", metavar="SIZE", help="Split into areas of this size.")
@click.option("--programid", metavar="ID", help="The program id (default dmstats).")
@click.option("--userdata", metavar="DATA", default="", help="Data kept with the region.")
@click.option("--bounds", metavar="B1,B2,...", help="Count latencies into a histogram.")
@click.option("--precise", is_flag=True, help="Nanosecond counters.")
@click.option("--alldevices", is_flag=True, help="Every device.")
@select_options
@pass_invocation
def create(inv: Invocation, names: tuple[str, ...], start: str | None, length: str | None,
           areas: int | None, areasize: str | None, programid: str | None, userdata: str,
           bounds: str | None, precise: bool, alldevices: bool) -> None:
    """Create a statistics region on each device: `@stats_create START+LEN STEP ...`."""
    if areas is not None and areasize is not None:
        refuse("Please specify one of --areas and --areasize.")
    devices = _device_names(inv, names, alldevices, need_all_flag=True)
    step = -(areas or 1) if areasize is None else _size(areasize, "areasize") // 512
    first = _size(start, "start") // 512 if start is not None else 0
    wanted = _size(length, "length") // 512 if length is not None else 0
    program = programid or sr.PROGRAM_ID
    for name in devices:
        tables = inv.call(DmCommand.TABLE, {"name": name}, "table", name)["devices"]
        size = wanted or sum(int(line.split()[1]) for d in tables for line in d["lines"])
        features: list[str] = []
        hist = None
        if bounds is not None:
            hist, region_precise = _bounds(bounds, name, precise)
        else:
            region_precise = precise
        if region_precise:
            features.append("precise_timestamps")
        if hist:
            features.append(hist)
        words = ["@stats_create", f"{first}+{size}" if first or size else "-",
                 f"/{-step}" if step < 0 else str(step),
                 *([str(len(features)), *features] if features else []), program,
                 *([userdata] if userdata else [])]
        region = _message(inv, name, *words)
        count = -step if step < 0 else -(-size // step) if size else 1
        click.echo(f"{name}: Created new region with {count} area(s) as region ID {region}")


def _regions(inv: Invocation, name: str, program: str | None) -> list[sr.Region]:
    listing = _message(inv, name, "@stats_list", *([program] if program else []))
    return sr.parse_list(name, listing)


def _program(programid: str | None, allprograms: bool) -> str | None:
    return None if allprograms else programid or sr.PROGRAM_ID


def _which(regionid: int | None, allregions: bool, words: str) -> None:
    if regionid is None and not allregions:
        refuse(words)


def program_options(func: Any) -> Any:
    for option in (click.option("--programid", metavar="ID", help="Only this program's."),
                   click.option("--allprograms", is_flag=True, help="Every program's."),
                   click.option("--regionid", type=click.IntRange(min=0), help="One region."),
                   click.option("--allregions", is_flag=True, help="Every region."),
                   click.option("--alldevices", is_flag=True, help="Every device.")):
        func = option(func)
    return select_options(func)


@stats.command()
@click.argument("names", nargs=-1)
@program_options
@pass_invocation
def delete(inv: Invocation, names: tuple[str, ...], programid: str | None, allprograms: bool,
           regionid: int | None, allregions: bool, alldevices: bool) -> None:
    """Delete a region (--regionid) or every one (--allregions)."""
    _which(regionid, allregions, "Please specify a --regionid or --groupid, or use "
                                 "--allregions.")
    for name in _device_names(inv, names, alldevices, need_all_flag=True):
        regions = _regions(inv, name, _program(programid, allprograms))
        if allregions:
            for region in regions:
                _message(inv, name, "@stats_delete", str(region.id))
            continue
        if not regions:
            refuse(f"Could not delete region ID {regionid}: no regions found\n"
                   "Could not delete statistics region")
        if all(r.id != regionid for r in regions):
            refuse(f"Region ID {regionid} does not exist\nCould not delete statistics region")
        _message(inv, name, "@stats_delete", str(regionid))


@stats.command()
@click.argument("names", nargs=-1)
@program_options
@pass_invocation
def clear(inv: Invocation, names: tuple[str, ...], programid: str | None, allprograms: bool,
          regionid: int | None, allregions: bool, alldevices: bool) -> None:
    """Zero the counters of a region (--regionid) or of every one (--allregions)."""
    _which(regionid, allregions, "Please specify a --regionid or use --allregions.")
    for name in _device_names(inv, names, alldevices, need_all_flag=False):
        regions = _regions(inv, name, None)
        for region in regions:
            if allregions or region.id == regionid:
                _message(inv, name, "@stats_clear", str(region.id))


@stats.command(name="print")
@click.argument("names", nargs=-1)
@click.option("--clear", "clear_too", is_flag=True, help="Zero the counters printed.")
@program_options
@pass_invocation
def print_(inv: Invocation, names: tuple[str, ...], clear_too: bool, programid: str | None,
           allprograms: bool, regionid: int | None, allregions: bool,
           alldevices: bool) -> None:
    """The kernel's counters of a region, one line per area."""
    _which(regionid, allregions, "Please specify a --regionid or use --allregions.")
    verb = "@stats_print_clear" if clear_too else "@stats_print"
    for name in _device_names(inv, names, alldevices, need_all_flag=False):
        if not allregions:
            assert regionid is not None
            _print_region(inv, name, verb, regionid)
            continue
        for region in _regions(inv, name, _program(programid, allprograms)):
            # lvm2 2.03.16 prints each region twice here (_stats_print): so do we
            _print_region(inv, name, verb, region.id)
            _print_region(inv, name, verb, region.id)


def _print_region(inv: Invocation, name: str, verb: str, region_id: int) -> None:
    from minidisk.control_client import ControlError, call

    args = {"name": name, "sector": 0, "args": [verb, str(region_id)]}
    try:
        result = call(require_server(inv.server), DmCommand.MESSAGE, args)["result"]
    except ControlError as e:
        refuse(f"device-mapper: message ioctl on {name}  failed: {strerror(e.errno)}\n"
               "Could not print statistics region.")
    click.echo(result or "", nl=False)


def _report(inv: Invocation, names: tuple[str, ...], program: str | None, areas: bool,
            default: str, fields: str | None, sort_keys: str | None, select: str | None,
            noheadings: bool, separator: str | None, nameprefixes: bool,
            regionid: int | None = None) -> None:
    values = {f: v for f, v in sr.STATS_VALUES.items()}
    kinds = {f: (BY_ID[f].kind if f not in sr.SIZE_FIELDS else "number", v)
             for f, v in values.items()}
    spec = report_spec(fields, sort_keys, select, default, values, kinds)
    rows: list[sr.Row] = []
    for name in _device_names(inv, names, False, need_all_flag=False):
        regions = [r for r in _regions(inv, name, program)
                   if regionid is None or r.id == regionid]
        if areas:  # as libdm's dm_stats_populate: counters since the last report
            for region in regions:
                region.areas = sr.parse_print(_message(inv, name, "@stats_print_clear",
                                                       str(region.id)))
        rows += sr.rows(regions, areas)
    rows = [r for r in report.sort_rows(rows, spec.sort_keys, values)
            if matches(spec.selection, r)]
    if rows:
        click.echo(report.info_columns(rows, not noheadings, spec.fields, separator,
                                       nameprefixes, True, values, sr.show), nl=False)


def report_options(func: Any) -> Any:
    for option in (
        click.option("-o", "--options", "fields", metavar="FIELDS", help="Fields to show."),
        click.option("-O", "--sort", "sort_keys", metavar="FIELDS", help="Sort by these."),
        click.option("-S", "--select", "select", metavar="SELECTION", help="Only these."),
        click.option("--noheadings", is_flag=True, help="No headings, ':' between."),
        click.option("--separator", metavar="SEP", help="Between fields, unaligned."),
        click.option("--nameprefixes", is_flag=True, help="DM_FIELD='value' pairs."),
    ):
        func = option(func)
    return func


@stats.command(name="list")
@click.argument("names", nargs=-1)
@click.option("-v", "--verbose", count=True, help="Each area too.")
@program_options
@report_options
@pass_invocation
def list_(inv: Invocation, names: tuple[str, ...], verbose: int, programid: str | None,
          allprograms: bool, regionid: int | None, allregions: bool, alldevices: bool,
          fields: str | None, sort_keys: str | None, select: str | None, noheadings: bool,
          separator: str | None, nameprefixes: bool) -> None:
    """The regions of each device (and with -v their areas)."""
    _report(inv, names, _program(programid, allprograms), bool(verbose),
            sr.STATS_AREA_LIST_FIELDS if verbose else sr.STATS_LIST_FIELDS, fields,
            sort_keys, select, noheadings, separator, nameprefixes, regionid)


@stats.command(name="report")
@click.argument("names", nargs=-1)
@program_options
@report_options
@pass_invocation
def report_(inv: Invocation, names: tuple[str, ...], programid: str | None,
            allprograms: bool, regionid: int | None, allregions: bool, alldevices: bool,
            fields: str | None, sort_keys: str | None, select: str | None,
            noheadings: bool, separator: str | None, nameprefixes: bool) -> None:
    """The counters of every area (and of regions of several areas)."""
    _report(inv, names, _program(programid, allprograms), True,
            "stats_name,group_id,region_id,obj_type,area_id,area_start,area_len,"
            "read_count,write_count,read_sector_count,write_sector_count",
            fields, sort_keys, select, noheadings, separator, nameprefixes, regionid)
