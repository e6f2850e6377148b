"""Server behaviour that needs a device the command line cannot build: requests that wait
on the test (shutdown with requests in flight, out-of-order replies), a backend that counts
syncs (FLUSH/FUA), a device with a 512-byte minimum block, and devices that fail.

The server runs in a thread of the test process (its own uvloop loop) on a unix socket;
the client is the raw-socket client, as for the subprocess servers.
"""

from __future__ import annotations

import asyncio
import errno
import shutil
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from tests.harness import short_dir
from tests.nbd.nbd_helpers import Closed, RawClient, read_data

from minidisk.device.api import BlockSize, Caps
from minidisk.device.memory import MemoryDevice
from minidisk.kernel.commands import wait_until
from minidisk.nbd import protocol as p
from minidisk.nbd.exports import DictExports
from minidisk.nbd.listen import ListenAddress
from minidisk.nbd.server import NBDServer, new_event_loop
from minidisk.nbd.transport import Transport

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20


class GatedDevice(MemoryDevice):
    """A memory device whose reads at `gate_offset` wait until the test opens the gate
    (no extents: holes would be answered without a read)."""

    caps = Caps(flush=True, fua=True, trim=True, zero=True, cache=True)

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.gate = asyncio.Event()
        self.waiting = threading.Event()
        self.gate_offset = 0

    async def pread(self, buf: memoryview, offset: int) -> None:
        if offset == self.gate_offset:
            self.waiting.set()
            await self.gate.wait()
        await super().pread(buf, offset)


