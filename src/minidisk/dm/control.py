"""The dm commands of the server's control channel: JSON-able dicts in, dicts out.

`control_handlers(registry)` maps command names (`dm.create`, `dm.status`, ...) to async
handlers. Every failure is an `OSError` whose errno says what kind (ENXIO no such device,
EBUSY in use, EINVAL bad table or argument, ELOOP a device holding itself) and whose
message is one line; the daemon passes both to the client. Arguments are checked here,
since they come off the wire. Commands about one device name it by `name`, `uuid`, or
`major` and `minor`, as dmsetup does by NAME, -u or -j/-m.

`create_from_table_file` is what `minidisk serve --table NAME=FILE` calls at start-up.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from minidisk.dm.commands import DmCommand
from minidisk.dm.mapped import DM_MAJOR, MappedDevice
from minidisk.dm.registry import DRIVER_VERSION, Registry
from minidisk.dm.status import StatusType
from minidisk.dm.status_table import without_keys
from minidisk.dm.table import TableError, format_line

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
Row = tuple[int, int, str, Any]  # a table or status line: start, length, target type, rest

# The libdevmapper whose dmsetup `minidisk dmsetup` matches, output for output (Debian 12's).
LIBRARY_VERSION = "1.02.185 (2022-05-18)"


def _str(args: dict[str, Any], key: str, default: str | None = None) -> str:
    value = args.get(key, default)
    if not isinstance(value, str):
        raise OSError(errno.EINVAL, f"argument {key!r} must be a string")
    return value


def _opt_str(args: dict[str, Any], key: str) -> str | None:
    value = args.get(key)
    if value is not None and not isinstance(value, str):
        raise OSError(errno.EINVAL, f"argument {key!r} must be a string")
    return value


def _bool(args: dict[str, Any], key: str) -> bool:
    value = args.get(key, False)
    if not isinstance(value, bool):
        raise OSError(errno.EINVAL, f"argument {key!r} must be true or false")
    return value


def _opt_int(args: dict[str, Any], key: str) -> int | None:
    value = args.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                              or value < 0):
        raise OSError(errno.EINVAL, f"argument {key!r} must be a non-negative integer")
    return value


def _table_errors(command: str, handler: Handler) -> Handler:
    """Report a refused table as its errno (EINVAL unless it says otherwise) with its
    one-line reason, and log every failure's reason: dmsetup prints only the errno of a
    failed ioctl and the kernel logs why, so the reason goes to the server's log, as the
    kernel's goes to its log."""

    async def wrapped(args: dict[str, Any]) -> dict[str, Any]:
        try:
            return await handler(args)
        except TableError as e:
            log.warning("device-mapper: %s: %s", command, e)
            raise OSError(e.errno, str(e)) from None
        except OSError as e:
            log.warning("device-mapper: %s: %s", command, e.strerror or e)
            raise

    return wrapped


def device_info(registry: Registry, name: str) -> dict[str, Any]:
    info = asdict(registry.info(name))
    info["major"] = DM_MAJOR
    return info


def _dependencies(registry: Registry, name: str) -> list[dict[str, Any]]:
    out = []
    for dep in registry.deps(name):
        entry: dict[str, Any] = {"key": dep.key, "name": None, "major": None, "minor": None}
        if dep.devno is not None:
            entry.update(major=dep.devno[0], minor=dep.devno[1])
        if dep.mapped is not None:
            entry.update(name=dep.mapped.name, major=DM_MAJOR, minor=dep.mapped.minor)
        out.append(entry)
    return out


