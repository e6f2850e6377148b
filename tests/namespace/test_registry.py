"""The namespace as the server and dm tables use it: windows, exports, holds, removal, dirs."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from minidisk.device.api import BlockDevice, Caps
from minidisk.device.memory import MemoryDevice
from minidisk.namespace import Namespace

Run = Callable[..., object]
MakeFile = Callable[..., Path]
Pattern = Callable[..., bytes]


async def read(device: BlockDevice, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    await device.pread(memoryview(buf), offset)
    return bytes(buf)


async def write(device: BlockDevice, offset: int, data: bytes, fua: bool = False) -> None:
    await device.pwrite(memoryview(data), offset, fua)


async def fails_with(code: int, awaitable: object) -> None:
    with pytest.raises(OSError) as info:
        await awaitable  # type: ignore[misc]
    assert info.value.errno == code


@pytest.mark.parametrize("kind", ["reg", "blk", "chr"])
def test_window_byte_for_byte(ns: Namespace, make_file: MakeFile, run: Run, pattern: Pattern,
                              kind: str) -> None:
    """Writes through the device land in the host file at begin+offset, and nowhere else."""
    host = make_file("host", 1 << 20, seed=7)
    original = host.read_bytes()
    begin, size = 3 * 4096 + 512, 200 * 1024
    ns.register("/w", str(host), kind, begin, size)

    async def scenario() -> None:
        ref = ns.open_export("w")
        device = ref.device
        assert device.size == size
        # Reads see the host file at begin+offset.
        assert await read(device, 0, size) == original[begin:begin + size]
        assert await read(device, 1536, 4096) == original[begin + 1536:begin + 5632]
        # Writes, including ones that cross cache lines and the window's last byte.
        writes = [(0, pattern(512, 1)), (65536 - 512, pattern(1024, 2)),
                  (size - 1024, pattern(1024, 3)), (70 * 1024, pattern(130 * 1024 - 1024, 4))]
        for offset, data in writes:
            await write(device, offset, data)
        await device.flush()
        expected = bytearray(original)
        for offset, data in writes:
            expected[begin + offset:begin + offset + len(data)] = data
        assert host.read_bytes() == bytes(expected)
        assert await read(device, 0, size) == bytes(expected[begin:begin + size])
        ref.close()

    run(scenario())


@pytest.mark.parametrize("kind", ["blk", "chr"])
def test_sector_types_refuse_partial_sectors(ns: Namespace, make_file: MakeFile,
                                             run: Run, pattern: Pattern, kind: str) -> None:
    ns.register("/s", str(make_file("host", 8192)), kind)
    device = ns.lookup("/s")

    async def scenario() -> None:
        await fails_with(errno.EINVAL, read(device, 1, 512))
        await fails_with(errno.EINVAL, read(device, 0, 511))
        await fails_with(errno.EINVAL, write(device, 512, b"x" * 513))
        await fails_with(errno.EINVAL, device.trim(100, 512))
        await fails_with(errno.EINVAL, device.zero(0, 1000))
        assert await read(device, 512, 1024) == pattern(8192, 1)[512:1536]

    run(scenario())


def test_reg_is_byte_granular(ns: Namespace, make_file: MakeFile,
                              run: Run, pattern: Pattern) -> None:
    host = make_file("host", 100)
    ns.register("/r", str(host), "reg", 10, 50)
    device = ns.lookup("/r")
    run(write(device, 3, b"abc"))
    assert host.read_bytes()[13:16] == b"abc"
    assert run(read(device, 2, 5)) == pattern(100, 1)[12:13] + b"abc" + pattern(100, 1)[16:17]


def test_same_host_file_twice_gets_two_windows(ns: Namespace, make_file: MakeFile,
                                               run: Run, pattern: Pattern) -> None:
    """NetBSD reuses the first registration's window for the same hostpath; we do not."""
    host = str(make_file("host", 8192))
    ns.register("/a", host, "blk", 0, 4096)
    ns.register("/b", host, "blk", 4096, 4096)
    assert run(read(ns.lookup("/b"), 0, 512)) == pattern(8192, 1)[4096:4608]
    assert ns.lookup("/a").size == ns.lookup("/b").size == 4096


def test_export_interface(ns: Namespace, tmp_path: Path, make_file: MakeFile) -> None:
    assert ns.export_names() == []
    with pytest.raises(OSError) as info:
        ns.open_export("")
    assert info.value.errno == errno.ENOENT
    (tmp_path / "d").mkdir()
    ns.register("/dirkey", str(tmp_path / "d"), "dir")  # first, but not an export of its own
    ns.register("/dev/first", str(make_file("f1", 4096)), "reg")
    ns.register_device("/mem", MemoryDevice(1 << 20), "a memory disk")
    assert ns.export_names() == ["dev/first", "mem"]
    for name in ("", "/", "//", "dev/first", "/dev/first", "///dev/first"):
        ref = ns.open_export(name)
        assert (ref.name, ref.key) == ("dev/first", "/dev/first")
        assert ref.device is ns.lookup("/dev/first")
        ref.close()
    ref = ns.open_export("mem")
    assert ref.description == "a memory disk" and ref.device.size == 1 << 20
    for name in ("nothing", "dev//first", "dev/first/", "dirkey", "x\0y", "x" * 5000):
        with pytest.raises(OSError) as info:
            ns.open_export(name)
        assert info.value.errno == errno.ENOENT, name


