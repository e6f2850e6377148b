"""Direct routes (dm/route.py): a mapped device with a linear or striped table calls the
child's device itself, stepping over the target and the namespace's revocable wrapper. These
tests run over a real `Namespace`, so the wrappers are there, and check that stepping over
them changes nothing a user can see: the bytes, the holes, a forced removal of a child
(ESHUTDOWN, drained), striped's per-stripe error count, and which targets are routed."""

from __future__ import annotations

import asyncio
import errno

import pytest
from tests.dm.dm_helpers import SECTOR, pattern, read, run, until, write

from minidisk.device.memory import MemoryDevice
from minidisk.device.revocable import RevocableDevice
from minidisk.dm import Registry
from minidisk.namespace import Namespace

CHUNK_SECTORS = 8
CHUNK = CHUNK_SECTORS * SECTOR


def namespace(**sizes: int) -> Namespace:
    ns = Namespace()
    for name, size in sizes.items():
        ns.register_device(f"/dev/{name}", MemoryDevice(size))
    return ns


def gate(ns: Namespace, key: str) -> RevocableDevice:
    device = ns.lookup(key)
    assert isinstance(device, RevocableDevice)
    return device


def test_routed_targets_and_the_others() -> None:
    ns = namespace(a=1 << 20, b=1 << 20)
    reg = Registry(ns, ns)

    async def go() -> None:
        tables = {
            "lin": ("0 64 linear /dev/a 8", True),
            "str": (f"0 64 striped 2 {CHUNK_SECTORS} /dev/a 0 /dev/b 0", True),
            "flk": ("0 64 flakey /dev/a 0 1 0", False),  # intercepts reads
            "dly": ("0 64 delay /dev/a 0 0", False),
            "two": ("0 32 linear /dev/a 0\n32 32 linear /dev/b 0", False),  # two segments
        }
        for name, (table, routed) in tables.items():
            dev = await reg.create(name, table)
            assert (dev._router is not None) is routed, name

    run(go())


@pytest.mark.parametrize("start", [0, 8, 1001])
def test_linear_route_bytes_holes_and_gate(start: int) -> None:
    ns = namespace(a=4 << 20)
    reg = Registry(ns, ns)
    child = gate(ns, "/dev/a")

    async def go() -> None:
        dev = await reg.create("lin", f"0 2048 linear /dev/a {start}")
        data = pattern(start, 3 * 4096)
        await write(dev, 8192, data)
        assert child.in_flight == 0  # every enter was left
        assert await read(ns.lookup("/dev/a"), start * SECTOR + 8192, len(data)) == data
        assert await read(dev, 8192, len(data)) == data
        # 256 KiB: the data, then pages never written. Holes come back in the device's own
        # offsets: what the child says about the same bytes, moved by the table's start.
        size = 256 << 10
        buf = memoryview(bytearray(size))
        holes = await dev.pread_sparse(buf, 0)
        base = start * SECTOR
        expected = await child.inner.pread_sparse(memoryview(bytearray(size)), base)
        assert holes == [(at - base, n) for at, n in expected]
        assert holes and holes[-1][0] + holes[-1][1] == size  # the tail was never written
        assert bytes(buf[8192:8192 + len(data)]) == data
        assert child.in_flight == 0

    run(go())


