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

import re
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from minidisk.dm import fields

DM_MAJOR = 253  # as minidisk.dm.mapped.DM_MAJOR (this module imports no dm layer)
READ_AHEAD = 256  # the kernel's default, in sectors; we do no read-ahead of our own


def openable(info: dict[str, Any]) -> bool:
    """Whether dmsetup could open the device's block device to ask it something (its
    read-ahead, its name): not while no table at all has been loaded."""
    return bool(info["live_table"] or info["inactive_table"])


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
        *([f"Read Ahead:        {info.get('read_ahead', READ_AHEAD)}"]
          if openable(info) else []),
        f"Tables present:    {tables}",
        f"Open count:        {info['open_count']}",
        f"Event number:      {info['event_nr']}",
        f"Major, minor:      {info['major']}, {info['minor']}",
        f"Number of targets: {info['target_count']}",
    ]
    if info["uuid"]:
        lines.append(f"UUID: {info['uuid']}")
    return "\n".join(lines) + "\n\n"


# libdm's whitelist of name and UUID characters; others are mangled as \\xNN ("auto").
_WHITELIST = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz#+-.:=@_")


def mangle(text: str) -> str:
    """libdm's mangled form of a name or UUID: each character off the whitelist as
    \\xNN (a \\xNN already there stays)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and len(text) > i + 3 and text[i + 1] == "x" \
                and all(c in "0123456789abcdefABCDEF" for c in text[i + 2:i + 4]):
            out.append(text[i:i + 4])
            i += 4
            continue
        c = text[i]
        out.append(c if c in _WHITELIST else "".join(f"\\x{b:02x}" for b in c.encode()))
        i += 1
    return "".join(out)


def _attr(i: dict[str, Any]) -> str:
    return (("L" if i["live_table"] else "-") + ("I" if i["inactive_table"] else "-")
            + ("s" if i["suspended"] else "-") + ("r" if i["read_only"] else "w"))


def _tables_loaded(i: dict[str, Any]) -> str:
    live, inactive = i["live_table"], i["inactive_table"]
    return "Both" if live and inactive else "Live" if live else \
        "Inactive" if inactive else "None"


def _blk(dep: dict[str, Any]) -> str:
    """A dependency's block device name: dm-N, or a key's last part (as loop0 is)."""
    return f"dm-{dep['minor']}" if dep["name"] is not None else dep["key"].rsplit("/", 1)[-1]


def _devno(dep: dict[str, Any]) -> str:
    return dep["key"] if dep["major"] is None else f"{dep['major']}:{dep['minor']}"


def _subsystem(i: dict[str, Any]) -> str:
    """What owns the device: its UUID up to the first '-' (LVM-..., CRYPT-...)."""
    uuid = str(i["uuid"])
    return uuid.split("-", 1)[0] if "-" in uuid else ""


def _lvm_part(i: dict[str, Any], n: int) -> str:
    return split_lvm_name(str(i["name"]))[n] if _subsystem(i) == "LVM" else ""


# Fields whose value needs the device's block device (no table: none to open).
NEEDS_BLOCK_DEVICE = {"blkdevname", "read_ahead"}

# `dmsetup info -c -o FIELD,...`: the value of each device field (headings, widths and
# kinds are libdm's, in dm/fields.py); `i` is a device as dm.ls gives it, with "users" (the
# devices whose live tables use it) added by the caller. Numbers are right-aligned, text
# left-aligned, as libdm's report does.
DEVICE_VALUES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "name": lambda i: i["name"],
    "mangled_name": lambda i: mangle(i["name"]),
    "unmangled_name": lambda i: i["name"],
    "uuid": lambda i: i["uuid"],
    "mangled_uuid": lambda i: mangle(i["uuid"]),
    "unmangled_uuid": lambda i: i["uuid"],
    "read_ahead": lambda i: i.get("read_ahead", READ_AHEAD) if openable(i) else 0,
    "blkdevname": lambda i: f"dm-{i['minor']}",
    "attr": _attr,
    "tables_loaded": _tables_loaded,
    "suspended": lambda i: "Suspended" if i["suspended"] else "Active",
    "readonly": lambda i: "Read-only" if i["read_only"] else "Writeable",
    "devno": lambda i: f"{i['major']}:{i['minor']}",
    "major": lambda i: i["major"],
    "minor": lambda i: i["minor"],
    "open": lambda i: i["open_count"],
    "segments": lambda i: i["target_count"],
    "events": lambda i: i["event_nr"],
    "device_count": lambda i: len(i["deps"]),
    "devs_used": lambda i: ",".join(sorted(d["name"] for d in i["deps"] if d["name"])),
    "devnos_used": lambda i: ",".join(_devno(d) for d in i["deps"]),
    "blkdevs_used": lambda i: ",".join(_blk(d) for d in i["deps"]),
    "device_ref_count": lambda i: len(i.get("users", [])),
    "names_using_dev": lambda i: ",".join(sorted(u["name"] for u in i.get("users", []))),
    "devnos_using_dev": lambda i: ",".join(f"{u['major']}:{u['minor']}"
                                           for u in i.get("users", [])),
    "subsystem": _subsystem,
    "vg_name": lambda i: _lvm_part(i, 0),
    "lv_name": lambda i: _lvm_part(i, 1),
    "lv_layer": lambda i: _lvm_part(i, 2),
}
DEVICE_FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    f: (fields.BY_ID[f].kind, value) for f, value in DEVICE_VALUES.items()}
DEFAULT_REPORT = "name,major,minor,attr,open,segments,events,uuid"


def report_fields(option: str | None, default: str = DEFAULT_REPORT,
                  known: Collection[str] = DEVICE_VALUES) -> list[str]:
    """The field ids `-o` asks for: a list, or `+list` to add to the default. ValueError
    names an unknown field as libdm does."""
    if not option:
        return default.split(",")
    wanted = (default + "," + option[1:]) if option.startswith("+") else option
    chosen = [g for f in wanted.split(",") if f.strip()
              for g in fields.GROUPS.get(f.strip(), [f.strip()])]
    for field in chosen:
        if field not in known:
            raise ValueError(f"Unrecognised field: {field}")
    return chosen


def sort_rows(rows: list[Any], keys: str | None,
              values: Mapping[str, Callable[[Any], Any]] = DEVICE_VALUES) -> list[Any]:
    """-O FIELD[,-FIELD...]: sort by each field in turn ('-' descending); without -O the
    rows stay in the order asked for (all devices: by name)."""
    rows = list(rows)
    for key in reversed(keys.split(",") if keys else []):
        field = key.lstrip("-+")
        if field not in values:
            raise ValueError(f"Unrecognised field: {field}")
        rows.sort(key=values[field], reverse=key.startswith("-"))
    return rows


def report_help() -> str:
    return fields.help_text()


def info_columns(rows: Sequence[Any], headings: bool = True,
                 wanted: Sequence[str] | None = None, separator: str | None = None,
                 prefixes: bool = False, quoted: bool = True,
                 values: Mapping[str, Callable[[Any], Any]] = DEVICE_VALUES,
                 show: Callable[[str, Any], str] = lambda field, value: str(value)) -> str:
    """A report as libdm prints it (`dmsetup info -c`, `dmsetup stats`): aligned columns
    with headings by default; `--noheadings` alone is dmsetup's old unaligned form with ':'
    between fields; `--separator` is unaligned; `--nameprefixes` prints DM_FIELD='value'
    pairs. `show` turns a value into its text (sizes have units)."""
    ids = list(wanted or DEFAULT_REPORT.split(","))
    columns = [fields.BY_ID[f] for f in ids]
    cells = [[show(f, values[f](row)) for f in ids] for row in rows]
    aligned = separator is None and headings and not prefixes
    # As dmsetup: --noheadings alone means ':' between fields; --separator wins.
    sep = separator if separator is not None else (" " if headings else ":")
    if prefixes:
        def pair(field: str, text: str) -> str:
            return f"DM_{field.upper()}=" + (f"'{text}'" if quoted else text)
        head = " ".join(c.heading for c in columns) + "\n" if headings else ""
        return head + "".join(
            sep.join(pair(f, t) for f, t in zip(ids, row, strict=True)) + "\n"
            for row in cells)
    if not aligned:
        lines = [[c.heading for c in columns]] if headings else []
        return "".join(sep.join(line) + "\n" for line in lines + cells)
    widths = [max([c.width, len(c.heading)] + [len(row[n]) for row in cells])
              for n, c in enumerate(columns)]

    def line(texts: list[str], right: list[bool]) -> str:
        # libdm pads every column, the last one too (trailing blanks included)
        padded = [text.rjust(w) if r else text.ljust(w)
                  for text, w, r in zip(texts, widths, right, strict=True)]
        return sep.join(padded) + "\n"

    out = line([c.heading for c in columns], [False] * len(columns))
    return out + "".join(line(row, [c.kind != "string" for c in columns]) for row in cells)


SPLITNAME_FIELDS = {"vg_name": ("VG", 4), "lv_name": ("LV", 4), "lv_layer": ("LVLayer", 7)}


def split_lvm_name(name: str) -> tuple[str, str, str]:
    """lvm2's dm_split_lvm_name: VG-LV-LAYER, each '-' inside a part doubled."""
    parts: list[str] = []
    part: list[str] = []
    i = 0
    while i < len(name):
        if name[i] == "-" and len(parts) < 2:
            if name[i + 1:i + 2] == "-":
                part.append("-")
                i += 2
                continue
            parts.append("".join(part))
            part = []
        else:
            part.append(name[i])
        i += 1
    parts.append("".join(part))
    vg, lv, layer = (parts + ["", ""])[:3]
    return vg, lv, layer