class CountingDevice(MemoryDevice):
    """Records every write (with its FUA flag) and every flush, in order."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.events: list[tuple[str, int, bool]] = []

    async def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        await asyncio.sleep(0.01 if offset == 0 else 0)  # the first write finishes last
        await super().pwrite(buf, offset, fua)
        self.events.append(("write", offset, fua))

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await super().trim(offset, length, fua)
        self.events.append(("trim", offset, fua))

    async def zero(self, offset: int, length: int, may_trim: bool = False, fast: bool = False,
                   fua: bool = False) -> None:
        await super().zero(offset, length, may_trim, fast, fua)
        self.events.append(("zero", offset, fua))

    async def flush(self) -> None:
        self.events.append(("flush", 0, False))


class FailingDevice(MemoryDevice):
    """Fails requests by offset: MiB n raises the errno n (0x7F: a non-OSError bug)."""

    caps = Caps(flush=True, fua=True, trim=True, zero=True, cache=True)

    def _maybe_fail(self, offset: int) -> None:
        code = offset // MiB
        if code == 0x7F:
            raise RuntimeError("device bug")
        if code:
            raise OSError(code, "injected")

    async def pread(self, buf: memoryview, offset: int) -> None:
        self._maybe_fail(offset)
        await super().pread(buf, offset)

    async def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        self._maybe_fail(offset)
        await super().pwrite(buf, offset, fua)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._maybe_fail(offset)


class ThreadServer:
    def __init__(self, devices: dict[str, Any]) -> None:
        self.directory = short_dir()
        self.socket = str(self.directory / "t.sock")
        self.server = NBDServer(DictExports(devices))
        self.loop = new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.server.listeners.listen(
                ListenAddress(Transport.UNIX, self.socket)))
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def call(self, fn: Any, *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def shutdown_soon(self) -> Any:
        return asyncio.run_coroutine_threadsafe(self.server.shutdown(timeout=10), self.loop)

    def stop(self) -> None:
        if not self.server.shutting_down:
            self.shutdown_soon().result(15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def thread_server() -> Iterator[Any]:
    servers: list[ThreadServer] = []

    def start(**devices: Any) -> ThreadServer:
        servers.append(ThreadServer(devices))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


def connect(path: str, name: str = "", structured: bool = True) -> RawClient:
    c = RawClient(path)
    c.handshake()
    c.go(name, structured=structured, meta=structured)
    return c


def test_t15_shutdown_finishes_in_flight_and_refuses_new(thread_server: Any) -> None:
    device = GatedDevice(4 * MiB)
    device.gate_offset = MiB
    srv = thread_server(disk=device)
    with connect(srv.socket) as c, connect(srv.socket, structured=False) as idle:
        c.request(p.CMD_WRITE, MiB, 4096, payload=b"\x77" * 4096)
        c.send_request(p.CMD_READ, 1, MiB, 4096)  # waits on the gate
        assert device.waiting.wait(5)
        done = srv.shutdown_soon()
        assert wait_until(lambda: srv.server.shutting_down, 5)
        # New requests during shutdown: ESHUTDOWN, while the first is still in flight.
        c.send_request(p.CMD_READ, 2, 0, 4096)
        c.send_request(p.CMD_WRITE, 3, 0, 4096, payload=b"\x01" * 4096)
        replies = c.replies(2)
        assert replies[2].errno == p.NBD_ESHUTDOWN and not replies[2].simple
        assert replies[3].errno == p.NBD_ESHUTDOWN
        assert not done.done()
        srv.call(device.gate.set)
        reply = c.replies(1)[1]
        assert read_data(reply, MiB, 4096) == b"\x77" * 4096
        assert c.is_closed()
        assert idle.is_closed()  # a connection with nothing in flight just closes
        done.result(10)
    assert device.allocated  # the refused WRITE did not run: offset 0 stayed a hole
    assert 0 not in device._pages


def test_shutdown_during_handshake(thread_server: Any) -> None:
    srv = thread_server(disk=MemoryDevice(MiB))
    with RawClient(srv.socket) as c:
        c.handshake()
        srv.shutdown_soon().result(10)
        c.send_unless_closed(struct.pack(">QII", p.IHAVEOPT, p.OPT_GO, 6) + bytes(6))
        # Idle in the handshake, it was hung up on at once (REP_ERR_SHUTDOWN answers an
        # option the server is handling when the shutdown comes).
        with pytest.raises(Closed):
            c.read_option_reply()
        assert c.is_closed()


def test_out_of_order_replies(thread_server: Any) -> None:
    device = GatedDevice(4 * MiB)
    device.gate_offset = 0
    srv = thread_server(disk=device)
    with connect(srv.socket) as c:
        c.send_request(p.CMD_READ, 10, 0, 512)  # blocked
        assert device.waiting.wait(5)
        c.send_request(p.CMD_READ, 11, 4096, 512)
        c.send_request(p.CMD_WRITE, 12, 8192, 512, payload=b"a" * 512)
        order: list[int] = []
        replies: dict[int, Any] = {}
        while len(order) < 2:
            cookie = c.read_message(replies)
            if cookie is not None:
                order.append(cookie)
        assert sorted(order) == [11, 12]
        srv.call(device.gate.set)
        while (cookie := c.read_message(replies)) is None:
            pass
        assert cookie == 10


def test_t13_flush_and_fua_reach_the_device(thread_server: Any) -> None:
    device = CountingDevice(4 * MiB)
    srv = thread_server(disk=device)
    with connect(srv.socket) as c:
        # Two writes in flight (the first finishes last), both replied to, then FLUSH.
        c.send_request(p.CMD_WRITE, 1, 0, 512, payload=b"x" * 512)
        c.send_request(p.CMD_WRITE, 2, 4096, 512, payload=b"y" * 512)
        assert all(r.errno == 0 for r in c.replies(2).values())
        assert c.request(p.CMD_FLUSH).errno == 0
        assert device.events == [("write", 4096, False), ("write", 0, False),
                                 ("flush", 0, False)]
        device.events.clear()
        c.request(p.CMD_WRITE, 8192, 512, p.CMD_FLAG_FUA, payload=b"z" * 512)
        c.request(p.CMD_TRIM, 8192, 512, p.CMD_FLAG_FUA)
        c.request(p.CMD_WRITE_ZEROES, 8192, 512, p.CMD_FLAG_FUA)
        c.request(p.CMD_READ, 0, 512, p.CMD_FLAG_FUA)  # accepted, ignored on a READ
        assert device.events == [("write", 8192, True), ("trim", 8192, True),
                                 ("zero", 8192, True)]


def test_t9_alignment_to_advertised_minimum(thread_server: Any) -> None:
    device = MemoryDevice(4 * MiB, BlockSize(512, 4096, MiB))
    srv = thread_server(disk=device)
    with RawClient(srv.socket) as c:
        c.handshake()
        c.option(p.OPT_STRUCTURED_REPLY)
        # The constraint is sent even to a client that did not ask for it.
        replies = c.option(p.OPT_INFO, p.info_request("", []))
        sizes = [r.data for r in replies if r.reply_type == p.REP_INFO
                 and struct.unpack_from(">H", r.data)[0] == p.INFO_TYPE_BLOCK_SIZE]
        assert sizes == [struct.pack(">HIII", 3, 512, 4096, MiB)]
        c.go("")
        for cmd, offset, length in ((p.CMD_READ, 1, 512), (p.CMD_READ, 0, 100),
                                    (p.CMD_WRITE, 512, 513), (p.CMD_TRIM, 100, 512),
                                    (p.CMD_WRITE_ZEROES, 0, 1), (p.CMD_CACHE, 3, 512),
                                    (p.CMD_BLOCK_STATUS, 1, 512)):
            assert c.request(cmd, offset, length).errno == p.NBD_EINVAL, (cmd, offset, length)
        assert c.request(p.CMD_READ, 0, MiB + 512).errno == p.NBD_EINVAL
        assert c.request(p.CMD_WRITE, 0, MiB + 512).errno == p.NBD_EINVAL  # drained
        assert c.request(p.CMD_READ, 0, 2 * MiB, p.CMD_FLAG_DF).errno == p.NBD_EOVERFLOW
        assert c.request(p.CMD_WRITE_ZEROES, 0, 2 * MiB).errno == 0  # no payload, no limit
        assert c.read(512, 1024) == bytes(1024)


@pytest.mark.parametrize("structured", [True, False])
def test_device_errors_reach_the_client(thread_server: Any, structured: bool) -> None:
    srv = thread_server(disk=FailingDevice(256 * MiB))
    with connect(srv.socket, structured=structured) as c:
        cases = [(errno.EIO, p.NBD_EIO), (errno.ENOSPC, p.NBD_ENOSPC),
                 (errno.EDQUOT, p.NBD_ENOSPC), (errno.EFBIG, p.NBD_ENOSPC),
                 (errno.EROFS, p.NBD_EPERM), (errno.ENOMEM, p.NBD_ENOMEM),
                 (errno.ENOENT, p.NBD_EIO), (0x7F, p.NBD_EIO)]
        for code, expected in cases:
            for cmd in (p.CMD_READ, p.CMD_WRITE, p.CMD_TRIM):
                reply = c.request(cmd, code * MiB, 4096)
                assert reply.errno == expected, (p.CMD_NAMES[cmd], code, reply)
                if structured and cmd == p.CMD_READ:
                    assert not reply.simple
        assert c.read(0, 4096) == bytes(4096)  # still in sync