def test_references_count_and_close_is_idempotent(ns: Namespace, run: Run) -> None:
    ns.register_device("/m", MemoryDevice(4096))
    unused: list[str] = []
    ns.on_unused(unused.append)
    a, b = ns.open_export("m"), ns.hold("/m")
    assert [row.users for row in ns.ls()] == [2]
    assert (ns.users("/m"), ns.users("//m"), ns.users("/nothing")) == (2, 2, 0)
    a.close()
    a.close()
    assert [row.users for row in ns.ls()] == [1] and ns.users("/m") == 1
    assert unused == []  # b still holds it
    with pytest.raises(OSError) as info:
        run(ns.remove("/m"))
    assert info.value.errno == errno.EBUSY
    assert ns.export_names() == ["m"]  # EBUSY changed nothing
    b.release()
    assert [row.users for row in ns.ls()] == [0]
    assert unused == ["/m"]  # said once, when the last reference went
    run(ns.remove("/m"))
    assert ns.ls() == []


class GatedDevice(MemoryDevice):
    """A memory device whose reads wait for a gate: requests that are really in flight."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.gate = asyncio.Event()
        self.entered = 0
        self.closed = False

    async def pread(self, buf: memoryview, offset: int) -> None:
        self.entered += 1
        await self.gate.wait()
        await super().pread(buf, offset)

    async def close(self) -> None:
        self.closed = True


def test_forced_removal_fails_in_flight_and_later_requests_only_of_that_device(
        ns: Namespace, run: Run) -> None:
    async def scenario() -> None:
        gated = GatedDevice(1 << 20)
        ns.register_device("/victim", gated)
        ns.register_device("/bystander", MemoryDevice(1 << 20))
        victim, bystander = ns.open_export("victim"), ns.open_export("bystander")
        await write(bystander.device, 0, b"still here")

        in_flight = [asyncio.create_task(read(victim.device, i * 4096, 4096)) for i in range(3)]
        while gated.entered < 3:
            await asyncio.sleep(0)
        await fails_with(errno.EBUSY, ns.remove("/victim"))
        removal = asyncio.create_task(ns.remove("/victim", force=True))
        await asyncio.sleep(0)
        # The key is gone at once and can be registered again; later requests fail at once.
        assert ns.export_names() == ["bystander"]
        ns.register_device("/victim", MemoryDevice(4096))
        await fails_with(errno.ESHUTDOWN, read(victim.device, 0, 512))
        await fails_with(errno.ESHUTDOWN, victim.device.flush())
        # The device is not closed under requests still inside it.
        assert not removal.done() and not gated.closed
        assert await read(bystander.device, 0, 10) == b"still here"
        gated.gate.set()
        for task in in_flight:
            await fails_with(errno.ESHUTDOWN, task)
        await removal
        assert gated.closed
        victim.close()  # a reference outliving its key closes quietly
        assert await read(bystander.device, 0, 10) == b"still here"
        assert [(row.key, row.users) for row in ns.ls()] == [("/bystander", 1), ("/victim", 0)]
        bystander.close()

    run(scenario())


def test_forced_removal_of_blk_keeps_acknowledged_writes(
        ns: Namespace, make_file: MakeFile, run: Run) -> None:
    host = make_file("host", 1 << 20)

    async def scenario() -> None:
        ns.register("/b", str(host), "blk")
        ref = ns.open_export("b")
        await write(ref.device, 8192, b"acknowledged" + bytes(500))
        assert host.read_bytes()[8192:8204] != b"acknowledged"  # still only in the cache
        await ns.remove("/b", force=True)
        assert host.read_bytes()[8192:8204] == b"acknowledged"
        await fails_with(errno.ESHUTDOWN, write(ref.device, 0, bytes(512)))
        ref.close()

    run(scenario())


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def make_tree(root: Path, pattern: Pattern) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "top.img").write_bytes(pattern(4096, 1))
    (root / "sub" / "mid.img").write_bytes(pattern(8192, 2))
    (root / "sub" / "deeper" / "low.img").write_bytes(pattern(512, 3))
    os.symlink("/etc/passwd", root / "escape")
    os.symlink("sub", root / "linkdir")
    os.mkfifo(root / "fifo")


def test_dir_shows_immediate_children_on_demand(
        ns: Namespace, tmp_path: Path, run: Run, pattern: Pattern) -> None:
    make_tree(tmp_path, pattern)
    ns.register("/d", str(tmp_path), "dir")
    assert ns.export_names() == []  # looked up on demand, never listed
    ref = ns.open_export("d/top.img")
    assert ref.name == "d/top.img" and ref.device.size == 4096
    assert run(read(ref.device, 0, 4096)) == pattern(4096, 1)
    cases = {"d/sub/mid.img": errno.ENOENT, "d/sub": errno.ENOENT, "d/escape": errno.ENOENT,
             "d/fifo": errno.ENOENT, "d/missing": errno.ENOENT, "d/.." : errno.EOPNOTSUPP,
             "d/./top.img": errno.ENOENT, "d//top.img": errno.ENOENT, "d": errno.ENOENT}
    for name, code in cases.items():
        with pytest.raises(OSError) as info:
            ns.open_export(name)
        assert info.value.errno == code, name
    ref.close()


def test_dir_subdirs_shows_the_tree_and_counts_users(
        ns: Namespace, tmp_path: Path, run: Run, pattern: Pattern) -> None:
    make_tree(tmp_path, pattern)
    ns.register("/t", str(tmp_path), "dir_subdirs")
    before = open_fds()
    low = ns.open_export("t/sub/deeper/low.img")
    mid = ns.open_export("/t/sub/mid.img")
    mid_again = ns.open_export("t/sub/mid.img")
    assert mid_again.device is mid.device  # one device per file, shared by its users
    assert run(read(low.device, 0, 512)) == pattern(512, 3)
    assert run(read(mid.device, 4096, 8)) == pattern(8192, 2)[4096:4104]
    for name, code in {"t/linkdir/mid.img": errno.ENOENT, "t/sub/../top.img": errno.EOPNOTSUPP,
                       "t/sub/deeper": errno.ENOENT, "t/sub//mid.img": errno.ENOENT}.items():
        with pytest.raises(OSError) as info:
            ns.open_export(name)
        assert info.value.errno == code, name
    rows = {row.key: row.users for row in ns.ls()}
    assert rows == {"/t": 0, "/t/sub/deeper/low.img": 1, "/t/sub/mid.img": 2}
    with pytest.raises(OSError) as info:
        run(ns.remove("/t"))
    assert info.value.errno == errno.EBUSY
    low.close()
    mid.close()
    mid_again.close()  # the last users are gone: the files are closed
    assert open_fds() == before
    assert [row.key for row in ns.ls()] == ["/t"]
    run(ns.remove("/t"))


def test_forced_removal_of_a_dir_revokes_its_open_files(
        ns: Namespace, tmp_path: Path, run: Run,
        pattern: Pattern) -> None:
    make_tree(tmp_path, pattern)
    ns.register("/t", str(tmp_path), "dir_subdirs")
    ref = ns.open_export("t/top.img")
    run(ns.remove("/t", force=True))
    with pytest.raises(OSError) as info:
        run(read(ref.device, 0, 512))
    assert info.value.errno == errno.ESHUTDOWN
    ref.close()
    assert ns.ls() == []


def test_register_device_keeps_caps(ns: Namespace) -> None:
    device = MemoryDevice(4096)
    ns.register_device("/m", device)
    assert ns.lookup("/m").caps == device.caps
    assert ns.lookup("/m").caps != Caps()


def test_registered_device_size_is_read_through(ns: Namespace) -> None:
    """A dm mapped device changes size when a new table is resumed; the key must follow."""
    device = MemoryDevice(4096)
    ns.register_device("/dev/mapper/grow", device)
    ref = ns.hold("/dev/mapper/grow")
    device.size = 8192
    assert ref.device.size == ns.lookup("/dev/mapper/grow").size == 8192
    assert [(row.type, row.size, row.users) for row in ns.ls()] == [("device", 8192, 1)]
    ref.release()


def test_sync_and_aclose_write_back_blk_caches(make_file: MakeFile, run: Run) -> None:
    """halt: acknowledged writes reach the host file, and every key is gone."""
    host = make_file("host", 1 << 20)
    ns = Namespace()

    async def scenario() -> None:
        ns.register("/b", str(host), "blk")
        ref = ns.open_export("b")
        await write(ref.device, 4096, b"S" * 512)
        await ns.sync()
        assert host.read_bytes()[4096:4608] == b"S" * 512
        await write(ref.device, 8192, b"C" * 512)
        assert host.read_bytes()[8192:8704] != b"C" * 512
        await ns.aclose()
        assert host.read_bytes()[8192:8704] == b"C" * 512
        assert ns.ls() == [] and ns.export_names() == []
        await fails_with(errno.ESHUTDOWN, read(ref.device, 0, 512))
        ref.close()

    run(scenario())