def control_handlers(registry: Registry) -> dict[str, Handler]:
    def selected(args: dict[str, Any]) -> str | None:
        """The device a command is about: `name`, else `uuid`, else `major` and `minor`
        (dmsetup's NAME, -u and -j/-m, in that order); None when none is given. In create
        and rename, `uuid` is instead the UUID to give, as dmsetup's -u is in create."""
        name = _opt_str(args, "name")
        if name is not None:
            registry.get(name)
            return name
        uuid = _opt_str(args, "uuid")
        if uuid is not None:
            return registry.name_of_uuid(uuid)
        major, minor = _opt_int(args, "major"), _opt_int(args, "minor")
        if major is None and minor is None:
            return None
        if major is None or minor is None:
            raise OSError(errno.EINVAL, "a device number needs both major and minor")
        return registry.name_of_devno(major, minor)

    def one(args: dict[str, Any]) -> str:
        name = selected(args)
        if name is None:
            raise OSError(errno.EINVAL, "no device specified")
        return name

    def names(args: dict[str, Any]) -> list[str]:
        """The selected device, or all of them (dmsetup with no device argument)."""
        name = selected(args)
        return registry.names() if name is None else [name]

    async def create(args: dict[str, Any]) -> dict[str, Any]:
        dev = await registry.create(_str(args, "name"), _opt_str(args, "table"),
                                    _str(args, "uuid", ""), _bool(args, "read_only"),
                                    _opt_int(args, "minor"))
        return device_info(registry, dev.name)

    async def load(args: dict[str, Any]) -> dict[str, Any]:
        name = one(args)
        await registry.load(name, _str(args, "table"))
        return device_info(registry, name)

    async def suspend(args: dict[str, Any]) -> dict[str, Any]:
        name = one(args)
        await registry.suspend(name, _bool(args, "noflush"))
        return device_info(registry, name)

    async def resume(args: dict[str, Any]) -> dict[str, Any]:
        name = one(args)
        await registry.resume(name)
        return device_info(registry, name)

    async def clear(args: dict[str, Any]) -> dict[str, Any]:
        name = one(args)
        await registry.clear(name)
        return device_info(registry, name)

    async def remove(args: dict[str, Any]) -> dict[str, Any]:
        removed = await registry.remove(one(args), _bool(args, "force"), _bool(args, "deferred"))
        return {"deferred": not removed}  # as DM_DEFERRED_REMOVE comes back from the kernel

    async def remove_all(args: dict[str, Any]) -> dict[str, Any]:
        return {"left": await registry.remove_all(_bool(args, "force"),
                                                  _bool(args, "deferred"))}

    async def rename(args: dict[str, Any]) -> dict[str, Any]:
        name = _str(args, "name")
        uuid = _opt_str(args, "uuid")
        if uuid is not None:
            await registry.set_uuid(name, uuid)
            return device_info(registry, name)
        new_name = _str(args, "new_name")
        await registry.rename(name, new_name)
        return device_info(registry, new_name)

    async def info(args: dict[str, Any]) -> dict[str, Any]:
        return {"devices": [device_info(registry, n) for n in names(args)]}

    async def ls(args: dict[str, Any]) -> dict[str, Any]:
        return {"devices": [dict(device_info(registry, n), deps=_dependencies(registry, n))
                            for n in registry.names()]}

    async def deps(args: dict[str, Any]) -> dict[str, Any]:
        return {"devices": [{"name": n, "deps": _dependencies(registry, n)}
                            for n in names(args)]}

    def segments(args: dict[str, Any], rows_of: Callable[[str, bool], Sequence[Row]],
                 text: Callable[[Row], str]) -> dict[str, Any]:
        """table and status: each device's segment lines. With `target` (dmsetup's
        --target) only the segments of that type, and a device with none is left out."""
        inactive = _bool(args, "inactive")
        target = _opt_str(args, "target")
        devices = []
        for n in names(args):
            rows = [r for r in rows_of(n, inactive) if target is None or r[2] == target]
            if rows or target is None:
                devices.append({"name": n, "lines": [text(r) for r in rows]})
        return {"devices": devices}

    def segment_data(args: dict[str, Any], kind: StatusType) -> dict[str, Any]:
        """table and status with `data`: each device's segments with their status as data
        (dm/status.py's one JSON shape), `target` as above. A table's keys are zeroes, as
        dmsetup shows them, unless `showkeys`: they leave the server only when asked for."""
        inactive, showkeys = _bool(args, "inactive"), _bool(args, "showkeys")
        target = _opt_str(args, "target")
        devices = []
        for n in names(args):
            found = [s for s in registry.status_data(n, kind, inactive)
                     if target is None or s.target_type == target]
            if kind is StatusType.TABLE and not showkeys:
                found = [s._replace(data=without_keys(s.data)) for s in found]
            if found or target is None:
                devices.append({"name": n, "targets": [s.as_json() for s in found]})
        return {"status_type": str(kind), "devices": devices}

    async def table(args: dict[str, Any]) -> dict[str, Any]:
        if _bool(args, "data"):
            return segment_data(args, StatusType.TABLE)
        return segments(args, registry.table, lambda r: format_line(*r))

    async def status(args: dict[str, Any]) -> dict[str, Any]:
        if _bool(args, "data"):
            return segment_data(args, StatusType.INFO)
        return segments(args, registry.status, lambda r: f"{r[0]} {r[1]} {r[2]} {r[3]}")

    async def measure(args: dict[str, Any]) -> dict[str, Any]:
        """dmsetup measure: each segment's IMA measurement text (the kernel's
        STATUSTYPE_IMA), from its table and status lines."""
        versions = dict(registry.target_versions())
        devices = []
        for n in names(args):
            table_rows = registry.table(n)
            status_rows = registry.status(n)
            devices.append({"name": n, "lines": [
                f"{t[0]} {t[1]} {t[2]} {_measurement(t, s, versions)}"
                for t, s in zip(table_rows, status_rows, strict=True)]})
        return {"devices": devices}

    async def geometry(args: dict[str, Any]) -> dict[str, Any]:
        """dmsetup setgeometry: CYLINDERS HEADS SECTORS START as the kernel reads them
        (four unsigned numbers; at most 65535 cylinders, 255 heads and sectors; START
        inside the geometry). Kept on the device, as the kernel keeps it for HDIO_GETGEO."""
        name = one(args)
        words = args.get("geometry")
        if not isinstance(words, list) or len(words) != 4 \
                or not all(isinstance(w, str) and w.isdigit() for w in words):
            raise OSError(errno.EINVAL, "Unable to interpret geometry settings.")
        cylinders, heads, sectors, start = map(int, words)
        if cylinders > 65535 or heads > 255 or sectors > 255:
            raise OSError(errno.EINVAL, "Geometry exceeds range limits.")
        if start > cylinders * heads * sectors:
            raise OSError(errno.EINVAL, "Start sector is beyond the geometry limits.")
        registry.get(name).geometry = (cylinders, heads, sectors, start)
        return device_info(registry, name)

    async def wait(args: dict[str, Any]) -> dict[str, Any]:
        name = one(args)
        await registry.wait(name, _opt_int(args, "event_nr"))
        return device_info(registry, name)

    async def message(args: dict[str, Any]) -> dict[str, Any]:
        words = args.get("args")
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise OSError(errno.EINVAL, "argument 'args' must be a list of strings")
        sector = _opt_int(args, "sector") or 0
        return {"result": await registry.message(one(args), sector, words)}

    async def readahead(args: dict[str, Any]) -> dict[str, Any]:
        """dmsetup --readahead N (set) or +N (at least N), in sectors."""
        name = one(args)
        sectors = _opt_int(args, "sectors") or 0
        dev = registry.get(name)
        if not (_bool(args, "at_least") and dev.read_ahead >= sectors):
            dev.read_ahead = sectors
        return device_info(registry, name)

    async def targets(args: dict[str, Any]) -> dict[str, Any]:
        return {"targets": [{"name": n, "version": list(v)}
                            for n, v in registry.target_versions()]}

    async def version(args: dict[str, Any]) -> dict[str, Any]:
        return {"library": LIBRARY_VERSION, "driver": ".".join(map(str, DRIVER_VERSION))}

    handlers: dict[DmCommand, Handler] = {
        DmCommand.CREATE: create, DmCommand.LOAD: load, DmCommand.RELOAD: load,
        DmCommand.SUSPEND: suspend, DmCommand.RESUME: resume, DmCommand.CLEAR: clear,
        DmCommand.REMOVE: remove, DmCommand.REMOVE_ALL: remove_all,
        DmCommand.RENAME: rename, DmCommand.INFO: info, DmCommand.LS: ls,
        DmCommand.DEPS: deps, DmCommand.TABLE: table, DmCommand.STATUS: status,
        DmCommand.MEASURE: measure, DmCommand.WAIT: wait, DmCommand.MESSAGE: message,
        DmCommand.TARGETS: targets, DmCommand.READAHEAD: readahead,
        DmCommand.GEOMETRY: geometry, DmCommand.VERSION: version,
    }
    return {str(name): _table_errors(name, h) for name, h in handlers.items()}


