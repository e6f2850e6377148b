"""Each target: table text round-trips, status text, and documented behaviour."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from tests.dm.dm_helpers import SECTOR, memory_namespace, pattern, read, registry_over, run, write

from minidisk.dm import DeviceDict
from minidisk.dm.table import format_table
from minidisk.dm.target import TargetContext
from minidisk.dm.targets.delay import Delay
from minidisk.dm.targets.flakey import Flakey

ROUND_TRIP = [
    "0 64 linear /dev/a 7",
    "0 64 striped 2 8 /dev/a 0 /dev/b 16",
    "0 64 zero",
    "0 64 error",
    "0 64 delay /dev/a 0 0",
    "0 64 delay /dev/a 0 5 /dev/b 8 10",
    "0 64 delay /dev/a 0 5 /dev/b 8 10 /dev/a 100 1",
    "0 64 flakey /dev/a 0 1 1 0",
    "0 64 flakey /dev/a 0 1 1 1 drop_writes",
    "0 64 flakey /dev/a 0 1 1 1 error_writes",
    "0 64 flakey /dev/a 0 0 5 5 corrupt_bio_byte 32 r 1 0",
    "0 64 flakey /dev/a 0 0 5 6 error_writes corrupt_bio_byte 3 r 255 0",
    "0 64 dust /dev/a 8 4096",
    "0 64 log-writes /dev/a /dev/b",
    "0 8 zero\n8 16 linear /dev/a 0\n24 40 error",
]


def numbered(table: str) -> str:
    """A table as it is printed: devices by number, as the kernel prints them (the dict
    namespace numbers its keys in order: /dev/a 240:0, /dev/b 240:1)."""
    return table.replace("/dev/a", "240:0").replace("/dev/b", "240:1")


@pytest.mark.parametrize("table", ROUND_TRIP)
def test_table_output_loads_back_unchanged(table: str) -> None:
    reg = registry_over(memory_namespace(a=1 << 20, b=1 << 20))

    async def go() -> None:
        await reg.create("first", table)
        printed = format_table(reg.table("first"))
        await reg.create("second", printed)
        assert format_table(reg.table("second")) == printed
        assert printed.split() == numbered(table).split()  # and it is what was given
        for name in ("second", "first"):
            await reg.remove(name)

    run(go())


@pytest.mark.parametrize("given,printed", [
    # no features (every request fails while down): 6.1 prints a count of 0
    ("0 64 flakey /dev/a 0 1 1", "0"),
    ("0 64 flakey /dev/a 0 1 1 0", "0"),
    # features come back in the kernel's order, whatever order they were given in
    ("0 64 flakey /dev/a 0 1 1 6 corrupt_bio_byte 1 r 0 0 DROP_WRITES",
     "6 drop_writes corrupt_bio_byte 1 r 0 0"),
    # only as many words as the count says are features; 6.1 ignores the rest
    ("0 64 flakey /dev/a 0 1 1 1 drop_writes error_writes", "1 drop_writes"),
])
def test_flakey_normal_form(given: str, printed: str) -> None:
    reg = registry_over(memory_namespace(a=1 << 20))

    async def go() -> None:
        await reg.create("f", given)
        # 6.1 ends the line with a space
        assert reg.table("f") == [(0, 64, "flakey", ["240:0", "0", "1", "1",
                                                     *printed.split(), ""])]
        await reg.create("g", format_table(reg.table("f")))
        assert reg.table("g") == reg.table("f")

    run(go())


def test_status_text_of_each_target() -> None:
    reg = registry_over(memory_namespace(a=1 << 20, b=1 << 20))

    async def go() -> None:
        await reg.create("t", "\n".join([
            "0 16 linear /dev/a 0", "16 16 striped 2 8 /dev/a 64 /dev/b 0", "32 8 zero",
            "40 8 error", "48 8 delay /dev/a 0 0 /dev/b 0 0", "56 8 flakey /dev/a 0 1 0",
            "64 8 dust /dev/a 0 512"]))
        assert [s[3] for s in reg.status("t")] == [
            "", "2 240:0 240:1 1 AA", "", "", "0 0 0", "",
            "240:0 bypass verbose"]
        await reg.create("lw", "0 8 log-writes /dev/a /dev/b")
        assert reg.status("lw") == [(0, 8, "log-writes", "0 0")]

    run(go())


@pytest.mark.parametrize("table,reason", [
    ("0 64 striped 0 8", "Invalid stripe count"),
    ("0 64 striped 2 0 /dev/a 0 /dev/b 0", "Invalid chunk_size"),
    ("0 64 striped 2 8 /dev/a 0", "Not enough destinations"),
    ("0 60 striped 2 8 /dev/a 0 /dev/b 0", "not divisible by chunk size"),
    ("0 64 delay /dev/a 0", "Requires exactly 3, 6 or 9 arguments"),
    ("0 64 delay /dev/a 0 x", "Invalid delay"),
    ("0 64 flakey /dev/a 0 0 0", "Total (up + down) interval is zero"),
    ("0 64 flakey /dev/a 0 1 1 2 drop_writes error_writes", "conflicts with feature"),
    ("0 64 flakey /dev/a 0 1 1 5 corrupt_bio_byte 1 x 0 0", "Invalid corrupt bio direction"),
    ("0 64 flakey /dev/a 0 1 1 5 corrupt_bio_byte 1 r 256 0", "(0-255)"),
    ("0 64 flakey /dev/a 0 1 1 6 drop_writes corrupt_bio_byte 1 w 0 0",
     "drop_writes is incompatible with corrupt_bio_byte with the WRITE flag set"),
    ("0 64 flakey /dev/a 0 1 1 2 drop_writes drop_writes", "Feature drop_writes duplicated"),
    ("0 64 flakey /dev/a 0 1 1 2 drop_writes", "Invalid number of feature args"),
    ("0 64 flakey /dev/a 0 1 1 7 a b c d e f g", "Invalid number of feature args"),
    # later kernels' features, which 6.1 does not know
    ("0 64 flakey /dev/a 0 1 1 1 error_reads", "Unrecognised flakey feature"),
    ("0 64 flakey /dev/a 0 1 1 2 random_read_corrupt 1", "Unrecognised flakey feature"),
    ("0 64 flakey /dev/a 0 1 1 1 frobnicate", "Unrecognised flakey feature"),
    ("0 64 dust /dev/a 0 1000", "power of 2"),
    ("0 64 dust /dev/a 0 256", "512 or above"),
    ("0 64 log-writes /dev/a", "Invalid argument count"),
    ("0 64 linear /dev/a 2040", "too small for target"),
])
def test_constructor_errors(table: str, reason: str) -> None:
    reg = registry_over(memory_namespace(a=1 << 20, b=1 << 20))

    async def go() -> None:
        with pytest.raises(ValueError) as e:
            await reg.create("x", table)
        assert reason in str(e.value) and str(e.value).startswith("line 1 (")

    run(go())


async def _expect_errno(coro: object, err: int = errno.EIO) -> None:
    with pytest.raises(OSError) as e:
        await coro  # type: ignore[misc]
    assert e.value.errno == err


def test_error_target_fails_io_but_flushes() -> None:
    reg = registry_over(memory_namespace(a=1 << 20))

    async def go() -> None:
        dev = await reg.create("e", "0 8 linear /dev/a 0\n8 8 error")
        await write(dev, 0, pattern(1, SECTOR))
        await _expect_errno(read(dev, 8 * SECTOR, SECTOR))
        await _expect_errno(write(dev, 8 * SECTOR, pattern(1, SECTOR)))
        await _expect_errno(dev.trim(8 * SECTOR, SECTOR))
        await _expect_errno(read(dev, 7 * SECTOR, 2 * SECTOR))  # spans into the error part
        await dev.flush()  # the kernel sends no flush to an error target

    run(go())


def test_zero_target_reads_zeroes_and_drops_writes() -> None:
    reg = registry_over(memory_namespace())

    async def go() -> None:
        dev = await reg.create("z", "0 4096 zero")
        await write(dev, 100, pattern(2, 3000))
        assert await read(dev, 0, 4096 * SECTOR) == bytes(4096 * SECTOR)

    run(go())


def test_flakey_down_with_no_features_fails_everything() -> None:
    ns = memory_namespace(a=1 << 20)
    reg = registry_over(ns)

    async def go() -> None:
        dev = await reg.create("f", "0 64 flakey /dev/a 0 0 10")  # down from the start
        await _expect_errno(read(dev, 0, SECTOR))
        await _expect_errno(write(dev, 0, pattern(1, SECTOR)))
        await _expect_errno(dev.flush())
        up = await reg.create("g", "0 64 flakey /dev/a 0 10 0")  # never down
        await write(up, 0, pattern(1, SECTOR))
        assert await read(up, 0, SECTOR) == pattern(1, SECTOR)

    run(go())


def test_flakey_write_features_leave_reads_alone_while_down() -> None:
    """6.1: down with drop_writes or error_writes, reads still reach the device; only a
    table without features fails them too."""
    ns = memory_namespace(a=1 << 20)
    reg = registry_over(ns)
    a = ns.devices["/dev/a"]

    async def go() -> None:
        await write(a, 0, b"old" * 512)
        drop = await reg.create("drop", "0 64 flakey /dev/a 0 0 10 1 drop_writes")
        await write(drop, 0, b"new" * 512)  # succeeds...
        assert await read(a, 0, 1536) == b"old" * 512  # ...but never reaches the device
        assert await read(drop, 0, 1536) == b"old" * 512
        fail = await reg.create("fail", "0 64 flakey /dev/a 0 0 10 1 error_writes")
        await _expect_errno(write(fail, 0, b"new" * 512))
        await _expect_errno(fail.flush())
        assert await read(fail, 0, 1536) == b"old" * 512
        none = await reg.create("none", "0 64 flakey /dev/a 0 0 10")
        await _expect_errno(read(none, 0, SECTOR))
        await _expect_errno(write(none, 0, b"new" * 512))
        assert await read(a, 0, 1536) == b"old" * 512

    run(go())


def test_flakey_corrupts_the_nth_byte_of_reads_or_writes() -> None:
    ns = memory_namespace(a=1 << 20)
    reg = registry_over(ns)
    a = ns.devices["/dev/a"]
    data = pattern(5, 4 * SECTOR)

    async def go() -> None:
        await write(a, 0, data)
        r = await reg.create("r", "0 64 flakey /dev/a 0 0 10 5 corrupt_bio_byte 100 r 7 0")
        got = await read(r, 0, 4 * SECTOR)
        assert got[99] == 7 and got[:99] + got[100:] == data[:99] + data[100:]
        assert await read(a, 0, 4 * SECTOR) == data  # the device itself is untouched
        w = await reg.create("w", "0 64 flakey /dev/a 0 0 10 5 corrupt_bio_byte 1 w 0 0")
        buf = bytearray(b"\xff" * SECTOR)
        await w.pwrite(memoryview(buf), 8 * SECTOR)
        assert buf == b"\xff" * SECTOR  # the caller's buffer is not changed
        assert await read(a, 8 * SECTOR, SECTOR) == b"\x00" + b"\xff" * (SECTOR - 1)

    run(go())


class FakeClock:
    """A dm Clock (minidisk.dm.clock) that moves only when the test sets `now`, and then
    runs the timers that fell due, in order: timing is checked at exact moments, and
    nothing sleeps."""

    def __init__(self) -> None:
        self.timers: list[FakeTimer] = []
        self._now = 0.0

    def monotonic(self) -> float:
        return self._now

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(self._now + delay, callback)
        self.timers.append(timer)
        return timer

    @property
    def now(self) -> float:
        return self._now

    @now.setter
    def now(self, when: float) -> None:
        assert when >= self._now, "a monotonic clock never goes back"
        self._now = when
        for timer in sorted(self.timers, key=lambda t: t.when):
            if timer.when <= when:
                self.timers.remove(timer)
                if not timer.cancelled:
                    timer.callback()


@dataclass
class FakeTimer:
    when: float
    callback: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


def _context(ns: DeviceDict) -> TargetContext:
    """What the registry gives a target it builds, for building one here with a clock."""
    return TargetContext(64, lambda key: (ns.lookup(key), lambda: None, ns.devno(key)),
                         lambda: None)


async def _spin() -> None:
    """Let every task that can run, run (no time passes)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def _until(condition: Callable[[], bool]) -> None:
    """Let the loop run (no time passes) until `condition` holds."""
    for _ in range(100):
        if condition():
            return
        await asyncio.sleep(0)
    assert condition()


