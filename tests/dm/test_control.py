"""The `dm.*` control handlers: what `minidisk dmsetup` sends, as the server answers it."""

from __future__ import annotations

from typing import Any

from dm_helpers import memory_namespace, registry_over, run

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
            "0 8 linear /dev/a 0", "16 8 linear /dev/a 8"]}]
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
        assert inactive["devices"] == [{"name": "zeros", "lines": ["0 4 linear /dev/a 0"]}]

    run(go())
