"""A table the guest's kernel refuses, tried on minidisk: shared by the dm format oracles."""

from __future__ import annotations

import errno

from minidisk.dm import Registry, TableError


async def try_table(reg: Registry, table: str, skip: int) -> tuple[int, str, str]:
    """(rc, reason as the kernel logs it with its errno, the loaded segment's arguments after
    the first `skip`) of creating device "refuse" from `table`, as dmsetup's exit status,
    dm-table's log line and `dmsetup table` show them; a loaded device is removed again."""
    try:
        await reg.create("refuse", table)
    except TableError as e:
        return 1, f"{e.reason} (-{errno.errorcode[e.errno]})", ""
    out = " ".join(reg.table("refuse")[0][3][skip:])
    await reg.remove("refuse")
    return 0, "", out