def test_flakey_goes_down_and_up_on_its_intervals() -> None:
    clock = FakeClock()
    flakey = Flakey(_context(memory_namespace(a=1 << 20)), ["/dev/a", "0", "2", "3"], clock)

    async def go() -> list[str]:
        seen = []
        for when in (0, 1.999, 2, 4.999, 5, 6.5, 7, 9.99, 10):
            clock.now = when
            try:
                await read(flakey, 0, SECTOR)
                seen.append("up")
            except OSError as e:
                assert e.errno == errno.EIO
                seen.append("down")
        return seen

    # up for 2 s from the table load, down for 3, up again: whole seconds, as the kernel
    # counts jiffies against HZ
    assert run(go()) == ["up", "up", "down", "down", "up", "up", "down", "down", "up"]


def test_delay_holds_each_class_for_its_time_and_counts_it() -> None:
    ns = memory_namespace(a=1 << 20, b=1 << 20)
    clock = FakeClock()
    delay = Delay(_context(ns), ["/dev/a", "0", "200", "/dev/b", "0", "400"], clock)

    async def go() -> None:
        r = asyncio.ensure_future(read(delay, 0, SECTOR))
        w = asyncio.ensure_future(write(delay, 0, b"D" * SECTOR))
        await _until(lambda: delay.status() == "1 1 0")  # one read, one write held now
        assert sorted(t.when for t in clock.timers) == [0.2, 0.4]
        clock.now = 0.199
        await _spin()
        assert not r.done() and not w.done()
        clock.now = 0.2
        await r
        assert delay.status() == "0 1 0" and not w.done()
        clock.now = 0.399
        await _spin()
        assert not w.done()
        clock.now = 0.4
        await w
        assert delay.status() == "0 0 0" and not clock.timers
        # writes went to the write device
        assert await read(ns.devices["/dev/b"], 0, SECTOR) == b"D" * SECTOR
        assert await read(ns.devices["/dev/a"], 0, SECTOR) == bytes(SECTOR)

    run(go())


