"""The `dm.*` control handlers: what `minidisk dmsetup` sends, as the server answers it."""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import pytest
from tests.dm.dm_helpers import memory_namespace, registry_over, run

from minidisk.dm import Registry
from minidisk.dm.control import control_handlers

MIXED = "0 8 linear /dev/a 0\n8 8 zero\n16 8 linear /dev/a 8"


async def call(reg: Registry, command: str, **args: Any) -> dict[str, Any]:
    return await control_handlers(reg)[command](args)


def test_target_keeps_only_segments_of_that_type_and_drops_devices_without() -> None:
    reg = registry_over(memory_namespace(a=1 << 20))

    async def go() -> None:
        await reg.create("mixed", MIXED)
        await reg.create("zeros", "0 8 zero")
        await reg.create("empty")
        table = await call(reg, "dm.table", target="linear")
        assert table["devices"] == [{"name": "mixed", "lines": [
            "0 8 linear 240:0 0", "16 8 linear 240:0 8"]}]
        status = await call(reg, "dm.status", target="zero")
        assert status["devices"] == [{"name": "mixed", "lines": ["8 8 zero "]},
                                     {"name": "zeros", "lines": ["0 8 zero "]}]
        # a named device with no such segment: no entry, so the CLI prints nothing
        assert (await call(reg, "dm.table", name="zeros", target="linear"))["devices"] == []
        assert (await call(reg, "dm.status", name="mixed", target="error"))["devices"] == []
        # without --target every device is there, the one without a table too
        assert [d["name"] for d in (await call(reg, "dm.table"))["devices"]] == \
            ["empty", "mixed", "zeros"]
        # and the inactive slot is filtered the same way
        await reg.load("zeros", "0 4 linear /dev/a 0\n4 4 zero")
        inactive = await call(reg, "dm.table", name="zeros", inactive=True, target="linear")
        assert inactive["devices"] == [{"name": "zeros", "lines": ["0 4 linear 240:0 0"]}]

    run(go())


def test_commands_choose_a_device_by_name_uuid_or_number() -> None:
    reg = registry_over(memory_namespace(a=1 << 20))

    async def go() -> None:
        await reg.create("first", "0 8 zero")
        await reg.create("second", "0 8 dust /dev/a 0 512", uuid="LVM-abc")
        by_uuid = await call(reg, "dm.info", uuid="LVM-abc")
        minor = by_uuid["devices"][0]["minor"]
        assert by_uuid == await call(reg, "dm.info", major=253, minor=minor)
        assert by_uuid["devices"][0]["name"] == "second"
        # a name wins over the other two, as in dmsetup
        named = await call(reg, "dm.table", name="first", uuid="LVM-abc")
        assert [d["name"] for d in named["devices"]] == ["first"]
        assert (await call(reg, "dm.deps", uuid="LVM-abc"))["devices"] == [
            {"name": "second", "deps": [{"key": "/dev/a", "name": None, "major": 240,
                                         "minor": 0}]}]
        assert (await call(reg, "dm.message", uuid="LVM-abc", sector=0,
                           args=["countbadblocks"]))["result"] == \
            "countbadblocks: 0 badblock(s) found"
        await call(reg, "dm.load", major=253, minor=minor, table="0 4 zero")
        await call(reg, "dm.clear", uuid="LVM-abc")
        await call(reg, "dm.load", uuid="LVM-abc", table="0 4 zero")
        await call(reg, "dm.suspend", major=253, minor=minor)
        assert reg.info("second").suspended and reg.info("second").inactive_table
        await call(reg, "dm.resume", uuid="LVM-abc")
        assert reg.table("second") == [(0, 4, "zero", [])]
        assert (await call(reg, "dm.status", uuid="LVM-abc"))["devices"] == [
            {"name": "second", "lines": ["0 4 zero "]}]
        waiter = asyncio.ensure_future(call(reg, "dm.wait", uuid="LVM-abc", event_nr=0))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        reg.devices["second"].raise_event()
        assert (await asyncio.wait_for(waiter, 5))["event_nr"] == 1
        await call(reg, "dm.remove", major=253, minor=minor)
        assert reg.names() == ["first"]

    run(go())


@pytest.mark.parametrize("command,args,err", [
    ("dm.info", {"uuid": "LVM-nope"}, errno.ENXIO),
    ("dm.info", {"uuid": ""}, errno.ENXIO),  # a device without a UUID is not found by ""
    ("dm.table", {"major": 7, "minor": 0}, errno.ENXIO),  # not device-mapper's major
    ("dm.status", {"major": 253, "minor": 99}, errno.ENXIO),
    ("dm.info", {"major": 253}, errno.EINVAL),
    ("dm.remove", {"minor": 0}, errno.EINVAL),
    ("dm.resume", {}, errno.EINVAL),  # a command about one device needs one
    ("dm.wait", {"uuid": 5}, errno.EINVAL),
])
def test_device_choice_errors(command: str, args: dict[str, Any], err: int) -> None:
    reg = registry_over(memory_namespace(a=1 << 20))

    async def go() -> None:
        await reg.create("plain", "0 8 zero")
        with pytest.raises(OSError) as e:
            await call(reg, command, **args)
        assert e.value.errno == err and "\n" not in str(e.value)
        assert reg.names() == ["plain"] and not reg.info("plain").suspended

    run(go())