def test_striped_route_places_by_the_formula_and_counts_a_revoked_stripe() -> None:
    ns = namespace(a=1 << 20, b=1 << 20)
    reg = Registry(ns, ns)

    async def go() -> None:
        dev = await reg.create("s", f"0 256 striped 2 {CHUNK_SECTORS} /dev/a 0 /dev/b 0")
        for chunk_no in range(4):
            await write(dev, chunk_no * CHUNK + 512, bytes([chunk_no + 1]) * 1024)
        # chunk n lies on stripe n % 2, row n // 2
        for chunk_no in range(4):
            key = "/dev/a" if chunk_no % 2 == 0 else "/dev/b"
            at = (chunk_no // 2) * CHUNK + 512
            assert await read(ns.lookup(key), at, 1024) == bytes([chunk_no + 1]) * 1024
        assert reg.status("s")[0][3].endswith(" 1 AA")
        # A forced removal of /dev/b while the table holds it: the gate fails its requests
        # with ESHUTDOWN and drains (it would hang here if a routed call had not left it).
        await ns.remove("/dev/b", force=True)
        assert await read(dev, 0 * CHUNK + 512, 1024) == b"\x01" * 1024  # stripe a still fine
        for op in ("read", "sparse", "write"):
            with pytest.raises(OSError) as e:
                if op == "read":
                    await read(dev, CHUNK, 512)
                elif op == "sparse":
                    await dev.pread_sparse(memoryview(bytearray(512)), CHUNK)
                else:
                    await write(dev, CHUNK, b"x" * 512)
            assert e.value.errno == errno.ESHUTDOWN, op
        # Counted against stripe b, as when the stripe was called whole.
        assert reg.status("s")[0][3].endswith(" 1 AD")
        # One event per failed request: the kernel schedules one per error below its
        # threshold (coalescing those still pending, which this table has no reason to).
        assert reg.info("s").event_nr == 3

    run(go())


def test_striped_places_alike_routed_and_called() -> None:
    """The route (its inlined formula) and the target's own paths (`_locate`: a table of two
    segments is not routed) put the same bytes in the same places, tell the same holes,
    and count a failed stripe alike."""
    ns = namespace(a=1 << 20, b=1 << 20, c=1 << 20, d=1 << 20)
    reg = Registry(ns, ns)

    async def go() -> None:
        routed = await reg.create("r", f"0 256 striped 2 {CHUNK_SECTORS} /dev/a 0 /dev/b 0")
        called = await reg.create(
            "c", f"0 256 striped 2 {CHUNK_SECTORS} /dev/c 0 /dev/d 0\n256 8 zero")
        assert routed._router is not None and called._router is None
        # Inside one chunk, up to its end, and across chunk and row boundaries.
        for n, (at, size) in enumerate([(512, 1024), (CHUNK - 512, 512), (CHUNK - 100, 300),
                                        (3 * CHUNK + 7, 2 * CHUNK + 9)]):
            data = pattern(n, size)
            await write(routed, at, data)
            await write(called, at, data)
            assert await read(called, at, size) == await read(routed, at, size) == data
        for mine, theirs in (("/dev/a", "/dev/c"), ("/dev/b", "/dev/d")):
            assert await read(ns.lookup(mine), 0, 4 * CHUNK) == \
                await read(ns.lookup(theirs), 0, 4 * CHUNK)
        for at, size in [(0, CHUNK), (CHUNK, 512), (0, 8 * CHUNK)]:
            holes = await routed.pread_sparse(memoryview(bytearray(size)), at)
            assert await called.pread_sparse(memoryview(bytearray(size)), at) == holes
        await ns.remove("/dev/b", force=True)
        await ns.remove("/dev/d", force=True)
        for dev in (routed, called):
            with pytest.raises(OSError) as e:
                await read(dev, CHUNK, 512)  # chunk 1: stripe 1
            assert e.value.errno == errno.ESHUTDOWN
        assert reg.status("r")[0][3].endswith(" 1 AD")
        assert reg.status("c")[0][3].endswith(" 1 AD")

    run(go())


def test_linear_route_over_a_revoked_child_fails_and_drains() -> None:
    ns = namespace(a=1 << 20)
    reg = Registry(ns, ns)
    child = gate(ns, "/dev/a")

    async def go() -> None:
        dev = await reg.create("lin", "0 64 linear /dev/a 0")
        await write(dev, 0, b"k" * 512)
        await ns.remove("/dev/a", force=True)
        assert child.revoked and child.in_flight == 0
        with pytest.raises(OSError) as e:
            await read(dev, 0, 512)
        assert e.value.errno == errno.ESHUTDOWN
        assert child.in_flight == 0

    run(go())


class GatedMemory(MemoryDevice):
    """Reads wait for a gate: requests that are really in flight."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.gate = asyncio.Event()

    async def pread_sparse(self, buf: memoryview, offset: int) -> list[tuple[int, int]]:
        await self.gate.wait()
        return await super().pread_sparse(buf, offset)

    async def pread(self, buf: memoryview, offset: int) -> None:
        await self.gate.wait()
        await super().pread(buf, offset)


def test_a_mapped_device_is_its_own_revocable_in_the_namespace() -> None:
    """The namespace holds /dev/mapper/NAME without a wrapper; a forced removal of that key
    behaves as the wrapper did: new and queued requests fail with ESHUTDOWN, one in flight
    finishes inside and then fails too, and the removal returns only after it is back."""
    ns = Namespace()
    slow = GatedMemory(1 << 20)
    ns.register_device("/dev/slow", slow)
    reg = Registry(ns, ns)

    async def go() -> None:
        dev = await reg.create("m", "0 64 linear /dev/slow 0")
        assert ns.lookup("/dev/mapper/m") is dev  # no wrapper
        held = ns.open_export("dev/mapper/m")  # an NBD client
        in_flight = asyncio.ensure_future(dev.pread_sparse(memoryview(bytearray(512)), 0))
        await asyncio.sleep(0.01)
        assert not in_flight.done()
        removal = asyncio.ensure_future(ns.remove("/dev/mapper/m", force=True))
        await asyncio.sleep(0.01)
        assert dev.revoked and not removal.done()  # waiting for the request inside
        with pytest.raises(OSError) as e:
            await read(dev, 0, 512)
        assert e.value.errno == errno.ESHUTDOWN
        slow.gate.set()
        with pytest.raises(OSError) as e:
            await in_flight
        assert e.value.errno == errno.ESHUTDOWN
        await asyncio.wait_for(removal, 5)
        held.close()
        assert reg.info("m").suspended is False
        await reg.remove("m")  # its key is gone already: the removal still completes
        assert reg.names() == []

    run(go())


def test_requests_queued_behind_a_suspend_fail_when_revoked() -> None:
    ns = namespace(a=1 << 20)
    reg = Registry(ns, ns)

    async def go() -> None:
        dev = await reg.create("m", "0 64 linear /dev/a 0")
        await reg.suspend("m")
        queued = asyncio.ensure_future(write(dev, 0, b"q" * 512))
        await until(lambda: reg.info("m").queued == 1)
        assert not queued.done()  # suspended: queued, not failed
        await ns.remove("/dev/mapper/m", force=True)
        with pytest.raises(OSError) as e:
            await queued
        assert e.value.errno == errno.ESHUTDOWN
        await reg.resume("m")  # a resume does not reopen a revoked device
        with pytest.raises(OSError) as e:
            await read(dev, 0, 512)
        assert e.value.errno == errno.ESHUTDOWN
        assert await read(ns.lookup("/dev/a"), 0, 512) == bytes(512)  # nothing written

    run(go())


def test_rename_moves_the_key_and_the_device_keeps_working() -> None:
    """dmsetup rename moves /dev/mapper/OLD to /dev/mapper/NEW in the namespace without
    closing the device (closing would revoke it: every later request ESHUTDOWN)."""
    ns = namespace(a=1 << 20)
    reg = Registry(ns, ns)

    async def go() -> None:
        dev = await reg.create("old", "0 64 linear /dev/a 0")
        top = await reg.create("top", "0 64 linear /dev/mapper/old 0")
        await write(dev, 0, b"r" * 512)
        client = ns.open_export("dev/mapper/old")
        with pytest.raises(OSError) as e:
            await reg.rename("old", "new")  # a client names it by key: busy
        assert e.value.errno == errno.EBUSY and reg.names() == ["old", "top"]
        client.close()
        await reg.rename("old", "new")
        assert ns.lookup("/dev/mapper/new") is dev and not dev.revoked
        with pytest.raises(OSError) as e:
            ns.lookup("/dev/mapper/old")
        assert e.value.errno == errno.ENOENT
        assert await read(ns.lookup("/dev/mapper/new"), 0, 512) == b"r" * 512
        await write(top, 512, b"t" * 512)  # the table above still reaches it
        assert await read(dev, 512, 512) == b"t" * 512
        assert [row.description for row in ns.ls() if row.key == "/dev/mapper/new"]

    run(go())
