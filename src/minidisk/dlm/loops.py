"""What the lock-manager client needs from its event loop, for asyncio and for trio.

Why both: the same client runs inside the NBD daemon and automounter (asyncio) and inside
dlmfs (trio, under pyfuse3). The connection (`client.py`) is written once; this module is the
part that differs: how a non-blocking socket is watched (on asyncio a reader callback -- no
task, no stream object; on trio one reader task and one writer task) and what a one-shot
future is. Waiting on either is cancelled by the caller's anyio cancel scope as usual.

Nothing here knows the protocol: an adapter drives any `Driven` connection.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any, Protocol

import anyio

from minidisk import busypoll

_trio: Any = None  # the trio module, imported by the first trio connection


class Waiter(Protocol):
    """A one-shot future: settled once (later settles are ignored), awaited by one task."""

    def settle(self, value: Any) -> None: ...
    def wait(self) -> Any: ...  # an awaitable of the value


class Driven(Protocol):
    """What a loop adapter calls back on the connection it watches."""

    closed: bool
    blocked: bool  # the kernel's send buffer is full

    def on_readable(self) -> bool:
        """Read and dispatch what arrived; False once the connection is gone."""

    def write_pending(self) -> bool:
        """Hand buffered requests to the kernel; True once none is left."""

    def flush_deferred(self) -> None:
        """Send what was deferred to the end of this step of the loop."""

    def expecting(self) -> bool:
        """Is a reply due (worth busy-polling for)?"""


class _AioFuture(asyncio.Future[Any]):
    """An asyncio future that can be settled twice (the second time is ignored)."""

    __slots__ = ()

    def settle(self, value: Any) -> None:
        if not self.done():
            self.set_result(value)

    def wait(self) -> _AioFuture:
        return self


class _TrioFuture:
    """A one-shot future on trio: the waiting task parks itself and is rescheduled directly
    (cheaper than a `trio.Event`, whose parking lot a single waiter does not need)."""

    __slots__ = ("_done", "_tasks", "_value")

    def __init__(self) -> None:
        self._done = False
        self._value: Any = None
        self._tasks: list[Any] = []

    def settle(self, value: Any) -> None:
        if not self._done:
            self._done = True
            self._value = value
            tasks, self._tasks = self._tasks, []
            for task in tasks:
                _trio.lowlevel.reschedule(task)

    async def wait(self) -> Any:
        if not self._done:
            lowlevel = _trio.lowlevel
            task = lowlevel.current_task()
            self._tasks.append(task)

            def abort(_: Any) -> Any:
                self._tasks.remove(task)
                return lowlevel.Abort.SUCCEEDED

            await lowlevel.wait_task_rescheduled(abort)
        return self._value


class LoopIo:
    """What differs between asyncio and trio: waiting for the socket, and futures."""

    poller: busypoll.AsyncioPoller | busypoll.TrioPoller

    def future(self) -> Waiter:
        raise NotImplementedError

    def want_write(self) -> None:
        """The kernel took only part: call `conn.write_pending()` whenever the socket is
        writable, until it returns True."""
        raise NotImplementedError

    def schedule_flush(self) -> None:
        """Call `conn.flush_deferred()` soon: at the end of this step of the loop."""
        raise NotImplementedError

    async def run(self, tasks: anyio.abc.TaskGroup) -> None:
        raise NotImplementedError

    def stop_reading(self) -> None:
        """The connection broke: stop watching it."""

    def stop(self) -> None:
        """The socket is about to be closed."""


class AsyncioIo(LoopIo):
    def __init__(self, conn: Driven, sock: socket.socket, busy_poll: float) -> None:
        self.conn = conn
        self.loop = asyncio.get_running_loop()
        self.fd = sock.fileno()
        self.reading = False
        self.poller = busypoll.AsyncioPoller(self.loop, busy_poll, conn.expecting)

    def future(self) -> Waiter:
        return _AioFuture(loop=self.loop)

    async def run(self, tasks: anyio.abc.TaskGroup) -> None:
        self.loop.add_reader(self.fd, self.conn.on_readable)
        self.reading = True

    def want_write(self) -> None:
        self.loop.add_writer(self.fd, self._on_writable)

    def schedule_flush(self) -> None:
        self.loop.call_soon(self.conn.flush_deferred)

    def _on_writable(self) -> None:
        if self.conn.write_pending():
            self.loop.remove_writer(self.fd)

    def stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.fd)

    def stop(self) -> None:
        self.stop_reading()
        self.loop.remove_writer(self.fd)


class TrioIo(LoopIo):
    def __init__(self, conn: Driven, sock: socket.socket, busy_poll: float) -> None:
        global _trio
        import trio

        _trio = self.trio = trio
        self.conn = conn
        self.sock = sock
        self.woken = False
        self.writer: Any = None  # the write loop's task while it sleeps
        self.poller: busypoll.TrioPoller = busypoll.TrioPoller(trio, busy_poll, conn.expecting)

    def future(self) -> Waiter:
        return _TrioFuture()

    async def run(self, tasks: anyio.abc.TaskGroup) -> None:
        tasks.start_soon(self._read_loop)
        tasks.start_soon(self._write_loop)
        if self.poller.budget > 0:
            tasks.start_soon(self.poller.run)

    async def _read_loop(self) -> None:
        conn, sock, wait_readable = self.conn, self.sock, self.trio.lowlevel.wait_readable
        try:
            while not conn.closed:
                await wait_readable(sock)
                if not conn.on_readable():
                    return
        except self.trio.ClosedResourceError:
            return

    async def _write_loop(self) -> None:
        conn = self.conn
        lowlevel = self.trio.lowlevel

        def abort(_: Any) -> Any:
            self.writer = None
            return lowlevel.Abort.SUCCEEDED

        try:
            while True:
                if not self.woken:
                    self.writer = lowlevel.current_task()
                    await lowlevel.wait_task_rescheduled(abort)
                self.woken = False
                conn.flush_deferred()
                while conn.blocked and not conn.write_pending():
                    await lowlevel.wait_writable(self.sock)
        except self.trio.ClosedResourceError:
            return

    def _wake(self) -> None:
        self.woken = True
        writer, self.writer = self.writer, None
        if writer is not None:
            self.trio.lowlevel.reschedule(writer)

    def want_write(self) -> None:
        self._wake()

    def schedule_flush(self) -> None:
        self._wake()

    def stop(self) -> None:
        self.trio.lowlevel.notify_closing(self.sock)


def on_trio() -> bool:
    """Which loop runs us: asyncio has a running loop in this thread, trio has not."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return True
    return False


def loop_io(conn: Driven, sock: socket.socket, busy_poll: float) -> LoopIo:
    """The adapter for the loop running us."""
    return (TrioIo if on_trio() else AsyncioIo)(conn, sock, busy_poll)


async def connect_unix(path: str) -> socket.socket:
    """A non-blocking unix stream socket connected to `path`, on the loop running us."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if on_trio():
            import trio

            try:
                sock.connect(path)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err), path) from None
        else:
            await asyncio.get_running_loop().sock_connect(sock, path)
    except BaseException:
        sock.close()
        raise
    return sock