def _measurement(table_row: Row, status_row: Row, versions: dict[str, tuple[int, int, int]]
                 ) -> str:
    """A segment's IMA text as 6.1 measures it: linear and striped say what they map (a
    striped stripe's status letter from its status line); the other targets we have
    measure nothing there."""
    kind, words = table_row[2], list(table_row[3])
    head = f"target_name={kind},target_version={'.'.join(map(str, versions[kind]))}"
    if kind == "linear":
        return f"{head},device_name={words[0]},start={words[1]};"
    if kind == "striped":
        stripes = int(words[0])
        health = str(status_row[3]).split()[-1]
        parts = [head, f"stripes={stripes}", f"chunk_size={words[1]}"]
        for n in range(stripes):
            parts += [f"stripe_{n}_device_name={words[2 + 2 * n]}",
                      f"stripe_{n}_physical_start={words[3 + 2 * n]}",
                      f"stripe_{n}_status={health[n]}"]
        return ",".join(parts) + ";"
    return ""


async def create_from_table_file(registry: Registry, name: str, path: str | Path
                                 ) -> MappedDevice:
    """`serve --table NAME=FILE`: create NAME from the table in FILE, live at once."""
    text = Path(path).read_text()
    try:
        return await registry.create(name, text)
    except TableError as e:
        raise TableError(f"{path}: {e}") from None
