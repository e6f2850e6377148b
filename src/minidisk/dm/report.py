"""dmsetup's output formats, from the dicts the control handlers return.

Matched to lvm2's tools/dmsetup.c so that scripts written for dmsetup read our output:
`info` (long form; `-c` as libdm's report with dmsetup's device fields), `ls`
(`name\\t(major:minor)`), `ls --target` (`name\\t(major, minor)`),
`ls --tree`, `deps` (`N dependencies\\t: (major, minor)...`), `table`/`status` (`name: `
prefixed when all devices are listed; a device without a table prints an empty line, and
with --target a device without such segments prints nothing), `targets`, `version`.

Devices in the namespace have no major:minor; where dmsetup would print one for a
non-dm device, the namespace key is printed instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

DM_MAJOR = 253  # as minidisk.dm.mapped.DM_MAJOR (this module imports nothing of ours)
READ_AHEAD = 256  # the kernel's default, in sectors; we do no read-ahead of our own


def info_long(info: dict[str, Any]) -> str:
    state = "SUSPENDED" if info["suspended"] else "ACTIVE"
    if info["read_only"]:
        state += " (READ-ONLY)"
    if info["deferred_remove"]:
        state += " (DEFERRED REMOVE)"
    live, inactive = info["live_table"], info["inactive_table"]
    tables = "None" if not (live or inactive) else (
        ("LIVE" if live else "") + (" & " if live and inactive else "")
        + ("INACTIVE" if inactive else ""))
    lines = [
        f"Name:              {info['name']}",
        f"State:             {state}",
        # dmsetup reads it from the block device, which cannot be opened without a table
        *([f"Read Ahead:        {info.get('read_ahead', READ_AHEAD)}"] if live else []),
        f"Tables present:    {tables}",
        f"Open count:        {info['open_count']}",
        f"Event number:      {info['event_nr']}",
        f"Major, minor:      {info['major']}, {info['minor']}",
        f"Number of targets: {info['target_count']}",
    ]
    if info["uuid"]:
        lines.append(f"UUID: {info['uuid']}")
    return "\n".join(lines) + "\n\n"


def _attr(i: dict[str, Any]) -> str:
    return (("L" if i["live_table"] else "-") + ("I" if i["inactive_table"] else "-")
            + ("s" if i["suspended"] else "-") + ("r" if i["read_only"] else "w"))


def _tables_loaded(i: dict[str, Any]) -> str:
    live, inactive = i["live_table"], i["inactive_table"]
    return "Both" if live and inactive else "Live" if live else \
        "Inactive" if inactive else "None"


# `dmsetup info -c -o FIELD,...`: the device fields of dmsetup's report (id, heading, minimum
# width, numeric, value). Numbers are right-aligned, text left-aligned, as libdm's report does.
REPORT_FIELDS: dict[str, tuple[str, int, bool, Any]] = {
    "name": ("Name", 16, False, lambda i: i["name"]),
    "uuid": ("UUID", 32, False, lambda i: i["uuid"]),
    "read_ahead": ("RAhead", 6, True, lambda i: READ_AHEAD),
    "attr": ("Stat", 4, False, _attr),
    "tables_loaded": ("Tables", 6, False, _tables_loaded),
    "suspended": ("Suspended", 9, False,
                  lambda i: "Suspended" if i["suspended"] else "Active"),
    "readonly": ("Read-only", 9, False,
                 lambda i: "Read-only" if i["read_only"] else "Writeable"),
    "devno": ("DevNo", 5, False, lambda i: f"{i['major']}:{i['minor']}"),
    "major": ("Maj", 3, True, lambda i: i["major"]),
    "minor": ("Min", 3, True, lambda i: i["minor"]),
    "open": ("Open", 4, True, lambda i: i["open_count"]),
    "segments": ("Targ", 4, True, lambda i: i["target_count"]),
    "events": ("Event", 6, True, lambda i: i["event_nr"]),
}
DEFAULT_REPORT = "name,major,minor,attr,open,segments,events,uuid"


def report_fields(option: str | None) -> list[str]:
    """The field ids `-o` asks for: a list, or `+list` to add to the default. ValueError
    names an unknown field as libdm does."""
    if not option:
        return DEFAULT_REPORT.split(",")
    wanted = (DEFAULT_REPORT + "," + option[1:]) if option.startswith("+") else option
    fields = [f.strip() for f in wanted.split(",") if f.strip()]
    for field in fields:
        if field not in REPORT_FIELDS:
            raise ValueError(f"Unrecognised field: {field}")
    return fields


def report_help() -> str:
    width = max(len(f) for f in REPORT_FIELDS)
    return "Mapped Device Information Fields\n" + "".join(
        f"  {field:<{width}} - {heading}\n"
        for field, (heading, _, _, _) in REPORT_FIELDS.items())


def info_columns(infos: Sequence[dict[str, Any]], headings: bool = True,
                 fields: Sequence[str] | None = None, separator: str | None = None,
                 prefixes: bool = False, quoted: bool = True) -> str:
    """`dmsetup info -c` as libdm's report prints it: aligned columns with headings by
    default; `--noheadings` alone is dmsetup's old unaligned form with ':' between fields;
    `--separator` is unaligned; `--nameprefixes` prints DM_FIELD='value' pairs."""
    fields = list(fields or DEFAULT_REPORT.split(","))
    columns = [REPORT_FIELDS[f] for f in fields]
    rows = [[str(value(i)) for _, _, _, value in columns] for i in infos]
    aligned = separator is None and headings and not prefixes
    # As dmsetup: --noheadings alone means ':' between fields; --separator wins.
    sep = separator if separator is not None else (" " if headings else ":")
    if prefixes:
        def pair(field: str, text: str) -> str:
            return f"DM_{field.upper()}=" + (f"'{text}'" if quoted else text)
        return "".join(sep.join(pair(f, t) for f, t in zip(fields, row, strict=True)) + "\n"
                       for row in rows)
    if not aligned:
        lines = [[heading for heading, _, _, _ in columns]] if headings else []
        return "".join(sep.join(line) + "\n" for line in lines + rows)
    widths = [max([width, len(heading)] + [len(row[n]) for row in rows])
              for n, (heading, width, _, _) in enumerate(columns)]

    def line(cells: list[str], numeric: list[bool]) -> str:
        # libdm pads every column, the last one too (trailing blanks included)
        padded = [cell.rjust(w) if num else cell.ljust(w)
                  for cell, w, num in zip(cells, widths, numeric, strict=True)]
        return sep.join(padded) + "\n"

    out = line([c[0] for c in columns], [False] * len(columns))
    return out + "".join(line(row, [c[2] for c in columns]) for row in rows)


def ls(devices: Sequence[dict[str, Any]], names: str = "devno") -> str:
    """`ls -o devno|devname|blkdevname`: a device without a table has no block device to
    name, so it is shown by number whatever is asked."""
    if not devices:
        return "No devices found\n"
    if names != "devno":
        return "".join(
            f"{d['name']}\t({d['name'] if names == 'devname' else 'dm-' + str(d['minor'])})\n"
            if d["live_table"] else f"{d['name']}\t({d['major']}:{d['minor']})\n"
            for d in devices)
    return "".join(f"{d['name']}\t({d['major']}:{d['minor']})\n" for d in devices)


def ls_target(devices: Sequence[dict[str, Any]], using: set[str]) -> str:
    """`ls --target TYPE`: dmsetup prints it through its table code, as `name\t(major,
    minor)`, and only says there are no devices when there are none of any type."""
    if not devices:
        return "No devices found\n"
    return "".join(f"{d['name']}\t({d['major']}, {d['minor']})\n" for d in devices
                   if d["name"] in using)


def _dep_text(dep: dict[str, Any], names: str) -> str:
    if dep["name"] is None:
        if dep["major"] is None:
            return f"({dep['key']})"
        if names == "devno":
            return f"({dep['major']}, {dep['minor']})"
        return f"({dep['key'].rsplit('/', 1)[-1]})"  # the key's last part, as a blkdev name
    if names == "devname":
        return f"({dep['name']})"
    if names == "blkdevname":
        return f"(dm-{dep['minor']})"
    return f"({dep['major']}, {dep['minor']})"


def deps(devices: Sequence[dict[str, Any]], multiple: bool, names: str = "devno") -> str:
    out = []
    for d in devices:
        prefix = f"{d['name']}: " if multiple else ""
        listed = "".join(" " + _dep_text(dep, names) for dep in d["deps"])
        out.append(f"{prefix}{len(d['deps'])} dependencies\t:{listed}\n")
    return "".join(out)


def lines(devices: Sequence[dict[str, Any]], multiple: bool) -> str:
    """`table` and `status`: one line per segment; an empty line for a device without one."""
    out = []
    for d in devices:
        prefix = f"{d['name']}: " if multiple else ""
        for line in d["lines"] or [""]:
            out.append(f"{prefix}{line}\n")
    return "".join(out)


def targets(entries: Sequence[dict[str, Any]]) -> str:
    return "".join(f"{t['name']:<16} v{'.'.join(map(str, t['version']))}\n" for t in entries)


def version(result: dict[str, Any]) -> str:
    return (f"Library version:   {result['library']}\n"
            f"Driver version:    {result['driver']}\n")


# ls --tree, drawn as dmsetup draws it (pstree's characters, not compact).

_UTF = {"branch": "\u251c\u2500", "last": "\u2514\u2500", "vert": "\u2502 ", "empty": "  "}
_ASCII = {"branch": "|-", "last": "`-", "vert": "| ", "empty": "  "}


def tree(devices: Sequence[dict[str, Any]], utf8: bool = True) -> str:
    """Top-level devices (held by no other) first, each with its children below it."""
    if not devices:
        return "No devices found\n"
    sym = _UTF if utf8 else _ASCII
    by_name = {d["name"]: d for d in devices}
    held = {dep["name"] for d in devices for dep in d["deps"] if dep["name"] is not None}
    out: list[str] = []

    def node(label: str, children: list[dict[str, Any]], more: list[bool]) -> None:
        prefix = ""
        depth = len(more)
        for level in range(depth):
            prefix += " "
            if level == depth - 1:
                prefix += sym["branch"] if more[level] else sym["last"]
            else:
                prefix += sym["vert"] if more[level] else sym["empty"]
        out.append(prefix + label + "\n")
        for i, dep in enumerate(children):
            last = i == len(children) - 1
            child = by_name.get(dep["name"]) if dep["name"] is not None else None
            if child is None:
                label = dep["key"] if dep["major"] is None else f"{dep['major']}:{dep['minor']}"
                node(f" ({label})", [], more + [not last])
            else:
                node(f"{child['name']} ({child['major']}:{child['minor']})", child["deps"],
                     more + [not last])

    for d in devices:
        if d["name"] not in held:
            node(f"{d['name']} ({d['major']}:{d['minor']})", d["deps"], [])
    return "".join(out)
