"""The dmsetup lifecycle on a Registry: slots, suspend/resume, remove, rename, events."""

from __future__ import annotations

import asyncio
import errno

import pytest
from tests.dm.dm_helpers import (
    SECTOR,
    HeldDevice,
    idle_passes,
    memory_namespace,
    pattern,
    read,
    registry_over,
    run,
    until,
    write,
)

from minidisk.dm import DeviceDict, Registry, TableError


def test_create_with_table_is_live_and_without_is_empty() -> None:
    ns = memory_namespace(a=1 << 20)
    reg = registry_over(ns)

    async def go() -> None:
        dev = await reg.create("one", "0 100 linear /dev/a 0")
        info = reg.info("one")
        assert (info.live_table, info.inactive_table, info.suspended, info.target_count,
                info.event_nr, info.open_count) == (True, False, False, 1, 0, 0)
        assert dev.size == 100 * SECTOR
        assert ns.devices["/dev/mapper/one"] is dev  # published for the server
        empty = await reg.create("two")
        info = reg.info("two")
        assert (info.live_table, info.inactive_table, info.target_count) == (False, False, 0)
        assert empty.size == 0
        with pytest.raises(OSError) as e:
            await read(empty, 0, SECTOR)
        assert e.value.errno == errno.EIO
        with pytest.raises(OSError) as e:
            await reg.create("one")
        assert e.value.errno == errno.EBUSY
        assert reg.info("one").minor != reg.info("two").minor

    run(go())


def test_load_goes_to_the_inactive_slot_until_resume() -> None:
    ns = memory_namespace(a=1 << 20, b=1 << 20)
    reg = registry_over(ns)

    async def go() -> None:
        dev = await reg.create("d", "0 64 linear /dev/a 0")
        await write(ns.devices["/dev/b"], 0, b"B" * SECTOR)
        await write(dev, 0, b"A" * SECTOR)
        await reg.load("d", "0 32 linear /dev/b 0")
        info = reg.info("d")
        assert (info.live_table, info.inactive_table) == (True, True)
        assert await read(dev, 0, SECTOR) == b"A" * SECTOR  # still the live table
        assert reg.table("d", inactive=True) == [(0, 32, "linear", ["240:1", "0"])]
        await reg.resume("d")
        assert await read(dev, 0, SECTOR) == b"B" * SECTOR
        assert dev.size == 32 * SECTOR
        assert reg.table("d") == [(0, 32, "linear", ["240:1", "0"])]
        assert ns.holds == {"/dev/b": 1}  # the old table let go of /dev/a
        await reg.load("d", "0 64 linear /dev/a 0")
        await reg.clear("d")
        assert not reg.info("d").inactive_table
        assert ns.holds == {"/dev/b": 1}

    run(go())


@pytest.mark.parametrize("table,reason", [
    ("0 64 linear /dev/a 0\n100 8 zero", "gap in table"),
    ("0 64 linear /dev/a 0\n32 8 zero", "overlaps the previous segment"),
    ("0 64 linear /dev/a 0\n64 0 zero", "zero-length segment"),
    ("0 64 linear /dev/a 0\n64 8 mirror core 1 8", "unknown target type 'mirror'"),
    ("0 64 linear /dev/a 0\n64 8000 linear /dev/b 0", "too small for target"),
    ("0 64 linear /dev/a 0\n64 8 linear /dev/b", "linear: Invalid argument count"),
    ("0 64 linear /dev/a 0\n64 8 linear /dev/nope 0", "Device lookup failed: /dev/nope"),
    ("0 64 linear /dev/a 0\n64 8 striped 3 8 /dev/a 0 /dev/b 0", "not divisible"),
    ("0 64 linear /dev/a 0\n64 8 zero extra", "zero: No arguments required"),
])
def test_bad_tables_name_the_segment_and_leave_the_device_alone(table: str, reason: str) -> None:
    ns = memory_namespace(a=1 << 20, b=1 << 20)
    reg = registry_over(ns)

    async def go() -> None:
        dev = await reg.create("d", "0 16 linear /dev/b 0")
        await reg.load("d", "0 8 zero")
        before = (reg.table("d"), reg.table("d", inactive=True), dict(ns.holds), dev.size)
        with pytest.raises(TableError) as e:
            await reg.load("d", table)
        message = str(e.value)
        assert "\n" not in message and message.startswith("line 2 (")
        assert reason in message
        assert (reg.table("d"), reg.table("d", inactive=True), dict(ns.holds), dev.size) \
            == before
        # And a bad table at create time creates nothing.
        with pytest.raises(TableError):
            await reg.create("e", table)
        assert "e" not in reg.devices and "/dev/mapper/e" not in ns.devices
        assert dict(ns.holds) == before[2]

    run(go())