def test_delay_releases_held_io_on_suspend() -> None:
    clock = FakeClock()  # it never moves: only a suspend releases what is held
    delay = Delay(_context(memory_namespace(a=1 << 20)), ["/dev/a", "0", "5000"], clock)

    async def go() -> None:
        w = asyncio.ensure_future(write(delay, 0, b"S" * SECTOR))
        await _until(lambda: delay.status() == "0 1 0")
        assert [t.when for t in clock.timers] == [5.0]
        await delay.presuspend(noflush=False)
        await w
        assert delay.status() == "0 0 0"
        assert all(t.cancelled for t in clock.timers)
        await delay.resume()
        r = asyncio.ensure_future(read(delay, 0, SECTOR))  # delays again after resume
        await _until(lambda: delay.status() == "1 0 0")
        clock.now = 5.0
        assert await r == b"S" * SECTOR

    run(go())


def test_suspending_a_delay_device_does_not_wait_out_its_delays() -> None:
    """Through the registry, on the real clock: a suspend releases what a delay holds
    before it waits for in-flight I/O (a day's delay, and the test is bounded by run's
    timeout, so only the release can finish it)."""
    reg = registry_over(memory_namespace(a=1 << 20))

    async def go() -> None:
        dev = await reg.create("d", f"0 64 delay /dev/a 0 {24 * 3600 * 1000}")
        w = asyncio.ensure_future(write(dev, 0, b"S" * SECTOR))
        await _until(lambda: reg.status("d")[0][3] == "0 1 0")
        await reg.suspend("d")
        assert w.done() and w.exception() is None
        await reg.resume("d")
        r = asyncio.ensure_future(read(dev, 0, SECTOR))
        await _until(lambda: reg.status("d")[0][3] == "1 0 0")  # held again
        await reg.suspend("d")
        assert await r == b"S" * SECTOR

    run(go(), timeout=20)


