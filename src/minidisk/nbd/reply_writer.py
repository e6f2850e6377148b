"""The replies of one NBD connection on their way out (research/python-stack.md §2).

Replies are appended whole to one list and handed to the transport in one `writelines`
(uvloop: one writev, from the buffers themselves): at the end of the parsing pass that
produced them, or, for a request that finished later (in a task), on the next loop
iteration. So replies go out of order but never interleaved, and a depth-32 batch costs
one system call. Data goes out from the buffer the device filled, never copied.

Write back-pressure is the connection's to act on (it stops reading); the writer keeps
the payload budget of the replies in flight: READ and BLOCK_STATUS replies hold their
bytes (`unsent`) until the transport takes them under its high-water mark, or, when it is
over it, until it drains (`held`; a client that stops reading is then watched for
progress).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable

from minidisk import busypoll
from minidisk.nbd import protocol as p
from minidisk.nbd.buffers import MIN_POOLED, BufferPool

Part = bytes | bytearray | memoryview

# Unix sockets: a larger send buffer lets a 1 MiB READ reply go out in one or two writevs,
# where the default (wmem_default, 208 KiB) took five, each after an EPOLLOUT wake-up:
# 1 MiB reads at depth 1 ran 1.2 -> 1.6 GiB/s with a 4 MiB one (server and fio pinned to
# a vCPU each). The kernel doubles the value and caps it at 2 * net.core.wmem_max. What a client
# that stops reading pins is kernel memory up to this per connection, so the server asks
# for no more than its payload budget spread over its connection limit (tune_send_buffer).
UNIX_SNDBUF = 1024 * 1024

_SIMPLE_OK = p.SIMPLE_REPLY_MAGIC
# The head of a READ reply that is one OFFSET_DATA chunk (the common case): p.CHUNK and
# p.OFFSET packed at once, for one pack and one part less per READ than read_reply's.
_DATA_CHUNK_HEAD = struct.Struct(">IHHQIQ")


class ReplyWriter:
    def __init__(self, loop: asyncio.AbstractEventLoop, pool: BufferPool,
                 give: Callable[[int], None], stalled: Callable[[], None]) -> None:
        self.loop = loop
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.poller: busypoll.AsyncioPoller | None = None
        self.out: list[Part] = []
        self.out_bytes = 0
        self.scheduled = False  # a flush is due: on the next iteration or after this pass
        self.paused = False  # the transport is over its high-water mark
        self.unsent = 0  # payload budget of the replies in `out`
        self.held = 0  # ... and of those in a transport buffer over its high-water mark
        self._give = give  # payload budget bytes back to the connection
        self._stalled = stalled  # held bytes wait on the client: watch its progress

    def send(self, *parts: Part) -> None:
        if self.transport is None:
            return
        self.out.extend(parts)
        for part in parts:
            self.out_bytes += len(part)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush)

    def begin_pass(self) -> bool:
        """Replies made until end_pass wait for it (one writev for all of them); returns
        whether a flush was due already."""
        due = self.scheduled
        self.scheduled = True
        return due

    def end_pass(self, due: bool) -> None:
        if not due:  # else the flush already scheduled sends them, on the next iteration
            self.flush()

    def flush(self) -> None:
        self.scheduled = False
        transport = self.transport
        if self.out and transport is not None and not transport.is_closing():
            out, self.out = self.out, []
            self.out_bytes = 0
            transport.writelines(out)  # calls pause_writing if it goes over high water
            if self.poller is not None:  # the client's next request comes soon
                self.poller.poke()
        if self.unsent:
            unsent, self.unsent = self.unsent, 0
            if self.paused and self.transport is not None:
                self.held += unsent  # still in memory, in the transport's buffer
                self._stalled()
            else:
                self._give(unsent)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        if self.held:
            held, self.held = self.held, 0
            self._give(held)

    def discard(self) -> int:
        """The connection is gone: drop what was not sent; return the budget it held."""
        self.transport = None
        self.out.clear()
        self.out_bytes = 0
        budget, self.unsent, self.held = self.unsent + self.held, 0, 0
        return budget

    # -- replies --

    def ok(self, cookie: int) -> None:
        """A simple reply without error (the hot path of every request but READ)."""
        if self.transport is None:
            return
        self.out.append(p.SIMPLE_REPLY.pack(_SIMPLE_OK, 0, cookie))
        self.out_bytes += p.SIMPLE_REPLY.size
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush)

    def fail(self, cookie: int, cmd: int, structured: bool, error: int, message: str) -> None:
        self.send(p.error_reply(cookie, cmd, structured, error, message))

    def read_buffer(self, length: int) -> bytearray:
        """A buffer for a READ reply of `length` bytes, its content unspecified: the
        device fills it (or reports holes, which are not sent)."""
        return self.pool.take(length) if length >= MIN_POOLED else bytearray(length)

    def data(self, cookie: int, offset: int, buf: bytearray, view: memoryview,
             holes: list[tuple[int, int]], structured: bool, charge: int) -> None:
        """A READ's reply from `view` of `buf`; `charge`: the payload budget it holds
        until the transport has it. `buf` goes back to the pool, to be reused once the
        transport has let go of it."""
        if self.transport is None:
            self._give(charge)
            return
        length = len(view)
        if structured and length and not holes:
            self.out += (_DATA_CHUNK_HEAD.pack(p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE,
                                               p.REPLY_TYPE_OFFSET_DATA, cookie,
                                               p.OFFSET.size + length, offset), view)
            self.out_bytes += _DATA_CHUNK_HEAD.size + length
            if not self.scheduled:
                self.scheduled = True
                self.loop.call_soon(self.flush)
        else:
            self.send(*p.read_reply(cookie, offset, view, holes, structured))
        self.unsent += charge
        if length >= MIN_POOLED:
            self.pool.give(buf)


def tune_send_buffer(sock: socket.socket | None, budget: int, connections: int) -> None:
    """Raise a unix socket's send buffer (see UNIX_SNDBUF) to at most budget/connections;
    TCP keeps its autotuning."""
    size = min(UNIX_SNDBUF, budget // max(connections, 1))
    if sock is None or sock.family != socket.AF_UNIX:
        return
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < size:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
    except OSError:  # not fatal: the default is only slower
        pass