def splitname(name: str, subsystem: str = "LVM", fields: str | None = None) -> str:
    """`dmsetup splitname`: a report of the parts (empty unless the subsystem is LVM)."""
    chosen = (fields or "vg_name,lv_name,lv_layer").split(",")
    values = dict(zip(SPLITNAME_FIELDS, split_lvm_name(name) if subsystem == "LVM"
                      else ("", "", ""), strict=True))
    widths = [max(SPLITNAME_FIELDS[f][1], len(values[f])) for f in chosen]
    head = " ".join(SPLITNAME_FIELDS[f][0].ljust(w) for f, w in zip(chosen, widths, strict=True))
    row = " ".join(values[f].ljust(w) for f, w in zip(chosen, widths, strict=True))
    return f"{head}\n{row}\n"


def ls(devices: Sequence[dict[str, Any]], names: str = "devno") -> str:
    """`ls -o devno|devname|blkdevname`: a device without a table has no block device to
    name, so it is shown by number whatever is asked."""
    if not devices:
        return "No devices found\n"
    if names != "devno":
        return "".join(
            f"{d['name']}\t({d['name'] if names == 'devname' else 'dm-' + str(d['minor'])})\n"
            if openable(d) else f"{d['name']}\t({d['major']}:{d['minor']})\n"
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


def hide_key(line: str) -> str:
    """A `table` line as dmsetup 1.02.185 prints it without --showkeys (its _status): a
    crypt segment's key, the word after the cipher, becomes zeroes of its length unless it
    is a keyring reference (`:LEN:TYPE:DESC` names no secret); in an integrity segment, the
    key after `internal_hash:ALG:`, `journal_crypt:ALG:` and `journal_mac:ALG:` does."""
    fields = line.split(" ", 3)
    if len(fields) < 4 or fields[2] not in ("crypt", "integrity"):
        return line
    params = fields[3]
    if fields[2] == "crypt":
        cipher, space, rest = params.partition(" ")
        if space and not rest.startswith(":"):
            key, space, tail = rest.partition(" ")
            params = f"{cipher} {'0' * len(key)}{space}{tail}"
    else:
        for name in ("internal_hash:", "journal_crypt:", "journal_mac:"):
            params = _hide_key_after(params, name)
    return " ".join([*fields[:3], params])


def _hide_key_after(params: str, name: str) -> str:
    """dmsetup's hide_key: after the first `name`, the text past the next ':' (if that comes
    before a space) up to the next space becomes zeroes."""
    at = params.find(name)
    if at < 0:
        return params
    i = at + len(name)
    while i < len(params) and params[i] not in " :":
        i += 1
    if i >= len(params) or params[i] != ":":
        return params
    end = params.find(" ", i + 1)
    end = len(params) if end < 0 else end
    return params[:i + 1] + "0" * (end - i - 1) + params[end:]


def _concise_quoted(text: str) -> str:
    """dmsetup's _print_string_quoted: ',', ';' and '\\' each after a backslash."""
    return re.sub(r"([,;\\])", r"\\\1", text)


def concise(devices: Sequence[tuple[dict[str, Any], Sequence[str]]]) -> str:
    """`table --concise`: each device (its info and table lines) as `create --concise` reads
    it, `NAME,UUID,MINOR,ro|rw[,START LENGTH TYPE PARAMS]...`, devices separated by ';', all
    on one line; name, UUID and each segment's parameters quoted as dmsetup quotes them."""
    out = []
    for info, table_lines in devices:
        entry = [_concise_quoted(info["name"]), _concise_quoted(info["uuid"]),
                 str(info["minor"]), "ro" if info["read_only"] else "rw"]
        for line in table_lines:
            start, length, kind, params = (line.split(" ", 3) + [""])[:4]
            entry.append(f"{start} {length} {kind} {_concise_quoted(params)}")
        out.append(",".join(entry))
    return ";".join(out) + "\n" if out else ""


def targets(entries: Sequence[dict[str, Any]]) -> str:
    return "".join(f"{t['name']:<16} v{'.'.join(map(str, t['version']))}\n" for t in entries)


def version(result: dict[str, Any]) -> str:
    return (f"Library version:   {result['library']}\n"
            f"Driver version:    {result['driver']}\n")


# ls --tree, drawn as dmsetup draws it: pstree's characters, `-o` options as there.

_UTF = {"branch": "\u251c\u2500", "last": "\u2514\u2500", "vert": "\u2502 ", "empty": "  ",
        "one": "\u2500\u2500\u2500", "first": "\u2500\u252c\u2500"}
_ASCII = {"branch": "|-", "last": "`-", "vert": "| ", "empty": "  ", "one": "---",
          "first": "-+-"}
TREE_OPTIONS = {"ascii", "utf", "vt100", "compact", "inverted", "notrunc", "blkdevname",
                "device", "nodevice", "active", "open", "rw", "uuid"}


def tree(devices: Sequence[dict[str, Any]], utf8: bool = True,
         options: frozenset[str] = frozenset()) -> str:
    """Devices used by no other first, each with what it uses below it (`inverted`: the
    devices that use nothing first, each with its users below), in the order dmsetup
    meets them (by name, each device's children in the kernel's order)."""
    if not devices:
        return "No devices found\n"
    sym = _ASCII if "ascii" in options or not (utf8 or "utf" in options) else _UTF
    by_name = {d["name"]: d for d in devices}

    # Nodes: ("dm", name) or ("dev", key); edges in the order dmsetup adds them.
    order: list[tuple[str, str]] = []
    children: dict[tuple[str, str], list[tuple[str, str]]] = {}
    parents: dict[tuple[str, str], list[tuple[str, str]]] = {}
    leaves: dict[tuple[str, str], dict[str, Any]] = {}

    def add(node: tuple[str, str]) -> None:
        if node not in children:
            order.append(node)
            children[node] = []
            parents[node] = []

    for d in devices:
        me = ("dm", d["name"])
        add(me)
        for dep in d["deps"]:
            child = ("dm", dep["name"]) if dep["name"] in by_name else ("dev", dep["key"])
            if child[0] == "dev":
                leaves[child] = dep
            add(child)
            children[me].append(child)
            parents[child].append(me)
    if "inverted" in options:
        children, parents = parents, children
    show_devices = "nodevice" not in options

    def label(node: tuple[str, str]) -> str:
        if node[0] == "dev":
            dep = leaves[node]
            number = dep["key"] if dep["major"] is None else f"{dep['major']}:{dep['minor']}"
            blk = f"<{dep['key'].rsplit('/', 1)[-1]}> " if "blkdevname" in options else ""
            return f" {blk}({number})"
        d = by_name[node[1]]
        text = str(d["name"])
        if "blkdevname" in options and openable(d):
            text += f" <dm-{d['minor']}>"
        if show_devices:
            text += f" ({d['major']}:{d['minor']})"
        if "active" in options:
            text += " [SUSPENDED]" if d["suspended"] else " [ACTIVE]"
        if "open" in options:
            text += f" [{d['open_count']}]"
        if "rw" in options:
            text += " [RO]" if d["read_only"] else " [RW]"
        if "uuid" in options:
            text += f" [{d['uuid']}]"
        return text

    def kids(node: tuple[str, str]) -> list[tuple[str, str]]:
        return [c for c in children[node] if show_devices or c[0] == "dm"]

    out: list[str] = []
    if "compact" in options and "inverted" not in options:  # dmsetup draws inverted in full
        def compact(node: tuple[str, str], indent: int, lead: str) -> None:
            text = lead + label(node)
            below = kids(node)
            if not below:
                out.append(text + "\n")
                return
            width = indent + len(text)
            for i, child in enumerate(below):
                if i == 0:
                    joint = sym["one"] if len(below) == 1 else sym["first"]
                    start = len(out)
                    compact(child, width + len(joint), "")
                    out[start] = text + joint + out[start]
                else:
                    joint = sym["last"] if i == len(below) - 1 else sym["branch"]
                    start = len(out)
                    compact(child, width + 1 + len(joint), "")
                    out[start] = " " * (width + 1) + joint + out[start]
        for node in order:
            if node[0] == "dm" and not parents[node] or node[0] == "dev" and not parents[node] \
                    and "inverted" in options:
                compact(node, 0, "")
        return "".join(out)

    def draw(node: tuple[str, str], more: list[bool]) -> None:
        prefix = ""
        for level, going_on in enumerate(more):
            prefix += " "
            if level == len(more) - 1:
                prefix += sym["branch"] if going_on else sym["last"]
            else:
                prefix += sym["vert"] if going_on else sym["empty"]
        out.append(prefix + label(node) + "\n")
        below = kids(node)
        for i, child in enumerate(below):
            draw(child, more + [i < len(below) - 1])

    for node in order:
        if not parents[node] and (node[0] == "dm" or "inverted" in options) \
                and (show_devices or node[0] == "dm"):
            draw(node, [])
    return "".join(out)
