"""The memory device's page pool (device/pages.py): pages read as zeroes when taken, go
back to the kernel when given (RAM leaves the process), are reused before new mappings
are made, and a device's pages return to the pool when the device is collected -- with
nothing of one device's bytes ever visible to another."""

from __future__ import annotations

import asyncio
import gc

from minidisk.device import pages
from minidisk.device.memory import MemoryDevice
from minidisk.device.pages import PAGE, PagePool

MiB = 1 << 20


def resident_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_given_page_leaves_ram_and_comes_back_zeroed() -> None:
    pool = PagePool(arena=64 * MiB)
    taken = [pool.take() for _ in range(2048)]  # one arena, 64 MiB of address space
    before = resident_kib()
    for view, _ in taken:
        view[:] = b"\xff" * PAGE
    written = resident_kib()
    assert written - before > 60 * 1024  # the pages are resident once written
    for view, slot in taken:
        view.release()
        pool.give(slot)
    assert resident_kib() < written - 60 * 1024  # and given back to the kernel
    again = [pool.take() for _ in range(2048)]
    assert pool.mapped == 64 * MiB  # reused: no second mapping
    assert all(view.tobytes() == bytes(PAGE) for view, _ in again)


def test_a_fresh_page_costs_only_the_os_pages_written() -> None:
    pool = PagePool(arena=64 * MiB)
    before = resident_kib()
    taken = [pool.take() for _ in range(2048)]
    for view, _ in taken:
        view[:4096] = b"x" * 4096  # one OS page of eight
    grown = resident_kib() - before
    assert grown < 16 * 1024, grown  # 8 MiB written; a zeroed 32 KiB page each would be 64


def test_a_collected_device_gives_its_pages_back_and_the_next_one_sees_zeroes() -> None:
    async def go() -> None:
        first = MemoryDevice(8 * MiB)
        await first.pwrite(memoryview(b"secret" * (MiB // 6 + 1))[:MiB], 0)
        held = len(pages.POOL._free)
        del first
        gc.collect()
        assert len(pages.POOL._free) == held + MiB // PAGE
        second = MemoryDevice(8 * MiB)
        await second.pwrite(memoryview(b"a"), 0)  # takes a page the first one held
        buf = bytearray(PAGE)
        await second.pread(memoryview(buf), 0)
        assert buf == b"a" + bytes(PAGE - 1)

    asyncio.run(go())


def test_trim_gives_whole_pages_back_and_zeroes_parts() -> None:
    async def go() -> None:
        dev = MemoryDevice(4 * MiB)
        await dev.pwrite(memoryview(b"\x01" * MiB), 0)
        free = len(pages.POOL._free)
        await dev.trim(PAGE // 2, 3 * PAGE)  # half of page 0, pages 1 and 2, half of 3
        assert len(pages.POOL._free) == free + 2
        buf = bytearray(4 * PAGE)
        await dev.pread(memoryview(buf), 0)
        half = PAGE // 2
        assert buf == b"\x01" * half + bytes(3 * PAGE) + b"\x01" * half
        await dev.trim(0, half)  # the rest of page 0: all zero now, so it goes too
        assert len(pages.POOL._free) == free + 3 and 0 not in dev._pages

    asyncio.run(go())