def test_dust_fails_reads_of_bad_blocks_once_enabled_and_writes_remap() -> None:
    ns = memory_namespace(a=1 << 20)
    reg = registry_over(ns)

    async def go() -> None:
        # 4 KiB blocks numbered on /dev/a; the target starts 8 sectors (block 1) in.
        dev = await reg.create("d", "0 128 dust /dev/a 8 4096")
        m = reg.message
        assert await m("d", 0, ["addbadblock", "3"]) is None
        assert await m("d", 0, ["addbadblock", "5", "2"]) is None
        await _expect_errno(m("d", 0, ["addbadblock", "3"]), errno.EINVAL)
        assert await m("d", 0, ["queryblock", "3"]) == \
            "dust_query_block: block 3 found in badblocklist"
        assert await m("d", 0, ["countbadblocks"]) == "countbadblocks: 2 badblock(s) found"
        assert await m("d", 0, ["listbadblocks"]) == "3\n5"
        # bypass mode: nothing fails yet
        await read(dev, 2 * 4096, 4096)
        await m("d", 0, ["enable"])
        assert reg.status("d")[0][3] == "240:0 fail_read_on_bad_block verbose"
        await _expect_errno(read(dev, 2 * 4096, 4096))  # device block 3
        await _expect_errno(read(dev, 2 * 4096 - 512, 1024))  # straddles into block 3
        await read(dev, 0, 2 * 4096)  # blocks 1 and 2 are fine
        # a write to block 3 remaps it: the block leaves the list and reads work
        await write(dev, 2 * 4096, pattern(3, 4096))
        assert await read(dev, 2 * 4096, 4096) == pattern(3, 4096)
        # block 5 fails two writes before the third remaps it
        for _ in range(2):
            await _expect_errno(write(dev, 4 * 4096, pattern(4, 4096)))
        await write(dev, 4 * 4096, pattern(4, 4096))
        assert await m("d", 0, ["countbadblocks"]) == "countbadblocks: 0 badblock(s) found"
        assert await m("d", 0, ["clearbadblocks"]) == "dust_clear_badblocks: no badblocks found"
        await m("d", 0, ["addbadblock", "7"])
        await m("d", 0, ["quiet"])
        assert reg.status("d")[0][3] == "240:0 fail_read_on_bad_block quiet"
        await m("d", 0, ["disable"])
        await read(dev, 6 * 4096, 4096)
        assert await m("d", 0, ["clearbadblocks"]) == "dust_clear_badblocks: badblocks cleared"
        await _expect_errno(m("d", 0, ["removebadblock", "7"]), errno.EINVAL)
        await _expect_errno(m("d", 0, ["addbadblock", "99999"]), errno.EINVAL)
        await _expect_errno(m("d", 0, ["frob"]), errno.EINVAL)

    run(go())