def test_a_device_may_not_hold_itself() -> None:
    reg = registry_over(memory_namespace(a=1 << 20))

    async def go() -> None:
        await reg.create("x", "0 8 linear /dev/a 0")
        await reg.create("y", "0 8 linear /dev/mapper/x 0")
        for name, table in (("x", "0 8 linear /dev/mapper/x 0"),
                            ("x", "0 8 linear /dev/mapper/y 0")):
            with pytest.raises(TableError, match="would hold itself"):
                await reg.load(name, table)

    run(go())


def test_remove_is_ebusy_while_open_and_force_swaps_in_an_error_table() -> None:
    ns = memory_namespace(a=1 << 20)
    reg = registry_over(ns)

    async def go() -> None:
        low = await reg.create("low", "0 8 linear /dev/a 0")
        await reg.create("top", "0 8 linear /dev/mapper/low 0")
        with pytest.raises(OSError) as e:
            await reg.remove("low")
        assert e.value.errno == errno.EBUSY
        with pytest.raises(OSError) as e:
            await reg.remove("low", force=True)
        assert e.value.errno == errno.EBUSY
        assert reg.table("low") == [(0, 8, "error", [])]
        with pytest.raises(OSError) as e:
            await read(low, 0, SECTOR)
        assert e.value.errno == errno.EIO
        assert ns.holds == {}  # the error table holds nothing
        await reg.remove("top")
        await reg.remove("low")
        assert reg.names() == [] and set(ns.devices) == {"/dev/a"}
        with pytest.raises(OSError) as e:
            reg.info("low")
        assert e.value.errno == errno.ENXIO

    run(go())


def test_rename_keeps_the_tables_above_pointing_at_it() -> None:
    ns = memory_namespace(a=1 << 20)
    reg = registry_over(ns)

    async def go() -> None:
        await reg.create("old", "0 8 linear /dev/a 0", uuid="U-1")
        await reg.create("top", "0 8 linear /dev/mapper/old 0")
        await reg.rename("old", "new")
        assert reg.names() == ["new", "top"]
        assert "/dev/mapper/new" in ns.devices and "/dev/mapper/old" not in ns.devices
        # the table above names it by number, which a rename keeps; deps by its new name
        assert reg.table("top") == [(0, 8, "linear", ["253:0", "0"])]
        assert [d.key for d in reg.deps("top")] == ["/dev/mapper/new"]
        assert reg.info("new").uuid == "U-1"
        with pytest.raises(OSError):
            await reg.set_uuid("new", "U-2")  # it already has one
        await reg.create("bare")
        await reg.set_uuid("bare", "U-2")
        assert reg.info("bare").uuid == "U-2"

    run(go())


