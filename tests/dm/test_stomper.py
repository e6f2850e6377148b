"""Pattern stomping across suspend/load/resume (dmtest's PatternStomper, in-process).

Two writers keep writing seeded patterns to random blocks of a mapped device while the
main task suspends it, loads a different table that maps the same storage, and resumes it,
over and over. After every cycle every block whose expected contents are settled is read
back; at the end every block is checked through the device and on the backing device
directly. No write may fail, and none that was acknowledged may be lost.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

from tests.dm.dm_helpers import (
    SECTOR,
    memory_namespace,
    pattern,
    read,
    registry_over,
    run,
    until,
    write,
)

from minidisk.device.api import BlockDevice

BLOCK = 4096
BLOCKS = 256
SECTORS = BLOCKS * BLOCK // SECTOR


@dataclass
class Stomper:
    """Seeded writes with a record of what each block must now hold."""

    device: BlockDevice
    rng: random.Random
    expected: dict[int, int] = field(default_factory=dict)  # block -> seed
    version: dict[int, int] = field(default_factory=dict)  # bumps on every write start
    busy: set[int] = field(default_factory=set)
    acknowledged: int = 0

    async def stomp(self, count: int, writer: int) -> None:
        for i in range(count):
            block = self.rng.randrange(BLOCKS)
            if block in self.busy:
                continue  # one writer per block at a time, so "expected" is well defined
            seed = writer * 1_000_000 + i
            self.busy.add(block)
            self.version[block] = self.version.get(block, 0) + 1
            try:
                await write(self.device, block * BLOCK, pattern(seed, BLOCK))
            finally:
                self.busy.discard(block)
            self.expected[block] = seed
            self.acknowledged += 1
            await asyncio.sleep(0)

    def wanted(self, block: int) -> bytes:
        seed = self.expected.get(block)
        return bytes(BLOCK) if seed is None else pattern(seed, BLOCK)

    async def verify_settled(self) -> int:
        """Check blocks no writer touched while they were read; return how many."""
        checked = 0
        for block in range(BLOCKS):
            if block in self.busy:
                continue
            before = self.version.get(block, 0)
            got = await read(self.device, block * BLOCK, BLOCK)
            if block in self.busy or self.version.get(block, 0) != before:
                continue
            assert got == self.wanted(block), f"block {block} lost a write"
            checked += 1
        return checked


TABLES = [
    f"0 {SECTORS} linear /dev/a 0",
    f"0 {SECTORS // 2} linear /dev/a 0\n{SECTORS // 2} {SECTORS // 2} linear /dev/a "
    f"{SECTORS // 2}",
    f"0 {SECTORS} linear /dev/mapper/mid 0",
    "\n".join(f"{i * 8} 8 linear /dev/a {i * 8}" for i in range(SECTORS // 8)),
]


def test_no_acknowledged_write_is_lost_across_reloads_under_load() -> None:
    ns = memory_namespace(a=BLOCKS * BLOCK)
    reg = registry_over(ns)

    async def go() -> None:
        await reg.create("mid", f"0 {SECTORS} linear /dev/a 0")
        dev = await reg.create("d", TABLES[0])
        stomper = Stomper(dev, random.Random(42))
        writers = [asyncio.ensure_future(stomper.stomp(4000, w)) for w in (1, 2)]
        cycles = 0
        while not all(w.done() for w in writers) or cycles < 8:
            await asyncio.sleep(0.005)
            await reg.suspend("d", noflush=cycles % 2 == 1)
            # While suspended, new I/O waits instead of failing.
            probe = asyncio.ensure_future(read(dev, 0, SECTOR))
            # the probe and each writer still running (its next request) queue up
            await until(lambda: dev.info().queued == 1 + sum(not w.done() for w in writers))
            assert not probe.done()
            await reg.load("d", TABLES[cycles % len(TABLES)])
            await reg.resume("d")
            await asyncio.wait_for(probe, 5)
            assert await stomper.verify_settled() > 0
            cycles += 1
        for w in writers:
            await w  # re-raises any failed write
        assert stomper.acknowledged > 4000 and cycles >= 8
        for block in range(BLOCKS):
            assert await read(dev, block * BLOCK, BLOCK) == stomper.wanted(block)
            assert await read(ns.devices["/dev/a"], block * BLOCK, BLOCK) == \
                stomper.wanted(block)

    run(go(), timeout=120)