def test_striped_trim_zero_and_extents_follow_the_chunks() -> None:
    ns = memory_namespace(a=1 << 20, b=1 << 20)
    reg = registry_over(ns)
    size = 2048 * SECTOR

    async def go() -> None:
        dev = await reg.create("s", "0 2048 striped 2 16 /dev/a 0 /dev/b 0")
        await write(dev, 0, pattern(9, size))
        await dev.zero(10 * SECTOR, 40 * SECTOR)
        got = await read(dev, 0, size)
        want = bytearray(pattern(9, size))
        want[10 * SECTOR:50 * SECTOR] = bytes(40 * SECTOR)
        assert got == want
        # 128 KiB..640 KiB is rows 8..39 of each stripe: whole pages of each memory device
        await dev.trim(128 << 10, 512 << 10)
        want[128 << 10:640 << 10] = bytes(512 << 10)
        assert await read(dev, 0, size) == want
        extents = await dev.extents(0, size)
        assert sum(e.length for e in extents) == size and extents[0].offset == 0
        pairs = zip(extents, extents[1:], strict=False)
        assert all(a.offset + a.length == b.offset for a, b in pairs)
        holes = [(e.offset, e.length) for e in extents if e.flags]
        assert (128 << 10, 512 << 10) in holes

    run(go())