def test_suspend_queues_io_and_resume_releases_it_onto_the_new_table() -> None:
    ns = memory_namespace(a=1 << 20, b=1 << 20)
    reg = registry_over(ns)

    async def go() -> None:
        dev = await reg.create("d", "0 64 linear /dev/a 0")
        await reg.suspend("d")
        assert reg.info("d").suspended
        pending = asyncio.ensure_future(write(dev, 0, b"Q" * SECTOR))
        reader = asyncio.ensure_future(read(dev, 0, SECTOR))
        await until(lambda: reg.info("d").queued == 2)
        assert not pending.done() and not reader.done()  # waiting, not failed
        await reg.load("d", "0 64 linear /dev/b 0")
        await reg.resume("d")
        await asyncio.wait_for(pending, 5)
        assert await read(ns.devices["/dev/b"], 0, SECTOR) == b"Q" * SECTOR
        assert await read(ns.devices["/dev/a"], 0, SECTOR) == bytes(SECTOR)
        # Released in the order they queued (one Event's waiters): the write, then the read.
        assert (await reader) == b"Q" * SECTOR

    run(go())


def test_suspend_waits_for_io_in_flight() -> None:
    held = HeldDevice(1 << 20)
    ns = DeviceDict({"/dev/a": held})
    reg = registry_over(ns)

    async def go() -> None:
        dev = await reg.create("d", "0 64 linear /dev/a 0")
        inflight = asyncio.ensure_future(write(dev, 0, b"W" * SECTOR))
        await until(lambda: held.held == 1)
        suspending = asyncio.ensure_future(reg.suspend("d"))
        await idle_passes()
        assert not suspending.done()  # the write is still in flight below it
        held.release.set()
        await suspending
        assert inflight.done() and await read(held, 0, SECTOR) == b"W" * SECTOR
        await reg.resume("d")

    run(go())


def test_wait_returns_when_a_target_raises_an_event() -> None:
    ns = memory_namespace(a=1 << 20)
    reg = registry_over(ns)

    async def go() -> None:
        await reg.create("bad", "0 16 error")
        dev = await reg.create("s", "0 32 striped 2 8 /dev/a 0 /dev/mapper/bad 0")
        waiter = asyncio.ensure_future(reg.wait("s", 0))
        await idle_passes()
        assert not waiter.done()
        await read(dev, 0, SECTOR)  # stripe 0 is fine
        with pytest.raises(OSError):
            await read(dev, 8 * SECTOR, SECTOR)  # chunk 1 is on the error stripe
        assert await asyncio.wait_for(waiter, 5) == 1
        assert reg.status("s") == [(0, 32, "striped", "2 240:0 253:0 1 AD")]
        assert reg.info("s").event_nr == 1

    run(go())


def test_message_goes_to_the_target_at_the_sector() -> None:
    ns = memory_namespace(a=1 << 20)
    reg = registry_over(ns)

    async def go() -> None:
        await reg.create("d", "0 8 zero\n8 64 dust /dev/a 0 512")
        assert await reg.message("d", 8, ["countbadblocks"]) == \
            "countbadblocks: 0 badblock(s) found"
        with pytest.raises(OSError) as e:
            await reg.message("d", 0, ["countbadblocks"])  # the zero target takes none
        assert e.value.errno == errno.EINVAL
        with pytest.raises(OSError, match="outside device"):
            await reg.message("d", 72, ["countbadblocks"])

    run(go())


def test_read_only_device_refuses_writes() -> None:
    reg = registry_over(memory_namespace(a=1 << 20))

    async def go() -> None:
        dev = await reg.create("ro", "0 8 linear /dev/a 0", read_only=True)
        assert dev.caps.read_only and reg.info("ro").read_only
        with pytest.raises(OSError) as e:
            await write(dev, 0, pattern(1, SECTOR))
        assert e.value.errno == errno.EROFS

    run(go())


async def _gone(reg: Registry, name: str) -> None:
    """Wait for a deferred removal, which happens after the call that let go returns."""
    await until(lambda: name not in reg.devices)


def test_deferred_remove_waits_for_the_table_above_to_let_go() -> None:
    ns = memory_namespace(a=1 << 20)
    reg = registry_over(ns)

    async def go() -> None:
        assert await reg.remove((await reg.create("closed", "0 8 zero")).name, deferred=True)
        assert "closed" not in reg.devices  # not open: removed at once
        low = await reg.create("low", "0 8 linear /dev/a 0")
        await reg.create("top", "0 8 linear /dev/mapper/low 0")
        assert not await reg.remove("low", deferred=True)  # marked, and no error
        info = reg.info("low")
        assert info.deferred_remove and info.open_count == 1
        await write(low, 0, pattern(3, SECTOR))  # still a working device meanwhile
        with pytest.raises(OSError) as e:
            await reg.remove("low")  # a plain remove of an open device is still EBUSY
        assert e.value.errno == errno.EBUSY and reg.info("low").deferred_remove
        await idle_passes()  # the reaper has looked, and left it
        assert reg.info("low").deferred_remove
        await reg.remove("top")  # its table lets go of low: low goes too
        await _gone(reg, "low")
        assert "/dev/mapper/low" not in ns.devices and ns.holds == {}

    run(go())


def test_deferred_remove_waits_for_clients_of_the_export() -> None:
    ns = memory_namespace(a=1 << 20)
    reg = registry_over(ns)

    async def go() -> None:
        await reg.create("d", "0 8 linear /dev/a 0")
        client = ns.hold("/dev/mapper/d")  # what an NBD connection holds
        assert not await reg.remove("d", deferred=True)
        await idle_passes()
        assert reg.info("d").deferred_remove  # still in use
        second = ns.hold("/dev/mapper/d")
        client.release()  # one of two clients gone: it stays
        await idle_passes()
        assert reg.info("d").deferred_remove and reg.names() == ["d"]
        second.release()  # the last one: the namespace says so, and it goes
        await _gone(reg, "d")
        assert "/dev/mapper/d" not in ns.devices and ns.holds == {}

    run(go())


def test_cancel_deferred_remove_keeps_the_device() -> None:
    reg = registry_over(memory_namespace(a=1 << 20))

    async def go() -> None:
        await reg.create("low", "0 8 linear /dev/a 0")
        await reg.create("top", "0 8 linear /dev/mapper/low 0")
        await reg.remove("low", deferred=True)
        assert await reg.message("low", 0, ["@cancel_deferred_remove"]) is None
        assert not reg.info("low").deferred_remove
        await reg.remove("top")
        await idle_passes()
        assert reg.names() == ["low"]
        for words, reason in ((["@cancel_deferred_remove", "now"], "Invalid arguments"),
                              (["@nosuch"], "Unsupported message sent to DM core")):
            with pytest.raises(OSError, match=reason) as e:
                await reg.message("low", 0, words)
            assert e.value.errno == errno.EINVAL
        # a message to dm itself needs no live table
        await reg.create("bare")
        await reg.message("bare", 0, ["@CANCEL_DEFERRED_REMOVE"])

    run(go())


def test_remove_all_deferred_and_force_deferred() -> None:
    ns = memory_namespace(a=1 << 20)
    reg = registry_over(ns)

    async def go() -> None:
        await reg.create("low", "0 8 linear /dev/a 0")
        await reg.create("top", "0 8 linear /dev/mapper/low 0")
        await reg.create("free", "0 8 zero")
        client = ns.hold("/dev/mapper/top")
        assert await reg.remove_all(deferred=True) == ["low", "top"]
        assert reg.info("top").deferred_remove and reg.info("low").deferred_remove
        client.release()  # top goes, which lets go of low, which goes too
        await _gone(reg, "top")
        await _gone(reg, "low")
        # --force --deferred: the error table first (as dmsetup does), then the mark
        dev = await reg.create("held", "0 8 linear /dev/a 0")
        client = ns.hold("/dev/mapper/held")
        assert not await reg.remove("held", force=True, deferred=True)
        assert reg.table("held") == [(0, 8, "error", [])] and reg.info("held").deferred_remove
        with pytest.raises(OSError):
            await read(dev, 0, SECTOR)
        client.release()
        await _gone(reg, "held")

    run(go())
